//! `sessionizer sessionize`: one available-now run, batch by batch.
//!
//! For each batch: plan (record the source versions) → read → sessionize → append sessions →
//! MERGE live → write state + progress. The plan is durable before the first output, each
//! output carries the batch's txn, and the state commit comes last, so a crash anywhere leaves
//! a checkpoint from which a rerun redoes exactly the missing steps of exactly the same batch.

use std::io::Write;
use std::time::Instant;

use arrow::array::RecordBatch;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, Identity, Plan, Progress};
use crate::cli::SessionizeArgs;
use crate::config::{Collect, Mode, OutputFormat, Settings, split_list};
use crate::engine::{
    Engine, EventSpec, SessionRules, live_schema, rejected_schema, sessions_schema, split_by_key,
};
use crate::error::{Error, Result};
use crate::source::{self, BatchLimits, ReadPlan, VersionFiles};
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
        let s = Settings {
            tables: self.tables.resolve(),
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
            flush: self.flush,
            output: self.output,
            on_change_commit: self.on_change_commit,
            max_files_per_batch: self.max_files_per_batch,
            max_bytes_per_batch: self.max_bytes_per_batch,
            bucket_size: self.bucket_size,
            starting_version: self.starting_version,
            starting_timestamp: self.starting_timestamp,
            break_lock: self.break_lock,
        };
        s.validate().map_err(Error::Usage)?;
        Ok(s)
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
    match s.mode {
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
    }
}

/// One available-now run.
pub async fn run(settings: &Settings) -> Result<RunSummary> {
    let started = Instant::now();
    let t = &settings.tables;
    let events = source::open_events(&t.events).await?;
    let schema = source::arrow_schema(&events)?;
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
    )?;
    let engine = Engine::new(
        spec.clone(),
        SessionRules {
            gap_us: settings.gap.as_micros(),
            delay_us: settings.watermark_delay.as_micros(),
            max_duration_us: settings.max_duration.map(|d| d.as_micros()),
            pair_timeout_us: settings.pair_timeout.as_micros(),
        },
    );
    let wanted = Identity {
        format: 1,
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
        created_at: Utc::now().to_rfc3339(),
    };
    let cp = Checkpoint::open(&t.checkpoint, true)?;
    let existing = cp.identity().await?;
    if let Some(id) = &existing {
        id.check_matches(&wanted, &cp.loc)?;
    }
    let lock = cp.lock(settings.break_lock).await?;
    failpoint::pause("pause-after-lock").await;
    let result = async {
        let identity = match existing {
            Some(id) => id,
            None => {
                cp.write_identity(&wanted).await?;
                // Re-read: a run that raced us to create the checkpoint wins.
                cp.identity().await?.unwrap_or(wanted)
            }
        };
        let started_ms = started.elapsed().as_millis() as u64;
        run_locked(
            settings, &engine, &events, &read_plan, &cp, &identity, started_ms,
        )
        .await
    }
    .await;
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

async fn run_locked(
    settings: &Settings,
    engine: &Engine,
    events: &deltalake::DeltaTable,
    read_plan: &ReadPlan,
    cp: &Checkpoint,
    identity: &Identity,
    started_ms: u64,
) -> Result<RunSummary> {
    let t = &settings.tables;
    let spec = &engine.spec;
    let app_id = identity.app_id();
    let mut clock = Instant::now();
    let mut phases = Phases {
        plan: started_ms,
        ..Default::default()
    };
    let log_store = events.log_store();
    let latest = events.version().unwrap_or(0);

    let mut state = cp.state_table().await?;
    let mut progress = cp.progress(state.as_ref()).await?;
    // The pending events are read when a batch needs them: a run with nothing new skips them.
    let mut pending: Option<RecordBatch> = None;
    let mut next = match (progress.last_version, &settings.starting_timestamp) {
        (Some(v), _) => v + 1,
        (None, Some(ts)) => source::first_version_at_or_after(&log_store, latest, ts).await?,
        (None, None) => settings.starting_version.unwrap_or(0),
    };
    if progress.last_version.is_none() && next > latest + 1 {
        return Err(Error::usage(format!(
            "--starting-version {next} is beyond the events table's latest version {latest}"
        )));
    }

    let mut sessions =
        sink::open_or_create(&t.sessions, &sessions_schema(spec), true, "--sessions").await?;
    let mut live = sink::open_or_create(&t.live, &live_schema(spec), false, "--live").await?;
    sink::check_rewritable(&live, &t.live, "--live")?;
    let mut late = match &t.late_events {
        Some(loc) => {
            Some(sink::open_or_create(loc, &rejected_schema(spec), true, "--late-events").await?)
        }
        None => None,
    };

    if settings.max_bytes_per_batch.is_some() {
        crate::memory::return_freed_memory_at_once();
    }
    let limits = BatchLimits {
        max_files: settings.max_files_per_batch,
        max_bytes: settings.max_bytes_per_batch,
    };
    let mut summary = RunSummary::default();
    let (mut first_read, mut last_read) = (None, None);
    let bar = crate::progress::bar((latest + 1).saturating_sub(next), "versions");
    loop {
        phases.plan += lap(&mut clock);
        let seq = progress.seq + 1;
        // Plan: replay the recorded plan of an unfinished batch, or choose the next versions.
        let (plan, vfs) = match cp.plan().await? {
            Some(p) if p.seq == seq => {
                tracing::info!(?p, "replaying the unfinished batch");
                let vfs = match p.versions {
                    Some((a, b)) => {
                        let mut v = Vec::new();
                        for version in a..=b {
                            v.push(
                                source::read_version(
                                    &log_store,
                                    version,
                                    settings.on_change_commit,
                                )
                                .await?,
                            );
                        }
                        v
                    }
                    None => Vec::new(),
                };
                (p, vfs)
            }
            _ => {
                let vfs = if next <= latest {
                    source::plan_versions(
                        &log_store,
                        next,
                        latest,
                        limits,
                        settings.on_change_commit,
                    )
                    .await?
                } else {
                    Vec::new()
                };
                let last = vfs.last().map(|v: &VersionFiles| v.version);
                let reaches_latest = last.is_none_or(|l| l == latest);
                if vfs.is_empty() && !settings.flush {
                    break;
                }
                if vfs.is_empty() {
                    let p = cp
                        .pending(state.as_ref(), &spec.normalized_schema())
                        .await?;
                    if p.num_rows() == 0 {
                        break;
                    }
                    pending = Some(p);
                }
                let plan = Plan {
                    seq,
                    versions: vfs.first().map(|f| (f.version, last.expect("non-empty"))),
                    flush: settings.flush && reaches_latest,
                };
                cp.write_plan(&plan).await?;
                (plan, vfs)
            }
        };
        failpoint::hit("after-plan");
        for v in &vfs {
            if let Some(why) = &v.skipped {
                tracing::info!(version = v.version, "skipped: {why}");
            }
        }

        phases.plan += lap(&mut clock);
        let files: usize = vfs.iter().map(|v| v.files.len()).sum();
        let new_bytes: u64 = vfs.iter().flat_map(|v| &v.files).map(|f| f.size).sum();
        let open_events = match pending.take() {
            Some(p) => p,
            None => {
                cp.pending(state.as_ref(), &spec.normalized_schema())
                    .await?
            }
        };
        let buckets = fold::bucket_count(new_bytes, open_events.num_rows(), settings.bucket_size.0);
        bar.set_message(format!("batch {seq}: reading {files} files"));
        let new_events =
            source::read_events(events.object_store(), &vfs, spec, read_plan, buckets).await?;
        phases.read += lap(&mut clock);
        failpoint::hit("after-read");
        bar.set_message(format!("batch {seq}: sessionizing"));
        let new_watermark = engine.watermark_after(progress.watermark_us, new_events.max_time);
        // The pending events live on only in their buckets.
        let pending_parts = split_by_key(&open_events, &spec.key_columns, buckets)?;
        drop(open_events);
        let threads = fold::threads(buckets);
        let writers = sink::append_writers(&sessions, &t.sessions, &app_id, seq, threads).await?;
        let mut out = fold::fold_buckets(
            engine,
            pending_parts,
            new_events.buckets,
            progress.watermark_us,
            new_watermark,
            plan.flush,
            writers,
            threads,
        )
        .await?;
        // The threads fold and encode in turn; the stage's wall time is shared between the
        // two phases in proportion to the threads' time in each.
        let stage = lap(&mut clock);
        let (f, w) = (out.fold_time.as_secs_f64(), out.write_time.as_secs_f64());
        tracing::debug!(
            buckets,
            threads,
            fold_thread_ms = (f * 1000.0) as u64,
            write_thread_ms = (w * 1000.0) as u64,
            "engine threads done"
        );
        let fold_share = if f + w > 0.0 { f / (f + w) } else { 1.0 };
        let fold_ms = (stage as f64 * fold_share).round() as u64;
        phases.sessionize += fold_ms;
        phases.write_sessions += stage - fold_ms;
        bar.set_message(format!("batch {seq}: writing"));

        let (s, _) = sink::commit_files(
            sessions,
            &t.sessions,
            std::mem::take(&mut out.adds),
            &app_id,
            seq,
        )
        .await?;
        sessions = s;
        phases.write_sessions += lap(&mut clock);
        failpoint::hit("after-sessions-commit");
        if let (Some(table), Some(loc)) = (late.take(), &t.late_events) {
            let (l, _) =
                sink::append_once(table, loc, vec![out.rejected.clone()], &app_id, seq).await?;
            late = Some(l);
        }
        let (l, upserted) = sink::merge_live(
            live,
            &t.live,
            out.live.clone(),
            &spec.key_columns,
            &app_id,
            seq,
        )
        .await?;
        live = l;
        phases.merge_live += lap(&mut clock);
        failpoint::hit("after-live-commit");

        let new_progress = Progress {
            seq,
            last_version: plan.versions.map(|(_, b)| b).or(progress.last_version),
            watermark_us: new_watermark,
            sessions_pending: out.metrics.sessions_pending,
            committed_at: Some(Utc::now().to_rfc3339()),
        };
        state = Some(
            cp.write_state(state, out.pending.clone(), &new_progress, &app_id)
                .await?,
        );
        phases.write_state += lap(&mut clock);
        failpoint::hit("after-state-commit");

        summary.batches += 1;
        failpoint::hit(&format!("after-batch-{}", summary.batches));
        let m = out.metrics;
        summary.rows_read += m.rows_read;
        summary.rows_late += m.rows_late;
        summary.rows_invalid += m.rows_invalid;
        summary.sessions_closed += m.sessions_closed;
        summary.live_rows_upserted += upserted as u64;
        if let Some((a, b)) = plan.versions {
            first_read = first_read.or(Some(a));
            last_read = Some(b);
        }
        progress = new_progress;
        pending = Some(out.pending);
        next = progress.last_version.map_or(0, |v| v + 1);
        bar.inc(vfs.len() as u64);
        if plan.flush {
            break;
        }
    }
    bar.finish_and_clear();
    phases.plan += lap(&mut clock);
    summary.phases = phases;
    summary.source_versions = first_read.zip(last_read).map(|(a, b)| format!("{a}..{b}"));
    summary.sessions_pending = progress.sessions_pending;
    summary.watermark = progress.watermark_us.map(format_micros);
    Ok(summary)
}
