//! `sessionizer demo`: the walkthrough of the reference design, on a fresh base directory,
//! saying what each step shows.

use std::io::Write;

use chrono::{Duration, Timelike, Utc};

use crate::cli::{DemoArgs, SessionizeArgs, TableArgs, TableChoice};
use crate::commands::{generate_rows, read_tables, sessionize};
use crate::config::{Collect, Dur, OnChangeCommit, OutputFormat, TableLocation};
use crate::error::Result;

/// The demo's gap and watermark delay, as in the reference walkthrough.
pub const DEMO_GAP: Dur = Dur::from_minutes(40);
pub const DEMO_DELAY: Dur = Dur::from_minutes(15);

fn table_args(base: &TableLocation) -> TableArgs {
    TableArgs {
        base_dir: base.clone(),
        events: None,
        sessions: None,
        live: None,
        checkpoint: None,
        late_events: None,
    }
}

/// `sessionize` flags of the demo.
pub fn demo_sessionize_args(base: &TableLocation) -> SessionizeArgs {
    SessionizeArgs {
        tables: table_args(base),
        key: "user_id".into(),
        time_column: "visit_time".into(),
        gap: DEMO_GAP,
        watermark_delay: DEMO_DELAY,
        collect: Collect::Auto,
        sum: vec![],
        flush: false,
        output: OutputFormat::Text,
        on_change_commit: OnChangeCommit::Fail,
        max_files_per_batch: 1000,
        max_bytes_per_batch: None,
        starting_version: None,
        break_lock: false,
    }
}

/// Removes the demo's four tables under `base` (and nothing else).
fn reset(base: &TableLocation) -> Result<()> {
    if let Some(p) = base.local_path() {
        for name in ["events", "sessions", "live_sessions", "checkpoint"] {
            let dir = p.join(name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
        }
    }
    Ok(())
}

pub async fn command(args: &DemoArgs, out: &mut dyn Write) -> Result<()> {
    let base = &args.base_dir;
    reset(base)?;
    let tables = table_args(base);
    let resolved = tables.resolve();
    let run_args = demo_sessionize_args(base);
    let t0 = Utc::now()
        .with_nanosecond(0)
        .expect("zero nanoseconds is valid");
    let step = |out: &mut dyn Write, n: u32, text: &str| -> std::io::Result<()> {
        writeln!(out, "\n=== step {n}: {text}")
    };
    writeln!(
        out,
        "sessionizer demo in {base}: gap {DEMO_GAP}, watermark delay {DEMO_DELAY}.\n\
         A session closes once the watermark (largest event time - {DEMO_DELAY}) is more than \
         {DEMO_GAP} past its last event."
    )?;

    step(
        out,
        1,
        "generate the reference rows (user 1 twice, users 2 and 3 once) at the current time",
    )?;
    let gen_args = |at: Option<String>, closing: bool| crate::cli::GenerateArgs {
        tables: tables.clone(),
        closing,
        users: None,
        per_user: None,
        at,
        seed: 42,
    };
    generate_rows::command(&gen_args(Some(t0.to_rfc3339()), false), out).await?;
    read_tables::show(&resolved, TableChoice::Events, 20, out).await?;

    step(
        out,
        2,
        "sessionize: every session is still open, so the sessions table stays empty and live shows them online",
    )?;
    sessionize::command(&run_args, out).await?;
    read_tables::show(&resolved, TableChoice::Sessions, 20, out).await?;
    read_tables::show(&resolved, TableChoice::Live, 20, out).await?;

    step(
        out,
        3,
        "generate the same users again, 73 seconds later, and sessionize: they join the open sessions, nothing closes yet",
    )?;
    generate_rows::command(
        &gen_args(Some((t0 + Duration::seconds(73)).to_rfc3339()), false),
        out,
    )
    .await?;
    sessionize::command(&run_args, out).await?;
    read_tables::show(&resolved, TableChoice::Sessions, 20, out).await?;
    read_tables::show(&resolved, TableChoice::Pending, 20, out).await?;

    step(
        out,
        4,
        "generate a closing row: a new user 61 minutes after the latest event, which moves the watermark past the open sessions",
    )?;
    generate_rows::command(&gen_args(None, true), out).await?;
    sessionize::command(&run_args, out).await?;
    writeln!(
        out,
        "Users 1, 2 and 3 now have one closed session each, holding both visits (close_reason = inactivity):"
    )?;
    read_tables::show(&resolved, TableChoice::Sessions, 20, out).await?;
    writeln!(
        out,
        "The live table shows them offline, and the new user online:"
    )?;
    read_tables::show(&resolved, TableChoice::Live, 20, out).await?;
    writeln!(
        out,
        "\nThe tables are ordinary Delta tables under {base}; try `sessionizer read-tables --base-dir {base}` or `sessionizer status --base-dir {base}`."
    )?;
    Ok(())
}
