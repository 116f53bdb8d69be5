//! The live table's upsert with deletion vectors (`--live-mode deletion-vectors`): a batch
//! marks the old rows of the keys it changes as deleted in the files that hold them, and
//! appends the new rows, in one commit carrying the batch's tag. No file is rewritten unless
//! the layout rules below say so, so a tick writes what it changed, not the table.
//!
//! The steps of one upsert:
//!
//! 1. **Find** the old rows of the changed keys: every file of the table (of this shard's
//!    partition) is read for its key columns only, on every core, and each row whose key is
//!    among the new rows' keys and not already deleted becomes a new deletion. With keys
//!    spread at random over the files, every file holds some of a tick's keys, so no file can
//!    be skipped; reading the key columns is the cost that grows with the table (README,
//!    "Live table modes").
//! 2. **Lay out**: a file with more than half of its rows deleted is *purged* (its surviving
//!    rows are carried into the new file and it is removed), and files of about the same size
//!    are merged when [`FANOUT`] of them pile up (size tiers: below 64 Ki rows, then eight
//!    times more each tier), so that the number of files stays logarithmic in the table's
//!    size and every row is rewritten a handful of times over its life, not on every tick.
//! 3. **Write** the new rows with the carried ones, and one deletion-vector file holding the
//!    new deletion vector of every other file with new deletions.
//! 4. **Commit**, as one fenced commit of the batch: for each such file a `remove` of its old
//!    entry and an `add` of the same file with its new deletion vector; the removes of purged
//!    and merged files; the adds of the new files.
//!
//! The result is the rewrite mode's rows, one per key, for every reader that honours deletion
//! vectors (delta-rs, Spark, Databricks, DuckDB's delta extension); one that ignores them
//! would see the old rows too.

use std::sync::Arc;

use arrow::array::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::{Action, LogicalFileView};
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use roaring::RoaringTreemap;

use crate::config::TableLocation;
use crate::delta::{self, Carried, KeyMatch, Rewrite};
use crate::dv::DvFile;
use crate::error::{Error, Result};

/// Files of one size tier merged at once.
pub const FANOUT: usize = 8;
/// Rows of the smallest tier's files.
const TIER0_ROWS: u64 = 64 * 1024;
/// A file with more than this share of its rows deleted is purged.
pub const PURGE_SHARE: f64 = 0.5;

/// What an upsert did, for the run's log and summary.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct UpsertReport {
    pub files_scanned: usize,
    pub rows_deleted: u64,
    pub deletion_vectors: usize,
    pub dv_bytes: usize,
    pub files_purged: usize,
    pub files_merged: usize,
    pub rows_carried: u64,
}

/// A file's rows and deletions after this upsert's finding.
struct Found {
    rows: u64,
    /// Deleted before (its deletion vector) and now (the changed keys' old rows).
    deleted: RoaringTreemap,
    new_deletions: u64,
}

impl Found {
    fn live(&self) -> u64 {
        self.rows - self.deleted.len()
    }
}

/// Upserts `rows` (one per key, with the partition column when `commit_as.partition` is set)
/// as the module header describes, and commits as `operation`.
pub async fn upsert(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keys: &[String],
    operation: deltalake::protocol::DeltaOperation,
    commit_as: Rewrite<'_>,
) -> Result<(DeltaTable, UpsertReport)> {
    let partition = commit_as.partition.clone();
    let files = delta::partition_files(&table, partition.as_ref())?;
    let found = find(&table, &files, &rows, keys).await?;
    let mut report = UpsertReport {
        files_scanned: files.len(),
        rows_deleted: found.iter().map(|f| f.new_deletions).sum(),
        ..Default::default()
    };

    // Lay out: purge, then merge tiers with the new file.
    let mut carry = vec![false; files.len()];
    for (i, f) in found.iter().enumerate() {
        if f.new_deletions > 0 && f.deleted.len() as f64 > PURGE_SHARE * f.rows as f64 {
            carry[i] = true;
            report.files_purged += 1;
        }
    }
    let mut out_rows = rows.num_rows() as u64
        + (0..files.len())
            .filter(|&i| carry[i])
            .map(|i| found[i].live())
            .sum::<u64>();
    loop {
        let t = tier(out_rows);
        let same: Vec<usize> = (0..files.len())
            .filter(|&i| !carry[i] && tier(found[i].live()) == t)
            .collect();
        if same.len() + 1 < FANOUT {
            break;
        }
        for i in same {
            carry[i] = true;
            report.files_merged += 1;
            out_rows += found[i].live();
        }
    }

    // Write: the deletion vectors of the files kept, the new rows with the carried ones.
    let store = table.object_store();
    let mut actions = Vec::new();
    let mut dvs = DvFile::default();
    let mut carried = Vec::new();
    for (i, (f, found)) in files.iter().zip(found).enumerate() {
        if carry[i] {
            actions.push(Action::Remove(f.remove_action(true)));
            report.rows_carried += found.live();
            if found.live() > 0 {
                carried.push(Carried {
                    path: f.object_store_path(),
                    size: f.size() as u64,
                    deleted: Some(Arc::new(found.deleted)),
                });
            }
        } else if found.new_deletions > 0 {
            actions.push(Action::Remove(f.remove_action(true)));
            if found.live() > 0 {
                #[allow(deprecated)] // the Add of a file as the log holds it
                let mut add = f.add_action();
                add.deletion_vector = Some(dvs.push(&found.deleted)?);
                add.data_change = true;
                add.stats = add.stats.map(|s| loose_bounds(&s));
                actions.push(Action::Add(add));
                report.deletion_vectors += 1;
            }
        }
    }
    let adds = delta::write_carrying(&table, rows, carried, None, partition).await?;
    actions.extend(adds.into_iter().map(Action::Add));
    report.dv_bytes = dvs.put(store.as_ref()).await?;
    tracing::info!(?report, "live upsert with deletion vectors");
    let table = commit_as.commit(table, loc, actions, operation).await?;
    Ok((table, report))
}

/// Rewrites every file of the table that has a deletion vector into files without (Spark's
/// `REORG TABLE ... APPLY (PURGE)`): the same rows, in one commit that changes no data, so
/// that the deleted rows leave the table's storage at the next VACUUM. Returns the files
/// purged and the rows carried. For `maintain`, under the checkpoint lock; a partition whose
/// purge loses to a concurrent commit (a shard's run) is left for the next `maintain`.
pub async fn purge(table: DeltaTable) -> Result<(DeltaTable, usize, u64)> {
    let partitioned = !table.snapshot()?.metadata().partition_columns().is_empty();
    let files: Vec<LogicalFileView> = delta::partition_files(&table, None)?
        .into_iter()
        .filter(|f| f.deletion_vector_descriptor().is_some())
        .collect();
    if files.is_empty() {
        return Ok((table, 0, 0));
    }
    // Files are carried per partition (the live table's only partitioning is by shard).
    let mut groups: std::collections::BTreeMap<Option<i32>, Vec<&LogicalFileView>> =
        Default::default();
    for f in &files {
        let value =
            if partitioned {
                let v = f
                    .partition_values_map()
                    .get(crate::sink::SHARD_COLUMN)
                    .cloned();
                Some(v.flatten().and_then(|v| v.parse::<i32>().ok()).ok_or_else(|| {
                Error::usage(format!(
                    "the live table's file `{}` has no `{}` partition value; only the live \
                     tables sessionizer writes can be purged",
                    f.path(),
                    crate::sink::SHARD_COLUMN
                ))
            })?)
            } else {
                None
            };
        groups.entry(value).or_default().push(f);
    }
    let schema = delta::arrow_schema(&table)?;
    let empty = RecordBatch::new_empty(schema);
    let (mut table, mut purged, mut rows) = (table, 0, 0u64);
    // One commit per partition: each shard's partition is purged on its own, so that a shard
    // committing meanwhile conflicts with at most one of them.
    for (value, files) in groups {
        let store = table.object_store();
        let mut actions = Vec::new();
        let mut carried = Vec::new();
        let mut group_rows = 0u64;
        for f in &files {
            let c = Carried::of(store.as_ref(), f).await?;
            group_rows += (f.num_records().unwrap_or(0) as u64)
                .saturating_sub(c.deleted.as_ref().map_or(0, |d| d.len()));
            carried.push(c);
            actions.push(Action::Remove(f.remove_action(false)));
        }
        let partition = value.map(|v| (crate::sink::SHARD_COLUMN.to_string(), v));
        let mut adds =
            delta::write_carrying(&table, empty.clone(), carried, None, partition).await?;
        for a in &mut adds {
            a.data_change = false;
        }
        actions.extend(adds.into_iter().map(Action::Add));
        let operation = deltalake::protocol::DeltaOperation::Optimize {
            predicate: value.map(|v| format!("{} = {v}", crate::sink::SHARD_COLUMN)),
            target_size: 0,
        };
        match delta::commit_untagged(table.clone(), actions, operation).await {
            Ok(t) => {
                table = t;
                purged += files.len();
                rows += group_rows;
            }
            // A run committed to this partition meanwhile: its files changed, so this purge
            // no longer fits them. Nothing was committed; the next maintain purges them.
            Err(e) => {
                tracing::warn!(
                    "the purge of the live table's deletion vectors{} lost to a concurrent \
                     commit and was left for the next maintain: {e}",
                    value.map_or(String::new(), |v| format!(" in shard {v}"))
                );
                table.update_state().await?;
            }
        }
    }
    Ok((table, purged, rows))
}

/// Size tier of a file of `rows` live rows: 0 below [`TIER0_ROWS`], then one more for every
/// eightfold.
fn tier(mut rows: u64) -> u32 {
    let mut t = 0;
    while rows >= TIER0_ROWS {
        rows /= FANOUT as u64;
        t += 1;
    }
    t
}

/// A file's statistics once rows of it are deleted: the same values, no longer tight bounds
/// (`numRecords` stays the file's physical row count, as the protocol says).
fn loose_bounds(stats: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(stats) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("tightBounds".into(), serde_json::Value::Bool(false));
            serde_json::Value::Object(m).to_string()
        }
        _ => stats.to_string(),
    }
}

/// Step 1 of the module header: each file's rows and deletions, in the order of `files`.
async fn find(
    table: &DeltaTable,
    files: &[LogicalFileView],
    rows: &RecordBatch,
    keys: &[String],
) -> Result<Vec<Found>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let new_keys = delta::key_columns(rows, keys)?;
    let types: Vec<_> = new_keys.iter().map(|c| c.data_type().clone()).collect();
    let matcher = Arc::new(KeyMatch::new(&new_keys)?);
    let store = table.object_store();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut tasks = tokio::task::JoinSet::new();
    for part in 0..cores.min(files.len()) {
        let mine: Vec<(usize, LogicalFileView)> = files
            .iter()
            .enumerate()
            .skip(part)
            .step_by(cores)
            .map(|(i, f)| (i, f.clone()))
            .collect();
        let (store, matcher, keys, types) =
            (store.clone(), matcher.clone(), keys.to_vec(), types.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            for (i, f) in mine {
                let old = Carried::of(store.as_ref(), &f).await?;
                let builder = delta::open_parquet(store.clone(), old.path, old.size).await?;
                let physical = builder.metadata().file_metadata().num_rows() as u64;
                let roots = keys
                    .iter()
                    .map(|k| {
                        builder.schema().index_of(k).map_err(|_| {
                            Error::Checkpoint(format!(
                                "live table file `{}` has no key column `{k}`",
                                f.path()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                let mut stream = builder
                    .with_projection(mask)
                    .with_batch_size(64 * 1024)
                    .build()?;
                let mut deleted = old.deleted.map(Arc::unwrap_or_clone).unwrap_or_default();
                let before = deleted.len();
                let mut offset = 0u64;
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    let cols = keys
                        .iter()
                        .zip(&types)
                        .map(|(k, t)| {
                            let c = batch.column_by_name(k).expect("projected");
                            if c.data_type() == t {
                                Ok(c.clone())
                            } else {
                                arrow::compute::cast(c, t)
                            }
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    matcher.for_each_hit(&cols, |j| {
                        deleted.insert(offset + j as u64);
                    })?;
                    offset += batch.num_rows() as u64;
                }
                let new_deletions = deleted.len() - before;
                out.push((
                    i,
                    Found {
                        rows: physical,
                        deleted,
                        new_deletions,
                    },
                ));
            }
            Ok::<_, Error>(out)
        });
    }
    let mut found: Vec<Option<Found>> = (0..files.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        for (i, f) in done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))? {
            found[i] = Some(f);
        }
    }
    Ok(found
        .into_iter()
        .map(|f| f.expect("every file found"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_grow_eightfold() {
        assert_eq!(tier(0), 0);
        assert_eq!(tier(65_535), 0);
        assert_eq!(tier(65_536), 1);
        assert_eq!(tier(8 * 65_536 - 1), 1);
        assert_eq!(tier(8 * 65_536), 2);
        assert_eq!(tier(4_000_000), 2);
        assert_eq!(tier(5_000_000), 3);
        assert_eq!(tier(40_000_000), 4);
    }

    #[test]
    fn stats_lose_tight_bounds_and_keep_the_rest() {
        let s = loose_bounds(r#"{"numRecords":5,"minValues":{"a":1}}"#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["numRecords"], 5);
        assert_eq!(v["minValues"]["a"], 1);
        assert_eq!(v["tightBounds"], false);
    }
}
