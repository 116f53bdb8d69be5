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
    ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, StringArray, new_null_array,
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
    EventSpec, FilePiece, Markers, TIME_COL, in_shard, normalize, screen, split_by_key,
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
        })
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
    let spec = Arc::new(spec.clone());
    let plan = Arc::new(plan.clone());
    // Each job: version, file ordinal, file, the guard's latest event time, commit time.
    let jobs: Vec<_> = versions
        .iter()
        .flat_map(|v| {
            let latest = max_skew_us.and_then(|skew| {
                v.committed_ms
                    .and_then(|ms| ms.checked_mul(1000))
                    .map(|us| us.saturating_add(skew))
            });
            v.files
                .iter()
                .enumerate()
                .map(move |(i, f)| (v.version, i as i32, f.clone(), latest, v.committed_ms))
        })
        .collect();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let mut files = futures::stream::iter(jobs.into_iter().map(|(v, i, f, latest, ms)| {
        let (store, spec, plan) = (store.clone(), spec.clone(), plan.clone());
        tokio::spawn(async move {
            let parts = read_file(store, v, i, &f, &spec, &plan, buckets, latest, shard).await;
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
    let path = Path::from_url_path(&file.path).map_err(|e| {
        Error::Source(format!(
            "version {version} names a data file `{}` that is not a valid path: {e}",
            file.path
        ))
    })?;
    let builder = crate::delta::open_parquet(store, path, file.size)
        .await
        .map_err(|e| {
            Error::Source(format!(
                "cannot read data file `{}` added in events version {version}: {e}. If the table \
                 was vacuumed, that version can no longer be read; start a new checkpoint with a \
                 later --starting-version",
                file.path
            ))
        })?;
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
        let markers = plan.markers(&batch)?;
        let raw_time_valid = arrow::compute::is_not_null(
            batch
                .column_by_name(&spec.time_column)
                .expect("the projection holds the time column"),
        )?;
        let normalized = normalize(spec, &batch, version as i64, file_idx, row, markers)?;
        drop(batch);
        let (normalized, rejected) = screen(normalized, &raw_time_valid, latest_us)?;
        // The watermark comes from every key's events, so that all shards of a batch share it.
        out.max_time = out.max_time.max(arrow::compute::max(
            normalized
                .column_by_name(TIME_COL)
                .expect("normalized time column")
                .as_primitive::<arrow::datatypes::Int64Type>(),
        ));
        // The shard stage: from here on, only this shard's keys.
        let own = |b: RecordBatch| -> Result<RecordBatch> {
            match shard {
                None => Ok(b),
                Some(s) => {
                    let mine = in_shard(&b, &spec.key_columns, s.index, s.count)?;
                    Ok(arrow::compute::filter_record_batch(&b, &mine)?)
                }
            }
        };
        out.rejected.extend(rejected.map(own).transpose()?);
        let normalized = own(normalized)?;
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
        let strings: ArrayRef = Arc::new(StringArray::from(vec![value; batch.num_rows()]));
        cols.push(cast(&strings, f.data_type())?);
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
