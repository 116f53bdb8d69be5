//! The checkpoint: identity, progress, the batch plan, the lock, and the pending-state table.
//!
//! Layout under `--checkpoint`:
//!
//! ```text
//! state/                              Delta table of the pending events (normalized layout)
//! _sessionizer/checkpoint.json        which events table and rules this checkpoint belongs to
//! _sessionizer/plans/<seq>.json       the plan of batch <seq>: its source versions, flush
//! _sessionizer/lock/<epoch>.json      the lock, one file per lock epoch
//! ```
//!
//! Progress (batch sequence number, last source version, watermark) is written in the same
//! Delta commit as the pending state, inside that commit's `commitInfo`, so the two can never
//! disagree. That commit is made against the exact state version the run read, so of two runs
//! that both believe they hold the checkpoint, at most one can record a batch.
//!
//! A batch's plan is created once (put-if-absent) before any output, so every run that ever
//! works on batch `seq` works on the same source versions; a rerun after a crash recomputes
//! exactly the same batch from exactly the same state, and the outputs' application
//! transactions (`txn`, one app id per checkpoint, version = batch sequence number) together
//! with the batch record in each commit tell which outputs of that batch already committed.
//!
//! **The lock.** Each lock epoch has its own file, created with put-if-absent (a hard link
//! locally, `If-None-Match` on object stores) and afterwards written only by the run that
//! created it (heartbeat, release): no two writers ever race on one file. The holder is the
//! newest epoch. Taking over a lock that expired, whose holder is dead, or with
//! `--break-lock`, is creating the next epoch's file, which exactly one taker can do. A run
//! owns the checkpoint as long as the next epoch's file does not exist: that is the
//! [`Fence`] it checks before every commit.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::protocol::SaveMode;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::TableLocation;
use crate::delta::{self, BatchTag, Fence};
use crate::error::{Error, Result};

const IDENTITY: &str = "_sessionizer/checkpoint.json";
/// Written by `reshard` in each shard checkpoint it replaced.
const RETIRED: &str = "_sessionizer/retired.json";
/// Where releases before per-batch plan files kept the one current plan.
const LEGACY_PLAN: &str = "_sessionizer/plan.json";
const PLANS: &str = "_sessionizer/plans";
const LOCKS: &str = "_sessionizer/lock";
const PROGRESS_KEY: &str = "sessionizer";

/// How long a lock is valid without a heartbeat. A run refreshes it every [`LOCK_HEARTBEAT`].
pub const LOCK_TTL: chrono::Duration = chrono::Duration::minutes(10);
pub const LOCK_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// The newest identity format this release reads. Format 2 records a shard function
/// (`--key-buckets`); checkpoints without one keep writing format 1, which every release reads.
pub const IDENTITY_FORMAT: u32 = 2;

/// What a checkpoint belongs to. A run with other settings is refused: its sessions would not
/// continue the ones already written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub checkpoint_id: String,
    pub events_table: String,
    pub events_table_id: String,
    pub keys: Vec<String>,
    /// Arrow types of the key columns: sessions cannot span a change of key type.
    #[serde(default)]
    pub key_types: Vec<String>,
    pub time_column: String,
    pub gap: String,
    pub watermark_delay: String,
    pub collect: Vec<String>,
    pub sums: Vec<String>,
    /// Arrow types the `--sum` columns are kept and summed as (`Int64` or `Float64`): the
    /// pending events hold them in that type. Absent in checkpoints written before integer
    /// sums were exact, which kept every summed column as `Float64`.
    #[serde(default)]
    pub sum_types: Vec<String>,
    /// `sessions`, or `pairs`; plus the rules that cut sessions. Absent in older checkpoints.
    #[serde(default)]
    pub rules: String,
    /// How a sharded run assigns keys to shards ([`crate::engine::ShardFn::recorded`]): empty
    /// for the default, and in checkpoints made before there was a choice.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shard_function: String,
    pub created_at: String,
}

impl Identity {
    /// The application id of every commit this checkpoint makes (`txn.appId`).
    pub fn app_id(&self) -> String {
        format!("sessionizer-{}", self.checkpoint_id)
    }

    /// Explains the first setting in which `wanted` differs from this checkpoint.
    pub fn check_matches(&self, wanted: &Identity, loc: &TableLocation) -> Result<()> {
        if self.format > IDENTITY_FORMAT {
            return Err(Error::Checkpoint(format!(
                "the checkpoint `{loc}` was made by a newer release of sessionizer (checkpoint \
                 format {}, this release reads up to {IDENTITY_FORMAT}); run it with that release",
                self.format
            )));
        }
        let diffs = [
            (
                "events table",
                &self.events_table,
                &wanted.events_table,
                "--events",
            ),
            (
                "events table id",
                &self.events_table_id,
                &wanted.events_table_id,
                "--events",
            ),
            ("key", &self.keys.join(","), &wanted.keys.join(","), "--key"),
            (
                "key column types",
                &self.key_types.join(","),
                &wanted.key_types.join(","),
                "--key on an events table whose key columns keep their type,",
            ),
            (
                "time column",
                &self.time_column,
                &wanted.time_column,
                "--time-column",
            ),
            ("gap", &self.gap, &wanted.gap, "--gap"),
            (
                "watermark delay",
                &self.watermark_delay,
                &wanted.watermark_delay,
                "--watermark-delay",
            ),
            (
                "collected columns",
                &self.collect.join(","),
                &wanted.collect.join(","),
                "--collect",
            ),
            (
                "summed columns",
                &self.sums.join(","),
                &wanted.sums.join(","),
                "--sum",
            ),
            (
                "session rules",
                &self.rules,
                &wanted.rules,
                "the same --mode, --end-when, --start-when, --max-duration and --pair-timeout:",
            ),
        ];
        let (have_fn, want_fn) = (
            shard_function_name(&self.shard_function),
            shard_function_name(&wanted.shard_function),
        );
        if have_fn != want_fn {
            return Err(Error::usage(format!(
                "the checkpoint `{loc}` splits keys over shards by {have_fn}, but this run asks \
                 for {want_fn}. A key would move to another shard, away from its pending events: \
                 rerun with the --key-buckets the checkpoint was made with (or none)"
            )));
        }
        for (what, have, want, flag) in diffs {
            // Checkpoints of releases that did not record the rules have none to compare.
            if have != want && !(what == "session rules" && have.is_empty()) {
                return Err(Error::usage(format!(
                    "the checkpoint `{loc}` was made for {what} `{have}`, but this run asks for \
                     `{want}`. Sessions cannot continue across that change: rerun with {flag} \
                     {have}, or start fresh with a new --checkpoint location (and new --sessions \
                     and --live tables)"
                )));
            }
        }
        let have = self.recorded_sum_types();
        let want = wanted.recorded_sum_types();
        if have != want {
            return Err(Error::usage(format!(
                "the checkpoint `{loc}` keeps the summed columns `{}` as `{}`, but this version \
                 of sessionizer sums them as `{}` (integer columns are summed exactly, as \
                 BIGINT). Its pending events cannot be carried over: start fresh with a new \
                 --checkpoint location and new --sessions and --live tables (their `_sum` \
                 columns change type too), with --starting-version N to begin after the \
                 versions this checkpoint processed",
                self.sums.join(","),
                have.join(","),
                want.join(","),
            )));
        }
        Ok(())
    }

    /// The types of the summed columns; `Float64` for each in a checkpoint that predates them.
    fn recorded_sum_types(&self) -> Vec<String> {
        if self.sum_types.is_empty() {
            vec!["Float64".to_string(); self.sums.len()]
        } else {
            self.sum_types.clone()
        }
    }
}

/// A recorded shard function, for messages.
fn shard_function_name(recorded: &str) -> String {
    if recorded.is_empty() {
        "the default hash (no --key-buckets)".to_string()
    } else {
        format!("`{recorded}` (--key-buckets)")
    }
}

/// How far the checkpoint got. Stored in the state table's commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Sequence number of the last committed batch (0: none yet).
    pub seq: i64,
    /// Last events version processed.
    pub last_version: Option<u64>,
    /// Watermark in microseconds since the epoch.
    pub watermark_us: Option<i64>,
    pub sessions_pending: u64,
    pub committed_at: Option<String>,
    /// The largest event time ever folded (microseconds), and the commit time
    /// (milliseconds) of the events version it came in: what the event-time guard measured.
    #[serde(default)]
    pub max_event_us: Option<i64>,
    #[serde(default)]
    pub max_event_committed_ms: Option<i64>,
}

/// The plan of one batch: recorded once, before any output of the batch is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub seq: i64,
    /// Inclusive range of events versions; `None` for a flush-only batch.
    pub versions: Option<(u64, u64)>,
    pub flush: bool,
}

/// One lock epoch's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockInfo {
    epoch: u64,
    token: String,
    host: String,
    pid: u32,
    /// `/proc/sys/kernel/random/boot_id`: the same host name on another machine, or after a
    /// reboot, is another boot.
    #[serde(default)]
    boot_id: String,
    /// The PID namespace (`/proc/self/ns/pid`): containers on one host reuse PIDs.
    #[serde(default)]
    pid_ns: String,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`), so that a
    /// reused PID is not taken for the holder.
    #[serde(default)]
    started: u64,
    since: String,
    expires_at: String,
    #[serde(default)]
    released: bool,
}

impl LockInfo {
    /// Whether another run may take the checkpoint over from this holder at `now`.
    fn is_free(&self, now: DateTime<Utc>, me: &Process) -> bool {
        let expired = DateTime::parse_from_rfc3339(&self.expires_at)
            .map(|t| t < now)
            .unwrap_or(true);
        self.released || expired || me.sees_dead(self)
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on host {} since {} (lock epoch {}, expires at {} unless that run keeps it \
             alive)",
            self.pid, self.host, self.since, self.epoch, self.expires_at
        )
    }
}

/// A checkpoint location and its object store.
pub struct Checkpoint {
    pub loc: TableLocation,
    store: Arc<dyn ObjectStore>,
}

impl Checkpoint {
    /// Opens the location without writing anything; a missing local folder is only created by
    /// [`Checkpoint::lock`].
    pub fn at(loc: &TableLocation) -> Result<Self> {
        let store = loc.builder()?.build()?.object_store();
        Ok(Self {
            loc: loc.clone(),
            store,
        })
    }

    /// Opens a checkpoint that must already exist (for `status` and `maintain`), with its
    /// identity; [`Error::NoCheckpoint`] when there is none at `loc`.
    pub async fn open_existing(loc: &TableLocation) -> Result<(Self, Identity)> {
        if loc.local_path().is_some_and(|p| !p.exists()) {
            return Err(no_checkpoint(loc));
        }
        let cp = Self::at(loc)?;
        match cp.identity().await? {
            Some(id) => Ok((cp, id)),
            None => Err(no_checkpoint(loc)),
        }
    }

    pub fn state_location(&self) -> TableLocation {
        self.loc.join("state")
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>> {
        match self.store.get(&Path::from(name)).await {
            Ok(r) => {
                let bytes = r.bytes().await?;
                serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                    Error::Checkpoint(format!(
                        "the checkpoint file `{}{name}` is corrupt ({e}). If no run is active, \
                         delete that file to let the next run rebuild it, or start fresh with a \
                         new --checkpoint location",
                        self.loc.url()
                    ))
                })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn put_json<T: Serialize>(&self, name: &str, value: &T, mode: PutMode) -> Result<()> {
        put_json(self.store.as_ref(), name, value, mode).await
    }

    pub async fn identity(&self) -> Result<Option<Identity>> {
        self.get_json(IDENTITY).await
    }

    /// Records the identity of a new checkpoint; of two runs racing to create it, the first
    /// one's stays, and that is the one returned.
    pub async fn write_identity(&self, id: &Identity) -> Result<Identity> {
        match self.put_json(IDENTITY, id, PutMode::Create).await {
            Ok(()) => Ok(id.clone()),
            Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. })) => self
                .identity()
                .await?
                .ok_or_else(|| self.corrupt("its identity file vanished while it was created")),
            Err(e) => Err(e),
        }
    }

    /// Why this checkpoint may no longer run, if `reshard` replaced it.
    pub async fn retired(&self) -> Result<Option<serde_json::Value>> {
        self.get_json(RETIRED).await
    }

    /// Marks this checkpoint as replaced (by `reshard`): runs on it are refused from now on.
    pub async fn retire(&self, why: &serde_json::Value, fence: &Fence) -> Result<()> {
        fence.check().await?;
        self.put_json(RETIRED, why, PutMode::Overwrite).await
    }

    fn plan_path(seq: i64) -> String {
        format!("{PLANS}/{seq:020}.json")
    }

    /// The recorded plan of batch `seq`, if any.
    pub async fn plan(&self, seq: i64) -> Result<Option<Plan>> {
        if let Some(p) = self.get_json(&Self::plan_path(seq)).await? {
            return Ok(Some(p));
        }
        let legacy: Option<Plan> = self.get_json(LEGACY_PLAN).await?;
        Ok(legacy.filter(|p| p.seq == seq))
    }

    /// Records the plan of a batch, once: if another run recorded a plan for this batch
    /// meanwhile, this run has lost the checkpoint ([`Error::Fenced`]).
    pub async fn record_plan(&self, plan: &Plan, fence: &Fence) -> Result<()> {
        fence.check().await?;
        match self
            .put_json(&Self::plan_path(plan.seq), plan, PutMode::Create)
            .await
        {
            Ok(()) => {}
            Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. })) => {
                if self.plan(plan.seq).await?.as_ref() != Some(plan) {
                    fence.set_lost();
                    return Err(Error::Fenced(format!(
                        "another run recorded the plan of batch {} of the checkpoint `{}` while \
                         this run was planning it: this run lost the checkpoint and stops without \
                         writing anything",
                        plan.seq, self.loc
                    )));
                }
            }
            Err(e) => return Err(e),
        }
        // Plans of batches long recorded are never read again.
        if plan.seq > 3 {
            let old = Path::from(Self::plan_path(plan.seq - 3));
            let _ = self.store.delete(&old).await;
        }
        Ok(())
    }

    /// The newest lock epoch and its file (`None` inside when unreadable).
    async fn top_lock(&self) -> Result<Option<(u64, Option<LockInfo>)>> {
        let prefix = Path::from(LOCKS);
        let metas: Vec<_> = match self.store.list(Some(&prefix)).try_collect().await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let top = metas
            .iter()
            .filter_map(|m| {
                m.location
                    .filename()?
                    .strip_suffix(".json")?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let Some(epoch) = top else {
            return Ok(None);
        };
        let info = read_lock(self.store.as_ref(), &lock_path(epoch)).await;
        Ok(Some((epoch, info)))
    }

    /// Takes the lock, or explains who holds it (exit 75).
    ///
    /// The newest epoch's holder keeps the checkpoint while it is alive and its heartbeat
    /// keeps it from expiring; otherwise (or with `break_lock`) this run creates the next
    /// epoch's file, which only one taker can do.
    pub async fn lock(&self, break_lock: bool) -> Result<LockGuard> {
        if let Some(p) = self.loc.local_path() {
            std::fs::create_dir_all(&p)?;
        }
        let now = Utc::now();
        let me = Process::current();
        let top = self.top_lock().await?;
        if let Some((_, Some(held))) = &top
            && !held.is_free(now, &me)
            && !break_lock
        {
            return Err(Error::Locked(format!(
                "another run holds the checkpoint `{}`: {}. Nothing was written. Retry later; if \
                 that run is gone, pass --break-lock",
                self.loc,
                held.describe()
            )));
        }
        // A lock its run released is the normal case of every run after the first; one that
        // expired, whose holder is dead, that cannot be read, or that --break-lock broke is
        // worth a warning.
        match &top {
            Some((_, Some(held))) if held.released => {
                tracing::debug!(epoch = held.epoch, "taking the lock its last run released");
            }
            Some((_, held)) => {
                tracing::warn!(?held, "taking over a stale, broken or still-held lock");
            }
            None => {}
        }
        let epoch = top.map_or(1, |(e, _)| e + 1);
        let info = LockInfo {
            epoch,
            token: uuid::Uuid::new_v4().to_string(),
            host: me.host.clone(),
            pid: me.pid,
            boot_id: me.boot_id.clone(),
            pid_ns: me.pid_ns.clone(),
            started: me.started,
            since: now.to_rfc3339(),
            expires_at: (now + LOCK_TTL).to_rfc3339(),
            released: false,
        };
        match self
            .put_json(&lock_path(epoch), &info, PutMode::Create)
            .await
        {
            Ok(()) => {}
            Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. })) => {
                return Err(Error::Locked(format!(
                    "another run took the checkpoint `{}` at the same moment; nothing was \
                     written, retry later",
                    self.loc
                )));
            }
            Err(e) => return Err(e),
        }
        // Epochs long superseded are never read again.
        if epoch > 3 {
            let _ = self.store.delete(&Path::from(lock_path(epoch - 3))).await;
        }
        let fence = Fence::new(
            self.store.clone(),
            Path::from(lock_path(epoch + 1)),
            format!("the checkpoint `{}` (lock epoch {epoch})", self.loc),
        );
        Ok(LockGuard::start(self.store.clone(), info, fence))
    }

    /// Who holds the lock now, if anyone (for `status`).
    pub async fn lock_holder(&self) -> Result<Option<String>> {
        Ok(match self.top_lock().await? {
            Some((_, Some(h))) if !h.released => Some(h.describe()),
            _ => None,
        })
    }

    /// Opens the pending-state table, if it exists.
    pub async fn state_table(&self) -> Result<Option<DeltaTable>> {
        let loc = self.state_location();
        match delta::try_load(&loc).await {
            Ok(t) => Ok(t),
            Err(e) => Err(Error::Checkpoint(format!(
                "the pending state in `{loc}` cannot be read ({e}). Restore it from a backup, or \
                 start fresh with a new --checkpoint location"
            ))),
        }
    }

    /// Reads the progress stored in the state table's latest commit.
    pub async fn progress(&self, state: Option<&DeltaTable>) -> Result<Progress> {
        let Some(table) = state else {
            return Ok(Progress::default());
        };
        let Some(version) = table.version() else {
            return Ok(Progress::default());
        };
        let actions = delta::commit_actions(table, version)
            .await?
            .ok_or_else(|| {
                self.corrupt(&format!("commit {version} of the state table is missing"))
            })?;
        if let Some(v) = delta::commit_info_value(&actions, PROGRESS_KEY) {
            return serde_json::from_value(v.clone())
                .map_err(|e| self.corrupt(&format!("unreadable progress record: {e}")));
        }
        if version == 0 {
            // Created, but the first batch never committed.
            return Ok(Progress::default());
        }
        Err(self.corrupt(&format!(
            "commit {version} of the state table carries no progress record (was it written by another tool?)"
        )))
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::Checkpoint(format!(
            "the checkpoint `{}` is corrupt: {what}. Start fresh with a new --checkpoint location \
             (and new --sessions and --live tables), or restore the checkpoint from a backup",
            self.loc
        ))
    }

    /// Reads every pending event, conformed to the engine's normalized schema.
    pub async fn pending(
        &self,
        state: Option<&DeltaTable>,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let Some(table) = state else {
            return Ok(RecordBatch::new_empty(schema.clone()));
        };
        let ctx = SessionContext::new();
        let provider = table.table_provider().await?;
        let batches = ctx.read_table(provider)?.collect().await?;
        let conformed: Vec<RecordBatch> = batches
            .iter()
            .map(|b| delta::conform(b, schema))
            .collect::<Result<_>>()
            .map_err(|e| {
                self.corrupt(&format!(
                    "the pending state does not match this run's columns: {e}"
                ))
            })?;
        Ok(arrow::compute::concat_batches(schema, &conformed)?)
    }

    /// Deletes the pending-state files that were replaced more than `retention` ago (Delta
    /// VACUUM). A rerun only ever reads the latest state, which VACUUM never touches; the
    /// VACUUM's own commits carry the same progress record, so the latest commit still holds it.
    pub async fn vacuum_state(
        &self,
        state: DeltaTable,
        progress: &Progress,
        retention: chrono::Duration,
    ) -> Result<(DeltaTable, usize)> {
        let meta = vec![(
            PROGRESS_KEY.to_string(),
            serde_json::to_value(progress).expect("serializable"),
        )];
        delta::vacuum(state, retention, meta).await
    }

    /// Replaces the pending state and records the progress, in one Delta commit made against
    /// the exact state version this run read: if another run recorded a batch meanwhile, this
    /// one fails (and is fenced).
    pub async fn write_state(
        &self,
        state: Option<DeltaTable>,
        pending: RecordBatch,
        progress: &Progress,
        tag: &BatchTag,
    ) -> Result<DeltaTable> {
        let loc = self.state_location();
        let table = match state {
            Some(t) => t,
            None => {
                tag.fence.check().await?;
                delta::create_table(&loc, &pending.schema(), false).await?
            }
        };
        // The pending events replace the previous ones in one overwrite commit.
        let operation = deltalake::protocol::DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: None,
            predicate: None,
        };
        let commit_as = delta::Rewrite {
            tag,
            extra: Some((
                PROGRESS_KEY,
                serde_json::to_value(progress).expect("serializable"),
            )),
            exact: true,
            partition: None,
        };
        delta::rewrite(table, &loc, pending, None, operation, commit_as).await
    }
}

fn lock_path(epoch: u64) -> String {
    format!("{LOCKS}/{epoch:020}.json")
}

async fn put_json<T: Serialize>(
    store: &dyn ObjectStore,
    name: &str,
    value: &T,
    mode: PutMode,
) -> Result<()> {
    let body = serde_json::to_vec_pretty(value).expect("serializable");
    store
        .put_opts(
            &Path::from(name),
            PutPayload::from(body),
            PutOptions {
                mode,
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

fn no_checkpoint(loc: &TableLocation) -> Error {
    Error::NoCheckpoint(format!(
        "there is no checkpoint at `{loc}` yet; run `sessionizer sessionize` first, or check \
         --checkpoint / --base-dir"
    ))
}

/// Holds the lock and keeps it alive until released.
pub struct LockGuard {
    store: Arc<dyn ObjectStore>,
    info: LockInfo,
    fence: Fence,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    fn start(store: Arc<dyn ObjectStore>, info: LockInfo, fence: Fence) -> Self {
        let (s, mut i, f) = (store.clone(), info.clone(), fence.clone());
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_HEARTBEAT).await;
                // Only this run ever writes its epoch's file; once the next epoch exists the
                // lock is no longer ours and the run stops at its next commit.
                if f.check().await.is_err() {
                    tracing::warn!("the checkpoint lock was taken over; stopping its heartbeat");
                    return;
                }
                i.expires_at = (Utc::now() + LOCK_TTL).to_rfc3339();
                let path = lock_path(i.epoch);
                if let Err(e) = put_json(s.as_ref(), &path, &i, PutMode::Overwrite).await {
                    tracing::warn!("could not refresh the checkpoint lock: {e}");
                }
            }
        });
        Self {
            store,
            info,
            fence,
            heartbeat,
        }
    }

    /// The fence every commit of this run checks.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The lock epoch and token, recorded in every commit of this run.
    pub fn epoch(&self) -> u64 {
        self.info.epoch
    }

    pub fn token(&self) -> &str {
        &self.info.token
    }

    /// Releases the lock (marks its epoch's file released). A run whose lock was taken over
    /// meanwhile leaves it and fails with [`Error::Fenced`] (exit 75), even if it had nothing
    /// left to write: it was not the run that owned the checkpoint.
    pub async fn release(self) -> Result<()> {
        self.heartbeat.abort();
        self.fence.check().await?;
        let mut info = self.info;
        info.released = true;
        put_json(
            self.store.as_ref(),
            &lock_path(info.epoch),
            &info,
            PutMode::Overwrite,
        )
        .await
    }
}

/// One lock file as stored, or `None` when there is none or it cannot be read as a lock.
async fn read_lock(store: &dyn ObjectStore, path: &str) -> Option<LockInfo> {
    let bytes = store
        .get(&Path::from(path))
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What identifies this process among all processes that may share a checkpoint.
struct Process {
    host: String,
    pid: u32,
    boot_id: String,
    pid_ns: String,
    started: u64,
}

impl Process {
    fn current() -> Self {
        let pid = std::process::id();
        Self {
            host: hostname(),
            pid,
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            started: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this process can tell for sure that the lock's holder is dead: only when both
    /// run in the same boot of the same machine and the same PID namespace (never by host
    /// name alone), and the holder's PID is gone or now belongs to a younger process.
    fn sees_dead(&self, holder: &LockInfo) -> bool {
        if self.boot_id.is_empty()
            || self.pid_ns.is_empty()
            || holder.boot_id != self.boot_id
            || holder.pid_ns != self.pid_ns
        {
            return false;
        }
        match start_time(holder.pid) {
            None => true,
            Some(t) => holder.started != 0 && t != holder.started,
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn hostname() -> String {
    Some(read_trimmed("/proc/sys/kernel/hostname"))
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// A process's start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`), or
/// `None` when there is no such process (or no /proc).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(me: &Process) -> LockInfo {
        LockInfo {
            epoch: 1,
            token: "t".into(),
            host: me.host.clone(),
            pid: me.pid,
            boot_id: me.boot_id.clone(),
            pid_ns: me.pid_ns.clone(),
            started: me.started,
            since: Utc::now().to_rfc3339(),
            expires_at: (Utc::now() + LOCK_TTL).to_rfc3339(),
            released: false,
        }
    }

    #[test]
    fn a_live_holder_is_alive_and_a_gone_one_dead() {
        let me = Process::current();
        assert!(!me.boot_id.is_empty(), "this test needs Linux /proc");
        let alive = holder(&me);
        assert!(!me.sees_dead(&alive));
        assert!(!alive.is_free(Utc::now(), &me));
        // The same PID with another start time: the PID was reused, the holder is gone.
        let reused = LockInfo {
            started: me.started + 1,
            ..holder(&me)
        };
        assert!(me.sees_dead(&reused));
    }

    #[test]
    fn a_holder_in_another_namespace_or_boot_is_never_judged_dead() {
        let me = Process::current();
        // PID 4194304 is above Linux's PID limit: no such process here.
        let ns = LockInfo {
            pid: 4_194_304,
            pid_ns: "pid:[1]".into(),
            ..holder(&me)
        };
        assert!(!me.sees_dead(&ns), "another PID namespace: cannot tell");
        let boot = LockInfo {
            pid: 4_194_304,
            boot_id: "another-boot".into(),
            ..holder(&me)
        };
        assert!(
            !me.sees_dead(&boot),
            "another boot (same host name): cannot tell"
        );
        let here = LockInfo {
            pid: 4_194_304,
            ..holder(&me)
        };
        assert!(me.sees_dead(&here));
    }

    #[test]
    fn expired_or_released_locks_are_free() {
        let me = Process::current();
        let past = LockInfo {
            pid: 1,
            boot_id: "other".into(),
            expires_at: (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
            ..holder(&me)
        };
        assert!(past.is_free(Utc::now(), &me));
        let released = LockInfo {
            released: true,
            ..holder(&me)
        };
        assert!(released.is_free(Utc::now(), &me));
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    fn identity(format: u32, shard_function: &str) -> Identity {
        Identity {
            format,
            checkpoint_id: "c".into(),
            events_table: "file:///e".into(),
            events_table_id: "id".into(),
            keys: vec!["user_id".into()],
            key_types: vec!["Int64".into()],
            time_column: "t".into(),
            gap: "30m".into(),
            watermark_delay: "0".into(),
            collect: vec![],
            sums: vec![],
            sum_types: vec![],
            rules: String::new(),
            shard_function: shard_function.into(),
            created_at: String::new(),
        }
    }

    #[test]
    fn a_checkpoint_of_a_newer_format_or_another_shard_function_is_refused() {
        let loc = TableLocation::from_path(std::path::Path::new("/tmp/cp")).unwrap();
        let buckets = "pmod(xxhash64(key), 16)";
        assert!(
            identity(2, buckets)
                .check_matches(&identity(2, buckets), &loc)
                .is_ok()
        );
        assert!(
            identity(1, "")
                .check_matches(&identity(1, ""), &loc)
                .is_ok()
        );
        let newer = identity(IDENTITY_FORMAT + 1, "").check_matches(&identity(1, ""), &loc);
        assert!(matches!(newer, Err(Error::Checkpoint(m)) if m.contains("newer release")));
        let other = identity(2, buckets).check_matches(&identity(1, ""), &loc);
        assert!(matches!(other, Err(Error::Usage(m)) if m.contains("--key-buckets")));
    }
}
