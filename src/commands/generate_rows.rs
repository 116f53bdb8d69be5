//! `sessionizer generate-rows`: demo events, appended to the events table in one commit.
//!
//! This is the one place that reads the wall clock (when `--at` is not given): the demo is
//! about "now". Random rows come from a seeded generator, so `--seed` makes them repeatable.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use chrono::{DateTime, NaiveDateTime, Utc};
use datafusion::prelude::SessionContext;
use deltalake::protocol::SaveMode;
use rand::{Rng, SeedableRng};

use crate::cli::GenerateArgs;
use crate::config::TableLocation;
use crate::error::{Error, Result};

/// The demo schema: `user_id BIGINT, visit_time TIMESTAMP, page STRING`.
pub fn demo_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, true),
        Field::new(
            "visit_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("page", DataType::Utf8, true),
    ]))
}

/// Parses `--at`: RFC 3339, or `YYYY-MM-DD HH:MM:SS[.f]` read as UTC.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::usage(format!(
        "--at `{s}` is not a time; write it like 2026-02-15T17:05:34Z or \"2026-02-15 17:05:34\" (UTC)"
    )))
}

/// Rows to append: `(user_id, time_us, page)`.
pub type Rows = Vec<(i64, i64, String)>;

/// The reference rows: user 1 twice, users 2 and 3 once each, all at `at`.
pub fn reference_rows(at_us: i64) -> Rows {
    vec![
        (1, at_us, "page_1.html".into()),
        (1, at_us, "page_2.html".into()),
        (2, at_us, "page_3.html".into()),
        (3, at_us, "page_4.html".into()),
    ]
}

/// Random rows: `users` users with `per_user` events each, a few minutes apart, from `at` on.
pub fn random_rows(at_us: i64, users: u64, per_user: u64, seed: u64) -> Rows {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity((users * per_user) as usize);
    for u in 1..=users as i64 {
        let mut t = at_us + rng.random_range(0..600_000_000i64);
        for _ in 0..per_user {
            rows.push((u, t, format!("page_{}.html", rng.random_range(1..=20))));
            t += rng.random_range(1_000_000..300_000_000i64);
        }
    }
    rows
}

fn to_batch(rows: &Rows) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        demo_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.2.as_str()),
            )),
        ],
    )?)
}

/// The latest event time and largest user id already in the table.
async fn latest_event(loc: &TableLocation) -> Result<Option<(i64, i64)>> {
    let Some(table) = crate::delta::try_load(loc).await? else {
        return Ok(None);
    };
    let ctx = SessionContext::new();
    ctx.register_table("events", table.table_provider().await?)?;
    let b = ctx
        .sql("SELECT max(visit_time) AS t, max(user_id) AS u FROM events")
        .await?
        .collect()
        .await?;
    let Some(b) = b.first().filter(|b| b.num_rows() == 1) else {
        return Ok(None);
    };
    let t = arrow::compute::cast(
        b.column(0),
        &DataType::Timestamp(TimeUnit::Microsecond, None),
    )?;
    let t = t.as_primitive::<TimestampMicrosecondType>();
    let u = arrow::compute::cast(b.column(1), &DataType::Int64)?;
    let u = u.as_primitive::<Int64Type>();
    Ok((t.is_valid(0) && u.is_valid(0)).then(|| (t.value(0), u.value(0))))
}

/// Appends rows to the events table (created on first use) in one commit.
pub async fn append(loc: &TableLocation, rows: &Rows, key_buckets: Option<u32>) -> Result<i64> {
    append_batch(loc, to_batch(rows)?, key_buckets).await
}

/// The column `--key-buckets` adds: Spark's `pmod(xxhash64(user_id), B)`.
pub const BUCKET_COLUMN: &str = "bucket";

/// Appends one batch to a table (created with the batch's schema on first use) in one commit.
/// With `key_buckets`, each row also gets its key's bucket in [`BUCKET_COLUMN`], and the
/// table is partitioned by it, as a Spark job that writes for `sessionize --key-buckets` does.
pub async fn append_batch(
    loc: &TableLocation,
    batch: RecordBatch,
    key_buckets: Option<u32>,
) -> Result<i64> {
    if key_buckets == Some(0) {
        return Err(Error::usage(
            "--key-buckets 0: a table needs at least one bucket",
        ));
    }
    let existing = crate::delta::try_load(loc).await?;
    let bucketed = match &existing {
        Some(t) => crate::delta::arrow_schema(t)?
            .field_with_name(BUCKET_COLUMN)
            .is_ok(),
        None => key_buckets.is_some(),
    };
    let batch = match (bucketed, key_buckets) {
        (false, None) => batch,
        (false, Some(_)) => {
            return Err(Error::usage(format!(
                "--key-buckets adds a `{BUCKET_COLUMN}` column, but `{loc}` was created \
                 without one; generate into a new --events location"
            )));
        }
        (true, None) => {
            return Err(Error::usage(format!(
                "`{loc}` is partitioned by key bucket (its `{BUCKET_COLUMN}` column); pass the \
                 --key-buckets B it was created with"
            )));
        }
        (true, Some(b)) => with_bucket(batch, b)?,
    };
    let table = match existing {
        Some(t) => {
            crate::delta::check_schema(&t, &batch.schema(), loc, "--events")?;
            t
        }
        None if bucketed => {
            crate::delta::create_partitioned(loc, &batch.schema(), false, &[BUCKET_COLUMN]).await?
        }
        None => crate::delta::create_table(loc, &batch.schema(), false).await?,
    };
    let table = table
        .write(vec![batch])
        .with_save_mode(SaveMode::Append)
        .await?;
    Ok(table.version().map_or(0, |v| v as i64))
}

/// `batch` with each row's key bucket added, as Spark computes it.
fn with_bucket(batch: RecordBatch, buckets: u32) -> Result<RecordBatch> {
    let keys = [batch
        .column_by_name("user_id")
        .expect("demo schema")
        .clone()];
    let bucket = Int64Array::from(crate::engine::spark_buckets(&keys, buckets)?);
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(BUCKET_COLUMN, DataType::Int64, true)));
    let mut cols = batch.columns().to_vec();
    cols.push(Arc::new(bucket));
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// `--at`, or the current time: the one place the generator reads the wall clock.
fn at_micros(args: &GenerateArgs) -> Result<i64> {
    Ok(match &args.at {
        Some(s) => parse_time(s)?,
        None => Utc::now(),
    }
    .timestamp_micros())
}

/// What `generate-rows` will append for these flags.
pub async fn rows_for(args: &GenerateArgs, loc: &TableLocation) -> Result<Rows> {
    let at = at_micros(args)?;
    if args.closing {
        let (t, u) = latest_event(loc).await?.ok_or_else(|| {
            Error::usage(format!(
                "--closing appends an event 61 minutes after the latest one, but `{loc}` has no events yet; run `sessionizer generate-rows` first"
            ))
        })?;
        return Ok(vec![(u + 1, t + 61 * 60_000_000, "page_1.html".into())]);
    }
    match (args.users, args.per_user) {
        (None, None) => Ok(reference_rows(at)),
        (u, p) => Ok(random_rows(at, u.unwrap_or(3), p.unwrap_or(2), args.seed)),
    }
}

/// Bulk mode: `total` events of `users` users over `commits` commits, built column by column.
///
/// Event times cover ten hours from `at`; commit `c` holds the `c`-th slice of that span, so a
/// backlog read in order looks like a day of traffic arriving. Each user visits a handful of
/// times, so most users have a few sessions with the default 30-minute gap.
pub fn bulk_batch(
    at_us: i64,
    users: u64,
    rows: u64,
    commit: u64,
    commits: u64,
    seed: u64,
) -> Result<RecordBatch> {
    const SPAN_US: i64 = 10 * 3_600_000_000;
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ commit);
    let slice = SPAN_US / commits.max(1) as i64;
    let from = at_us + slice * commit as i64;
    let n = rows as usize;
    let users = users.max(1) as i64;
    let user_ids = Int64Array::from_iter_values((0..n).map(|_| rng.random_range(1..=users)));
    let times = TimestampMicrosecondArray::from_iter_values(
        (0..n).map(|_| from + rng.random_range(0..slice.max(1))),
    )
    .with_timezone("UTC");
    let names: Vec<String> = (1..=50).map(|p| format!("page_{p}.html")).collect();
    let pages = StringArray::from_iter_values(
        (0..n).map(|_| names[rng.random_range(0..names.len())].as_str()),
    );
    Ok(RecordBatch::try_new(
        demo_schema(),
        vec![Arc::new(user_ids), Arc::new(times), Arc::new(pages)],
    )?)
}

pub async fn command(args: &GenerateArgs, out: &mut dyn Write) -> Result<()> {
    let loc = args.tables.resolve().events;
    if let Some(total) = args.rows {
        let at = at_micros(args)?;
        let commits = args.commits.max(1);
        let users = args.users.unwrap_or((total / 11).max(1));
        let mut version = 0;
        for c in 0..commits {
            let rows = total / commits + u64::from(c < total % commits);
            version = append_batch(
                &loc,
                bulk_batch(at, users, rows, c, commits, args.seed)?,
                args.key_buckets,
            )
            .await?;
        }
        writeln!(
            out,
            "generate-rows: appended {total} rows of {users} users in {commits} commit(s) to {loc}, up to version {version}"
        )?;
        return Ok(());
    }
    if let Some(scenario) = args.scenario {
        let batch = scenario.rows(at_micros(args)?, args.seed);
        let n = batch.num_rows();
        let version = append_batch(&loc, batch, None).await?;
        writeln!(
            out,
            "generate-rows: appended {n} {} rows to {loc} as version {version}",
            scenario.name()
        )?;
        return Ok(());
    }
    let rows = rows_for(args, &loc).await?;
    let version = append(&loc, &rows, args.key_buckets).await?;
    writeln!(
        out,
        "generate-rows: appended {} rows to {loc} as version {version}",
        rows.len()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rows_repeat_with_a_seed_and_differ_without() {
        let a = random_rows(0, 5, 3, 7);
        assert_eq!(a, random_rows(0, 5, 3, 7));
        assert_ne!(a, random_rows(0, 5, 3, 8));
        assert_eq!(a.len(), 15);
        assert!(a.iter().all(|r| (1..=5).contains(&r.0)));
    }

    #[test]
    fn times_parse_in_both_forms() {
        let a = parse_time("2026-02-15T17:05:34Z").unwrap();
        let b = parse_time("2026-02-15 17:05:34").unwrap();
        assert_eq!(a, b);
        assert!(parse_time("yesterday").is_err());
    }
}
