//! `sessionizer demo`: the walkthrough of the reference design, on a fresh base directory,
//! saying what each step shows.
//!
//! The demo deletes and rewrites tables, so it must not be able to reach real ones. It takes
//! its location from its own `--base-dir` only: config files (`--config`,
//! `SESSIONIZER_CONFIG`) and `SESSIONIZER_*` variables never apply to it or its steps. It
//! marks what it creates, and before deleting anything it looks at each of its four
//! locations: a Delta table it created carries the table property `sessionizer.demo = true`
//! (the events table from its first commit; the sessions and live tables from the commit
//! right after the first `sessionize` step creates them), and its checkpoint folder holds
//! `_sessionizer/demo.json`, written before the first run. Anything else found there is
//! refused with exit 2, naming it, and nothing is deleted.

use std::collections::HashMap;
use std::io::Write;

use chrono::{Duration, Timelike, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::cli::{Command, DemoArgs, GenerateArgs, SessionizeArgs, TableChoice};
use crate::commands::scenarios::Scenario;
use crate::commands::{generate_rows, read_tables, sessionize};
use crate::config::{Dur, TableLocation, Tables};
use crate::error::{Error, Result};

/// The demo's gap and watermark delay, as in the reference walkthrough.
pub const DEMO_GAP: Dur = Dur::from_minutes(40);
pub const DEMO_DELAY: Dur = Dur::from_minutes(15);

/// The table property that marks a Delta table the demo created.
pub const DEMO_PROPERTY: &str = "sessionizer.demo";
/// The file that marks a checkpoint folder the demo created (relative to the checkpoint).
pub const DEMO_CHECKPOINT_MARKER: &str = "_sessionizer/demo.json";

/// The demo's four locations under its base, as folder names.
const EVENTS: &str = "events";
const TABLES: [&str; 3] = [EVENTS, "sessions", "live_sessions"];
const CHECKPOINT: &str = "checkpoint";

/// What one of the demo's locations holds.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Nothing,
    /// Something the demo created: safe to delete.
    Demo,
    /// Something else, described for the refusal.
    Other(String),
}

/// What is at `<base>/<name>`: a table is the demo's when it carries [`DEMO_PROPERTY`], the
/// checkpoint folder when it holds [`DEMO_CHECKPOINT_MARKER`].
async fn inspect(base: &TableLocation, name: &str) -> Result<Found> {
    let store = base.builder()?.build()?.object_store();
    let first = store
        .list(Some(&Path::from(name)))
        .next()
        .await
        .transpose()?;
    let Some(first) = first else {
        return Ok(Found::Nothing);
    };
    if name == CHECKPOINT {
        let exists = |file: &str| {
            let store = store.clone();
            let path = Path::from(format!("{CHECKPOINT}/{file}"));
            async move {
                match store.head(&path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(Error::from(e)),
                }
            }
        };
        return Ok(if exists(DEMO_CHECKPOINT_MARKER).await? {
            Found::Demo
        } else if exists("_sessionizer/checkpoint.json").await? {
            Found::Other("a sessionizer checkpoint that the demo did not create".into())
        } else {
            Found::Other(format!(
                "files that the demo did not write (e.g. `{first}`)",
                first = first.location
            ))
        });
    }
    match crate::delta::try_load(&base.join(name)).await {
        Ok(Some(t)) => Ok(if is_marked(&t)? {
            Found::Demo
        } else {
            Found::Other(format!(
                "a Delta table (version {}, columns {}) that the demo did not create",
                t.version().unwrap_or(0),
                crate::delta::arrow_schema(&t)?
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }),
        Ok(None) => Ok(Found::Other(format!(
            "files that are not a Delta table (e.g. `{}`)",
            first.location
        ))),
        Err(e) => Ok(Found::Other(format!(
            "something that is not readable as a demo table ({e})"
        ))),
    }
}

/// Whether the demo created this table: it carries [`DEMO_PROPERTY`] = `true`.
fn is_marked(table: &deltalake::DeltaTable) -> Result<bool> {
    Ok(table
        .snapshot()?
        .metadata()
        .configuration()
        .get(DEMO_PROPERTY)
        .is_some_and(|v| v == "true"))
}

/// Removes what an earlier demo left under `base`, after checking that every one of the
/// demo's locations is empty or the demo's own; refuses (exit 2) before deleting anything
/// otherwise. Nothing outside the four locations is looked at or touched.
async fn reset(base: &TableLocation) -> Result<()> {
    if base.local_path().is_some_and(|p| !p.exists()) {
        return Ok(());
    }
    let mut ours = Vec::new();
    for name in TABLES.into_iter().chain([CHECKPOINT]) {
        match inspect(base, name).await? {
            Found::Nothing => {}
            Found::Demo => ours.push(name),
            Found::Other(what) => {
                return Err(Error::usage(format!(
                    "demo: `{}` holds {what}. The demo deletes and recreates only the tables it \
                     created itself (marked with the table property {DEMO_PROPERTY} = true), so it \
                     stops here and has changed nothing. Choose another --base-dir for the demo \
                     (its default is /tmp/sessionizer-demo); if this is left over from an \
                     interrupted demo, delete it by hand",
                    base.join(name)
                )));
            }
        }
    }
    if let Some(p) = base.local_path() {
        for name in ours {
            std::fs::remove_dir_all(p.join(name))?;
        }
        return Ok(());
    }
    let store = base.builder()?.build()?.object_store();
    for name in ours {
        let prefix = Path::from(name);
        let paths = store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        store.delete_stream(paths).try_collect::<Vec<_>>().await?;
    }
    Ok(())
}

/// Creates the demo's events table with its marker, and marks the checkpoint folder, before
/// any step writes: whatever the demo leaves behind, even when interrupted, the next demo
/// recognises.
async fn create_marked(
    base: &TableLocation,
    events_schema: &arrow::datatypes::Schema,
) -> Result<()> {
    use deltalake::kernel::StructType;
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    let loc = base.join(EVENTS);
    if let Some(p) = loc.local_path() {
        std::fs::create_dir_all(&p)?;
    }
    let kernel: StructType = events_schema.try_into_kernel()?;
    loc.builder()?
        .build()?
        .create()
        .with_columns(kernel.fields().cloned())
        .with_configuration([(DEMO_PROPERTY, Some("true"))])
        .with_raise_if_key_not_exists(false)
        .await?;
    let marker = serde_json::json!({
        "created_by": "sessionizer demo",
        "created_at": Utc::now().to_rfc3339(),
    });
    base.builder()?
        .build()?
        .object_store()
        .put(
            &Path::from(format!("{CHECKPOINT}/{DEMO_CHECKPOINT_MARKER}")),
            serde_json::to_vec_pretty(&marker)
                .expect("serializable")
                .into(),
        )
        .await?;
    Ok(())
}

/// Marks the sessions and live tables once a `sessionize` step has created them (one
/// SET TBLPROPERTIES commit each, the first time only).
async fn mark_outputs(tables: &Tables) -> Result<()> {
    for loc in [&tables.sessions, &tables.live] {
        let Some(t) = crate::delta::try_load(loc).await? else {
            continue;
        };
        if !is_marked(&t)? {
            t.set_tbl_properties()
                .with_properties(HashMap::from([(
                    DEMO_PROPERTY.to_string(),
                    "true".to_string(),
                )]))
                .with_raise_if_not_exists(false)
                .await?;
        }
    }
    Ok(())
}

/// One `sessionize` step of the demo, then the marks on the tables it created.
async fn run_step(args: &SessionizeArgs, tables: &Tables, out: &mut dyn Write) -> Result<()> {
    sessionize::command(args, out).await?;
    mark_outputs(tables).await
}

/// Parses a subcommand's flags as the command line would, so the demo gets the same defaults
/// and validation as a user typing them, but without reading any `SESSIONIZER_*` variable:
/// the demo's steps see only the flags written here.
fn parse(base: &TableLocation, subcommand: &str, flags: &[&str]) -> Result<Command> {
    use clap::{CommandFactory, FromArgMatches};
    let no_env = |a: clap::Arg| a.env(None::<&'static str>);
    let cmd = crate::cli::Cli::command()
        .mut_args(no_env)
        .mut_subcommands(move |c| c.mut_args(no_env));
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
    cmd.try_get_matches_from(argv)
        .and_then(|m| crate::cli::Cli::from_arg_matches(&m))
        .map(|cli| cli.command)
        .map_err(|e| Error::usage(e.to_string()))
}

fn sessionize_args(base: &TableLocation, flags: &[&str]) -> Result<SessionizeArgs> {
    match parse(base, "sessionize", flags)? {
        Command::Sessionize(a) => Ok(*a),
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
    create_marked(base, &scenario.schema()).await?;
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
        run_step(&sessionize_args(base, flags)?, &resolved, out).await?;
        read_tables::show(&resolved, TableChoice::Sessions, 30, out).await?;
        read_tables::show(&resolved, TableChoice::Live, 30, out).await?;
    }
    writeln!(
        out,
        "\n=== step 3: sessionize --flush closes what is still open (end of a backfill or a day)"
    )?;
    run_step(
        &sessionize_args(base, &[flags, &["--flush"]].concat())?,
        &resolved,
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
    create_marked(base, &generate_rows::demo_schema()).await?;
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
    run_step(&run_args, &resolved, out).await?;
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
    run_step(&run_args, &resolved, out).await?;
    read_tables::show(&resolved, TableChoice::Sessions, 20, out).await?;
    read_tables::show(&resolved, TableChoice::Pending, 20, out).await?;

    step(
        out,
        4,
        "generate a closing row: a new user 61 minutes after the latest event, which moves the watermark past the open sessions",
    )?;
    generate_rows::command(&generate_args(base, &["--closing"])?, out).await?;
    run_step(&run_args, &resolved, out).await?;
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
