//! `sessionizer sessionize`: one available-now run, batch by batch.
//!
//! Before anything is written, the run checks what it can by reading only: the checkpoint's
//! identity (tables, keys, rules), where a new checkpoint starts, and that a new checkpoint's
//! output tables were not written by another checkpoint. Then it takes the lock, and each
//! batch goes through short stages, each returning a report that adds into the run summary:
//!
//! 1. [`Batch::plan`]: replay the recorded plan of an unfinished batch, or choose the next
//!    source versions;
//! 2. [`Batch::check_outputs`]: which outputs already hold this batch, and that none holds a
//!    different or later one (the checkpoint must not be behind its outputs);
//! 3. record the plan (once, put-if-absent), then [`Batch::read`] the new files;
//! 4. [`Batch::fold`]: the engine over the key buckets, streaming closed sessions to files;
//! 5. [`Batch::write_outputs`]: sessions, late rows, live, each a fenced commit;
//! 6. [`Batch::record`]: pending state + progress in one commit against the state version read.
//!
//! The plan is durable before the first output, each output carries the batch's txn and
//! record, and the state commit comes last, so a crash anywhere leaves a checkpoint from which
//! a rerun redoes exactly the missing steps of exactly the same batch.

use std::io::Write;
use std::time::Instant;

use arrow::array::RecordBatch;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, Identity, LockGuard, Plan, Progress};
use crate::cli::SessionizeArgs;
use crate::config::{Collect, LiveMode, Mode, OutputFormat, Settings, split_list};
use crate::delta::{self, BatchRecord, BatchTag};
use crate::engine::{
    Engine, EventSpec, SessionRules, rejected_schema, sessions_schema, split_by_key,
};
use crate::error::{Error, Result};
use crate::source::{self, BatchLimits, EventParts, ReadPlan, VersionFiles};
use crate::{failpoint, fold, sink};

/// The run summary: what SPEC.md lists, plus the number of batches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// `first..last` events versions read by this run, or null when there was nothing new.
    pub source_versions: Option<String>,
    pub batches: u64,
    pub rows_read: u64,
    pub rows_late: u64,
    pub rows_invalid: u64,
    pub sessions_closed: u64,
    pub sessions_pending: u64,
    pub live_rows_upserted: u64,
    /// RFC 3339, or null before the first event.
    pub watermark: Option<String>,
    /// Data files of the events table decoded for their rows.
    pub files_read: u64,
    /// Data files of other shards' key buckets (`--key-buckets`), of which only the time
    /// column was read, for the watermark.
    pub files_watermark_only: u64,
    pub elapsed_ms: u64,
    /// Where the time went, in milliseconds, summed over batches.
    pub phases: Phases,
}

/// Milliseconds per phase of a run. `plan` covers opening the tables, the checkpoint, the
/// lock and choosing versions; `commit` is what remains (plan file, lock release).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    pub plan: u64,
    pub read: u64,
    pub sessionize: u64,
    pub write_sessions: u64,
    pub merge_live: u64,
    pub write_state: u64,
    pub commit: u64,
}

/// Milliseconds since `*t`, restarting the lap; logs the process's peak memory so far at
/// debug level (`-vv`), which shows which phase sets a run's peak.
fn lap(t: &mut Instant) -> u64 {
    let ms = t.elapsed().as_millis() as u64;
    *t = Instant::now();
    if tracing::enabled!(tracing::Level::DEBUG) {
        let peak = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        tracing::debug!(lap_ms = ms, peak_rss = %peak, "phase done");
    }
    ms
}

impl RunSummary {
    /// The summary as one structured log line (target `sessionizer::summary`), on by default.
    pub fn log(&self) {
        let p = &self.phases;
        tracing::info!(
            target: "sessionizer::summary",
            source_versions = self.source_versions.as_deref().unwrap_or("none"),
            batches = self.batches,
            rows_read = self.rows_read,
            rows_late = self.rows_late,
            rows_invalid = self.rows_invalid,
            sessions_closed = self.sessions_closed,
            sessions_pending = self.sessions_pending,
            live_rows_upserted = self.live_rows_upserted,
            watermark = self.watermark.as_deref().unwrap_or("none"),
            elapsed_ms = self.elapsed_ms,
            read_ms = p.read,
            sessionize_ms = p.sessionize,
            write_ms = p.write_sessions + p.merge_live + p.write_state,
            "sessionize finished"
        );
    }

    pub fn print(&self, format: OutputFormat, out: &mut dyn Write) -> std::io::Result<()> {
        match format {
            OutputFormat::Json => writeln!(
                out,
                "{}",
                serde_json::to_string(self).expect("serializable")
            ),
            OutputFormat::Text => {
                let none = "-".to_string();
                writeln!(
                    out,
                    "sessionize: versions {} in {} batch(es), {} rows read ({} late, {} invalid), \
                     {} sessions closed, {} pending, {} live rows upserted, watermark {}, {} ms",
                    self.source_versions
                        .as_ref()
                        .unwrap_or(&"none new".to_string()),
                    self.batches,
                    self.rows_read,
                    self.rows_late,
                    self.rows_invalid,
                    self.sessions_closed,
                    self.sessions_pending,
                    self.live_rows_upserted,
                    self.watermark.as_ref().unwrap_or(&none),
                    self.elapsed_ms
                )
            }
        }
    }
}

/// Formats microseconds since the epoch as RFC 3339.
pub fn format_micros(us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| us.to_string())
}

impl SessionizeArgs {
    /// Raw flags to validated settings; no I/O.
    pub fn settings(&self) -> Result<Settings> {
        let shard = self.shard()?;
        let mut tables = self.tables.resolve();
        if let Some(s) = shard {
            // Each shard keeps its own checkpoint: progress, plans, lock, pending state, app id.
            tables.checkpoint = tables.checkpoint.join(&s.checkpoint_name());
        }
        let s = Settings {
            tables,
            shard,
            bucket_column: self.bucket_column.clone(),
            keys: split_list(&self.key),
            time_column: self.time_column.trim().to_string(),
            gap: self.gap,
            watermark_delay: self.watermark_delay,
            collect: self.collect.clone(),
            sums: self.sum.iter().flat_map(|s| split_list(s)).collect(),
            mode: self.mode,
            start_when: self.start_when.clone(),
            end_when: self.end_when.clone(),
            max_duration: self.max_duration,
            pair_timeout: self.pair_timeout,
            max_event_skew: self.max_event_skew,
            flush: self.flush,
            output: self.output,
            on_change_commit: self.on_change_commit,
            max_files_per_batch: self.max_files_per_batch,
            max_bytes_per_batch: self.max_bytes_per_batch,
            bucket_size: self.bucket_size,
            starting_version: self.starting_version,
            starting_timestamp: self.starting_timestamp,
            break_lock: self.break_lock,
            warn_open_session_events: self.warn_open_session_events,
            live_mode: self.live_mode,
        };
        s.validate().map_err(Error::Usage)?;
        Ok(s)
    }
}

impl SessionizeArgs {
    /// `--shards N --shard I` (or `JOB_COMPLETION_INDEX` for I), validated; `None` unsharded.
    fn shard(&self) -> Result<Option<crate::config::Shard>> {
        let Some(count) = self.shards else {
            if self.key_buckets.is_some() {
                return Err(Error::usage(
                    "--key-buckets splits keys over shards: it needs --shards N and --shard I",
                ));
            }
            if self.shard.is_some() {
                return Err(Error::usage(
                    "--shard needs --shards N (how many shards there are in all)",
                ));
            }
            return Ok(None);
        };
        let index = match self.shard {
            Some(i) => i,
            None => match std::env::var("JOB_COMPLETION_INDEX") {
                Ok(v) => v.trim().parse().map_err(|_| {
                    Error::usage(format!(
                        "JOB_COMPLETION_INDEX `{v}` is not a shard number; pass --shard I"
                    ))
                })?,
                Err(_) => {
                    return Err(Error::usage(format!(
                        "--shards {count} needs --shard I (0..{}), or JOB_COMPLETION_INDEX as a \
                         Kubernetes Indexed Job sets it",
                        count.saturating_sub(1)
                    )));
                }
            },
        };
        if count == 0 || index >= count {
            return Err(Error::usage(format!(
                "--shard {index} is not one of --shards {count} (0..{})",
                count.saturating_sub(1)
            )));
        }
        let function = match self.key_buckets {
            None => crate::engine::ShardFn::Mix,
            Some(0) => {
                return Err(Error::usage(
                    "--key-buckets 0: a table needs at least one bucket (the B of the writer's \
                     pmod(xxhash64(key), B))",
                ));
            }
            Some(b) => crate::engine::ShardFn::SparkBuckets(b),
        };
        Ok((count > 1).then_some(crate::config::Shard {
            index,
            count,
            function,
        }))
    }
}

/// A recorded shard function as the flags that choose it.
fn describe_shard_function(recorded: &str) -> String {
    match crate::engine::ShardFn::from_recorded(recorded) {
        Some(crate::engine::ShardFn::SparkBuckets(b)) => {
            format!("--key-buckets {b} (and its --bucket-column)")
        }
        _ => "no --key-buckets".to_string(),
    }
}

/// Runs `sessionize` and prints the summary.
pub async fn command(args: &SessionizeArgs, out: &mut dyn Write) -> Result<()> {
    let settings = args.settings()?;
    let summary = run(&settings).await?;
    summary.log();
    summary.print(settings.output, out)?;
    Ok(())
}

/// The rule settings a checkpoint is bound to, as one comparable string.
fn rules_fingerprint(s: &Settings) -> String {
    // The event-time guard decides which events count; its default is left out so that
    // checkpoints made before it existed still match.
    let skew = match s.max_event_skew.0 {
        Some(d) if d.as_micros() == 86_400_000_000 => String::new(),
        _ => format!("; max-event-skew: {}", s.max_event_skew),
    };
    let rules = match s.mode {
        Mode::Sessions => format!(
            "sessions; end-when: {}; max-duration: {}",
            s.end_when.as_deref().unwrap_or("-"),
            s.max_duration.map_or("-".into(), |d| d.to_string())
        ),
        Mode::Pairs => format!(
            "pairs; start-when: {}; end-when: {}; pair-timeout: {}",
            s.start_when.as_deref().unwrap_or("-"),
            s.end_when.as_deref().unwrap_or("-"),
            s.pair_timeout
        ),
    };
    rules + &skew
}

impl std::ops::AddAssign for Phases {
    fn add_assign(&mut self, o: Self) {
        self.plan += o.plan;
        self.read += o.read;
        self.sessionize += o.sessionize;
        self.write_sessions += o.write_sessions;
        self.merge_live += o.merge_live;
        self.write_state += o.write_state;
        self.commit += o.commit;
    }
}

/// What one batch adds to the run summary.
#[derive(Debug, Default)]
struct BatchReport {
    versions: Option<(u64, u64)>,
    metrics: crate::engine::StepMetrics,
    live_rows_upserted: u64,
    files_read: u64,
    files_watermark_only: u64,
    phases: Phases,
}

impl std::ops::AddAssign<BatchReport> for RunSummary {
    fn add_assign(&mut self, b: BatchReport) {
        self.batches += 1;
        self.rows_read += b.metrics.rows_read;
        self.rows_late += b.metrics.rows_late;
        self.rows_invalid += b.metrics.rows_invalid;
        self.sessions_closed += b.metrics.sessions_closed;
        self.live_rows_upserted += b.live_rows_upserted;
        self.files_read += b.files_read;
        self.files_watermark_only += b.files_watermark_only;
        self.phases += b.phases;
        if let Some((a, z)) = b.versions {
            let first = self
                .source_versions
                .as_deref()
                .and_then(|s| s.split("..").next())
                .map_or(a.to_string(), str::to_string);
            self.source_versions = Some(format!("{first}..{z}"));
        }
    }
}

/// What a run works with, resolved from the settings and the events table before any write.
struct Job<'a> {
    settings: &'a Settings,
    events: deltalake::DeltaTable,
    engine: Engine,
    read_plan: ReadPlan,
    wanted: Identity,
}

impl<'a> Job<'a> {
    async fn prepare(settings: &'a Settings) -> Result<Self> {
        let t = &settings.tables;
        let events = source::open_events(&t.events).await?;
        let schema = delta::arrow_schema(&events)?;
        let collect = match &settings.collect {
            Collect::Auto if schema.field_with_name("page").is_ok() => vec!["page".to_string()],
            Collect::Auto | Collect::None => vec![],
            Collect::Columns(c) => c.clone(),
        };
        let pairs = settings.mode == Mode::Pairs;
        let (collect, sums) = if pairs {
            (vec![], vec![])
        } else {
            (collect, settings.sums.clone())
        };
        let spec = EventSpec::resolve(
            &schema,
            &settings.keys,
            &settings.time_column,
            &collect,
            &sums,
        )?
        .with_pairs(pairs);
        let read_plan = ReadPlan::new(
            &spec,
            &schema,
            settings.start_when.as_deref(),
            settings.end_when.as_deref(),
        )?
        .with_mapping(delta::column_mapping(&events)?);
        let read_plan = match (settings.shard.map(|s| s.function), &settings.bucket_column) {
            (Some(crate::engine::ShardFn::SparkBuckets(b)), Some(column)) => {
                if let Some((k, t)) = spec
                    .key_columns
                    .iter()
                    .zip(&spec.key_types)
                    .find(|(_, t)| !crate::engine::ShardFn::hashes(t))
                {
                    return Err(Error::usage(format!(
                        "--key-buckets {b} hashes the key as Spark's xxhash64 does, which this \
                         release does for integer and string key columns; the key column `{k}` \
                         is {t}. Drop --key-buckets"
                    )));
                }
                read_plan.with_bucket_column(column, &schema)?
            }
            _ => read_plan,
        };
        let wanted = Identity {
            // Format 2 only where it matters: releases before it ignore a shard function.
            format: if settings
                .shard
                .is_some_and(|s| s.function != crate::engine::ShardFn::Mix)
            {
                crate::checkpoint::IDENTITY_FORMAT
            } else {
                1
            },
            checkpoint_id: uuid::Uuid::new_v4().to_string(),
            events_table: t.events.url().to_string(),
            events_table_id: events.snapshot()?.metadata().id().to_string(),
            keys: settings.keys.clone(),
            key_types: spec.key_types.iter().map(|t| t.to_string()).collect(),
            time_column: settings.time_column.clone(),
            gap: settings.gap.to_string(),
            watermark_delay: settings.watermark_delay.to_string(),
            collect,
            sums,
            sum_types: spec.sum_types.iter().map(|t| t.to_string()).collect(),
            rules: rules_fingerprint(settings),
            shard_function: settings
                .shard
                .map(|s| s.function.recorded())
                .unwrap_or_default(),
            created_at: Utc::now().to_rfc3339(),
        };
        let engine = Engine::new(
            spec,
            SessionRules {
                gap_us: settings.gap.as_micros(),
                delay_us: settings.watermark_delay.as_micros(),
                max_duration_us: settings.max_duration.map(|d| d.as_micros()),
                pair_timeout_us: settings.pair_timeout.as_micros(),
            },
        );
        Ok(Self {
            settings,
            events,
            engine,
            read_plan,
            wanted,
        })
    }

    fn latest(&self) -> u64 {
        self.events.version().unwrap_or(0)
    }

    /// The first events version to read, after `progress`; for a new checkpoint, from
    /// `--starting-version` or `--starting-timestamp` (refused when beyond the table).
    async fn first_version(&self, progress: &Progress) -> Result<u64> {
        let latest = self.latest();
        let next = match (progress.last_version, &self.settings.starting_timestamp) {
            (Some(v), _) => v + 1,
            (None, Some(ts)) => {
                source::first_version_at_or_after(&self.events.log_store(), latest, ts).await?
            }
            (None, None) => self.settings.starting_version.unwrap_or(0),
        };
        if progress.last_version.is_none() && next > latest + 1 {
            return Err(Error::usage(format!(
                "--starting-version {next} is beyond the events table's latest version {latest}"
            )));
        }
        Ok(next)
    }

    /// The identities of the other shards' checkpoints that exist, with their shard numbers.
    async fn sibling_identities(&self, s: crate::config::Shard) -> Result<Vec<(u32, Identity)>> {
        let root = self.settings.tables.checkpoint.parent();
        let mut found = Vec::new();
        for j in (0..s.count).filter(|&j| j != s.index) {
            let name = crate::config::shard_checkpoint_name(j, s.count);
            if let Some(id) = Checkpoint::at(&root.join(&name))?.identity().await? {
                found.push((j, id));
            }
        }
        Ok(found)
    }

    /// Every shard of a run must split the keys by the same function: shards that disagree
    /// would each miss some keys and fold others twice. Checked on every run before the lock,
    /// and again right after a new shard checkpoint records its identity, so that of two shards
    /// started together with different `--key-buckets`, the later one to record its identity
    /// sees the other's and stops before its first commit.
    async fn refuse_other_shard_functions(&self, just_created: bool) -> Result<()> {
        let Some(s) = self.settings.shard else {
            return Ok(());
        };
        for (j, id) in self.sibling_identities(s).await? {
            if id.shard_function == self.wanted.shard_function {
                continue;
            }
            let fix = if just_created {
                format!(
                    " This shard's checkpoint `{}` was created by this run and holds no batch: \
                     delete that folder, then rerun with the flags of shard {j}",
                    self.settings.tables.checkpoint
                )
            } else {
                String::new()
            };
            return Err(Error::usage(format!(
                "shard {j} of {} was started with {}, and this shard with {}: all shards of a \
                 run must split the keys the same way. Run this shard with {}.{fix}",
                s.count,
                describe_shard_function(&id.shard_function),
                describe_shard_function(&self.wanted.shard_function),
                describe_shard_function(&id.shard_function),
            )));
        }
        Ok(())
    }

    /// A new checkpoint must not write to tables that another checkpoint wrote: its batches
    /// would repeat theirs. Checked by reading only, before anything is written.
    async fn refuse_foreign_outputs(&self) -> Result<()> {
        let t = &self.settings.tables;
        let own = self.wanted.app_id();
        // The other shards of a sharded run write the same tables, each under its own app id.
        let mut siblings = Vec::new();
        if let Some(s) = self.settings.shard {
            for (_, id) in self.sibling_identities(s).await? {
                siblings.push(id.app_id());
            }
        }
        let mut outputs = vec![("--sessions", &t.sessions), ("--live", &t.live)];
        if let Some(l) = &t.late_events {
            outputs.push(("--late-events", l));
        }
        for (flag, loc) in outputs {
            let Some(table) = delta::try_load(loc).await? else {
                continue;
            };
            let others = delta::other_checkpoints(&table, &own).await?;
            if let Some((app, batch, version)) = others
                .into_iter()
                .find(|(app, _, _)| !siblings.contains(app))
            {
                return Err(Error::Disagreement(format!(
                    "{flag} `{loc}` was written by another sessionizer checkpoint ({app}: batch \
                     {batch} at table version {version}), and the checkpoint `{}` is new. A new \
                     checkpoint would write every session again. Ways out: point --checkpoint \
                     at the checkpoint that wrote these tables (restore it if it was lost), or \
                     give this checkpoint new --sessions and --live (and --late-events) tables",
                    t.checkpoint
                )));
            }
        }
        Ok(())
    }
}

/// One available-now run.
pub async fn run(settings: &Settings) -> Result<RunSummary> {
    let started = Instant::now();
    let job = Job::prepare(settings).await?;
    let cp = Checkpoint::at(&settings.tables.checkpoint)?;
    // Everything that can refuse the run is checked before the first write, even on a new
    // checkpoint: a refused run leaves no trace.
    let existing = cp.identity().await?;
    if let Some(why) = cp.retired().await? {
        return Err(Error::usage(format!(
            "the checkpoint `{}` was replaced by `sessionizer reshard` ({why}); run with the \
             new --shards",
            cp.loc
        )));
    }
    match &existing {
        Some(id) => id.check_matches(&job.wanted, &cp.loc)?,
        None => {
            job.first_version(&Progress::default()).await?;
            job.refuse_foreign_outputs().await?;
        }
    }
    job.refuse_other_shard_functions(false).await?;
    let lock = cp.lock(settings.break_lock).await?;
    failpoint::pause("pause-after-lock").await;
    let started_ms = started.elapsed().as_millis() as u64;
    let result = run_locked(&job, &cp, existing, &lock, started_ms).await;
    let released = lock.release().await;
    let mut summary = result?;
    released?;
    summary.elapsed_ms = started.elapsed().as_millis() as u64;
    let p = &summary.phases;
    let accounted =
        p.plan + p.read + p.sessionize + p.write_sessions + p.merge_live + p.write_state;
    summary.phases.commit = summary.elapsed_ms.saturating_sub(accounted);
    Ok(summary)
}

/// The output tables of a run, open for writing.
struct Outputs {
    sessions: deltalake::DeltaTable,
    live: deltalake::DeltaTable,
    late: Option<deltalake::DeltaTable>,
}

/// Which outputs already hold the batch being written (a replay after a crash).
#[derive(Debug, Default, Clone, Copy)]
struct Done {
    sessions: bool,
    live: bool,
    late: bool,
}

/// The state a run carries from batch to batch.
struct Batch<'a> {
    job: &'a Job<'a>,
    cp: &'a Checkpoint,
    /// The checkpoint's identity; `None` until a new checkpoint records it.
    identity: Option<Identity>,
    lock: &'a LockGuard,
    /// Opened (and created on first use) once the first batch is planned.
    outputs: Option<Outputs>,
    state: Option<deltalake::DeltaTable>,
    progress: Progress,
    /// The pending events, once read: a run with nothing new never reads them.
    pending: Option<RecordBatch>,
    next: u64,
    clock: Instant,
}

/// A batch chosen by [`Batch::plan`].
struct Planned {
    plan: Plan,
    vfs: Vec<VersionFiles>,
    /// True when the plan was recorded by an earlier, unfinished run.
    replay: bool,
}

async fn run_locked(
    job: &Job<'_>,
    cp: &Checkpoint,
    identity: Option<Identity>,
    lock: &LockGuard,
    started_ms: u64,
) -> Result<RunSummary> {
    let settings = job.settings;
    let state = cp.state_table().await?;
    let progress = cp.progress(state.as_ref()).await?;
    let next = job.first_version(&progress).await?;
    if settings.max_bytes_per_batch.is_some() {
        crate::memory::return_freed_memory_at_once();
    }
    let mut run = Batch {
        job,
        cp,
        identity,
        lock,
        outputs: None,
        state,
        progress,
        pending: None,
        next,
        clock: Instant::now(),
    };
    let mut summary = RunSummary {
        phases: Phases {
            plan: started_ms,
            ..Default::default()
        },
        ..Default::default()
    };
    let latest = job.latest();
    let bar = crate::progress::bar((latest + 1).saturating_sub(next), "versions");
    loop {
        summary.phases.plan += lap(&mut run.clock);
        let Some(planned) = run.plan().await? else {
            break;
        };
        let flush = planned.plan.flush;
        let versions = planned.vfs.len() as u64;
        let report = run.batch(planned, &bar).await?;
        summary += report;
        failpoint::hit(&format!("after-batch-{}", summary.batches));
        bar.inc(versions);
        if flush {
            break;
        }
    }
    bar.finish_and_clear();
    summary.phases.plan += lap(&mut run.clock);
    summary.sessions_pending = run.progress.sessions_pending;
    summary.watermark = run.progress.watermark_us.map(format_micros);
    Ok(summary)
}

impl Batch<'_> {
    fn settings(&self) -> &Settings {
        self.job.settings
    }

    fn outputs(&self) -> &Outputs {
        self.outputs
            .as_ref()
            .expect("opened before the first batch")
    }

    fn app_id(&self) -> String {
        self.identity
            .as_ref()
            .expect("recorded before the first batch")
            .app_id()
    }

    /// Opens the output tables, checking that their columns fit (exit 2) before anything is
    /// written; then records a new checkpoint's identity and creates the missing tables.
    async fn open_outputs(&mut self) -> Result<()> {
        if self.outputs.is_some() {
            return Ok(());
        }
        let t = &self.job.settings.tables;
        let spec = &self.job.engine.spec;
        let shard = self.settings().shard;
        let live_mode = self.settings().live_mode;
        let wanted = [
            (&t.sessions, sessions_schema(spec), true, "--sessions"),
            (
                &t.live,
                sink::live_table_schema(spec, shard),
                false,
                "--live",
            ),
        ];
        let late = t
            .late_events
            .as_ref()
            .map(|l| (l, rejected_schema(spec), true, "--late-events"));
        let mut found = Vec::new();
        for (loc, schema, _, flag) in wanted.iter().chain(late.iter()) {
            let table = delta::try_load(loc).await?;
            if let Some(table) = &table {
                delta::check_schema(table, schema, loc, flag)?;
                if *flag == "--live" {
                    delta::check_rewritable(table, loc, flag)?;
                    let partitioned = table
                        .snapshot()?
                        .metadata()
                        .partition_columns()
                        .iter()
                        .any(|c| c == sink::SHARD_COLUMN);
                    if partitioned != shard.is_some() {
                        return Err(Error::usage(format!(
                            "--live `{loc}` was written {} but this run is {}; its rows are laid \
                             out per shard only in sharded runs. Run with the same --shards as \
                             the runs that wrote it, or point --live at a new location",
                            if partitioned {
                                "by a sharded run"
                            } else {
                                "unsharded"
                            },
                            if shard.is_some() {
                                "sharded"
                            } else {
                                "unsharded"
                            },
                        )));
                    }
                }
            }
            found.push(table);
        }
        if self.identity.is_none() {
            self.lock.fence().check().await?;
            let id = self.cp.write_identity(&self.job.wanted).await?;
            // A run that created the checkpoint first won: its settings must fit.
            id.check_matches(&self.job.wanted, &self.cp.loc)?;
            self.job.refuse_other_shard_functions(true).await?;
            self.identity = Some(id);
        }
        let mut tables = Vec::new();
        for ((loc, schema, append_only, flag), table) in wanted.iter().chain(late.iter()).zip(found)
        {
            tables.push(match table {
                Some(t) => t,
                None => {
                    self.lock.fence().check().await?;
                    // A sharded run's live table is partitioned by shard.
                    let by: &[&str] = if shard.is_some() && *flag == "--live" {
                        &[sink::SHARD_COLUMN]
                    } else {
                        &[]
                    };
                    let props: &[(&str, &str)] = match (*flag, *append_only, live_mode) {
                        (_, true, _) => &[("delta.appendOnly", "true")],
                        ("--live", _, LiveMode::DeletionVectors) => {
                            &[("delta.enableDeletionVectors", "true")]
                        }
                        _ => &[],
                    };
                    delta::create_with(loc, schema, by, props).await?
                }
            });
        }
        if live_mode == LiveMode::DeletionVectors {
            self.lock.fence().check().await?;
            tables[1] = sink::enable_deletion_vectors(tables[1].clone(), &t.live).await?;
        }
        let mut tables = tables.into_iter();
        self.outputs = Some(Outputs {
            sessions: tables.next().expect("sessions"),
            live: tables.next().expect("live"),
            late: tables.next(),
        });
        Ok(())
    }

    /// Stage 1: the recorded plan of an unfinished batch, or the next versions to read;
    /// `None` when there is nothing to do.
    async fn plan(&mut self) -> Result<Option<Planned>> {
        let settings = self.job.settings;
        let seq = self.progress.seq + 1;
        let log_store = self.job.events.log_store();
        if let Some(plan) = self.cp.plan(seq).await? {
            tracing::info!(?plan, "replaying the unfinished batch");
            let mut vfs = Vec::new();
            if let Some((a, b)) = plan.versions {
                for version in a..=b {
                    vfs.push(
                        source::read_version(&log_store, version, settings.on_change_commit)
                            .await?,
                    );
                }
            }
            return Ok(Some(Planned {
                plan,
                vfs,
                replay: true,
            }));
        }
        let latest = self.job.latest();
        let limits = BatchLimits {
            max_files: settings.max_files_per_batch,
            max_bytes: settings.max_bytes_per_batch,
        };
        let vfs = if self.next <= latest {
            source::plan_versions(
                &log_store,
                self.next,
                latest,
                limits,
                settings.on_change_commit,
            )
            .await?
        } else {
            Vec::new()
        };
        let last = vfs.last().map(|v: &VersionFiles| v.version);
        if vfs.is_empty() {
            if !settings.flush {
                return Ok(None);
            }
            let spec = &self.job.engine.spec;
            let p = self
                .cp
                .pending(self.state.as_ref(), &spec.normalized_schema())
                .await?;
            if p.num_rows() == 0 {
                return Ok(None);
            }
            self.pending = Some(p);
        }
        let plan = Plan {
            seq,
            versions: vfs.first().map(|f| (f.version, last.expect("non-empty"))),
            flush: settings.flush && last.is_none_or(|l| l == latest),
        };
        Ok(Some(Planned {
            plan,
            vfs,
            replay: false,
        }))
    }

    fn tag(&self, plan: &Plan) -> BatchTag {
        BatchTag {
            app_id: self.app_id(),
            record: BatchRecord {
                seq: plan.seq,
                versions: plan.versions,
                flush: plan.flush,
                epoch: self.lock.epoch(),
                run: self.lock.token().to_string(),
            },
            fence: self.lock.fence().clone(),
        }
    }

    /// Stage 2: which outputs already hold this batch; refuses when one holds another batch
    /// under this number, or a later one.
    async fn check_outputs(&self, tag: &BatchTag) -> Result<Done> {
        let t = &self.settings().tables;
        let cp = &self.cp.loc;
        let o = self.outputs();
        Ok(Done {
            sessions: sink::batch_done(&o.sessions, &t.sessions, "--sessions", tag, cp).await?,
            live: sink::batch_done(&o.live, &t.live, "--live", tag, cp).await?,
            late: match (&o.late, &t.late_events) {
                (Some(table), Some(loc)) => {
                    sink::batch_done(table, loc, "--late-events", tag, cp).await?
                }
                _ => false,
            },
        })
    }

    /// One batch, stage by stage.
    async fn batch(
        &mut self,
        planned: Planned,
        bar: &indicatif::ProgressBar,
    ) -> Result<BatchReport> {
        let mut report = BatchReport {
            versions: planned.plan.versions,
            ..Default::default()
        };
        report.phases.plan += lap(&mut self.clock);
        let seq = planned.plan.seq;
        bar.set_message(format!("batch {seq}: reading"));
        // A batch is planned and read (the source's commits and files checked) before anything
        // is written, even the identity of a new checkpoint or its empty output tables: a run
        // refused by what it reads leaves no trace.
        let (open_events, new_events, buckets) = self.read(&planned.vfs).await?;
        report.phases.read += lap(&mut self.clock);
        failpoint::hit("after-read");
        self.open_outputs().await?;
        let tag = self.tag(&planned.plan);
        let done = self.check_outputs(&tag).await?;
        if !planned.replay {
            self.cp.record_plan(&planned.plan, &tag.fence).await?;
        }
        failpoint::hit("after-plan");
        failpoint::pause("pause-after-plan").await;
        for v in &planned.vfs {
            if let Some(why) = &v.skipped {
                tracing::info!(version = v.version, "skipped: {why}");
            }
        }
        report.phases.plan += lap(&mut self.clock);
        bar.set_message(format!("batch {seq}: sessionizing"));
        let new_watermark = self
            .job
            .engine
            .watermark_after(self.progress.watermark_us, new_events.max_time);
        let max_event = (new_events.max_time, new_events.max_time_committed_ms);
        report.files_read = new_events.files_read;
        report.files_watermark_only = new_events.files_watermark_only;
        let out = self
            .fold(
                open_events,
                new_events,
                buckets,
                new_watermark,
                &planned.plan,
                done,
            )
            .await?;
        // The threads fold and encode in turn; the stage's wall time is shared between the
        // two phases in proportion to the threads' time in each.
        let stage = lap(&mut self.clock);
        let (f, w) = (out.fold_time.as_secs_f64(), out.write_time.as_secs_f64());
        let fold_share = if f + w > 0.0 { f / (f + w) } else { 1.0 };
        let fold_ms = (stage as f64 * fold_share).round() as u64;
        report.phases.sessionize += fold_ms;
        report.phases.write_sessions += stage - fold_ms;
        bar.set_message(format!("batch {seq}: writing"));
        let mut out = out;
        let adds = std::mem::take(&mut out.adds);
        report.live_rows_upserted = self
            .write_outputs(adds, &out, done, &tag, &mut report.phases)
            .await?;
        self.record(
            out,
            &planned.plan,
            new_watermark,
            max_event,
            &tag,
            &mut report,
        )
        .await?;
        Ok(report)
    }

    /// Stage 3: the pending events and the batch's new events, cut into key buckets.
    async fn read(&mut self, vfs: &[VersionFiles]) -> Result<(RecordBatch, EventParts, usize)> {
        let spec = &self.job.engine.spec;
        let files: usize = vfs.iter().map(|v| v.files.len()).sum();
        let new_bytes: u64 = vfs.iter().flat_map(|v| &v.files).map(|f| f.size).sum();
        let open_events = match self.pending.take() {
            Some(p) => p,
            None => {
                self.cp
                    .pending(self.state.as_ref(), &spec.normalized_schema())
                    .await?
            }
        };
        let buckets = fold::bucket_count(
            new_bytes,
            open_events.num_rows(),
            self.settings().bucket_size.0,
        );
        tracing::debug!(files, buckets, "reading the batch's files");
        let new_events = source::read_events(
            self.job.events.object_store(),
            vfs,
            spec,
            &self.job.read_plan,
            buckets,
            self.settings().max_event_skew.0.map(|d| d.as_micros()),
            self.settings().shard,
        )
        .await?;
        Ok((open_events, new_events, buckets))
    }

    /// Stage 4: the engine over every key bucket, closed sessions streamed into files (unless
    /// the sessions table already holds this batch).
    async fn fold(
        &self,
        open_events: RecordBatch,
        new_events: EventParts,
        buckets: usize,
        new_watermark: Option<i64>,
        plan: &Plan,
        done: Done,
    ) -> Result<fold::Folded> {
        let engine = &self.job.engine;
        let pending_parts = split_by_key(&open_events, &engine.spec.key_columns, buckets)?;
        drop(open_events);
        let read_rejects = new_events.rejected;
        let threads = fold::threads(buckets);
        let writers = if done.sessions {
            None
        } else {
            Some(sink::append_writers(&self.outputs().sessions, threads)?)
        };
        let mut out = fold::fold_buckets(
            engine,
            pending_parts,
            new_events.buckets,
            self.progress.watermark_us,
            new_watermark,
            plan.flush,
            writers,
            threads,
        )
        .await?;
        fold::add_read_rejects(&mut out, read_rejects)?;
        if out.metrics.largest_open > self.settings().warn_open_session_events {
            tracing::warn!(
                events = out.metrics.largest_open,
                "one key holds {} events in a session still open (a key never idle for --gap: a \
                 bot, an anonymous id?); every batch re-reads and rewrites them. `sessionizer \
                 status` lists the keys holding the most pending events; --max-duration bounds \
                 how long a session can grow",
                out.metrics.largest_open
            );
        }
        tracing::debug!(
            buckets,
            threads,
            fold_thread_ms = out.fold_time.as_millis() as u64,
            write_thread_ms = out.write_time.as_millis() as u64,
            "engine threads done"
        );
        Ok(out)
    }

    /// Stage 5: the sessions, late rows and live rows, each in one fenced commit (skipped on
    /// the tables that already hold this batch). Returns the live rows upserted.
    async fn write_outputs(
        &mut self,
        adds: Vec<deltalake::kernel::Add>,
        out: &fold::Folded,
        done: Done,
        tag: &BatchTag,
        phases: &mut Phases,
    ) -> Result<u64> {
        let t = &self.job.settings.tables;
        let o = self
            .outputs
            .as_mut()
            .expect("opened before the first batch");
        if !done.sessions {
            let table = o.sessions.clone();
            o.sessions = delta::commit_files(table, &t.sessions, adds, tag).await?.0;
        }
        phases.write_sessions += lap(&mut self.clock);
        failpoint::hit("after-sessions-commit");
        if let (Some(table), Some(loc), false) = (&o.late, &t.late_events, done.late) {
            let rows = vec![out.rejected.clone()];
            o.late = Some(sink::append(table.clone(), loc, rows, tag).await?.0);
        }
        let upserted = out.live.num_rows() as u64;
        if !done.live {
            let keys = &self.job.engine.spec.key_columns;
            let table = o.live.clone();
            let shard = self.job.settings.shard;
            let mode = self.job.settings.live_mode;
            o.live = sink::merge_live(table, &t.live, out.live.clone(), keys, tag, shard, mode)
                .await?
                .0;
        }
        phases.merge_live += lap(&mut self.clock);
        failpoint::hit("after-live-commit");
        Ok(upserted)
    }

    /// Stage 6: the pending state and the progress, in one commit against the state version
    /// this run read.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &mut self,
        out: fold::Folded,
        plan: &Plan,
        new_watermark: Option<i64>,
        max_event: (Option<i64>, Option<i64>),
        tag: &BatchTag,
        report: &mut BatchReport,
    ) -> Result<()> {
        let (max_event_us, max_event_committed_ms) = match max_event {
            (Some(t), ms) if Some(t) > self.progress.max_event_us => (Some(t), ms),
            _ => (
                self.progress.max_event_us,
                self.progress.max_event_committed_ms,
            ),
        };
        let progress = Progress {
            seq: plan.seq,
            last_version: plan.versions.map(|(_, b)| b).or(self.progress.last_version),
            watermark_us: new_watermark,
            sessions_pending: out.metrics.sessions_pending,
            committed_at: Some(Utc::now().to_rfc3339()),
            max_event_us,
            max_event_committed_ms,
        };
        let state = self.state.take();
        self.state = Some(
            self.cp
                .write_state(state, out.pending.clone(), &progress, tag)
                .await?,
        );
        report.phases.write_state += lap(&mut self.clock);
        failpoint::hit("after-state-commit");
        report.metrics = out.metrics;
        self.next = progress.last_version.map_or(0, |v| v + 1);
        self.progress = progress;
        self.pending = Some(out.pending);
        Ok(())
    }
}
