//! Writing the outputs: the append-only sessions table, the MERGE-upserted live table, and the
//! optional late/invalid rows table.
//!
//! Every commit carries the checkpoint's application transaction (`txn`): app id of the
//! checkpoint, version = batch sequence number. delta-rs does not skip a commit whose txn is
//! already recorded, so each write first reads the recorded version on the very table it then
//! writes with, and skips when the batch is already there. An error that comes back from a
//! commit may have arrived after the commit became durable (post-commit hooks), so errors are
//! re-checked against the txn before they are believed.

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Schema};
use datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError, TableProperty};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::config::TableLocation;
use crate::error::{Error, Result};

/// Creates a Delta table with this Arrow schema (optionally `delta.appendOnly = true`).
pub async fn create_table(
    loc: &TableLocation,
    schema: &Schema,
    append_only: bool,
) -> Result<DeltaTable> {
    if let Some(p) = loc.local_path() {
        std::fs::create_dir_all(&p)?;
    }
    let kernel: StructType = schema.try_into_kernel()?;
    let table = loc.builder()?.build()?;
    let mut create = table.create().with_columns(kernel.fields().cloned());
    if append_only {
        create = create.with_configuration_property(TableProperty::AppendOnly, Some("true"));
    }
    match create.await {
        Ok(t) => Ok(t),
        // Another writer created it between our look and our create: use theirs.
        Err(e) if e.to_string().contains("already exists") => load(loc).await,
        Err(e) => Err(e.into()),
    }
}

async fn load(loc: &TableLocation) -> Result<DeltaTable> {
    Ok(loc.builder()?.load().await?)
}

/// Opens an output table, creating it on first use; refuses one whose columns do not fit.
pub async fn open_or_create(
    loc: &TableLocation,
    schema: &Schema,
    append_only: bool,
    flag: &str,
) -> Result<DeltaTable> {
    let Some(table) = crate::source::try_load(loc).await? else {
        return create_table(loc, schema, append_only).await;
    };
    check_schema(&table, schema, loc, flag)?;
    Ok(table)
}

/// Every column we write must exist in the table with the same type.
fn check_schema(table: &DeltaTable, want: &Schema, loc: &TableLocation, flag: &str) -> Result<()> {
    let have = table.snapshot()?.snapshot().arrow_schema();
    let describe = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for f in want.fields() {
        let ok = have
            .field_with_name(f.name())
            .map(|h| same_type(h.data_type(), f.data_type()))
            .unwrap_or(false);
        if !ok {
            return Err(Error::usage(format!(
                "{flag} `{loc}` already holds a table whose columns do not fit this run: column \
                 `{}` {} is needed, the table has [{}]. Point {flag} at a new location, or run \
                 with the settings (--key, --collect, --sum) that made this table",
                f.name(),
                f.data_type(),
                describe(&have)
            )));
        }
    }
    Ok(())
}

/// Type equality that ignores nullability, list item names, and string/view encodings.
fn same_type(a: &DataType, b: &DataType) -> bool {
    use DataType::*;
    match (a, b) {
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        (List(x) | LargeList(x), List(y) | LargeList(y)) => same_type(x.data_type(), y.data_type()),
        (Struct(x), Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.name() == q.name() && same_type(p.data_type(), q.data_type()))
        }
        (Timestamp(u, _), Timestamp(v, _)) => u == v,
        _ => a == b,
    }
}

/// The txn version this app last recorded on the table.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>> {
    Ok(table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?)
}

/// Turns a commit error into success when the commit is durable after all.
pub async fn committed_or_recheck(
    result: std::result::Result<DeltaTable, DeltaTableError>,
    loc: &TableLocation,
    app_id: &str,
    seq: i64,
) -> Result<DeltaTable> {
    match result {
        Ok(t) => Ok(t),
        Err(e) => {
            let table = load(loc).await?;
            if txn_version(&table, app_id).await? >= Some(seq) {
                tracing::warn!("commit to {loc} reported `{e}` but is durable; continuing");
                Ok(table)
            } else {
                Err(e.into())
            }
        }
    }
}

/// Parquet settings for appends: Snappy as delta-rs does by default, no dictionary for
/// integer and timestamp columns (their values are nearly all distinct, so a dictionary is
/// built and then abandoned), and neither dictionary nor compression for the session id, a
/// random hex string that neither can shrink.
fn append_writer_properties(schema: &Schema) -> WriterProperties {
    let mut b = WriterProperties::builder().set_compression(Compression::SNAPPY);
    if let Ok(descr) = parquet::arrow::ArrowSchemaConverter::new().convert(schema) {
        for col in descr.columns() {
            if matches!(
                col.physical_type(),
                parquet::basic::Type::INT64 | parquet::basic::Type::INT32
            ) {
                b = b.set_column_dictionary_enabled(col.path().clone(), false);
            }
        }
    }
    for id in ["session_id", "session_uid"] {
        b = b
            .set_column_dictionary_enabled(ColumnPath::from(id), false)
            .set_column_compression(ColumnPath::from(id), Compression::UNCOMPRESSED);
    }
    b.build()
}

/// Appends `batches` in one commit carrying `props`, encoding their Parquet files on every
/// core: each batch is cut into up to one slice per core, each slice written by its own writer
/// task, and the files are committed together. (delta-rs's `write` encodes one in-memory
/// batch on one thread.)
async fn append_parallel(
    table: DeltaTable,
    batches: Vec<RecordBatch>,
    props: CommitProperties,
) -> std::result::Result<DeltaTable, DeltaTableError> {
    use deltalake::kernel::Action;
    use deltalake::kernel::transaction::CommitBuilder;
    use deltalake::protocol::DeltaOperation;
    use deltalake::writer::{DeltaWriter, RecordBatchWriter};

    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    // Below a few hundred thousand rows one writer is as fast and makes one file.
    let mut slices = Vec::new();
    for batch in batches.iter().filter(|b| b.num_rows() > 0) {
        let n = batch.num_rows();
        let chunk = n.div_ceil((n / 250_000).clamp(1, cores));
        slices.extend(
            (0..n)
                .step_by(chunk)
                .map(|s| batch.slice(s, chunk.min(n - s))),
        );
    }
    drop(batches);
    let wp = append_writer_properties(&slices[0].schema());
    let mut tasks = Vec::with_capacity(slices.len());
    for slice in slices {
        let mut writer = RecordBatchWriter::for_table(&table)?.with_writer_properties(wp.clone());
        tasks.push(tokio::spawn(async move {
            writer.write(slice).await?;
            writer.flush().await
        }));
    }
    let mut actions = Vec::new();
    for task in tasks {
        let adds = task
            .await
            .map_err(|e| DeltaTableError::Generic(format!("a writer task failed: {e}")))??;
        actions.extend(adds.into_iter().map(Action::Add));
    }
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let committed = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(table.snapshot()?), table.log_store(), operation)
        .await?;
    // Replays just the commit made here onto the table's snapshot.
    let mut table = table;
    table.update_incremental(Some(committed.version())).await?;
    Ok(table)
}

fn txn_props(app_id: &str, seq: i64) -> CommitProperties {
    CommitProperties::default().with_application_transaction(Transaction::new(app_id, seq))
}

/// Appends `batches` in one commit unless batch `seq` of `app_id` is already in the table.
/// Returns whether it wrote.
pub async fn append_once(
    table: DeltaTable,
    loc: &TableLocation,
    batches: Vec<RecordBatch>,
    app_id: &str,
    seq: i64,
) -> Result<(DeltaTable, bool)> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok((table, false));
    }
    if txn_version(&table, app_id).await? >= Some(seq) {
        tracing::info!("{loc} already holds batch {seq}; skipping (replay after a crash)");
        return Ok((table, false));
    }
    let result = append_parallel(table, batches, txn_props(app_id, seq)).await;
    Ok((committed_or_recheck(result, loc, app_id, seq).await?, true))
}

/// MERGE-upserts the live rows on the key columns unless batch `seq` is already recorded.
/// Returns the number of rows inserted or updated.
pub async fn merge_live(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keys: &[String],
    app_id: &str,
    seq: i64,
) -> Result<(DeltaTable, usize)> {
    if rows.num_rows() == 0 {
        return Ok((table, 0));
    }
    if txn_version(&table, app_id).await? >= Some(seq) {
        tracing::info!("{loc} already holds batch {seq}; skipping (replay after a crash)");
        return Ok((table, rows.num_rows()));
    }
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let predicate = keys
        .iter()
        .map(|k| format!("target.{} = source.{}", q(k), q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let columns: Vec<String> = rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let ctx = SessionContext::new();
    let source = ctx.read_batch(rows)?;
    let result = table
        .merge(source, predicate)
        .with_source_alias("source")
        .with_target_alias("target")
        .when_matched_update(|mut u| {
            for c in columns.iter().filter(|c| !keys.contains(c)) {
                u = u.update(q(c), format!("source.{}", q(c)));
            }
            u
        })?
        .when_not_matched_insert(|mut i| {
            for c in &columns {
                i = i.set(q(c), format!("source.{}", q(c)));
            }
            i
        })?
        .with_commit_properties(txn_props(app_id, seq))
        .await;
    match result {
        Ok((t, m)) => Ok((t, m.num_target_rows_inserted + m.num_target_rows_updated)),
        Err(e) => {
            let t = committed_or_recheck(Err(e), loc, app_id, seq).await?;
            Ok((t, 0))
        }
    }
}
