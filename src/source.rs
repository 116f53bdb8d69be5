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

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{Schema, SchemaRef};
use deltalake::kernel::Action;
use deltalake::logstore::{LogStoreRef, get_actions};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::ProjectionMask;
// ParquetObjectReader is deprecated upstream in favour of hand-written readers; it is still the
// simplest correct reader over an object store, so we keep it until the replacement settles.
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};

use crate::config::{ByteSize, OnChangeCommit, TableLocation};
use crate::engine::{EventSpec, normalize};
use crate::error::{Error, Result};

/// Opens the events table at its latest version, or explains why it is not one.
pub async fn open_events(loc: &TableLocation) -> Result<DeltaTable> {
    open_existing(
        loc,
        "--events",
        "create it with `sessionizer generate-rows`, or point --events at your table",
    )
    .await
}

/// Opens an existing Delta table, turning "not there" into a usage error naming the flag.
pub async fn open_existing(loc: &TableLocation, flag: &str, fix: &str) -> Result<DeltaTable> {
    try_load(loc).await?.ok_or_else(|| {
        Error::usage(format!(
            "{flag} `{loc}` is not a Delta table (there is no _delta_log with commits there); {fix}"
        ))
    })
}

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
        let t = DeltaTableBuilder::from_url(loc.url().clone())?.build()?;
        if !t.verify_deltatable_existence().await? {
            return Ok(None);
        }
    }
    match DeltaTableBuilder::from_url(loc.url().clone())?.load().await {
        Ok(t) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) | Err(DeltaTableError::InvalidTableLocation(_)) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The table's schema as Arrow.
pub fn arrow_schema(table: &DeltaTable) -> Result<SchemaRef> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// One data file added by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Relative path, percent-decoded by the object store when read.
    pub path: String,
    pub size: u64,
    pub partition_values: HashMap<String, Option<String>>,
}

/// What one source commit brings to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFiles {
    pub version: u64,
    /// New data files, sorted by path (their ordinal is the tie-break "file" coordinate).
    pub files: Vec<DataFile>,
    /// Why the commit contributes nothing, when it does not.
    pub skipped: Option<String>,
}

/// Reads and classifies one commit of the events table.
pub async fn read_version(
    log_store: &LogStoreRef,
    version: u64,
    on_change: OnChangeCommit,
) -> Result<VersionFiles> {
    let bytes = log_store.read_commit_entry(version).await?.ok_or_else(|| {
        Error::Source(format!(
            "version {version} of the events table is no longer in its log (removed by log \
             clean-up, see delta.logRetentionDuration), so the events it added cannot be read \
             incrementally. Start a new checkpoint (a new --checkpoint location) with \
             --starting-version set to the oldest version still in the log, and backfill the gap \
             separately if you need it"
        ))
    })?;
    let actions = get_actions(version, &bytes)?;
    let mut files = Vec::new();
    let mut removes = 0usize;
    let mut operation = String::from("unknown operation");
    for a in actions {
        match a {
            Action::Add(add) if add.data_change => files.push(DataFile {
                path: add.path,
                size: add.size.max(0) as u64,
                partition_values: add.partition_values,
            }),
            Action::Remove(r) if r.data_change => removes += 1,
            Action::CommitInfo(ci) => {
                if let Some(op) = ci.operation {
                    operation = op;
                }
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
                skipped: Some(format!(
                    "{operation} removes data; skipped (--on-change-commit skip)"
                )),
            }),
        };
    }
    let skipped = files
        .is_empty()
        .then(|| format!("{operation} adds no data"));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(VersionFiles {
        version,
        files,
        skipped,
    })
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

/// Reads the listed versions' files as normalized event batches.
///
/// Files are read concurrently but returned in (version, file) order; only the columns the
/// run uses are decoded. Partition columns come from the add action's partition values.
pub async fn read_events(
    store: Arc<dyn ObjectStore>,
    versions: &[VersionFiles],
    spec: &EventSpec,
    table_schema: &Schema,
) -> Result<Vec<RecordBatch>> {
    let wanted = spec.source_columns();
    let jobs: Vec<(u64, i32, DataFile)> = versions
        .iter()
        .flat_map(|v| {
            v.files
                .iter()
                .enumerate()
                .map(move |(i, f)| (v.version, i as i32, f.clone()))
        })
        .collect();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let results: Vec<Vec<RecordBatch>> =
        futures::stream::iter(jobs.into_iter().map(|(v, i, f)| {
            let store = store.clone();
            let wanted = wanted.clone();
            async move { read_file(store, v, i, &f, spec, table_schema, &wanted).await }
        }))
        .buffered(parallel)
        .try_collect()
        .await?;
    Ok(results.into_iter().flatten().collect())
}

async fn read_file(
    store: Arc<dyn ObjectStore>,
    version: u64,
    file_idx: i32,
    file: &DataFile,
    spec: &EventSpec,
    table_schema: &Schema,
    wanted: &[String],
) -> Result<Vec<RecordBatch>> {
    let path = Path::from_url_path(&file.path).map_err(|e| {
        Error::Source(format!(
            "version {version} names a data file `{}` that is not a valid path: {e}",
            file.path
        ))
    })?;
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(store, path).with_file_size(file.size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| {
        Error::Source(format!(
            "cannot read data file `{}` added in events version {version}: {e}. If the table was \
             vacuumed, that version can no longer be read; start a new checkpoint with a later \
             --starting-version",
            file.path
        ))
    })?;
    let file_schema = builder.schema().clone();
    let roots: Vec<usize> = wanted
        .iter()
        .filter_map(|c| file_schema.index_of(c).ok())
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()?;
    let mut out = Vec::new();
    let mut row = 0i64;
    while let Some(batch) = stream.next().await {
        let batch = with_partition_columns(batch?, file, wanted, table_schema)?;
        let n = batch.num_rows() as i64;
        out.push(normalize(
            spec,
            &batch,
            version as i64,
            file_idx,
            row,
            None,
        )?);
        row += n;
    }
    Ok(out)
}

/// Adds the wanted columns that live in the file's partition values rather than in the file.
fn with_partition_columns(
    batch: RecordBatch,
    file: &DataFile,
    wanted: &[String],
    table_schema: &Schema,
) -> Result<RecordBatch> {
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|c| batch.column_by_name(c).is_none() && file.partition_values.contains_key(*c))
        .collect();
    if missing.is_empty() {
        return Ok(batch);
    }
    let mut fields: Vec<Arc<arrow::datatypes::Field>> =
        batch.schema().fields().iter().cloned().collect();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    for c in missing {
        let field = table_schema.field_with_name(c)?;
        let value = file.partition_values[c].clone();
        let strings: ArrayRef = Arc::new(StringArray::from(vec![value; batch.num_rows()]));
        cols.push(cast(&strings, field.data_type())?);
        fields.push(Arc::new(field.clone().with_nullable(true)));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// Number of rows across batches.
pub fn row_count(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}
