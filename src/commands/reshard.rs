//! `sessionizer reshard --shards N --to M`: change the number of shards of a sharded run.
//!
//! Under every old shard's lock, and only when every shard has processed the same events
//! versions with no batch left unfinished, the pending state of all shards is read and cut by
//! the new shard count, each new shard's checkpoint gets its part (with the shared progress:
//! last version and watermark), and the live table's rows are moved to their new `shard`
//! partitions in one commit. The steps are ordered so that a crash anywhere leaves a state
//! from which the same command finishes the job, and no run can write in between:
//!
//! 1. the old checkpoints are marked retired (runs on them are refused from then on);
//! 2. the new checkpoints' pending state is written (each under its own lock);
//! 3. the live table is repartitioned (one overwrite commit);
//! 4. the new checkpoints' identities are written: only then can runs with `--shards M`
//!    start (before, a new shard checkpoint with no identity would be refused, because the
//!    output tables hold other checkpoints' batches).
//!
//! A rerun after a crash finds the old checkpoints retired *to the same M* and their state
//! untouched, and does every step again; each is idempotent.

use std::io::Write;

use arrow::array::{Int32Array, RecordBatch};
use arrow::datatypes::DataType;
use chrono::Utc;
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, Identity, LockGuard, Progress};
use crate::cli::ReshardArgs;
use crate::config::{OutputFormat, TableLocation, shard_checkpoint_name};
use crate::delta::{self, BatchRecord, BatchTag};
use crate::engine::{ShardFn, shard_of};
use crate::error::{Error, Result};
use crate::sink::SHARD_COLUMN;

#[derive(Debug, Serialize)]
pub struct ReshardReport {
    pub from: u32,
    pub to: u32,
    /// The events version every shard had processed.
    pub last_version: Option<u64>,
    pub pending_events: u64,
    pub live_rows: u64,
    pub elapsed_ms: u64,
}

fn shard_location(root: &TableLocation, index: u32, count: u32) -> TableLocation {
    root.join(&shard_checkpoint_name(index, count))
}

pub async fn reshard(args: &ReshardArgs) -> Result<ReshardReport> {
    let started = std::time::Instant::now();
    let (from, to) = (args.shards, args.to);
    if from < 2 || to < 2 || from == to {
        return Err(Error::usage(format!(
            "reshard goes from --shards N to --to M, both at least 2 and different (got {from} \
             and {to}); an unsharded run cannot be split, start sharded runs on new tables instead"
        )));
    }
    let tables = args.tables.resolve();
    let root = tables.checkpoint.clone();
    let why = serde_json::json!({ "resharded_to": to });

    // The old shards: every one must exist; a retired one only by an earlier reshard to M.
    let mut olds: Vec<(Checkpoint, Identity)> = Vec::new();
    for i in 0..from {
        let loc = shard_location(&root, i, from);
        let (cp, identity) = Checkpoint::open_existing(&loc).await.map_err(|_| {
            Error::usage(format!(
                "shard {i} of {from} has no checkpoint at `{loc}`: reshard needs every shard to \
                 have run (check --shards and --checkpoint)"
            ))
        })?;
        if let Some(r) = cp.retired().await?
            && r != why
        {
            return Err(Error::usage(format!(
                "shard {i} of {from} was already replaced by another reshard ({r})"
            )));
        }
        if ShardFn::from_recorded(&identity.shard_function).is_none() {
            return Err(Error::Checkpoint(format!(
                "shard {i} of {from} splits keys by `{}`, which this release of sessionizer does \
                 not know; reshard with the release that made it (nothing was changed)",
                identity.shard_function
            )));
        }
        if let Some((_, first)) = olds.first()
            && first.shard_function != identity.shard_function
        {
            return Err(Error::usage(format!(
                "shard {i} of {from} splits keys by `{}` and shard 0 by `{}`: shards that \
                 disagree on their keys cannot be resharded; rerun the odd shard's checkpoint \
                 from scratch with the same --key-buckets as the others",
                identity.shard_function, first.shard_function
            )));
        }
        olds.push((cp, identity));
    }
    let mut locks: Vec<LockGuard> = Vec::new();
    let result = async {
        for (cp, _) in &olds {
            locks.push(cp.lock(false).await?);
        }
        let (pending, progress, identity) = read_old_shards(&olds, from).await?;
        for ((cp, _), lock) in olds.iter().zip(&locks) {
            cp.retire(&why, lock.fence()).await?;
        }
        let keys = identity.keys.clone();
        let live_rows = repartition(
            &olds,
            &locks,
            &root,
            to,
            &identity,
            &keys,
            pending.clone(),
            &progress,
            &tables.live,
        )
        .await?;
        Ok::<_, Error>((pending.num_rows() as u64, progress.last_version, live_rows))
    }
    .await;
    for lock in locks {
        // A lock we lost is reported by the run that fails, not here.
        let _ = lock.release().await;
    }
    let (pending_events, last_version, live_rows) = result?;
    Ok(ReshardReport {
        from,
        to,
        last_version,
        pending_events,
        live_rows,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Every old shard's pending events, and the progress they share; refused unless every shard
/// is at the same events version with no unfinished batch.
async fn read_old_shards(
    olds: &[(Checkpoint, Identity)],
    from: u32,
) -> Result<(RecordBatch, Progress, Identity)> {
    let mut parts = Vec::new();
    let mut schema = None;
    let mut shared: Option<Progress> = None;
    for (i, (cp, _)) in olds.iter().enumerate() {
        let state = cp.state_table().await?;
        let progress = cp.progress(state.as_ref()).await?;
        if cp.plan(progress.seq + 1).await?.is_some() {
            return Err(Error::usage(format!(
                "shard {i} of {from} has an unfinished batch (a crashed run): run it again \
                 (sessionize --shards {from} --shard {i}) before resharding; nothing was changed"
            )));
        }
        if let Some(p) = &shared
            && (p.last_version, p.watermark_us) != (progress.last_version, progress.watermark_us)
        {
            return Err(Error::usage(format!(
                "the shards are not at the same events version (shard 0: {:?}, shard {i}: {:?}): \
                 run every shard once more with no new commits in between (or with \
                 --starting-version fixed by a pause of the writers), then reshard; nothing was \
                 changed",
                p.last_version, progress.last_version
            )));
        }
        if let Some(t) = &state {
            // Read as the table's schema says, so that every part concatenates.
            let s = schema.get_or_insert(delta::arrow_schema(t)?).clone();
            for b in SessionContext::new()
                .read_table(t.table_provider().await?)?
                .collect()
                .await?
            {
                parts.push(delta::conform(&b, &s)?);
            }
        }
        shared.get_or_insert(progress);
    }
    // With no state table anywhere (no shard ever ran a batch) there is nothing to carry.
    let pending = match schema {
        Some(s) => arrow::compute::concat_batches(&s, &parts)?,
        None => RecordBatch::new_empty(std::sync::Arc::new(arrow::datatypes::Schema::empty())),
    };
    Ok((pending, shared.unwrap_or_default(), olds[0].1.clone()))
}

/// Steps 2 to 4 of the module header. Returns the live rows moved.
#[allow(clippy::too_many_arguments)]
async fn repartition(
    olds: &[(Checkpoint, Identity)],
    old_locks: &[LockGuard],
    root: &TableLocation,
    to: u32,
    template: &Identity,
    keys: &[String],
    pending: RecordBatch,
    progress: &Progress,
    live: &TableLocation,
) -> Result<u64> {
    let function = ShardFn::from_recorded(&template.shard_function)
        .expect("checked before any shard was retired");
    let shards = if pending.num_rows() > 0 {
        shard_of(&pending, keys, to, function)?
    } else {
        Vec::new()
    };
    let mut news = Vec::new();
    for j in 0..to {
        let cp = Checkpoint::at(&shard_location(root, j, to))?;
        let lock = cp.lock(false).await?;
        let identity = match cp.identity().await? {
            Some(id) => id,
            None => Identity {
                checkpoint_id: uuid::Uuid::new_v4().to_string(),
                created_at: Utc::now().to_rfc3339(),
                ..template.clone()
            },
        };
        let tag = BatchTag {
            app_id: identity.app_id(),
            record: BatchRecord {
                seq: 0,
                versions: None,
                flush: false,
                epoch: lock.epoch(),
                run: lock.token().to_string(),
            },
            fence: lock.fence().clone(),
        };
        let mine: arrow::array::BooleanArray = shards.iter().map(|&s| Some(s == j)).collect();
        let part = if pending.num_rows() > 0 {
            arrow::compute::filter_record_batch(&pending, &mine)?
        } else {
            pending.clone()
        };
        // Written even when empty: the progress (last version, watermark) must carry over.
        if part.num_columns() > 0 {
            let state = cp.state_table().await?;
            let new_progress = Progress {
                seq: 0,
                committed_at: Some(Utc::now().to_rfc3339()),
                sessions_pending: 0,
                ..progress.clone()
            };
            cp.write_state(state, part, &new_progress, &tag).await?;
        }
        news.push((cp, lock, identity, tag));
    }
    let _ = (olds, old_locks);
    crate::failpoint::hit("reshard-after-states");
    let moved = repartition_live(live, keys, to, function, &news[0].3).await?;
    crate::failpoint::hit("reshard-after-live");
    for (cp, _, identity, tag) in &news {
        tag.fence.check().await?;
        cp.write_identity(identity).await?;
    }
    for (_, lock, _, _) in news {
        lock.release().await?;
    }
    Ok(moved)
}

/// Moves every live row to the partition of its key's new shard, in one overwrite commit.
async fn repartition_live(
    loc: &TableLocation,
    keys: &[String],
    to: u32,
    function: ShardFn,
    tag: &BatchTag,
) -> Result<u64> {
    use deltalake::kernel::Action;
    let Some(table) = delta::try_load(loc).await? else {
        return Ok(0);
    };
    let schema = delta::arrow_schema(&table)?;
    let batches = SessionContext::new()
        .read_table(table.table_provider().await?)?
        .collect()
        .await?;
    let mut actions: Vec<Action> = table
        .snapshot()?
        .log_data()
        .iter()
        .map(|f| Action::Remove(f.remove_action(true)))
        .collect();
    let props = delta::append_writer_properties(&schema);
    let mut writer = delta::FileWriter::new(&table, &props)?;
    let mut moved = 0u64;
    for b in batches {
        let b = delta::conform(&b, &schema)?;
        let shards: Int32Array = shard_of(&b, keys, to, function)?
            .into_iter()
            .map(|s| s as i32)
            .collect();
        let idx = b.schema().index_of(SHARD_COLUMN)?;
        let mut cols = b.columns().to_vec();
        cols[idx] = arrow::compute::cast(&shards, &DataType::Int32)?;
        moved += b.num_rows() as u64;
        writer
            .write(RecordBatch::try_new(b.schema(), cols)?)
            .await?;
    }
    actions.extend(writer.finish().await?.into_iter().map(Action::Add));
    let operation = deltalake::protocol::DeltaOperation::Write {
        mode: deltalake::protocol::SaveMode::Overwrite,
        partition_by: None,
        predicate: None,
    };
    delta::commit(table, loc, actions, operation, tag, None, false).await?;
    Ok(moved)
}

pub async fn command(args: &ReshardArgs, out: &mut dyn Write) -> Result<()> {
    let r = reshard(args).await?;
    match args.output {
        OutputFormat::Json => {
            writeln!(out, "{}", serde_json::to_string(&r).expect("serializable"))?
        }
        OutputFormat::Text => writeln!(
            out,
            "reshard: {} -> {} shards at events version {}: {} pending events and {} live rows \
             redistributed in {} ms",
            r.from,
            r.to,
            r.last_version.map_or("-".into(), |v| v.to_string()),
            r.pending_events,
            r.live_rows,
            r.elapsed_ms
        )?,
    }
    Ok(())
}
