//! `sessionizer query`: SQL over the run's tables, with DataFusion.
//!
//! The tables that exist are registered as `events`, `sessions`, `live_sessions` (also as
//! `live`), `pending` and `late_events`, so the questions the reference jobs answer by hand are one command, e.g.
//! `SELECT avg(duration_ms) FROM sessions`.

use std::io::Write;

use arrow::array::RecordBatch;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::cli::{QueryArgs, QueryFormat};
use crate::commands::read_tables::render;
use crate::config::TableLocation;
use crate::error::{Error, Result};

/// Runs `sql` against the tables of `tables`, returning the result batches.
pub async fn query(tables: &crate::config::Tables, sql: &str) -> Result<Vec<RecordBatch>> {
    // Column names keep their case (`userID`), as in the tables.
    let config =
        SessionConfig::new().set_bool("datafusion.sql_parser.enable_ident_normalization", false);
    let ctx = SessionContext::new_with_config(config);
    let mut named: Vec<(&str, TableLocation)> = vec![
        ("events", tables.events.clone()),
        ("sessions", tables.sessions.clone()),
        ("live_sessions", tables.live.clone()),
        ("pending", tables.checkpoint.join("state")),
    ];
    if let Some(l) = &tables.late_events {
        named.push(("late_events", l.clone()));
    }
    let mut registered = Vec::new();
    for (name, loc) in named {
        if let Some(t) = crate::delta::try_load(&loc).await? {
            let provider = t.table_provider().await?;
            if name == "live_sessions" {
                ctx.register_table("live", provider.clone())?;
            }
            ctx.register_table(name, provider)?;
            registered.push(name);
        }
    }
    let df = ctx.sql(sql).await.map_err(|e| {
        Error::usage(format!(
            "the query failed: {e}. Tables available: {}",
            if registered.is_empty() {
                "none (run sessionize first)".into()
            } else {
                registered.join(", ")
            }
        ))
    })?;
    Ok(df.collect().await?)
}

pub async fn command(args: &QueryArgs, out: &mut dyn Write) -> Result<()> {
    let batches = query(&args.tables.resolve(), &args.sql).await?;
    match args.format {
        QueryFormat::Table => render(&batches, out)?,
        QueryFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            for b in &batches {
                w.write(b)?;
            }
        }
        QueryFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
}
