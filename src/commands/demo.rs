//! `sessionizer demo`: the walkthrough of the reference design, on a fresh base directory,
//! saying what each step shows.

use std::io::Write;

use chrono::{Duration, Timelike, Utc};

use crate::cli::{Command, DemoArgs, GenerateArgs, SessionizeArgs, TableChoice};
use crate::commands::scenarios::Scenario;
use crate::commands::{generate_rows, read_tables, sessionize};
use crate::config::{Dur, TableLocation};
use crate::error::Result;

/// The demo's gap and watermark delay, as in the reference walkthrough.
pub const DEMO_GAP: Dur = Dur::from_minutes(40);
pub const DEMO_DELAY: Dur = Dur::from_minutes(15);

/// Removes the demo's four tables under `base` (and nothing else), locally or on a store.
async fn reset(base: &TableLocation) -> Result<()> {
    const TABLES: [&str; 4] = ["events", "sessions", "live_sessions", "checkpoint"];
    if let Some(p) = base.local_path() {
        for name in TABLES {
            let dir = p.join(name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
        }
        return Ok(());
    }
    use futures::{StreamExt, TryStreamExt};
    let store = base.builder()?.build()?.object_store();
    for name in TABLES {
        let prefix = object_store::path::Path::from(name);
        let paths = store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        store.delete_stream(paths).try_collect::<Vec<_>>().await?;
    }
    Ok(())
}

/// Parses a subcommand's flags as the command line would, so the demo gets the same defaults
/// and validation as a user typing them.
fn parse(base: &TableLocation, subcommand: &str, flags: &[&str]) -> Result<Command> {
    use clap::Parser;
    let storage: Vec<String> = base
        .options()
        .iter()
        .map(|(k, v)| format!("--storage-option={k}={v}"))
        .collect();
    let base = base.to_string();
    let argv = ["sessionizer", subcommand, "--base-dir", base.as_str()]
        .into_iter()
        .chain(flags.iter().copied())
        .chain(storage.iter().map(String::as_str));
    crate::cli::Cli::try_parse_from(argv)
        .map(|cli| cli.command)
        .map_err(|e| crate::error::Error::usage(e.to_string()))
}

fn sessionize_args(base: &TableLocation, flags: &[&str]) -> Result<SessionizeArgs> {
    match parse(base, "sessionize", flags)? {
        Command::Sessionize(a) => Ok(a),
        _ => unreachable!("parsed as sessionize"),
    }
}

fn generate_args(base: &TableLocation, flags: &[&str]) -> Result<GenerateArgs> {
    match parse(base, "generate-rows", flags)? {
        Command::GenerateRows(a) => Ok(a),
        _ => unreachable!("parsed as generate-rows"),
    }
}

/// One reference job's scenario: two windows of data, a run after each, then a flush.
async fn scenario_demo(
    base: &TableLocation,
    scenario: Scenario,
    out: &mut dyn Write,
) -> Result<()> {
    let flags = scenario.sessionize_flags();
    let resolved = sessionize_args(base, flags)?.tables.resolve();
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
        let at = (t0 + Duration::minutes(offset)).to_rfc3339();
        let gen_args = generate_args(base, &["--scenario", scenario.name(), "--at", &at])?;
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
    let options = args.storage_option.iter().cloned().collect();
    let base = &args.base_dir.clone().with_options(&options);
    reset(base).await?;
    if let Some(scenario) = args.scenario {
        return scenario_demo(base, scenario, out).await;
    }
    let (gap, delay) = (DEMO_GAP.to_string(), DEMO_DELAY.to_string());
    let run_args = sessionize_args(base, &["--gap", &gap, "--watermark-delay", &delay])?;
    let resolved = run_args.tables.resolve();
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
    generate_rows::command(&generate_args(base, &["--at", &t0.to_rfc3339()])?, out).await?;
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
        &generate_args(base, &["--at", &(t0 + Duration::seconds(73)).to_rfc3339()])?,
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
    generate_rows::command(&generate_args(base, &["--closing"])?, out).await?;
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
