//! The one door to Delta: every table access that the source, the sink and the checkpoint
//! share: open, create, conform to a schema, application-transaction lookups, commit-log
//! walking, streaming rewrites, vacuum, and the commit itself with its fencing.
//!
//! **Fenced commits.** Every commit a run makes carries a [`BatchTag`]: the checkpoint's
//! application transaction (`txn`, app id of the checkpoint, version = batch sequence number)
//! and, in `commitInfo`, a [`BatchRecord`] saying which batch it is (source versions, flush)
//! and which run made it (lock epoch and token). Three things keep a stale run (one frozen
//! while another took its lock over) from writing:
//!
//! 1. Before each commit, the run checks its [`Fence`]: the lock file of the *next* lock epoch
//!    must not exist. A run that lost its lock stops there with exit 75.
//! 2. The check and the commit are not atomic, so the commit itself is conditional too. A
//!    commit is built on the snapshot in which the run checked the txn; if another run
//!    committed to the table since, Delta's conflict checker sees the same app id in the
//!    winning commit and fails ours (`ConcurrentTransaction`); the state table's commit is made
//!    against the exact version the run read, with no retry at all.
//! 3. A failed commit may still be durable (a post-commit hook failed). It is believed only if
//!    the commit holding this batch's txn carries *this run's* token; a commit of the batch by
//!    another run means this run lost the checkpoint: exit 75. Never `txn >= seq`.
//!
//! delta-rs does not skip a commit whose txn is already recorded, so callers look the txn up
//! first ([`recorded_batch`]) on the very table they then write with.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Action, StructType, Transaction};
use deltalake::logstore::get_actions;
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

// ParquetObjectReader is deprecated upstream in favour of hand-written readers; it is still the
// simplest correct reader over an object store, so we keep it until the replacement settles.
#[allow(deprecated)]
use parquet::arrow::async_reader::ParquetObjectReader;

use crate::config::TableLocation;
use crate::error::{Error, Result};

/// The `commitInfo` key under which every commit of a batch records its [`BatchRecord`].
pub const BATCH_KEY: &str = "sessionizerBatch";
/// App ids of sessionizer checkpoints start with this.
pub const APP_PREFIX: &str = "sessionizer-";
/// How many of a table's latest commits the log walks look at.
const WALK_LIMIT: u64 = 1000;

// ---------------------------------------------------------------------------------------------
// Opening and creating

/// Loads the Delta table at `loc` at its latest version, or `None` when there is none.
///
/// Existence is checked first (a listing of `_delta_log`), because loading a missing table
/// surfaces as assorted kernel errors rather than one "not found".
pub async fn try_load(loc: &TableLocation) -> Result<Option<DeltaTable>> {
    if let Some(p) = loc.local_path() {
        let log = p.join("_delta_log");
        let has_commits = std::fs::read_dir(&log)
            .map(|mut d| {
                d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
            })
            .unwrap_or(false);
        if !has_commits {
            return Ok(None);
        }
    } else {
        let t = loc.builder()?.build()?;
        if !t.verify_deltatable_existence().await? {
            return Ok(None);
        }
    }
    match loc.builder()?.load().await {
        Ok(t) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) | Err(DeltaTableError::InvalidTableLocation(_)) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens an existing Delta table, turning "not there" into a usage error naming the flag.
pub async fn open_existing(loc: &TableLocation, flag: &str, fix: &str) -> Result<DeltaTable> {
    try_load(loc).await?.ok_or_else(|| {
        Error::usage(format!(
            "{flag} `{loc}` is not a Delta table (there is no _delta_log with commits there); {fix}"
        ))
    })
}

async fn load(loc: &TableLocation) -> Result<DeltaTable> {
    Ok(loc.builder()?.load().await?)
}

/// The table's schema as Arrow.
pub fn arrow_schema(table: &DeltaTable) -> Result<SchemaRef> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// Creates a Delta table with this Arrow schema (optionally `delta.appendOnly = true`).
pub async fn create_table(
    loc: &TableLocation,
    schema: &Schema,
    append_only: bool,
) -> Result<DeltaTable> {
    create_partitioned(loc, schema, append_only, &[]).await
}

/// [`create_table`], partitioned by `partition_by`.
pub async fn create_partitioned(
    loc: &TableLocation,
    schema: &Schema,
    append_only: bool,
    partition_by: &[&str],
) -> Result<DeltaTable> {
    let props: &[(&str, &str)] = if append_only {
        &[("delta.appendOnly", "true")]
    } else {
        &[]
    };
    create_with(loc, schema, partition_by, props).await
}

/// A Delta checkpoint every ten commits (Spark's default; delta-rs's is 100), set on every
/// table sessionizer creates: every run opens its tables, and opening one replays each commit
/// since its last checkpoint, so a tick would otherwise pay for up to 99 earlier ticks.
pub const CHECKPOINT_INTERVAL: (&str, &str) = ("delta.checkpointInterval", "10");

/// [`create_partitioned`] with these table properties (and [`CHECKPOINT_INTERVAL`]).
pub async fn create_with(
    loc: &TableLocation,
    schema: &Schema,
    partition_by: &[&str],
    properties: &[(&str, &str)],
) -> Result<DeltaTable> {
    if let Some(p) = loc.local_path() {
        std::fs::create_dir_all(&p)?;
    }
    let kernel: StructType = schema.try_into_kernel()?;
    let table = loc.builder()?.build()?;
    // No retry: of writers creating one table at once (shards), one wins version 0 and the
    // others load it. A retried create would land its metadata again as version 1, which
    // fails every concurrent commit with "metadata changed".
    let mut create = table
        .create()
        .with_columns(kernel.fields().cloned())
        .with_commit_properties(CommitProperties::default().with_max_retries(0));
    if !partition_by.is_empty() {
        create = create.with_partition_columns(partition_by.iter().map(|c| c.to_string()));
    }
    create = create
        .with_configuration([(CHECKPOINT_INTERVAL.0, Some(CHECKPOINT_INTERVAL.1))])
        .with_configuration(properties.iter().map(|(k, v)| (*k, Some(*v))));
    match create.await {
        Ok(t) => Ok(t),
        // Another writer (another shard, say) created it between our look and our create:
        // use theirs. The create fails as "already exists" or as a metadata conflict.
        Err(e) => match try_load(loc).await {
            Ok(Some(theirs)) => {
                tracing::debug!("{loc} was created by another writer meanwhile ({e})");
                check_schema(&theirs, schema, loc, "the table")?;
                Ok(theirs)
            }
            _ => Err(e.into()),
        },
    }
}

/// Opens an output table, creating it on first use; refuses one whose columns do not fit.
pub async fn open_or_create(
    loc: &TableLocation,
    schema: &Schema,
    append_only: bool,
    flag: &str,
) -> Result<DeltaTable> {
    let Some(table) = try_load(loc).await? else {
        return create_table(loc, schema, append_only).await;
    };
    check_schema(&table, schema, loc, flag)?;
    Ok(table)
}

/// Every column we write must exist in the table with the same type.
pub fn check_schema(
    table: &DeltaTable,
    want: &Schema,
    loc: &TableLocation,
    flag: &str,
) -> Result<()> {
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

/// Casts a batch read back from Delta (view types, UTC timestamps) to the expected schema.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let mut cols = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let c = batch
            .column_by_name(f.name())
            .ok_or_else(|| Error::Checkpoint(format!("column `{}` is missing", f.name())))?;
        cols.push(if c.data_type() == f.data_type() {
            c.clone()
        } else {
            cast(c, f.data_type())?
        });
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// Opens a Parquet data file of `size` bytes on an object store for streaming reads.
#[allow(deprecated)]
pub type ParquetBuilder = ParquetRecordBatchStreamBuilder<ParquetObjectReader>;

#[allow(deprecated)]
pub async fn open_parquet(
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
) -> parquet::errors::Result<ParquetBuilder> {
    let reader = ParquetObjectReader::new(store, path).with_file_size(size);
    ParquetRecordBatchStreamBuilder::new(reader).await
}

// ---------------------------------------------------------------------------------------------
// Table features

/// Reader features the source reads correctly (column mapping by the table's metadata,
/// timestamps without time zone, v2 checkpoints and their sidecars through delta-rs, vacuum
/// protection, type widening through casts); deletion vectors are checked per added file
/// ([`crate::source::read_version`]).
const READ_FEATURES: &[&str] = &[
    "columnMapping",
    "deletionVectors",
    "timestampNtz",
    "v2Checkpoint",
    "vacuumProtocolCheck",
    "typeWidening",
    "typeWidening-preview",
];

/// The table's protocol and metadata as the log states them (their accessors are partly
/// private in delta-rs; their serialized form is the protocol's own).
fn protocol_and_metadata(table: &DeltaTable) -> Result<(serde_json::Value, serde_json::Value)> {
    let snapshot = table.snapshot()?;
    let protocol = serde_json::to_value(snapshot.protocol()).unwrap_or_default();
    let metadata = serde_json::to_value(snapshot.metadata()).unwrap_or_default();
    Ok((protocol, metadata))
}

/// The table's `readerFeatures` or `writerFeatures` (`which`), as its protocol lists them.
fn table_features(table: &DeltaTable, which: &str) -> Result<Vec<String>> {
    let (protocol, _) = protocol_and_metadata(table)?;
    Ok(protocol[which]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Refuses (exit 2) a table whose reader features include one this tool does not read
/// correctly, before anything is read: a reader that ignores a feature misreads rows silently.
pub fn check_reader_features(table: &DeltaTable, loc: &TableLocation, flag: &str) -> Result<()> {
    let features = table_features(table, "readerFeatures")?;
    if let Some(f) = features
        .iter()
        .find(|f| !READ_FEATURES.contains(&f.as_str()))
    {
        return Err(Error::usage(format!(
            "{flag} `{loc}` uses the Delta reader feature `{f}`, which sessionizer does not read \
             (it reads: {}). Reading it anyway could give wrong rows, so nothing was read or \
             written. Rewrite the table without that feature, or point {flag} at a copy that \
             does not use it",
            READ_FEATURES.join(", ")
        )));
    }
    Ok(())
}

/// Whether the table's protocol lists this writer feature.
pub fn has_writer_feature(table: &DeltaTable, feature: &str) -> Result<bool> {
    Ok(table_features(table, "writerFeatures")?
        .iter()
        .any(|f| f == feature))
}

/// How a table with column mapping names its columns in the data files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    /// `id` mode: data files are matched by Parquet field id first.
    pub by_id: bool,
    /// Top-level logical name -> (physical name, field id).
    pub columns: std::collections::HashMap<String, (String, Option<i64>)>,
}

/// The table's column mapping (`delta.columnMapping.mode` = `name` or `id`), if any.
pub fn column_mapping(table: &DeltaTable) -> Result<Option<ColumnMapping>> {
    let (_, metadata) = protocol_and_metadata(table)?;
    let mode = metadata["configuration"]["delta.columnMapping.mode"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    if mode == "none" {
        return Ok(None);
    }
    let schema: serde_json::Value = metadata["schemaString"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let mut columns = std::collections::HashMap::new();
    for f in schema["fields"].as_array().into_iter().flatten() {
        let (Some(name), Some(physical)) = (
            f["name"].as_str(),
            f["metadata"]["delta.columnMapping.physicalName"].as_str(),
        ) else {
            continue;
        };
        let id = f["metadata"]["delta.columnMapping.id"].as_i64();
        columns.insert(name.to_string(), (physical.to_string(), id));
    }
    Ok(Some(ColumnMapping {
        by_id: mode == "id",
        columns,
    }))
}

// ---------------------------------------------------------------------------------------------
// The commit log

/// The actions of commit `version`, or `None` when log clean-up removed it.
pub async fn commit_actions(table: &DeltaTable, version: u64) -> Result<Option<Vec<Action>>> {
    log_actions(&table.log_store(), version).await
}

/// [`commit_actions`] through a table's log store (the source walks the events log with it).
pub async fn log_actions(
    log: &deltalake::logstore::LogStoreRef,
    version: u64,
) -> Result<Option<Vec<Action>>> {
    match log.read_commit_entry(version).await? {
        Some(bytes) => Ok(Some(get_actions(version, &bytes)?)),
        None => Ok(None),
    }
}

/// The value of `key` in the `commitInfo` of these actions.
pub fn commit_info_value<'a>(actions: &'a [Action], key: &str) -> Option<&'a serde_json::Value> {
    actions.iter().find_map(|a| match a {
        Action::CommitInfo(ci) => ci.info.get(key),
        _ => None,
    })
}

/// The txn version this app last recorded on the table.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>> {
    Ok(table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?)
}

/// What a table says about batch `seq` of one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The table holds no commit of that batch (its txn is below `seq`, or absent).
    No,
    /// The table holds that batch; its record, when the commit carries one (commits of
    /// releases before records carry none).
    Batch(Option<BatchRecord>),
    /// The table holds a later batch of the checkpoint: `txn` is beyond `seq`.
    Beyond(i64),
}

/// Looks batch `seq` of `app_id` up in the table: the txn first, then, when it is there, the
/// commit that recorded it (walking back from the latest commit; it is nearly always among the
/// last few).
pub async fn recorded_batch(table: &DeltaTable, app_id: &str, seq: i64) -> Result<Recorded> {
    let txn = txn_version(table, app_id).await?;
    match txn {
        None => return Ok(Recorded::No),
        Some(t) if t < seq => return Ok(Recorded::No),
        Some(t) if t > seq => return Ok(Recorded::Beyond(t)),
        Some(_) => {}
    }
    let latest = table.version().unwrap_or(0);
    for v in (latest.saturating_sub(WALK_LIMIT)..=latest).rev() {
        let Some(actions) = commit_actions(table, v).await? else {
            break;
        };
        let ours = actions
            .iter()
            .any(|a| matches!(a, Action::Txn(t) if t.app_id == app_id && t.version == seq));
        if ours {
            let record = commit_info_value(&actions, BATCH_KEY)
                .and_then(|v| serde_json::from_value(v.clone()).ok());
            return Ok(Recorded::Batch(record));
        }
    }
    Ok(Recorded::Batch(None))
}

/// Sessionizer checkpoints (app ids) other than `own` that committed to this table, among its
/// latest commits, with the latest batch and table version of each.
pub async fn other_checkpoints(table: &DeltaTable, own: &str) -> Result<Vec<(String, i64, u64)>> {
    let mut found: Vec<(String, i64, u64)> = Vec::new();
    let latest = table.version().unwrap_or(0);
    for v in (latest.saturating_sub(WALK_LIMIT)..=latest).rev() {
        let Some(actions) = commit_actions(table, v).await? else {
            break;
        };
        for a in &actions {
            if let Action::Txn(t) = a
                && t.app_id.starts_with(APP_PREFIX)
                && t.app_id != own
                && !found.iter().any(|(id, _, _)| id == &t.app_id)
            {
                found.push((t.app_id.clone(), t.version, v));
            }
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Fenced commits

/// Which batch a commit belongs to and which run made it; stored in the commit's `commitInfo`
/// under [`BATCH_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub seq: i64,
    /// Inclusive range of events versions; `None` for a flush-only batch.
    pub versions: Option<(u64, u64)>,
    pub flush: bool,
    /// The lock epoch of the run that made the commit.
    pub epoch: u64,
    /// The lock token of that run.
    pub run: String,
}

impl BatchRecord {
    /// Whether two records describe the same batch (whichever run committed it).
    pub fn same_batch(&self, other: &BatchRecord) -> bool {
        self.seq == other.seq && self.versions == other.versions && self.flush == other.flush
    }
}

/// The proof of ownership that a run re-checks before every commit: the lock file of the next
/// lock epoch must not exist (a run that takes the lock over creates it first).
#[derive(Debug, Clone)]
pub struct Fence {
    store: Arc<dyn ObjectStore>,
    successor: Path,
    /// What the lock is, for messages: the checkpoint location and this run's epoch.
    what: String,
    lost: Arc<AtomicBool>,
}

impl Fence {
    pub fn new(store: Arc<dyn ObjectStore>, successor: Path, what: String) -> Self {
        Self {
            store,
            successor,
            what,
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the lock as lost (the heartbeat saw the successor).
    pub fn set_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    /// Fails with [`Error::Fenced`] when another run has taken the lock over.
    pub async fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.fenced());
        }
        match self.store.head(&self.successor).await {
            Ok(_) => {
                self.set_lost();
                Err(self.fenced())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn fenced(&self) -> Error {
        Error::Fenced(format!(
            "this run lost the lock of {} to another run (its lock expired or was broken while \
             this process was stopped), so it stops here without writing anything more. The \
             run that took over carries on; nothing needs fixing. If this happens often, look \
             for what froze this process, or give runs more time between ticks",
            self.what
        ))
    }
}

/// Everything a batch's commit must carry: the checkpoint's txn, the record, the fence.
#[derive(Debug, Clone)]
pub struct BatchTag {
    pub app_id: String,
    pub record: BatchRecord,
    pub fence: Fence,
}

impl BatchTag {
    pub fn seq(&self) -> i64 {
        self.record.seq
    }

    fn properties(
        &self,
        extra: Option<(&str, serde_json::Value)>,
        exact: bool,
    ) -> CommitProperties {
        let mut meta = vec![(
            BATCH_KEY.to_string(),
            serde_json::to_value(&self.record).expect("serializable"),
        )];
        if let Some((k, v)) = extra {
            meta.push((k.to_string(), v));
        }
        let props = CommitProperties::default()
            .with_metadata(meta)
            .with_application_transaction(Transaction::new(&self.app_id, self.seq()));
        if exact {
            props.with_max_retries(0)
        } else {
            props
        }
    }
}

/// Commits `actions` as `operation` with the batch's tag (and `extra` commit metadata), then
/// brings the table up to that commit. With `exact`, the commit must land right after the
/// version the table was read at. See the module header for how it is fenced.
pub async fn commit(
    table: DeltaTable,
    loc: &TableLocation,
    actions: Vec<Action>,
    operation: deltalake::protocol::DeltaOperation,
    tag: &BatchTag,
    extra: Option<(&str, serde_json::Value)>,
    exact: bool,
) -> Result<DeltaTable> {
    tag.fence.check().await?;
    crate::failpoint::pause("pause-before-commit").await;
    // The same window before the commit to one table, named by its folder.
    let name = loc.to_string();
    let table_name = name
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    crate::failpoint::pause(&format!("pause-before-commit-to-{table_name}")).await;
    let props = tag.properties(extra, exact);
    let error = match land(table, props, actions, operation).await {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    // The commit may be durable even so (a post-commit hook failed), or another run may have
    // committed this batch, or something else since the table was read.
    let table = load(loc).await?;
    match recorded_batch(&table, &tag.app_id, tag.seq()).await? {
        Recorded::Batch(Some(r)) if r.run == tag.record.run => {
            tracing::warn!("commit to {loc} reported `{error}` but is durable; continuing");
            Ok(table)
        }
        Recorded::Batch(_) | Recorded::Beyond(_) => {
            tag.fence.set_lost();
            Err(Error::Fenced(format!(
                "another run committed batch {} (or a later one) of this checkpoint to `{loc}` \
                 while this run was writing it: this run lost the checkpoint and stops without \
                 writing anything more ({error})",
                tag.seq()
            )))
        }
        Recorded::No => {
            tag.fence.check().await?;
            Err(error.into())
        }
    }
}

/// Commits `actions` that change no rows (a compaction under the checkpoint lock, by
/// `maintain`), without a batch's tag, on the version read and with no retry: a conflict
/// with a concurrent writer fails it and leaves the table as it was.
pub async fn commit_untagged(
    table: DeltaTable,
    actions: Vec<Action>,
    operation: deltalake::protocol::DeltaOperation,
) -> Result<DeltaTable> {
    let props = CommitProperties::default().with_max_retries(0);
    Ok(land(table, props, actions, operation).await?)
}

/// Commits `actions` on the table's snapshot, then replays just that commit onto it.
async fn land(
    table: DeltaTable,
    props: CommitProperties,
    actions: Vec<Action>,
    operation: deltalake::protocol::DeltaOperation,
) -> std::result::Result<DeltaTable, DeltaTableError> {
    use deltalake::kernel::transaction::CommitBuilder;
    let committed = CommitBuilder::from(props)
        .with_actions(actions)
        .build(Some(table.snapshot()?), table.log_store(), operation)
        .await?;
    let mut table = table;
    table.update_incremental(Some(committed.version())).await?;
    Ok(table)
}

/// Commits the written files of a batch in one append commit. Returns whether it committed
/// (no files, no commit).
pub async fn commit_files(
    table: DeltaTable,
    loc: &TableLocation,
    adds: Vec<deltalake::kernel::Add>,
    tag: &BatchTag,
) -> Result<(DeltaTable, bool)> {
    use deltalake::protocol::DeltaOperation;
    if adds.is_empty() {
        return Ok((table, false));
    }
    let operation = DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    };
    let actions = adds.into_iter().map(Action::Add).collect();
    let table = commit(table, loc, actions, operation, tag, None, false).await?;
    Ok((table, true))
}

/// Deletes files replaced more than `retention` ago (Delta VACUUM), recording `meta` in the
/// VACUUM's commits.
pub async fn vacuum(
    table: DeltaTable,
    retention: chrono::Duration,
    meta: Vec<(String, serde_json::Value)>,
) -> Result<(DeltaTable, usize)> {
    let (table, metrics) = table
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_commit_properties(CommitProperties::default().with_metadata(meta))
        .await?;
    Ok((table, metrics.files_deleted.len()))
}

// ---------------------------------------------------------------------------------------------
// Writing files

/// Rows per row group of appended files. A writer holds its open row group encoded in memory
/// until it is full, so this bounds each writer's memory (about 25 MiB of sessions).
const APPEND_ROW_GROUP_ROWS: usize = 256 * 1024;

/// Parquet settings for appends: Snappy as delta-rs does by default, no dictionary for
/// integer and timestamp columns (their values are nearly all distinct, so a dictionary is
/// built and then abandoned), and neither dictionary nor compression for the session id, a
/// random hex string that neither can shrink.
pub fn append_writer_properties(schema: &Schema) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(APPEND_ROW_GROUP_ROWS));
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

/// Parquet files for one append, written from any thread and streamed to the store as they
/// are encoded. Nothing is visible until [`commit_files`] commits the files' Add actions
/// together with the batch's txn; files of a run that dies first are never referenced.
pub struct FileWriter {
    inner: deltalake::writer::RecordBatchWriter,
    rows: usize,
}

impl FileWriter {
    pub fn new(table: &DeltaTable, props: &WriterProperties) -> Result<Self> {
        Ok(Self {
            inner: deltalake::writer::RecordBatchWriter::for_table(table)?
                .with_writer_properties(props.clone()),
            rows: 0,
        })
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        use deltalake::writer::DeltaWriter;
        if batch.num_rows() > 0 {
            self.rows += batch.num_rows();
            self.inner.write(batch).await?;
        }
        Ok(())
    }

    /// Closes the files and returns their Add actions.
    pub async fn finish(mut self) -> Result<Vec<deltalake::kernel::Add>> {
        use deltalake::writer::DeltaWriter;
        if self.rows == 0 {
            return Ok(Vec::new());
        }
        Ok(self.inner.flush().await?)
    }

    /// [`FileWriter::write`] from a thread outside the async runtime (an engine thread).
    pub fn write_blocking(
        &mut self,
        rt: &tokio::runtime::Handle,
        batch: RecordBatch,
    ) -> Result<()> {
        rt.block_on(self.write(batch))
    }
}

type FastHash = BuildHasherDefault<twox_hash::XxHash64>;

/// The keys of the rows being upserted, to find the old rows they replace. The one-column
/// cases keep the values behind a one-bit-per-slot filter ([`HashFilter`]) that answers most
/// misses with one memory access: a scan of a live table's keys is mostly misses.
pub(crate) enum KeyMatch {
    /// One integer key column that fits in an `i64` (the common case).
    Int(HashSet<i64, FastHash>, HashFilter),
    /// One string key column: the values' bytes.
    Str(HashSet<Box<[u8]>, FastHash>, HashFilter),
    /// Any other key: row-encoded bytes.
    Rows(RowConverter, HashSet<Box<[u8]>, FastHash>),
}

fn int_hash(k: i64) -> u64 {
    (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn bytes_hash(b: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(b)
}

/// A string key column as `Utf8`, whatever string type it was written with.
fn utf8(col: &ArrayRef) -> Result<ArrayRef> {
    Ok(match col.data_type() {
        DataType::Utf8 => col.clone(),
        _ => cast(col, &DataType::Utf8)?,
    })
}

impl KeyMatch {
    pub(crate) fn new(cols: &[ArrayRef]) -> Result<Self> {
        use DataType::*;
        // Every value of these types is an Int64 (UInt64 is not: it takes the general path).
        if let [one] = cols
            && matches!(
                one.data_type(),
                Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32
            )
        {
            let v = arrow::compute::cast(one, &DataType::Int64)?;
            let set: HashSet<i64, FastHash> =
                v.as_primitive::<Int64Type>().iter().flatten().collect();
            let filter = HashFilter::new(set.iter().map(|k| int_hash(*k)));
            return Ok(Self::Int(set, filter));
        }
        if let [one] = cols
            && crate::engine::is_string_type(one.data_type())
        {
            let v = utf8(one)?;
            let set: HashSet<Box<[u8]>, FastHash> = v
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(|k| Box::from(k.as_bytes()))
                .collect();
            let filter = HashFilter::new(set.iter().map(|k| bytes_hash(k)));
            return Ok(Self::Str(set, filter));
        }
        let fields = cols
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)?;
        let rows = converter.convert_columns(cols)?;
        let set = rows.iter().map(|r| Box::from(r.as_ref())).collect();
        Ok(Self::Rows(converter, set))
    }

    /// Which rows of these key columns hold a key that is not being upserted.
    pub(crate) fn absent(&self, cols: &[ArrayRef]) -> Result<BooleanArray> {
        if let Self::Rows(converter, set) = self {
            return Ok(converter
                .convert_columns(cols)?
                .iter()
                .map(|r| Some(!set.contains(r.as_ref())))
                .collect());
        }
        let mut absent = vec![true; cols[0].len()];
        self.for_each_hit(cols, |i| absent[i] = false)?;
        Ok(BooleanArray::from(absent))
    }

    /// Calls `hit` with the index of every row of these key columns whose key is being
    /// upserted (the complement of [`KeyMatch::absent`], without building a mask).
    pub(crate) fn for_each_hit(&self, cols: &[ArrayRef], mut hit: impl FnMut(usize)) -> Result<()> {
        use arrow::array::Array;
        match self {
            Self::Int(set, filter) => {
                let v = arrow::compute::cast(&cols[0], &DataType::Int64)?;
                let v = v.as_primitive::<Int64Type>();
                for (i, k) in v.values().iter().enumerate() {
                    if filter.may_hold(int_hash(*k)) && set.contains(k) && v.is_valid(i) {
                        hit(i);
                    }
                }
            }
            Self::Str(set, filter) => {
                let v = utf8(&cols[0])?;
                for (i, k) in v.as_string::<i32>().iter().enumerate() {
                    if let Some(k) = k
                        && filter.may_hold(bytes_hash(k.as_bytes()))
                        && set.contains(k.as_bytes())
                    {
                        hit(i);
                    }
                }
            }
            Self::Rows(converter, set) => {
                for (i, r) in converter.convert_columns(cols)?.iter().enumerate() {
                    if set.contains(r.as_ref()) {
                        hit(i);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A one-bit-per-slot filter over 64-bit hashes of keys: `may_hold` is false for most keys
/// not in the set, and true for every key in it.
pub(crate) struct HashFilter {
    bits: Vec<u64>,
    shift: u32,
}

impl HashFilter {
    fn new(hashes: impl ExactSizeIterator<Item = u64>) -> Self {
        // About 64 slots per key (at most 2^24 slots, 2 MiB): under 2 % of misses pass.
        let slots = (hashes.len().max(1) * 64)
            .next_power_of_two()
            .clamp(64, 1 << 24);
        let mut f = Self {
            bits: vec![0; slots / 64],
            shift: 64 - slots.trailing_zeros(),
        };
        for h in hashes {
            let s = f.slot(h);
            f.bits[s / 64] |= 1 << (s % 64);
        }
        f
    }

    fn slot(&self, h: u64) -> usize {
        (h >> self.shift) as usize
    }

    fn may_hold(&self, h: u64) -> bool {
        let s = self.slot(h);
        self.bits[s / 64] & (1 << (s % 64)) != 0
    }
}

/// Refuses a table that [`rewrite`] cannot carry rows of: one whose deletion vectors are
/// stored at absolute paths (written by another engine). Checked when the table is opened,
/// before a run writes anything. Deletion vectors stored in the table or inline are honoured.
pub fn check_rewritable(table: &DeltaTable, loc: &TableLocation, flag: &str) -> Result<()> {
    use deltalake::kernel::StorageType;
    let files = table.snapshot()?.log_data();
    if files.iter().any(|f| {
        f.deletion_vector_descriptor()
            .is_some_and(|d| d.storage_type == StorageType::AbsolutePath)
    }) {
        return Err(Error::usage(format!(
            "{flag} `{loc}` has deletion vectors stored at absolute paths (another engine \
             wrote them), which sessionizer does not read. Purge them first (Spark: REORG \
             TABLE ... APPLY (PURGE)) or point {flag} at a new location"
        )));
    }
    Ok(())
}

/// An old data file whose rows are carried into a commit's new files, less its deleted rows.
pub struct Carried {
    pub path: Path,
    pub size: u64,
    pub deleted: Option<Arc<roaring::RoaringTreemap>>,
}

impl Carried {
    /// A file of the table as it stands, with the rows its deletion vector deletes.
    pub async fn of(
        store: &dyn ObjectStore,
        f: &deltalake::kernel::LogicalFileView,
    ) -> Result<Self> {
        let deleted = match f.deletion_vector_descriptor() {
            Some(d) => Some(Arc::new(crate::dv::deleted_rows(store, &d).await?)),
            None => None,
        };
        Ok(Self {
            path: f.object_store_path(),
            size: f.size() as u64,
            deleted,
        })
    }
}

/// Which of `n` rows starting at file row `offset` survive `deleted`; `None` when all do.
pub fn surviving(
    deleted: Option<&roaring::RoaringTreemap>,
    offset: u64,
    n: usize,
) -> Option<BooleanArray> {
    let deleted = deleted?;
    let end = offset + n as u64;
    if deleted.range_cardinality(offset..end) == 0 {
        return None;
    }
    let mut keep = vec![true; n];
    let mut it = deleted.iter();
    it.advance_to(offset);
    for p in it.take_while(|p| *p < end) {
        keep[(p - offset) as usize] = false;
    }
    Some(BooleanArray::from(keep))
}

/// One writer's share of [`write_carrying`]: slices of the new rows, then old files to carry.
#[derive(Default)]
struct Share {
    new: Vec<RecordBatch>,
    old: Vec<Carried>,
}

/// Writes `rows` and the surviving rows of the `old` files into new files of the table (not
/// committed), leaving out old rows whose key is among `rows` when `upsert_keys` is given.
///
/// It is written as a stream: each old file is read batch by batch and filtered straight into
/// a writer, so memory follows a file batch, not the table. The work is shared by one writer
/// per core at most, so it leaves at most that many files whatever it started from.
/// (delta-rs's MERGE joins the source with the table in memory, and its overwrite encodes on
/// one thread.)
pub async fn write_carrying(
    table: &DeltaTable,
    rows: RecordBatch,
    old: Vec<Carried>,
    upsert_keys: Option<&[String]>,
    partition: Option<(String, i32)>,
) -> Result<Vec<deltalake::kernel::Add>> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut shares: Vec<Share> = (0..cores).map(|_| Share::default()).collect();
    // The new rows, in up to one slice per core of at least 250,000 rows.
    let n = rows.num_rows();
    let chunk = n.div_ceil((n / 250_000).clamp(1, cores)).max(1);
    for (i, start) in (0..n).step_by(chunk).enumerate() {
        shares[i % cores]
            .new
            .push(rows.slice(start, chunk.min(n - start)));
    }
    let matcher = match upsert_keys {
        Some(keys) if !old.is_empty() => Some(Arc::new(KeyMatch::new(&key_columns(&rows, keys)?)?)),
        _ => None,
    };
    for (i, f) in old.into_iter().enumerate() {
        shares[(i + n.div_ceil(chunk)) % cores].old.push(f);
    }

    // Old files are read as the table's schema says (files written by other writers may hold
    // strings as views, say), so that every batch a writer gets has the same types.
    let schema = table.snapshot()?.snapshot().arrow_schema();
    let wp = append_writer_properties(&schema);
    let store = table.object_store();
    let keys = upsert_keys.unwrap_or_default().to_vec();
    let mut tasks = tokio::task::JoinSet::new();
    for share in shares
        .into_iter()
        .filter(|s| !s.new.is_empty() || !s.old.is_empty())
    {
        let (store, schema, keys, matcher, partition) = (
            store.clone(),
            schema.clone(),
            keys.clone(),
            matcher.clone(),
            partition.clone(),
        );
        let mut writer = FileWriter::new(table, &wp)?;
        tasks.spawn(async move {
            for slice in share.new {
                writer.write(slice).await?;
            }
            for f in share.old {
                let mut stream = open_parquet(store.clone(), f.path, f.size)
                    .await?
                    .with_batch_size(64 * 1024)
                    .build()?;
                let mut offset = 0u64;
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    let keep = surviving(f.deleted.as_deref(), offset, batch.num_rows());
                    offset += batch.num_rows() as u64;
                    let batch = match keep {
                        Some(keep) => arrow::compute::filter_record_batch(&batch, &keep)?,
                        None => batch,
                    };
                    // A partition column lives in the log, not in the file.
                    let batch = match &partition {
                        Some((col, value)) => with_constant(batch, col, *value)?,
                        None => batch,
                    };
                    let batch = conform(&batch, &schema)?;
                    let batch = match &matcher {
                        Some(m) => {
                            let absent = m.absent(&key_columns(&batch, &keys)?)?;
                            arrow::compute::filter_record_batch(&batch, &absent)?
                        }
                        None => batch,
                    };
                    writer.write(batch).await?;
                }
            }
            writer.finish().await
        });
    }
    let mut adds = Vec::new();
    while let Some(done) = tasks.join_next().await {
        // A panic in a writer task is a bug: let it end the run as one (exit 101).
        adds.extend(done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?);
    }
    Ok(adds)
}

/// The files of the table, or of one partition (column, value) of an `Int32` column.
pub fn partition_files(
    table: &DeltaTable,
    partition: Option<&(String, i32)>,
) -> Result<Vec<deltalake::kernel::LogicalFileView>> {
    Ok(table
        .snapshot()?
        .log_data()
        .iter()
        .filter(|f| match partition {
            None => true,
            Some((col, value)) => {
                f.partition_values_map()
                    .get(col)
                    .cloned()
                    .flatten()
                    .as_deref()
                    == Some(value.to_string().as_str())
            }
        })
        .collect())
}

/// Replaces the table's rows in one commit: removes every current file and adds files holding
/// `rows` plus, with `keep_other_keys`, the old rows whose key (on those columns) is not among
/// `rows` (see [`write_carrying`]). The commit is recorded as `operation` and made as
/// `commit_as` says.
pub async fn rewrite(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keep_other_keys: Option<&[String]>,
    operation: deltalake::protocol::DeltaOperation,
    commit_as: Rewrite<'_>,
) -> Result<DeltaTable> {
    // With a partition, only its files are replaced; the other partitions are other writers'.
    let partition = commit_as.partition.clone();
    let files = partition_files(&table, partition.as_ref())?;
    let mut actions: Vec<Action> = files
        .iter()
        .map(|f| Action::Remove(f.remove_action(true)))
        .collect();
    let mut old = Vec::new();
    if keep_other_keys.is_some() {
        check_rewritable(&table, loc, "the table")?;
        let store = table.object_store();
        for f in &files {
            old.push(Carried::of(store.as_ref(), f).await?);
        }
    }
    let adds = write_carrying(&table, rows, old, keep_other_keys, partition).await?;
    actions.extend(adds.into_iter().map(Action::Add));
    commit_as.commit(table, loc, actions, operation).await
}

/// How a [`rewrite`] commits: the batch's tag, extra `commitInfo` metadata, and whether it
/// must land right after the version read.
pub struct Rewrite<'a> {
    pub tag: &'a BatchTag,
    pub extra: Option<(&'a str, serde_json::Value)>,
    pub exact: bool,
    /// Replace only the rows of this partition (column, value) of an `Int32` column.
    pub partition: Option<(String, i32)>,
}

impl Rewrite<'_> {
    /// [`commit`]s `actions` as this says.
    pub async fn commit(
        self,
        table: DeltaTable,
        loc: &TableLocation,
        actions: Vec<Action>,
        operation: deltalake::protocol::DeltaOperation,
    ) -> Result<DeltaTable> {
        commit(
            table, loc, actions, operation, self.tag, self.extra, self.exact,
        )
        .await
    }
}

/// `batch` with an `Int32` column `name` holding `value` on every row.
pub fn with_constant(batch: RecordBatch, name: &str, value: i32) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut fields: Vec<arrow::datatypes::FieldRef> =
        batch.schema().fields().iter().cloned().collect();
    let mut cols = batch.columns().to_vec();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        name,
        DataType::Int32,
        true,
    )));
    cols.push(Arc::new(arrow::array::Int32Array::from_value(value, n)));
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        cols,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )?)
}

/// The key columns of a batch (they are in every batch the live schema describes).
pub(crate) fn key_columns(batch: &RecordBatch, keys: &[String]) -> Result<Vec<ArrayRef>> {
    keys.iter()
        .map(|k| {
            batch.column_by_name(k).cloned().ok_or_else(|| {
                Error::Checkpoint(format!("a live row batch has no key column `{k}`"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringArray};
    use proptest::prelude::*;

    fn hits(m: &KeyMatch, col: ArrayRef) -> Vec<usize> {
        let mut out = Vec::new();
        m.for_each_hit(&[col], |i| out.push(i)).unwrap();
        out
    }

    proptest! {
        /// The filtered scan finds exactly the rows whose key is among the upserted keys
        /// (nulls never), for integer keys of any width and for string keys.
        #[test]
        fn hits_are_exactly_the_rows_with_upserted_keys(
            new in proptest::collection::vec(-50i64..50, 0..30),
            old in proptest::collection::vec(proptest::option::of(-60i64..60), 0..200),
        ) {
            let expected: Vec<usize> = old
                .iter()
                .enumerate()
                .filter(|(_, k)| k.is_some_and(|k| new.contains(&k)))
                .map(|(i, _)| i)
                .collect();
            let m = KeyMatch::new(&[Arc::new(Int64Array::from(new.clone())) as ArrayRef]).unwrap();
            prop_assert_eq!(&hits(&m, Arc::new(Int64Array::from(old.clone()))), &expected);
            let narrow = |v: &[Option<i64>]| -> ArrayRef {
                Arc::new(Int32Array::from(v.iter().map(|k| k.map(|k| k as i32)).collect::<Vec<_>>()))
            };
            let new32: Vec<Option<i64>> = new.iter().map(|k| Some(*k)).collect();
            let m = KeyMatch::new(&[narrow(&new32)]).unwrap();
            prop_assert_eq!(&hits(&m, narrow(&old)), &expected);
            let text = |v: &[Option<i64>]| -> ArrayRef {
                Arc::new(StringArray::from(v.iter().map(|k| k.map(|k| format!("u{k}"))).collect::<Vec<_>>()))
            };
            let m = KeyMatch::new(&[text(&new32)]).unwrap();
            let got = hits(&m, text(&old));
            prop_assert_eq!(&got, &expected);
            let absent = m.absent(&[text(&old)]).unwrap();
            let missing: Vec<usize> = (0..old.len()).filter(|i| !absent.value(*i)).collect();
            prop_assert_eq!(&missing, &expected);
            // Two key columns take the row-encoded path (nulls match nothing here: the new
            // keys have none).
            let wide = |v: &[Option<i64>]| -> Vec<ArrayRef> {
                vec![Arc::new(Int64Array::from(v.to_vec())) as ArrayRef, text(v)]
            };
            let m = KeyMatch::new(&wide(&new32)).unwrap();
            let mut got = Vec::new();
            m.for_each_hit(&wide(&old), |i| got.push(i)).unwrap();
            prop_assert_eq!(&got, &expected);
        }
    }

    #[test]
    fn the_integer_filter_never_misses_a_key_and_rejects_most_others() {
        let keys: Vec<i64> = (0..10_000).map(|i| i * 7919).collect();
        let f = HashFilter::new(keys.iter().map(|k| int_hash(*k)));
        assert!(keys.iter().all(|k| f.may_hold(int_hash(*k))));
        let passed = (0..1_000_000i64)
            .map(|i| -1 - i)
            .filter(|k| f.may_hold(int_hash(*k)))
            .count();
        assert!(passed < 30_000, "{passed} of 1,000,000 misses passed");
    }
}
