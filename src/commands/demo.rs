//! `sessionizer demo`: the walkthrough of the reference design, on a fresh base directory,
//! saying what each step shows.

use std::io::Write;

use chrono::{Duration, Timelike, Utc};

use crate::cli::{DemoArgs, SessionizeArgs, TableArgs, TableChoice};
use crate::commands::scenarios::Scenario;
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
        mode: crate::config::Mode::Sessions,
        end_when: None,
        start_when: None,
        max_duration: None,
        pair_timeout: Dur::from_minutes(60),
        flush: false,
        output: OutputFormat::Text,
        on_change_commit: OnChangeCommit::Fail,
        max_files_per_batch: 1000,
        max_bytes_per_batch: None,
        starting_version: None,
        starting_timestamp: None,
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

/// Parses `sessionize` flags as the command line would.
fn sessionize_args(base: &TableLocation, flags: &[&str]) -> Result<SessionizeArgs> {
    use clap::Parser;
    let base = base.to_string();
    let argv = ["sessionizer", "sessionize", "--base-dir", base.as_str()]
        .into_iter()
        .chain(flags.iter().copied());
    match crate::cli::Cli::try_parse_from(argv) {
        Ok(crate::cli::Cli {
            command: crate::cli::Command::Sessionize(a),
            ..
        }) => Ok(a),
        Ok(_) => unreachable!("parsed as sessionize"),
        Err(e) => Err(crate::error::Error::usage(e.to_string())),
    }
}

/// One reference job's scenario: two windows of data, a run after each, then a flush.
async fn scenario_demo(
    base: &TableLocation,
    scenario: Scenario,
    out: &mut dyn Write,
) -> Result<()> {
    let tables = table_args(base);
    let resolved = tables.resolve();
    let flags = scenario.sessionize_flags();
    let t0 = Utc::now()
        .with_nanosecond(0)
        .expect("zero nanoseconds is valid");
    writeln!(
        out,
        "sessionizer demo --scenario {}: sessionize {}",
        scenario.name(),
        flags
            .iter()
            .map(|f| if f.contains(' ') {
                format!("\"{f}\"")
            } else {
                f.to_string()
            })
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    for (n, offset) in [(1u32, 0i64), (2, 20)] {
        writeln!(
            out,
            "\n=== step {n}: a window of {} events {offset} minutes after the start, then sessionize",
            scenario.name()
        )?;
        let gen_args = crate::cli::GenerateArgs {
            tables: tables.clone(),
            closing: false,
            users: None,
            per_user: None,
            at: Some((t0 + Duration::minutes(offset)).to_rfc3339()),
            seed: 42,
            scenario: Some(scenario),
            rows: None,
            commits: 1,
        };
        generate_rows::command(&gen_args, out).await?;
        sessionize::command(&sessionize_args(base, flags)?, out).await?;
        read_tables::show(&resolved, TableChoice::Sessions, 30, out).await?;
        read_tables::show(&resolved, TableChoice::Live, 30, out).await?;
    }
    writeln!(
        out,
        "\n=== step 3: sessionize --flush closes what is still open (end of a backfill or a day)"
    )?;
    sessionize::command(
        &sessionize_args(base, &[flags, &["--flush"]].concat())?,
        out,
    )
    .await?;
    read_tables::show(&resolved, TableChoice::Sessions, 50, out).await?;
    if scenario != Scenario::Pairs {
        writeln!(
            out,
            "\nThe average session duration is one query away:\n$ sessionizer query \"SELECT count(*) AS sessions, avg(duration_ms) AS avg_duration_ms FROM sessions\""
        )?;
        let batches = crate::commands::query::query(
            &resolved,
            "SELECT count(*) AS sessions, avg(duration_ms) AS avg_duration_ms FROM sessions",
        )
        .await?;
        read_tables::render(&batches, out)?;
    }
    Ok(())
}

pub async fn command(args: &DemoArgs, out: &mut dyn Write) -> Result<()> {
    let base = &args.base_dir;
    reset(base)?;
    if let Some(scenario) = args.scenario {
        return scenario_demo(base, scenario, out).await;
    }
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
        scenario: None,
        rows: None,
        commits: 1,
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
