//! The checkpoint: identity, progress, the batch plan, the lock, and the pending-state table.
//!
//! Layout under `--checkpoint`:
//!
//! ```text
//! state/                      Delta table of the pending events (engine's normalized layout)
//! _sessionizer/checkpoint.json  which events table and settings this checkpoint belongs to
//! _sessionizer/plan.json        the batch being processed: sequence number and source versions
//! _sessionizer/lock.json        who is running now, and until when the lock is valid
//! ```
//!
//! Progress (batch sequence number, last source version, watermark) is written in the same
//! Delta commit as the pending state, inside that commit's `commitInfo`, so the two can never
//! disagree. The plan is written before any output, so that a rerun after a crash recomputes
//! exactly the same batch from exactly the same state, and the outputs' application
//! transactions (`txn`, one app id per checkpoint, version = batch sequence number) tell which
//! outputs of that batch already committed.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use deltalake::kernel::Action;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::logstore::get_actions;
use deltalake::protocol::SaveMode;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::TableLocation;
use crate::error::{Error, Result};

const IDENTITY: &str = "_sessionizer/checkpoint.json";
const PLAN: &str = "_sessionizer/plan.json";
const LOCK: &str = "_sessionizer/lock.json";
const PROGRESS_KEY: &str = "sessionizer";

/// How long a lock is valid without a heartbeat. A run refreshes it every [`LOCK_HEARTBEAT`].
pub const LOCK_TTL: chrono::Duration = chrono::Duration::minutes(10);
pub const LOCK_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

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
    pub created_at: String,
}

impl Identity {
    /// The application id of every commit this checkpoint makes (`txn.appId`).
    pub fn app_id(&self) -> String {
        format!("sessionizer-{}", self.checkpoint_id)
    }

    /// Explains the first setting in which `wanted` differs from this checkpoint.
    pub fn check_matches(&self, wanted: &Identity, loc: &TableLocation) -> Result<()> {
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
        ];
        for (what, have, want, flag) in diffs {
            if have != want {
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
}

/// The batch being processed: recorded before any output is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub seq: i64,
    /// Inclusive range of events versions; `None` for a flush-only batch.
    pub versions: Option<(u64, u64)>,
    pub flush: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockInfo {
    token: String,
    host: String,
    pid: u32,
    since: String,
    expires_at: String,
}

/// A checkpoint location and its object store.
pub struct Checkpoint {
    pub loc: TableLocation,
    store: Arc<dyn ObjectStore>,
}

impl Checkpoint {
    /// Opens the location. With `create`, a local folder is made if missing; without it, a
    /// missing local folder is [`Error::NoCheckpoint`].
    pub fn open(loc: &TableLocation, create: bool) -> Result<Self> {
        if let Some(p) = loc.local_path() {
            if create {
                std::fs::create_dir_all(&p)?;
            } else if !p.exists() {
                return Err(no_checkpoint(loc));
            }
        }
        let store = loc.builder()?.build()?.object_store();
        Ok(Self {
            loc: loc.clone(),
            store,
        })
    }

    /// Opens a checkpoint that must already exist (for `status` and `maintain`), with its
    /// identity; [`Error::NoCheckpoint`] when there is none at `loc`.
    pub async fn open_existing(loc: &TableLocation) -> Result<(Self, Identity)> {
        let cp = Self::open(loc, false)?;
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
        let body = serde_json::to_vec_pretty(value).expect("serializable");
        self.store
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

    pub async fn identity(&self) -> Result<Option<Identity>> {
        self.get_json(IDENTITY).await
    }

    pub async fn write_identity(&self, id: &Identity) -> Result<()> {
        match self.put_json(IDENTITY, id, PutMode::Create).await {
            Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. })) => Ok(()),
            other => other,
        }
    }

    pub async fn plan(&self) -> Result<Option<Plan>> {
        self.get_json(PLAN).await
    }

    pub async fn write_plan(&self, plan: &Plan) -> Result<()> {
        self.put_json(PLAN, plan, PutMode::Overwrite).await
    }

    /// Takes the lock, or explains who holds it.
    ///
    /// The lock file is created with put-if-absent (a hard link locally, a conditional put on
    /// object stores), so of two runs starting together exactly one gets it. A lock whose
    /// holder is a dead process on this host, or whose heartbeat stopped more than
    /// [`LOCK_TTL`] ago, is taken over.
    pub async fn lock(&self, break_lock: bool) -> Result<LockGuard> {
        let now = Utc::now();
        let info = LockInfo {
            token: uuid::Uuid::new_v4().to_string(),
            host: hostname(),
            pid: std::process::id(),
            since: now.to_rfc3339(),
            expires_at: (now + LOCK_TTL).to_rfc3339(),
        };
        for attempt in 0..2 {
            match self.put_json(LOCK, &info, PutMode::Create).await {
                Ok(()) => {
                    return Ok(LockGuard::start(self.store.clone(), info));
                }
                Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. }))
                    if attempt == 0 =>
                {
                    let held = read_lock(self.store.as_ref()).await;
                    let stale = match &held {
                        None => true,
                        Some(h) => {
                            let expired = DateTime::parse_from_rfc3339(&h.expires_at)
                                .map(|t| t < now)
                                .unwrap_or(true);
                            let dead = h.host == info.host && !pid_alive(h.pid);
                            expired || dead
                        }
                    };
                    if !stale && !break_lock {
                        let h = held.expect("not stale implies present");
                        return Err(Error::Locked(format!(
                            "another run holds the checkpoint `{}`: pid {} on host {} since {} \
                             (the lock expires at {} unless that run keeps it alive). Nothing was \
                             written. Retry later; if that run is gone, pass --break-lock",
                            self.loc, h.pid, h.host, h.since, h.expires_at
                        )));
                    }
                    tracing::warn!(?held, "taking over a stale or broken lock");
                    match self.store.delete(&Path::from(LOCK)).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Error::ObjectStore(object_store::Error::AlreadyExists { .. })) => {
                    return Err(Error::Locked(format!(
                        "another run took the checkpoint `{}` at the same moment; nothing was written, retry later",
                        self.loc
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Who holds the lock now, if anyone (for `status`).
    pub async fn lock_holder(&self) -> Result<Option<String>> {
        let held = read_lock(self.store.as_ref()).await;
        Ok(held.map(|h| {
            format!(
                "pid {} on {} since {} (expires {})",
                h.pid, h.host, h.since, h.expires_at
            )
        }))
    }

    /// Opens the pending-state table, if it exists.
    pub async fn state_table(&self) -> Result<Option<DeltaTable>> {
        let loc = self.state_location();
        match crate::source::try_load(&loc).await {
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
        let bytes = table
            .log_store()
            .read_commit_entry(version)
            .await?
            .ok_or_else(|| {
                self.corrupt(&format!("commit {version} of the state table is missing"))
            })?;
        for action in get_actions(version, &bytes)? {
            if let Action::CommitInfo(ci) = action
                && let Some(v) = ci.info.get(PROGRESS_KEY)
            {
                return serde_json::from_value(v.clone())
                    .map_err(|e| self.corrupt(&format!("unreadable progress record: {e}")));
            }
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
            .map(|b| conform(b, schema))
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
        let (table, metrics) = state
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .with_commit_properties(progress_commit(progress))
            .await?;
        Ok((table, metrics.files_deleted.len()))
    }

    /// Replaces the pending state and records the progress, in one Delta commit.
    pub async fn write_state(
        &self,
        state: Option<DeltaTable>,
        pending: RecordBatch,
        progress: &Progress,
        app_id: &str,
    ) -> Result<DeltaTable> {
        let table = match state {
            Some(t) => t,
            None => {
                let loc = self.state_location();
                if let Some(p) = loc.local_path() {
                    std::fs::create_dir_all(&p)?;
                }
                crate::sink::create_table(&loc, &pending.schema(), false).await?
            }
        };
        let props = progress_commit(progress)
            .with_application_transaction(Transaction::new(app_id, progress.seq));
        // The pending events replace the previous ones in one overwrite commit.
        let operation = deltalake::protocol::DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: None,
            predicate: None,
        };
        let loc = self.state_location();
        crate::sink::rewrite(
            table,
            &loc,
            pending,
            None,
            props,
            operation,
            app_id,
            progress.seq,
        )
        .await
    }
}

/// Commit properties that record `progress` in the commit's `commitInfo`.
fn progress_commit(progress: &Progress) -> CommitProperties {
    CommitProperties::default().with_metadata([(
        PROGRESS_KEY.to_string(),
        serde_json::to_value(progress).expect("serializable"),
    )])
}

fn no_checkpoint(loc: &TableLocation) -> Error {
    Error::NoCheckpoint(format!(
        "there is no checkpoint at `{loc}` yet; run `sessionizer sessionize` first, or check \
         --checkpoint / --base-dir"
    ))
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

/// Holds the lock and keeps it alive until released.
pub struct LockGuard {
    store: Arc<dyn ObjectStore>,
    info: LockInfo,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    fn start(store: Arc<dyn ObjectStore>, info: LockInfo) -> Self {
        let (s, mut i) = (store.clone(), info.clone());
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_HEARTBEAT).await;
                // Refresh only a lock that is still ours: if it expired and another run took
                // it over, overwriting theirs would let two runs believe they hold it.
                let ours = read_lock(s.as_ref())
                    .await
                    .is_some_and(|h| h.token == i.token);
                if !ours {
                    tracing::warn!("the checkpoint lock is no longer ours; stopping its heartbeat");
                    return;
                }
                i.expires_at = (Utc::now() + LOCK_TTL).to_rfc3339();
                let body = serde_json::to_vec_pretty(&i).expect("serializable");
                if let Err(e) = s.put(&Path::from(LOCK), PutPayload::from(body)).await {
                    tracing::warn!("could not refresh the checkpoint lock: {e}");
                }
            }
        });
        Self {
            store,
            info,
            heartbeat,
        }
    }

    /// Releases the lock if it is still ours.
    pub async fn release(self) -> Result<()> {
        self.heartbeat.abort();
        if read_lock(self.store.as_ref())
            .await
            .is_some_and(|h| h.token != self.info.token)
        {
            tracing::warn!("the lock was taken over by another run; leaving it");
            return Ok(());
        }
        match self.store.delete(&Path::from(LOCK)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The lock as stored, or `None` when there is none or it cannot be read as a lock.
async fn read_lock(store: &dyn ObjectStore) -> Option<LockInfo> {
    let bytes = store
        .get(&Path::from(LOCK))
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether a process of this host is alive. Only Linux can tell (via /proc); elsewhere a lock
/// is assumed alive until it expires.
fn pid_alive(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}
