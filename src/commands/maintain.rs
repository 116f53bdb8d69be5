//! `sessionizer maintain`: keep the tables fast to read and cheap to store.
//!
//! Under the checkpoint lock (so no run is writing meanwhile), for the sessions, live and late
//! tables: purge the live table's deletion vectors ([`crate::live::purge`]), compact small
//! files (Delta OPTIMIZE; both are no-data-change commits), then VACUUM files
//! replaced more than `--retention` ago, then write a Delta checkpoint of the log. For the
//! pending state: VACUUM and a checkpoint.
//!
//! Like every run, maintenance is fenced: before each step that commits or deletes (purge,
//! OPTIMIZE, VACUUM, the Delta checkpoint, per table) it checks that no other run has taken
//! its lock over, and stops with exit 75 if one has; a `maintain` frozen for longer than its
//! lock lasts therefore does nothing more when it wakes.
//!
//! None of it touches what exactly-once relies on: the `txn` records of every batch live in
//! the Delta log and are carried into every checkpoint; a rerun reads only the latest pending
//! state; and the events table is never modified.

use std::io::Write;
use std::num::NonZeroU64;

use deltalake::DeltaTable;
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::cli::MaintainArgs;
use crate::config::{OutputFormat, TableLocation};
use crate::delta::{Fence, try_load};
use crate::error::{Error, Result};

/// What maintenance did to one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub location: String,
    /// Small files replaced by OPTIMIZE, and the files that replaced them.
    pub files_compacted: u64,
    pub files_written: u64,
    /// Live table files whose deletion vectors were purged (rewritten without deleted rows).
    pub files_purged: u64,
    /// Unreferenced files deleted by VACUUM.
    pub files_vacuumed: u64,
    /// The table version the Delta checkpoint was written for.
    pub checkpoint_version: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct MaintainReport {
    pub retention: String,
    pub tables: Vec<TableReport>,
    pub elapsed_ms: u64,
}

pub async fn maintain(args: &MaintainArgs) -> Result<MaintainReport> {
    let started = std::time::Instant::now();
    let tables = args.tables.resolve();
    // A VACUUM of a table with another one inside it would delete the inner table's files.
    tables.check_nesting().map_err(Error::Usage)?;
    let retention = chrono::Duration::microseconds(args.retention.as_micros());
    let (cp, _) = Checkpoint::open_existing(&tables.checkpoint).await?;
    let lock = cp.lock(args.break_lock).await?;
    crate::failpoint::pause("pause-after-lock").await;
    let fence = lock.fence();
    let result = async {
        let mut reports = Vec::new();
        let mut outputs = vec![
            ("sessions", &tables.sessions),
            ("live_sessions", &tables.live),
        ];
        if let Some(l) = &tables.late_events {
            outputs.push(("late_events", l));
        }
        for (name, loc) in outputs {
            if let Some(table) = try_load(loc).await? {
                reports.push(maintain_output(name, loc, table, args, retention, fence).await?);
            }
        }
        if let Some(state) = cp.state_table().await? {
            let progress = cp.progress(Some(&state)).await?;
            let (state, vacuumed) = if args.no_vacuum {
                (state, 0)
            } else {
                fence.check().await?;
                cp.vacuum_state(state, &progress, retention).await?
            };
            fence.check().await?;
            reports.push(TableReport {
                table: "pending".into(),
                location: cp.state_location().to_string(),
                files_compacted: 0,
                files_written: 0,
                files_purged: 0,
                files_vacuumed: vacuumed as u64,
                checkpoint_version: write_checkpoint(&state).await?,
            });
        }
        Ok::<_, Error>(reports)
    }
    .await;
    let released = lock.release().await;
    let reports = result?;
    released?;
    Ok(MaintainReport {
        retention: args.retention.to_string(),
        tables: reports,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

async fn maintain_output(
    name: &str,
    loc: &TableLocation,
    table: DeltaTable,
    args: &MaintainArgs,
    retention: chrono::Duration,
    fence: &Fence,
) -> Result<TableReport> {
    let (mut table, mut compacted, mut written) = (table, 0, 0);
    let mut purged = 0;
    if !args.no_optimize && name == "live_sessions" {
        fence.check().await?;
        let (t, files, _) = crate::live::purge(table).await?;
        table = t;
        purged = files as u64;
    }
    if !args.no_optimize {
        fence.check().await?;
        let mut optimize = table.optimize();
        if let Some(size) = args.target_file_size.and_then(|s| NonZeroU64::new(s.0)) {
            optimize = optimize.with_target_size(size);
        }
        let (t, metrics) = optimize.await?;
        table = t;
        compacted = metrics.num_files_removed;
        written = metrics.num_files_added;
    }
    let mut vacuumed = 0;
    if !args.no_vacuum {
        fence.check().await?;
        let (t, metrics) = table
            .vacuum()
            .with_retention_period(retention)
            .with_enforce_retention_duration(false)
            .await?;
        table = t;
        vacuumed = metrics.files_deleted.len() as u64;
    }
    fence.check().await?;
    Ok(TableReport {
        table: name.into(),
        location: loc.to_string(),
        files_compacted: compacted,
        files_written: written,
        files_purged: purged,
        files_vacuumed: vacuumed,
        checkpoint_version: write_checkpoint(&table).await?,
    })
}

/// Writes a Delta checkpoint at the table's current version, so readers replay a short log.
async fn write_checkpoint(table: &DeltaTable) -> Result<Option<u64>> {
    let Some(version) = table.version() else {
        return Ok(None);
    };
    deltalake::checkpoints::create_checkpoint(table, None).await?;
    Ok(Some(version))
}

pub async fn command(args: &MaintainArgs, out: &mut dyn Write) -> Result<()> {
    let report = maintain(args).await?;
    match args.output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string(&report).expect("serializable")
        )?,
        OutputFormat::Text => {
            for t in &report.tables {
                writeln!(
                    out,
                    "maintain {}: {} files with deletion vectors purged, {} small files \
                     compacted into {}, {} files older than {} vacuumed, checkpoint at version {}",
                    t.table,
                    t.files_purged,
                    t.files_compacted,
                    t.files_written,
                    t.files_vacuumed,
                    report.retention,
                    t.checkpoint_version.map_or("-".into(), |v| v.to_string())
                )?;
            }
            writeln!(out, "maintain: done in {} ms", report.elapsed_ms)?;
        }
    }
    Ok(())
}
