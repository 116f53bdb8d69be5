//! sessionizer: incremental, exactly-once sessionization of a click-stream Delta table.
//!
//! Data flows read → sessionize → write → record:
//!
//! - [`source`] walks the events table's commit log from the checkpoint's last version and reads
//!   only the Parquet files those commits added, as normalized Arrow batches.
//! - [`engine`] is pure: (pending events, new events, watermark) → (closed sessions, pending
//!   events, live rows, rejected rows, new watermark). No I/O, no clock.
//! - [`fold`] runs the engine over a batch's key buckets on every core, each thread streaming
//!   the sessions it closes into Parquet files that the sink then commits.
//! - [`sink`] appends closed sessions, MERGE-upserts the live table, keeps late rows, each commit
//!   tagged with the batch's application transaction so that replays skip what is already there.
//! - [`checkpoint`] records the plan before the outputs and the pending state plus progress
//!   after them, and holds the lock that keeps two runs apart.
//!
//! - [`delta`] is the one door to Delta under all three: open, create, conform, txn lookups,
//!   log walks, streaming rewrites, and the fenced commit that every output and state commit
//!   goes through.
//!
//! [`config`] turns flags into validated settings before any of that happens; [`commands`] holds
//! one module per subcommand; [`cli`] mirrors the flags.

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod config;
pub mod delta;
pub mod dv;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod fold;
pub mod live;
pub mod memory;
pub mod progress;
pub mod sink;
pub mod source;

use std::io::Write;

pub use error::{Error, Result};

/// Runs one parsed command line, printing results to `out`.
pub async fn run(cli: cli::Cli, out: &mut dyn Write) -> Result<()> {
    use cli::Command::*;
    match cli.command {
        Sessionize(a) => commands::sessionize::command(&a, out).await,
        GenerateRows(a) => commands::generate_rows::command(&a, out).await,
        ReadTables(a) => commands::read_tables::command(&a, out).await,
        Status(a) => commands::status::command(&a, out).await,
        Query(a) => commands::query::command(&a, out).await,
        Demo(a) => commands::demo::command(&a, out).await,
        Maintain(a) => commands::maintain::command(&a, out).await,
        Reshard(a) => commands::reshard::command(&a, out).await,
        Completions(a) => {
            use clap::CommandFactory;
            let mut cmd = cli::Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "sessionizer", out);
            Ok(())
        }
        Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(cli::Cli::command()).render(out)?;
            Ok(())
        }
    }
}
