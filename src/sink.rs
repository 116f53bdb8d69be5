//! Writing the outputs: the append-only sessions table, the live table (upserted on the key in
//! one MERGE commit), and the optional late/invalid rows table.
//!
//! Each output commit carries the batch's tag ([`BatchTag`]: the checkpoint's txn, the batch
//! record, the fence), so that the commits are fenced as [`crate::delta`] describes. Whether a
//! table already holds the batch (a replay after a crash) is decided once, before the batch's
//! plan is recorded, by [`batch_done`]: a table that holds the very same batch is skipped; one
//! that holds another batch under the same sequence number, or a later batch, means the
//! checkpoint and its outputs disagree, and the run is refused before it writes anything.

use arrow::array::RecordBatch;
use deltalake::DeltaTable;

use crate::config::{LiveMode, Shard, TableLocation};

/// The partition column of a sharded run's live table: the shard that owns the row's key.
pub const SHARD_COLUMN: &str = "shard";

/// The live table's schema: the engine's live rows, plus [`SHARD_COLUMN`] when sharded.
pub fn live_table_schema(
    spec: &crate::engine::EventSpec,
    shard: Option<Shard>,
) -> arrow::datatypes::SchemaRef {
    let live = crate::engine::live_schema(spec);
    if shard.is_none() {
        return live;
    }
    let mut fields: Vec<arrow::datatypes::FieldRef> = live.fields().iter().cloned().collect();
    fields.push(std::sync::Arc::new(arrow::datatypes::Field::new(
        SHARD_COLUMN,
        arrow::datatypes::DataType::Int32,
        true,
    )));
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}
use crate::delta::{self, BatchTag, FileWriter, Recorded};
use crate::error::{Error, Result};

/// Whether `table` already holds the batch of `tag` (so it must not be written again).
///
/// Refuses (exit 2) when the table holds a different batch under this sequence number, or a
/// later batch: the checkpoint is behind its outputs (pending state lost, or restored from an
/// older backup), and going on would drop or repeat sessions. When this run lost its lock
/// meanwhile, that is the reason instead (exit 75).
pub async fn batch_done(
    table: &DeltaTable,
    loc: &TableLocation,
    flag: &str,
    tag: &BatchTag,
    checkpoint: &TableLocation,
) -> Result<bool> {
    let seq = tag.seq();
    let found = delta::recorded_batch(table, &tag.app_id, seq).await?;
    let theirs = match found {
        Recorded::No => return Ok(false),
        // Written by a release that kept no record: the txn is all there is.
        Recorded::Batch(None) => return Ok(true),
        Recorded::Batch(Some(r)) if r.same_batch(&tag.record) => {
            tracing::info!("{loc} already holds batch {seq}; skipping (replay after a crash)");
            return Ok(true);
        }
        Recorded::Batch(Some(r)) => format!(
            "batch {seq} made from events versions {}{}",
            describe_versions(r.versions),
            if r.flush { " with --flush" } else { "" }
        ),
        Recorded::Beyond(t) => format!("batches up to {t}"),
    };
    tag.fence.check().await?;
    Err(Error::Disagreement(format!(
        "the checkpoint `{checkpoint}` and its outputs disagree: {flag} `{loc}` (version {}) \
         already holds {theirs} of this checkpoint, but the checkpoint is at batch {} and would \
         now write batch {seq} from events versions {}{}. The checkpoint is behind its outputs \
         (its pending state was lost, or it was restored from an older backup); going on would \
         drop or repeat sessions, so nothing was written. Ways out: restore the checkpoint that \
         matches these tables, or start a new checkpoint with new --sessions and --live (and \
         --late-events) tables",
        table.version().unwrap_or(0),
        seq - 1,
        describe_versions(tag.record.versions),
        if tag.record.flush {
            " with --flush"
        } else {
            ""
        }
    )))
}

fn describe_versions(v: Option<(u64, u64)>) -> String {
    match v {
        Some((a, b)) if a == b => format!("{a}"),
        Some((a, b)) => format!("{a}..{b}"),
        None => "none (a flush only)".into(),
    }
}

/// `n` writers for an append to `table`. Nothing they write is visible until
/// [`delta::commit_files`] commits their files.
pub fn append_writers(table: &DeltaTable, n: usize) -> Result<Vec<FileWriter>> {
    let props = delta::append_writer_properties(&table.snapshot()?.snapshot().arrow_schema());
    (0..n.max(1))
        .map(|_| FileWriter::new(table, &props))
        .collect()
}

/// Appends `batches` in one commit. Returns whether it wrote (no rows, no commit).
pub async fn append(
    table: DeltaTable,
    loc: &TableLocation,
    batches: Vec<RecordBatch>,
    tag: &BatchTag,
) -> Result<(DeltaTable, bool)> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Ok((table, false));
    }
    let mut writer = append_writers(&table, 1)?.pop().expect("one writer");
    for batch in batches {
        writer.write(batch).await?;
    }
    let adds = writer.finish().await?;
    delta::commit_files(table, loc, adds, tag).await
}

/// Upserts the live rows on the key columns, recorded as a MERGE with the batch's tag: in
/// [`LiveMode::Rewrite`] the copy-on-write MERGE delta-rs would commit, written by
/// [`delta::rewrite`] as a stream; in [`LiveMode::DeletionVectors`] a merge-on-read upsert
/// ([`crate::live`]). Returns the number of rows inserted or updated.
///
/// A sharded run's live table is partitioned by [`SHARD_COLUMN`]: each shard replaces only its
/// own partition, and its commit's predicate names that partition, so that Delta's conflict
/// checker lets the shards commit side by side.
pub async fn merge_live(
    table: DeltaTable,
    loc: &TableLocation,
    rows: RecordBatch,
    keys: &[String],
    tag: &BatchTag,
    shard: Option<Shard>,
    mode: LiveMode,
) -> Result<(DeltaTable, usize)> {
    use deltalake::protocol::{DeltaOperation, MergePredicate};

    let upserted = rows.num_rows();
    if upserted == 0 {
        return Ok((table, 0));
    }
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let (rows, predicate, partition) = match shard {
        None => {
            let on_keys = keys
                .iter()
                .map(|k| format!("target.{} = source.{}", q(k), q(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            (rows, on_keys, None)
        }
        Some(s) => (
            delta::with_constant(rows, SHARD_COLUMN, s.index as i32)?,
            format!("{SHARD_COLUMN} = {}", s.index),
            Some((SHARD_COLUMN.to_string(), s.index as i32)),
        ),
    };
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
    let commit_as = delta::Rewrite {
        tag,
        extra: None,
        exact: false,
        partition,
    };
    let table = match mode {
        LiveMode::Rewrite => {
            delta::rewrite(table, loc, rows, Some(keys), operation, commit_as).await?
        }
        LiveMode::DeletionVectors => {
            crate::live::upsert(table, loc, rows, keys, operation, commit_as)
                .await?
                .0
        }
    };
    Ok((table, upserted))
}

/// Makes sure the live table may hold deletion vectors (`--live-mode deletion-vectors`):
/// enables them (reader version 3, writer version 7, feature `deletionVectors`) in a commit of
/// its own when they are not. The commit changes no rows and carries no batch, so a run that
/// dies after it leaves nothing half-done.
pub async fn enable_deletion_vectors(table: DeltaTable, loc: &TableLocation) -> Result<DeltaTable> {
    const PROPERTY: &str = "delta.enableDeletionVectors";
    match dv_setting(&table)? {
        DvSetting::Enabled => return Ok(table),
        // Someone turned them off on purpose (Spark's documented way to stop them): the
        // protocol forbids new deletion vectors then.
        DvSetting::Disabled => {
            return Err(Error::usage(format!(
                "--live `{loc}` has {PROPERTY} = false, so no writer may add deletion vectors \
                 to it, and --live-mode deletion-vectors cannot upsert it. Run with \
                 --live-mode rewrite, or set {PROPERTY} = true on the table"
            )));
        }
        DvSetting::Unset => {}
    }
    tracing::info!("enabling deletion vectors on {loc}");
    let props = [(PROPERTY.to_string(), "true".to_string())];
    match table
        .clone()
        .set_tbl_properties()
        .with_properties(props.into_iter().collect())
        .await
    {
        Ok(t) => Ok(t),
        // Another shard enabled them meanwhile.
        Err(e) => match delta::try_load(loc).await? {
            Some(t) if dv_setting(&t)? == DvSetting::Enabled => Ok(t),
            _ => Err(e.into()),
        },
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DvSetting {
    /// The feature is in the protocol and `delta.enableDeletionVectors` is true.
    Enabled,
    /// `delta.enableDeletionVectors` is set to something else than true.
    Disabled,
    /// Neither: the table was never set up for deletion vectors.
    Unset,
}

fn dv_setting(table: &DeltaTable) -> Result<DvSetting> {
    let property = table
        .snapshot()?
        .metadata()
        .configuration()
        .get("delta.enableDeletionVectors")
        .map(|v| v.eq_ignore_ascii_case("true"));
    Ok(
        match (
            delta::has_writer_feature(table, "deletionVectors")?,
            property,
        ) {
            (_, Some(false)) => DvSetting::Disabled,
            (true, Some(true)) => DvSetting::Enabled,
            _ => DvSetting::Unset,
        },
    )
}
