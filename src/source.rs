//! The events table: which versions a batch reads, what each commit did, and reading the data
//! files those commits added as normalized Arrow batches.
//!
//! A run never scans the table. It walks the commit log from the checkpoint's last version to
//! the version that was latest when the run started, classifies each commit from its actions
//! (`add`/`remove` with `dataChange`), and reads exactly the Parquet files the appends added.
//! Reading the files directly (rather than through a snapshot's table provider) means a file
//! that a later OPTIMIZE replaced is still readable at the version that added it, and the row
//! position inside each file gives the tie-break of SPEC rule 10.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, StringArray,
    new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::logical_expr::ExprSchemable;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use deltalake::kernel::Action;
use deltalake::logstore::LogStoreRef;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::ProjectionMask;

use crate::config::Shard;
use crate::config::{ByteSize, OnChangeCommit, TableLocation};
use crate::engine::{
    EventSpec, FilePiece, Markers, ShardFn, guarded_max_from_maxes, guarded_max_time, in_shard,
    kept_max_time, normalize, screen, spark_buckets, split_by_key,
};
use crate::error::{Error, Result};

/// Opens the events table at its latest version, or explains why it is not one.
pub async fn open_events(loc: &TableLocation) -> Result<DeltaTable> {
    let table = crate::delta::open_existing(
        loc,
        "--events",
        "create it with `sessionizer generate-rows`, or point --events at your table",
    )
    .await?;
    crate::delta::check_reader_features(&table, loc, "--events")?;
    Ok(table)
}

/// One data file added by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Relative path, percent-decoded by the object store when read.
    pub path: String,
    pub size: u64,
    pub partition_values: HashMap<String, Option<String>>,
    /// The add action's `modificationTime` (milliseconds).
    pub modified_ms: i64,
    /// The add action's column statistics (JSON), when the writer recorded them.
    pub stats: Option<String>,
}

/// What one source commit brings to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFiles {
    pub version: u64,
    /// New data files, sorted by path (their ordinal is the tie-break "file" coordinate).
    pub files: Vec<DataFile>,
    /// Why the commit contributes nothing, when it does not.
    pub skipped: Option<String>,
    /// When the commit was made (milliseconds since the epoch): its `commitInfo.timestamp`,
    /// else the latest modification time of the files it added. From the log, so the same on
    /// every replay; the event-time guard measures event times against it.
    pub committed_ms: Option<i64>,
}

/// Reads and classifies one commit of the events table.
pub async fn read_version(
    log_store: &LogStoreRef,
    version: u64,
    on_change: OnChangeCommit,
) -> Result<VersionFiles> {
    let actions = crate::delta::log_actions(log_store, version)
        .await?
        .ok_or_else(|| {
            Error::Source(format!(
                "version {version} of the events table is no longer in its log (removed by log \
             clean-up, see delta.logRetentionDuration), so the events it added cannot be read \
             incrementally. Start a new checkpoint (a new --checkpoint location) with \
             --starting-version set to the oldest version still in the log, and backfill the gap \
             separately if you need it"
            ))
        })?;
    let mut files = Vec::new();
    let mut removes = 0usize;
    let mut operation = String::from("unknown operation");
    let mut commit_ts: Option<i64> = None;
    let mut with_dv: Option<String> = None;
    for a in actions {
        match a {
            Action::Add(add) if add.data_change && add.deletion_vector.is_some() => {
                with_dv.get_or_insert(add.path);
            }
            Action::Add(add) if add.data_change => files.push(DataFile {
                modified_ms: add.modification_time,
                stats: add.stats,
                path: add.path,
                size: add.size.max(0) as u64,
                partition_values: add.partition_values,
            }),
            Action::Remove(r) if r.data_change => removes += 1,
            Action::CommitInfo(ci) => {
                if let Some(op) = ci.operation {
                    operation = op;
                }
                commit_ts = ci.in_commit_timestamp.or(ci.timestamp);
            }
            _ => {}
        }
    }
    if removes > 0 {
        return match on_change {
            OnChangeCommit::Fail => Err(Error::Source(format!(
                "version {version} of the events table removes data ({operation}, {removes} \
                 file(s) removed); sessions already written cannot be corrected by an \
                 append-only pipeline. If the change does not matter to sessions, rerun with \
                 --on-change-commit skip to ignore this commit; otherwise rebuild the sessions \
                 from a new checkpoint"
            ))),
            OnChangeCommit::Skip => Ok(VersionFiles {
                version,
                files: Vec::new(),
                committed_ms: commit_ts,
                skipped: Some(format!(
                    "{operation} removes data; skipped (--on-change-commit skip)"
                )),
            }),
        };
    }
    if let Some(path) = with_dv {
        return Err(Error::usage(format!(
            "version {version} of the events table adds the data file `{}` with a \
                     deletion vector (Delta table feature `deletionVectors`): some of its rows \
                     are deleted, and sessionizer reads added files whole. Nothing was written. \
                     Purge the deletion vectors (Spark: REORG TABLE ... APPLY (PURGE)) and start \
                     a new checkpoint after that version, or disable deletion vectors on the \
                     events table (delta.enableDeletionVectors = false)",
            path
        )));
    }
    let skipped = files
        .is_empty()
        .then(|| format!("{operation} adds no data"));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let committed_ms = commit_ts.or_else(|| files.iter().map(|f| f.modified_ms).max());
    Ok(VersionFiles {
        version,
        files,
        skipped,
        committed_ms,
    })
}

/// The first version committed at or after `at` (by the commit's timestamp), walking back from
/// `latest`; `latest + 1` when every commit is older (the run then waits for new ones).
pub async fn first_version_at_or_after(
    log_store: &LogStoreRef,
    latest: u64,
    at: &chrono::DateTime<chrono::Utc>,
) -> Result<u64> {
    let want = at.timestamp_millis();
    let mut first = latest + 1;
    for v in (0..=latest).rev() {
        let Some(actions) = crate::delta::log_actions(log_store, v).await? else {
            break; // older versions are gone: start at the oldest one still there
        };
        let ts = actions.into_iter().find_map(|a| match a {
            Action::CommitInfo(ci) => ci.timestamp,
            _ => None,
        });
        match ts {
            Some(ts) if ts < want => break,
            _ => first = v,
        }
    }
    Ok(first)
}

/// Limits that cut a backlog into batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_files: usize,
    pub max_bytes: Option<ByteSize>,
}

/// Chooses the versions of the next batch: from `first` on, whole versions, until the next
/// one would pass a limit (a batch always holds at least one version).
pub async fn plan_versions(
    log_store: &LogStoreRef,
    first: u64,
    latest: u64,
    limits: BatchLimits,
    on_change: OnChangeCommit,
) -> Result<Vec<VersionFiles>> {
    let mut out: Vec<VersionFiles> = Vec::new();
    let (mut files, mut bytes) = (0usize, 0u64);
    for v in first..=latest {
        let vf = read_version(log_store, v, on_change).await?;
        let f = vf.files.len();
        let b: u64 = vf.files.iter().map(|f| f.size).sum();
        let over =
            files + f > limits.max_files || limits.max_bytes.is_some_and(|m| bytes + b > m.0);
        // Versions without data files (compaction, metadata) never make a batch of their own.
        if files > 0 && over {
            break;
        }
        files += f;
        bytes += b;
        out.push(vf);
    }
    Ok(out)
}

/// What a run reads from each data file: the projected columns (keys, time, collected, summed,
/// and those the predicates use, in this order and with the table's types) and the compiled
/// `--start-when` / `--end-when` predicates, evaluated per batch with DataFusion.
#[derive(Debug, Clone)]
pub struct ReadPlan {
    /// The columns read, by their logical names.
    pub schema: SchemaRef,
    /// How data files name those columns, for tables with column mapping.
    pub mapping: Option<Arc<crate::delta::ColumnMapping>>,
    pub start_when: Option<Arc<dyn PhysicalExpr>>,
    pub end_when: Option<Arc<dyn PhysicalExpr>>,
    /// `--bucket-column`: read with the other columns, and checked against the key's bucket.
    pub bucket_column: Option<String>,
}

impl ReadPlan {
    /// Projects the table schema and compiles the predicates against the projection.
    pub fn new(
        spec: &EventSpec,
        table_schema: &Schema,
        start_when: Option<&str>,
        end_when: Option<&str>,
    ) -> Result<Self> {
        let mut names = spec.source_columns();
        let ctx = predicate_context();
        let full = DFSchema::try_from(table_schema.clone())?;
        let mut parsed = Vec::new();
        for (sql, flag) in [(start_when, "--start-when"), (end_when, "--end-when")] {
            let Some(sql) = sql else {
                parsed.push(None);
                continue;
            };
            let expr = ctx
                .parse_sql_expr(sql, &full)
                .map_err(|e| bad_predicate(flag, sql, e))?;
            refuse_non_deterministic(&expr, flag, sql)?;
            for c in expr.column_refs() {
                if !names.contains(&c.name) {
                    names.push(c.name.clone());
                }
            }
            parsed.push(Some((expr, flag, sql)));
        }
        let fields: Vec<Field> = names
            .iter()
            .map(|n| {
                table_schema
                    .field_with_name(n)
                    .map(|f| f.clone().with_nullable(true))
            })
            .collect::<std::result::Result<_, _>>()?;
        let schema = Arc::new(Schema::new(fields));
        let projected = DFSchema::try_from(schema.as_ref().clone())?;
        let mut compiled = Vec::new();
        for p in parsed {
            compiled.push(match p {
                None => None,
                Some((expr, flag, sql)) => {
                    let dt = expr
                        .to_field(&projected)
                        .map_err(|e| bad_predicate(flag, sql, e))?
                        .1
                        .data_type()
                        .clone();
                    if dt != DataType::Boolean {
                        return Err(Error::usage(format!(
                            "{flag} `{sql}` is of type {dt}, not a boolean condition; compare it \
                             with something, e.g. {flag} \"action = 'deposit'\""
                        )));
                    }
                    Some(
                        ctx.create_physical_expr(expr, &projected)
                            .map_err(|e| bad_predicate(flag, sql, e))?,
                    )
                }
            });
        }
        let end_when = compiled.pop().flatten();
        let start_when = compiled.pop().flatten();
        Ok(Self {
            schema,
            mapping: None,
            start_when,
            end_when,
            bucket_column: None,
        })
    }

    /// Also reads `--bucket-column` (an integer column of the events table), whose values and
    /// file statistics say which shard's keys a file holds.
    pub fn with_bucket_column(mut self, column: &str, table_schema: &Schema) -> Result<Self> {
        let field = table_schema.field_with_name(column).map_err(|_| {
            Error::usage(format!(
                "--bucket-column `{column}` is not a column of the events table; name the \
                 column that holds pmod(xxhash64(key), B), or drop --key-buckets"
            ))
        })?;
        if !field.data_type().is_integer() {
            return Err(Error::usage(format!(
                "--bucket-column `{column}` is of type {}, not an integer column; it must hold \
                 pmod(xxhash64(key), B)",
                field.data_type()
            )));
        }
        if self.schema.field_with_name(column).is_err() {
            // Appended last: the compiled predicates address the columns before it by index.
            let mut fields: Vec<Arc<Field>> = self.schema.fields().iter().cloned().collect();
            fields.push(Arc::new(field.clone().with_nullable(true)));
            self.schema = Arc::new(Schema::new(fields));
        }
        self.bucket_column = Some(column.to_string());
        Ok(self)
    }

    /// Reads data files by the table's column mapping (see [`crate::delta::column_mapping`]).
    pub fn with_mapping(mut self, mapping: Option<crate::delta::ColumnMapping>) -> Self {
        self.mapping = mapping.map(Arc::new);
        self
    }

    /// For each projected column, its position among the file's top-level fields: by logical
    /// name, or under column mapping by field id (id mode) or physical name.
    fn file_columns(&self, file_schema: &Schema) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        for (i, f) in self.schema.fields().iter().enumerate() {
            let at = match &self.mapping {
                None => file_schema.index_of(f.name()).ok(),
                Some(m) => match m.columns.get(f.name()) {
                    Some((physical, id)) => {
                        let by_id = id.filter(|_| m.by_id).and_then(|id| {
                            file_schema.fields().iter().position(|ff| {
                                ff.metadata()
                                    .get("PARQUET:field_id")
                                    .and_then(|v| v.parse::<i64>().ok())
                                    == Some(id)
                            })
                        });
                        by_id.or_else(|| file_schema.index_of(physical).ok())
                    }
                    None => file_schema.index_of(f.name()).ok(),
                },
            };
            if let Some(j) = at {
                found.push((i, j));
            }
        }
        found
    }

    /// The name a partition value is stored under for a projected column.
    fn partition_key<'a>(&'a self, logical: &'a str) -> &'a str {
        match self.mapping.as_ref().and_then(|m| m.columns.get(logical)) {
            Some((physical, _)) => physical,
            None => logical,
        }
    }

    /// Conforms a batch read from one file to the projected schema: columns in order, missing
    /// ones (added to the table later) as nulls, types cast to the table's.
    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let cols = self
            .schema
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
                Some(c) => cast(c, f.data_type()),
                None => Ok(new_null_array(f.data_type(), n)),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            cols,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    fn markers(&self, batch: &RecordBatch) -> Result<Markers> {
        let eval = |p: &Option<Arc<dyn PhysicalExpr>>| -> Result<Option<BooleanArray>> {
            match p {
                None => Ok(None),
                Some(p) => {
                    let v = p.evaluate(batch)?.into_array(batch.num_rows())?;
                    Ok(Some(v.as_boolean().clone()))
                }
            }
        };
        Ok(Markers {
            start: eval(&self.start_when)?,
            end: eval(&self.end_when)?,
        })
    }
}

/// Predicates keep the case of column names (`eventType` stays `eventType`).
fn predicate_context() -> SessionContext {
    let config =
        SessionConfig::new().set_bool("datafusion.sql_parser.enable_ident_normalization", false);
    SessionContext::new_with_config(config)
}

/// A predicate must give the same answer on every replay of a batch: functions whose result
/// depends on anything but their arguments (`random()`, `uuid()`, `now()`, `current_date()`)
/// are refused, naming the function.
fn refuse_non_deterministic(expr: &datafusion::prelude::Expr, flag: &str, sql: &str) -> Result<()> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{Expr, Volatility};
    let mut found = None;
    expr.apply(|e| {
        if let Expr::ScalarFunction(f) = e
            && f.func.signature().volatility != Volatility::Immutable
        {
            found = Some(f.func.name().to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        None => Ok(()),
        Some(name) => Err(Error::usage(format!(
            "{flag} `{sql}` calls `{name}()`, whose result changes from call to call (or with the \
             wall clock); a replay after a crash would cut other sessions than the first try. \
             Use a condition on the event's own columns only"
        ))),
    }
}

fn bad_predicate(flag: &str, sql: &str, e: impl std::fmt::Display) -> Error {
    Error::usage(format!(
        "{flag} `{sql}` is not a valid SQL condition over the events' columns: {e}. Quote \
         string values with single quotes, e.g. {flag} \"action = 'deposit'\""
    ))
}

/// The new events of a batch, normalized and cut into key buckets (see
/// [`crate::engine::split_by_key`]): `buckets[b]` holds bucket `b`'s rows in read order
/// (version, file, row), in pieces of one file each.
#[derive(Debug, Default)]
pub struct EventParts {
    pub buckets: Vec<Vec<FilePiece>>,
    /// The latest event time read, in microseconds (of the rows kept).
    pub max_time: Option<i64>,
    /// The commit time (milliseconds) of the version that brought `max_time`.
    pub max_time_committed_ms: Option<i64>,
    /// Rows the event-time guard took out (`future`, `bad_time`), in the rejected-rows layout.
    pub rejected: Vec<RecordBatch>,
    /// Data files decoded whole.
    pub files_read: u64,
    /// Data files of other shards' key buckets, of which only the time column was read.
    pub files_watermark_only: u64,
}

/// What a run needs from one data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Its rows (of this shard's keys, when sharded).
    Rows,
    /// Its latest event time only: the file holds other shards' key buckets alone, and the
    /// watermark of every shard moves by every key's events.
    Watermark,
}

/// What shard `shard` needs from `file`: with a bucket column (`--key-buckets`), a file whose
/// partition value, or column statistics (min and max), show only other shards' buckets is
/// needed for its event times alone. A file the log says nothing certain about is read whole.
pub fn need(file: &DataFile, plan: &ReadPlan, shard: Option<Shard>) -> Need {
    let (Some(s), Some(column)) = (shard, plan.bucket_column.as_deref()) else {
        return Need::Rows;
    };
    if !matches!(s.function, ShardFn::SparkBuckets(_)) {
        return Need::Rows;
    }
    match bucket_range(file, plan.partition_key(column)) {
        Some((lo, hi))
            if hi.saturating_sub(lo) < i64::from(s.count)
                && (lo..=hi).all(|b| b.rem_euclid(i64::from(s.count)) != i64::from(s.index)) =>
        {
            Need::Watermark
        }
        _ => Need::Rows,
    }
}

/// With `--key-buckets`, says when the log cannot narrow some files to fewer buckets than there
/// are shards: every shard decodes those, so the layout (not partitioned or clustered by the
/// bucket column, or written without statistics for it) costs what it would without key
/// buckets.
fn warn_unbucketed(versions: &[VersionFiles], plan: &ReadPlan, shard: Option<Shard>) {
    let (Some(s), Some(column)) = (shard, plan.bucket_column.as_deref()) else {
        return;
    };
    if !matches!(s.function, ShardFn::SparkBuckets(_)) {
        return;
    }
    let files = versions.iter().flat_map(|v| &v.files);
    let wide = files
        .clone()
        .filter(|f| match bucket_range(f, plan.partition_key(column)) {
            None => true,
            Some((lo, hi)) => hi.saturating_sub(lo) >= i64::from(s.count) - 1,
        })
        .count();
    if wide > 0 {
        tracing::warn!(
            "{wide} of {} new data files may hold the keys of every shard, by the Delta log (no \
             partition value of `{column}`, and no min/max statistics of it or a range of {} \
             buckets or more): every shard decodes them whole. Partition the events table by \
             `{column}`, or cluster it (ZORDER BY {column})",
            files.count(),
            s.count
        );
    }
}

/// The smallest and largest key bucket a file holds, from its partition value or its column
/// statistics (`key` is the column's name in the log); `None` when the log does not tell, or
/// tells of a null bucket.
fn bucket_range(file: &DataFile, key: &str) -> Option<(i64, i64)> {
    if let Some(value) = file.partition_values.get(key) {
        let b = value.as_deref()?.trim().parse().ok()?;
        return Some((b, b));
    }
    let stats: serde_json::Value = serde_json::from_str(file.stats.as_deref()?).ok()?;
    if stats["nullCount"][key].as_i64()? != 0 {
        return None;
    }
    let (lo, hi) = (
        stats["minValues"][key].as_i64()?,
        stats["maxValues"][key].as_i64()?,
    );
    (lo <= hi).then_some((lo, hi))
}

/// Reads the files the given versions added, one task per file (decoding runs on every core),
/// and cuts each decoded batch into `buckets` key buckets as it arrives, so the batch is never
/// held twice.
///
/// With `max_skew_us`, an event later than its commit's time plus that skew is taken out as
/// `future` (SPEC rule 11), and so is a time that cannot be represented (`bad_time`): neither
/// reaches a session or moves the watermark.
pub async fn read_events(
    store: Arc<dyn ObjectStore>,
    versions: &[VersionFiles],
    spec: &EventSpec,
    plan: &ReadPlan,
    buckets: usize,
    max_skew_us: Option<i64>,
    shard: Option<Shard>,
) -> Result<EventParts> {
    // Each job: version, file ordinal, file, the guard's latest event time, commit time, need.
    let jobs: Vec<_> = versions
        .iter()
        .flat_map(|v| {
            let latest = max_skew_us.and_then(|skew| {
                v.committed_ms
                    .and_then(|ms| ms.checked_mul(1000))
                    .map(|us| us.saturating_add(skew))
            });
            v.files.iter().enumerate().map(move |(i, f)| {
                let need = need(f, plan, shard);
                (v.version, i as i32, f.clone(), latest, v.committed_ms, need)
            })
        })
        .collect();
    warn_unbucketed(versions, plan, shard);
    let spec = Arc::new(spec.clone());
    let plan = Arc::new(plan.clone());
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let mut files = futures::stream::iter(jobs.into_iter().map(|(v, i, f, latest, ms, need)| {
        let (store, spec, plan) = (store.clone(), spec.clone(), plan.clone());
        tokio::spawn(async move {
            let parts = match need {
                Need::Rows => {
                    read_file(store, v, i, &f, &spec, &plan, buckets, latest, shard).await
                }
                Need::Watermark => read_file_times(store, v, i, &f, &spec, &plan, latest).await,
            };
            parts.map(|p| (ms, p))
        })
    }))
    .buffered(parallel);
    let mut parts = EventParts {
        buckets: vec![Vec::new(); buckets.max(1)],
        ..Default::default()
    };
    // Files are taken in job order, so each bucket's pieces stay in read order.
    while let Some(file) = files.next().await {
        let (committed_ms, file) =
            file.map_err(|e| Error::Source(format!("a file reader task failed: {e}")))??;
        if file.max_time > parts.max_time {
            parts.max_time = file.max_time;
            parts.max_time_committed_ms = committed_ms;
        }
        parts.rejected.extend(file.rejected);
        parts.files_read += file.files_read;
        parts.files_watermark_only += file.files_watermark_only;
        for (bucket, pieces) in parts.buckets.iter_mut().zip(file.buckets) {
            bucket.extend(pieces.into_iter().filter(|p| p.rows.num_rows() > 0));
        }
    }
    Ok(parts)
}

#[allow(clippy::too_many_arguments)]
async fn read_file(
    store: Arc<dyn ObjectStore>,
    version: u64,
    file_idx: i32,
    file: &DataFile,
    spec: &EventSpec,
    plan: &ReadPlan,
    buckets: usize,
    latest_us: Option<i64>,
    shard: Option<Shard>,
) -> Result<EventParts> {
    let builder = open_file(store, version, file).await?;
    let file_schema = builder.schema().clone();
    let matched = plan.file_columns(&file_schema);
    let mut roots: Vec<usize> = matched.iter().map(|&(_, j)| j).collect();
    roots.sort_unstable();
    // The decoded batch holds the chosen roots in file order; each is renamed to its logical
    // name (under column mapping, files use physical names).
    let names: Vec<(String, String)> = matched
        .iter()
        .map(|&(i, j)| {
            (
                file_schema.field(j).name().clone(),
                plan.schema.field(i).name().clone(),
            )
        })
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()?;
    let mut out = EventParts {
        buckets: vec![Vec::new(); buckets.max(1)],
        files_read: 1,
        ..Default::default()
    };
    // Each bucket's rows of this file are gathered into one contiguous piece, so that freeing a
    // folded bucket gives whole buffers back rather than holes in pages shared with the others.
    let mut small: Vec<Vec<RecordBatch>> = vec![Vec::new(); buckets.max(1)];
    let gather = |small: &mut Vec<RecordBatch>| -> Result<Option<FilePiece>> {
        let rows = match small.as_slice() {
            [] => return Ok(None),
            [one] => one.clone(),
            many => arrow::compute::concat_batches(&many[0].schema(), many)?,
        };
        small.clear();
        Ok(Some(FilePiece {
            version: version as i64,
            file: file_idx,
            rows,
        }))
    };
    let mut row = 0i64;
    while let Some(batch) = stream.next().await {
        let batch = logical_names(batch?, &names)?;
        let batch = with_partition_columns(batch, file, plan)?;
        let batch = plan.conform(&batch)?;
        let n = batch.num_rows() as i64;
        // With --key-buckets, each row's bucket, checked against the bucket column.
        let key_buckets = match shard {
            Some(s) => check_buckets(&batch, spec, plan, s, version, file, row)?,
            None => None,
        };
        let markers = plan.markers(&batch)?;
        let raw_time_valid = arrow::compute::is_not_null(
            batch
                .column_by_name(&spec.time_column)
                .expect("the projection holds the time column"),
        )?;
        let normalized = normalize(spec, &batch, version as i64, file_idx, row, markers)?;
        drop(batch);
        // The watermark comes from every key's events, so that all shards of a batch share it.
        out.max_time = out.max_time.max(kept_max_time(&normalized, latest_us));
        // The shard stage: from here on, only this shard's keys.
        let (normalized, raw_time_valid) = match shard {
            None => (normalized, raw_time_valid),
            Some(s) => {
                let mine = match key_buckets {
                    Some(b) => {
                        let (n, i) = (i64::from(s.count), i64::from(s.index));
                        b.iter().map(|&b| Some(b % n == i)).collect()
                    }
                    None => in_shard(&normalized, &spec.key_columns, s.index, s.count, s.function)?,
                };
                let valid = arrow::compute::filter(&raw_time_valid, &mine)?;
                (
                    arrow::compute::filter_record_batch(&normalized, &mine)?,
                    valid.as_boolean().clone(),
                )
            }
        };
        let (normalized, rejected) = screen(normalized, &raw_time_valid, latest_us)?;
        out.rejected.extend(rejected);
        let compact = FilePiece::from_normalized(&normalized, version as i64, file_idx)?;
        drop(normalized);
        for (bucket, rows) in
            small
                .iter_mut()
                .zip(split_by_key(&compact.rows, &spec.key_columns, buckets)?)
        {
            bucket.push(rows);
        }
        row += n;
    }
    for (pieces, small) in out.buckets.iter_mut().zip(&mut small) {
        pieces.extend(gather(small)?);
    }
    Ok(out)
}

/// With `--key-buckets`, each row's bucket (see [`spark_buckets`]). Every row of a file a shard
/// reads must hold its key's bucket in the
/// bucket column: the shards of other buckets skipped this file on the strength of it, so a
/// wrong bucket would lose its events. A mismatch stops the run before anything is written.
fn check_buckets(
    batch: &RecordBatch,
    spec: &EventSpec,
    plan: &ReadPlan,
    shard: Shard,
    version: u64,
    file: &DataFile,
    first_row: i64,
) -> Result<Option<Vec<i64>>> {
    let (ShardFn::SparkBuckets(b), Some(column)) = (shard.function, &plan.bucket_column) else {
        return Ok(None);
    };
    let keys: Vec<ArrayRef> = spec
        .key_columns
        .iter()
        .map(|k| {
            batch
                .column_by_name(k)
                .expect("the projection holds the keys")
                .clone()
        })
        .collect();
    let want = spark_buckets(&keys, b)?;
    let have = cast(
        batch
            .column_by_name(column)
            .expect("the projection holds the bucket column"),
        &DataType::Int64,
    )?;
    let have = have.as_primitive::<arrow::datatypes::Int64Type>();
    // Other shards skipped this file by the range the log gives: a row outside it would be
    // lost to every shard, however right its bucket.
    let logged = bucket_range(file, plan.partition_key(column));
    let outside = |b: i64| logged.is_some_and(|(lo, hi)| b < lo || b > hi);
    if let Some(r) = (0..want.len()).find(|&r| have.is_valid(r) && outside(have.value(r))) {
        let (lo, hi) = logged.expect("outside a logged range");
        return Err(Error::usage(format!(
            "row {} of data file `{}` (events version {version}) has bucket {} in \
             --bucket-column `{column}`, but the Delta log says the file holds buckets {lo}..={hi} \
             (its partition value or min/max statistics), and shards skip files by the log. The \
             table's log disagrees with its data: rewrite that file (or its partition) with a \
             writer that records them together. This shard wrote nothing for this batch",
            first_row + r as i64,
            file.path,
            have.value(r),
        )));
    }
    let Some(r) = (0..want.len()).find(|&r| have.is_null(r) || have.value(r) != want[r]) else {
        return Ok(Some(want));
    };
    let key: Vec<String> = keys
        .iter()
        .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap_or_else(|_| "?".into()))
        .collect();
    let found = if have.is_null(r) {
        "null".to_string()
    } else {
        have.value(r).to_string()
    };
    Err(Error::usage(format!(
        "row {} of data file `{}` (events version {version}) has key ({}) in bucket {found} of \
         --bucket-column `{column}`, but pmod(xxhash64({}), {b}) is {}. Shards skip files by \
         that column, so every row must hold its key's bucket. This shard wrote nothing for \
         this batch (shards that skipped the file may have). If the writer used another B, \
         start every shard anew with it: new --checkpoint, --sessions and --live locations, \
         `--key-buckets` set to the writer's B. If the writer computes the bucket otherwise, \
         make it compute Spark's pmod(xxhash64({}), {b}) and rewrite the files written so far",
        first_row + r as i64,
        file.path,
        key.join(", "),
        spec.key_columns.join(", "),
        want[r],
        spec.key_columns.join(", "),
    )))
}

/// Opens one data file added by events version `version`, its footer read.
async fn open_file(
    store: Arc<dyn ObjectStore>,
    version: u64,
    file: &DataFile,
) -> Result<crate::delta::ParquetBuilder> {
    let path = Path::from_url_path(&file.path).map_err(|e| {
        Error::Source(format!(
            "version {version} names a data file `{}` that is not a valid path: {e}",
            file.path
        ))
    })?;
    crate::delta::open_parquet(store, path, file.size)
        .await
        .map_err(|e| {
            Error::Source(format!(
                "cannot read data file `{}` added in events version {version}: {e}. If the table \
                 was vacuumed, that version can no longer be read; start a new checkpoint with a \
                 later --starting-version",
                file.path
            ))
        })
}

/// [`Need::Watermark`]: the latest event time the guard keeps in one file, from its time column
/// alone (the rest of the file is never decoded).
async fn read_file_times(
    store: Arc<dyn ObjectStore>,
    version: u64,
    file_idx: i32,
    file: &DataFile,
    spec: &EventSpec,
    plan: &ReadPlan,
    latest_us: Option<i64>,
) -> Result<EventParts> {
    let mut out = EventParts {
        files_watermark_only: 1,
        ..Default::default()
    };
    let builder = open_file(store.clone(), version, file).await?;
    let t = plan.schema.index_of(&spec.time_column)?;
    let Some((_, j)) = plan
        .file_columns(builder.schema())
        .into_iter()
        .find(|&(i, _)| i == t)
    else {
        // Not in the file: a partition column (read as a whole file reads it), or a column the
        // table gained after this file was written (null times move no watermark).
        if file
            .partition_values
            .contains_key(plan.partition_key(&spec.time_column))
        {
            let whole = read_file(
                store, version, file_idx, file, spec, plan, 1, latest_us, None,
            );
            out.max_time = whole.await?.max_time;
        }
        return Ok(out);
    };
    let field = Arc::new(plan.schema.field(t).clone());
    // The time column alone, in the table's type, under its logical name.
    let as_raw = |times: &ArrayRef| -> Result<RecordBatch> {
        let times = match times.data_type() == field.data_type() {
            true => times.clone(),
            false => cast(times, field.data_type())?,
        };
        let schema = Arc::new(Schema::new(vec![field.clone()]));
        Ok(RecordBatch::try_new(schema, vec![times])?)
    };
    // The footer's statistics usually settle it, and nothing is decoded.
    if let Some(maxes) = row_group_maxes(&builder, j)
        && let Some(max) =
            guarded_max_from_maxes(spec, &as_raw(&maxes)?, version as i64, latest_us)?
    {
        out.max_time = max;
        return Ok(out);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [j]);
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()?;
    while let Some(batch) = stream.next().await {
        let raw = as_raw(batch?.column(0))?;
        out.max_time = out
            .max_time
            .max(guarded_max_time(spec, &raw, version as i64, latest_us)?);
    }
    Ok(out)
}

/// The largest value of the file's top-level column `j` in each row group, from the footer's
/// statistics, in the file's Arrow type; `None` when a row group has none, or the column is not
/// stored as 32- or 64-bit integers (a legacy INT96 timestamp has no usable statistics).
fn row_group_maxes(builder: &crate::delta::ParquetBuilder, j: usize) -> Option<ArrayRef> {
    use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
    use parquet::basic::Type as Physical;
    let schema = builder.schema();
    let name = schema.field(j).name();
    let parquet = builder.parquet_schema();
    let stats = StatisticsConverter::try_new(name, schema, parquet).ok()?;
    let leaf = stats.parquet_column_index()?;
    if !matches!(
        parquet.column(leaf).physical_type(),
        Physical::INT64 | Physical::INT32
    ) {
        return None;
    }
    // Only byte arrays have truncated statistics: an integer maximum is exact, whether or not
    // the writer set the flag that says so (parquet-java does not).
    let groups = builder.metadata().row_groups();
    let maxes = stats.row_group_maxes(groups).ok()?;
    (maxes.null_count() == 0).then_some(maxes)
}

/// Adds the projected columns that live in the file's partition values rather than in the file.
fn with_partition_columns(
    batch: RecordBatch,
    file: &DataFile,
    plan: &ReadPlan,
) -> Result<RecordBatch> {
    let missing: Vec<&Field> = plan
        .schema
        .fields()
        .iter()
        .map(|f| f.as_ref())
        .filter(|f| {
            batch.column_by_name(f.name()).is_none()
                && file
                    .partition_values
                    .contains_key(plan.partition_key(f.name()))
        })
        .collect();
    if missing.is_empty() {
        return Ok(batch);
    }
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    for f in missing {
        let value = file.partition_values[plan.partition_key(f.name())].clone();
        // The value is parsed once, then repeated for every row.
        let one = cast(&StringArray::from(vec![value]), f.data_type())?;
        let every_row = arrow::array::UInt32Array::from(vec![0u32; batch.num_rows()]);
        cols.push(arrow::compute::take(&one, &every_row, None)?);
        fields.push(Arc::new(f.clone()));
    }
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        cols,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

/// Renames a decoded batch's columns from the names in the file to the logical names.
fn logical_names(batch: RecordBatch, names: &[(String, String)]) -> Result<RecordBatch> {
    if names.iter().all(|(file, logical)| file == logical) {
        return Ok(batch);
    }
    let fields: Vec<Arc<Field>> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| match names.iter().find(|(file, _)| file == f.name()) {
            Some((_, logical)) => Arc::new(f.as_ref().clone().with_name(logical)),
            None => f.clone(),
        })
        .collect();
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        batch.columns().to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ReadPlan {
        let schema = Schema::new(vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("t", DataType::Int64, true),
            Field::new("bucket", DataType::Int64, true),
        ]);
        let spec = EventSpec::resolve(&schema, &["user_id".into()], "t", &[], &[]).unwrap();
        ReadPlan::new(&spec, &schema, None, None)
            .unwrap()
            .with_bucket_column("bucket", &schema)
            .unwrap()
    }

    fn file(partition: Option<Option<&str>>, stats: Option<&str>) -> DataFile {
        DataFile {
            path: "part-0.parquet".into(),
            size: 1,
            partition_values: partition
                .map(|v| HashMap::from([("bucket".to_string(), v.map(String::from))]))
                .unwrap_or_default(),
            modified_ms: 0,
            stats: stats.map(String::from),
        }
    }

    fn shard(index: u32) -> Option<Shard> {
        Some(Shard {
            index,
            count: 4,
            function: ShardFn::SparkBuckets(16),
        })
    }

    #[test]
    fn a_shard_skips_a_file_only_when_the_log_shows_every_bucket_is_another_shards() {
        let plan = plan();
        // Partitioned: bucket 6 belongs to shard 6 mod 4 = 2.
        let f = file(Some(Some("6")), None);
        let needs: Vec<Need> = (0..4).map(|i| need(&f, &plan, shard(i))).collect();
        assert_eq!(
            needs,
            [
                Need::Watermark,
                Need::Watermark,
                Need::Rows,
                Need::Watermark
            ]
        );
        // Clustered: buckets 4..=5 belong to shards 0 and 1.
        let stats = r#"{"numRecords":9,"minValues":{"bucket":4},"maxValues":{"bucket":5},"nullCount":{"bucket":0}}"#;
        let f = file(None, Some(stats));
        let needs: Vec<Need> = (0..4).map(|i| need(&f, &plan, shard(i))).collect();
        assert_eq!(
            needs,
            [Need::Rows, Need::Rows, Need::Watermark, Need::Watermark]
        );
        // What the log does not make certain is read whole by every shard: a range as wide as
        // the shard count, a null bucket, a null count, no statistics, a value that is no number.
        for f in [
            file(
                None,
                Some(
                    r#"{"minValues":{"bucket":1},"maxValues":{"bucket":4},"nullCount":{"bucket":0}}"#,
                ),
            ),
            file(
                None,
                Some(
                    r#"{"minValues":{"bucket":4},"maxValues":{"bucket":4},"nullCount":{"bucket":2}}"#,
                ),
            ),
            file(
                None,
                Some(r#"{"minValues":{"bucket":4},"maxValues":{"bucket":4}}"#),
            ),
            file(None, None),
            file(Some(None), None),
            file(Some(Some("six")), None),
        ] {
            for i in 0..4 {
                assert_eq!(need(&f, &plan, shard(i)), Need::Rows, "{f:?}");
            }
        }
        // Without the bucket function, or unsharded, every file is read.
        let f = file(Some(Some("6")), None);
        let mix = Shard {
            function: ShardFn::Mix,
            ..shard(0).unwrap()
        };
        assert_eq!(need(&f, &plan, Some(mix)), Need::Rows);
        assert_eq!(need(&f, &plan, None), Need::Rows);
    }

    #[test]
    fn the_bucket_column_must_be_an_integer_column_of_the_table() {
        let schema = Schema::new(vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("t", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]);
        let spec = EventSpec::resolve(&schema, &["user_id".into()], "t", &[], &[]).unwrap();
        let p = ReadPlan::new(&spec, &schema, None, None).unwrap();
        assert!(p.clone().with_bucket_column("b", &schema).is_err());
        assert!(p.with_bucket_column("nope", &schema).is_err());
    }
}
