//! Writing the outputs: the append-only sessions table, the live table (upserted on the key in
//! one MERGE commit), the optional late/invalid rows table, and the rewrite that also replaces
//! the checkpoint's pending state.
//!
//! Every commit carries the checkpoint's application transaction (`txn`): app id of the
//! checkpoint, version = batch sequence number. delta-rs does not skip a commit whose txn is
//! already recorded, so each write first reads the recorded version on the very table it then
//! writes with, and skips when the batch is already there. An error that comes back from a
//! commit may have arrived after the commit became durable (post-commit hooks), so errors are
//! re-checked against the txn before they are believed.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, Schema};
use arrow::row::{RowConverter, SortField};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError, TableProperty};
use futures::StreamExt;
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

/// Rows per row group of appended files. A writer holds its open row group encoded in memory
/// until it is full, so this bounds each writer's memory (about 25 MiB of sessions).
const APPEND_ROW_GROUP_ROWS: usize = 256 * 1024;

/// Parquet settings for appends: Snappy as delta-rs does by default, no dictionary for
/// integer and timestamp columns (their values are nearly all distinct, so a dictionary is
/// built and then abandoned), and neither dictionary nor compression for the session id, a
/// random hex string that neither can shrink.
fn append_writer_properties(schema: &Schema) -> WriterProperties {
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
    fn new(table: &DeltaTable, props: &WriterProperties) -> Result<Self> {
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

/// `n` writers for an append of batch `seq` to `table`, or `None` when the table already holds
/// that batch (a replay after a crash), in which case nothing must be written.
pub async fn append_writers(
    table: &DeltaTable,
    loc: &TableLocation,
    app_id: &str,
    seq: i64,
    n: usize,
) -> Result<Option<Vec<FileWriter>>> {
    if txn_version(table, app_id).await? >= Some(seq) {
        tracing::info!("{loc} already holds batch {seq}; skipping (replay after a crash)");
        return Ok(None);
    }
    let props = append_writer_properties(&table.snapshot()?.snapshot().arrow_schema());
    (0..n.max(1))
        .map(|_| FileWriter::new(table, &props))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Commits the written files of batch `seq` in one commit carrying the batch's txn. Returns
/// whether it committed (no files, no commit).
pub async fn commit_files(
    table: DeltaTable,
    loc: &TableLocation,
    adds: Vec<deltalake::kernel::Add>,
    app_id: &str,
    seq: i64,
) -> Result<(DeltaTable, bool)> {
    use deltalake::kernel::Action;
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
    let props = txn_props(app_id, seq);
    let table = commit(table, loc, actions, props, operation, app_id, seq).await?;
    Ok((table, true))
}

/// Commits `actions` with `props` (the batch's txn, any metadata) as `operation`, then brings
/// the table up to that commit; an error is re-checked against the txn before it is believed.
async fn commit(
    table: DeltaTable,
    loc: &TableLocation,
    actions: Vec<deltalake::kernel::Action>,
    props: CommitProperties,
    operation: deltalake::protocol::DeltaOperation,
    app_id: &str,
    seq: i64,
) -> Result<DeltaTable> {
    use deltalake::kernel::transaction::CommitBuilder;
    let committed: std::result::Result<DeltaTable, DeltaTableError> = async {
        let committed = CommitBuilder::from(props)
            .with_actions(actions)
            .build(Some(table.snapshot()?), table.log_store(), operation)
            .await?;
        // Replays just the commit made here onto the table's snapshot.
        let mut table = table;
        table.update_incremental(Some(committed.version())).await?;
        Ok(table)
    }
    .await;
    committed_or_recheck(committed, loc, app_id, seq).await
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
    let Some(mut writers) = append_writers(&table, loc, app_id, seq, 1).await? else {
        return Ok((table, false));
    };
    let mut writer = writers.pop().expect("one writer");
    for batch in batches {
        writer.write(batch).await?;
    }
    let adds = writer.finish().await?;
    commit_files(table, loc, adds, app_id, seq).await
}

type FastHash = BuildHasherDefault<twox_hash::XxHash64>;

/// The keys of the rows being upserted, to find the old rows they replace.
enum KeyMatch {
    /// One integer key column that fits in an `i64` (the common case): the values themselves.
    Int(HashSet<i64, FastHash>),
    /// Any other key: row-encoded bytes.
    Rows(RowConverter, HashSet<Box<[u8]>, FastHash>),
}

impl KeyMatch {
    fn new(cols: &[ArrayRef]) -> Result<Self> {
        use DataType::*;
        // Every value of these types is an Int64 (UInt64 is not: it takes the general path).
        if let [one] = cols
            && matches!(
                one.data_type(),
                Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32
            )
        {
            let v = arrow::compute::cast(one, &DataType::Int64)?;
            return Ok(Self::Int(
                v.as_primitive::<Int64Type>().iter().flatten().collect(),
            ));
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
    fn absent(&self, cols: &[ArrayRef]) -> Result<BooleanArray> {
        Ok(match self {
            Self::Int(set) => {
                let v = arrow::compute::cast(&cols[0], &DataType::Int64)?;
                v.as_primitive::<Int64Type>()
                    .iter()
                    .map(|k| Some(k.is_none_or(|k| !set.contains(&k))))
                    .collect()
            }
            Self::Rows(converter, set) => converter
                .convert_columns(cols)?
                .iter()
                .map(|r| Some(!set.contains(r.as_ref())))
                .collect(),
        })
    }
}

/// Upserts the live rows on the key columns unless batch `seq` is already recorded: the
/// copy-on-write MERGE delta-rs would commit (recorded as a MERGE, with the batch's txn), written
/// by [`rewrite`] as a stream. Returns the number of rows inserted or updated.
pub async fn merge_live(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keys: &[String],
    app_id: &str,
    seq: i64,
) -> Result<(DeltaTable, usize)> {
    use deltalake::protocol::{DeltaOperation, MergePredicate};

    let upserted = rows.num_rows();
    if upserted == 0 {
        return Ok((table, 0));
    }
    if txn_version(&table, app_id).await? >= Some(seq) {
        tracing::info!("{loc} already holds batch {seq}; skipping (replay after a crash)");
        return Ok((table, upserted));
    }
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let predicate = keys
        .iter()
        .map(|k| format!("target.{} = source.{}", q(k), q(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let operation = DeltaOperation::Merge {
        predicate: Some(predicate.clone()),
        merge_predicate: Some(predicate),
        matched_predicates: vec![MergePredicate {
            action_type: "update".into(),
            predicate: None,
        }],
        not_matched_predicates: vec![MergePredicate {
            action_type: "insert".into(),
            predicate: None,
        }],
        not_matched_by_source_predicates: vec![],
    };
    let props = txn_props(app_id, seq);
    let table = rewrite(table, loc, rows, Some(keys), props, operation, app_id, seq).await?;
    Ok((table, upserted))
}

/// Refuses a table that [`rewrite`] cannot carry rows of: one with deletion vectors (written by
/// another engine), whose files hold rows that are deleted. Checked when the table is opened,
/// before a run writes anything.
pub fn check_rewritable(table: &DeltaTable, loc: &TableLocation, flag: &str) -> Result<()> {
    let files = table.snapshot()?.log_data();
    if files
        .iter()
        .any(|f| f.deletion_vector_descriptor().is_some())
    {
        return Err(Error::usage(format!(
            "{flag} `{loc}` has deletion vectors (another engine wrote them); sessionizer \
             rewrites its files whole and cannot honour them. Purge them first (Spark: REORG \
             TABLE ... APPLY (PURGE)) or point {flag} at a new location"
        )));
    }
    Ok(())
}

/// One writer's share of a [`rewrite`]: slices of the new rows, then old files to filter.
#[derive(Default)]
struct Share {
    new: Vec<RecordBatch>,
    old: Vec<(object_store::path::Path, u64)>,
}

/// Replaces the table's rows in one commit: removes every current file and adds files holding
/// `rows` plus, with `keep_other_keys`, the old rows whose key (on those columns) is not among
/// `rows`. The commit carries `props` (the batch's txn and any metadata) and is recorded as
/// `operation`.
///
/// It is written as a stream: each old file is read batch by batch and filtered straight into
/// a writer, so memory follows a file batch, not the table. The work is shared by one writer
/// per core at most, so a rewrite leaves at most that many files whatever it started from.
/// (delta-rs's MERGE joins the source with the table in memory, and its overwrite encodes on
/// one thread.)
#[allow(clippy::too_many_arguments)]
pub async fn rewrite(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keep_other_keys: Option<&[String]>,
    props: CommitProperties,
    operation: deltalake::protocol::DeltaOperation,
    app_id: &str,
    seq: i64,
) -> Result<DeltaTable> {
    use deltalake::kernel::Action;

    let files: Vec<_> = table.snapshot()?.log_data().iter().collect();
    let mut actions: Vec<Action> = files
        .iter()
        .map(|f| Action::Remove(f.remove_action(true)))
        .collect();
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
    // The old files whose other keys are carried over, spread over the writers.
    let mut matcher = None;
    if let Some(keys) = keep_other_keys.filter(|_| !files.is_empty()) {
        check_rewritable(&table, loc, "the table")?;
        matcher = Some(Arc::new(KeyMatch::new(&key_columns(&rows, keys)?)?));
        for (i, f) in files.iter().enumerate() {
            let share = &mut shares[(i + n.div_ceil(chunk)) % cores];
            share.old.push((f.object_store_path(), f.size() as u64));
        }
    }

    // Old files are read as the table's schema says (files written by other writers may hold
    // strings as views, say), so that every batch a writer gets has the same types.
    let schema = table.snapshot()?.snapshot().arrow_schema();
    let wp = append_writer_properties(&schema);
    let store = table.object_store();
    let keys = keep_other_keys.unwrap_or_default().to_vec();
    let mut tasks = tokio::task::JoinSet::new();
    for share in shares
        .into_iter()
        .filter(|s| !s.new.is_empty() || !s.old.is_empty())
    {
        let (store, schema, keys, matcher) =
            (store.clone(), schema.clone(), keys.clone(), matcher.clone());
        let mut writer = FileWriter::new(&table, &wp)?;
        tasks.spawn(async move {
            for slice in share.new {
                writer.write(slice).await?;
            }
            for (path, size) in share.old {
                let matcher = matcher.as_ref().expect("built when old files are carried");
                let mut stream = crate::source::open_parquet(store.clone(), path, size)
                    .await?
                    .with_batch_size(64 * 1024)
                    .build()?;
                while let Some(batch) = stream.next().await {
                    let batch = crate::checkpoint::conform(&batch?, &schema)?;
                    let keep = matcher.absent(&key_columns(&batch, &keys)?)?;
                    writer
                        .write(arrow::compute::filter_record_batch(&batch, &keep)?)
                        .await?;
                }
            }
            writer.finish().await
        });
    }
    while let Some(done) = tasks.join_next().await {
        // A panic in a writer task is a bug: let it end the run as one (exit 101).
        let adds = done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        actions.extend(adds.into_iter().map(Action::Add));
    }
    commit(table, loc, actions, props, operation, app_id, seq).await
}

/// The key columns of a batch (they are in every batch the live schema describes).
fn key_columns(batch: &RecordBatch, keys: &[String]) -> Result<Vec<ArrayRef>> {
    keys.iter()
        .map(|k| {
            batch.column_by_name(k).cloned().ok_or_else(|| {
                Error::Checkpoint(format!("a live row batch has no key column `{k}`"))
            })
        })
        .collect()
}
