//! `sessionizer status`: where the checkpoint stands.

use std::io::Write;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::cli::StatusArgs;
use crate::commands::sessionize::format_micros;
use crate::config::OutputFormat;
use crate::error::{Error, Result};
use crate::source;

#[derive(Debug, Serialize)]
pub struct Status {
    pub checkpoint: String,
    pub events_table: String,
    pub last_version_processed: Option<u64>,
    pub latest_version_available: Option<u64>,
    pub versions_behind: Option<u64>,
    pub watermark: Option<String>,
    pub sessions_pending: u64,
    pub batches_committed: i64,
    pub last_run_at: Option<String>,
    pub lock: Option<String>,
}

pub async fn status(args: &StatusArgs) -> Result<Status> {
    let tables = args.tables.resolve();
    let cp = Checkpoint::open(&tables.checkpoint, false)?;
    if cp.identity().await?.is_none() {
        return Err(Error::Checkpoint(format!(
            "there is no checkpoint at `{}` yet; run `sessionizer sessionize` first, or check --checkpoint",
            tables.checkpoint
        )));
    }
    let state = cp.state_table().await?;
    let progress = cp.progress(state.as_ref()).await?;
    let latest = match source::open_events(&tables.events).await {
        Ok(t) => t.version(),
        Err(_) => None,
    };
    Ok(Status {
        checkpoint: tables.checkpoint.to_string(),
        events_table: tables.events.to_string(),
        last_version_processed: progress.last_version,
        latest_version_available: latest,
        versions_behind: latest.map(|l| match progress.last_version {
            Some(p) => l.saturating_sub(p),
            None => l + 1,
        }),
        watermark: progress.watermark_us.map(format_micros),
        sessions_pending: progress.sessions_pending,
        batches_committed: progress.seq,
        last_run_at: progress.committed_at,
        lock: cp.lock_holder().await?,
    })
}

pub async fn command(args: &StatusArgs, out: &mut dyn Write) -> Result<()> {
    let s = status(args).await?;
    match args.output {
        OutputFormat::Json => {
            writeln!(out, "{}", serde_json::to_string(&s).expect("serializable"))?
        }
        OutputFormat::Text => {
            let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
            writeln!(out, "checkpoint:               {}", s.checkpoint)?;
            writeln!(out, "events table:             {}", s.events_table)?;
            writeln!(
                out,
                "last version processed:   {}",
                n(s.last_version_processed)
            )?;
            writeln!(
                out,
                "latest version available: {}",
                n(s.latest_version_available)
            )?;
            writeln!(out, "versions behind:          {}", n(s.versions_behind))?;
            writeln!(out, "watermark:                {}", o(&s.watermark))?;
            writeln!(out, "pending sessions:         {}", s.sessions_pending)?;
            writeln!(out, "batches committed:        {}", s.batches_committed)?;
            writeln!(out, "last run at:              {}", o(&s.last_run_at))?;
            writeln!(
                out,
                "lock:                     {}",
                s.lock.clone().unwrap_or_else(|| "free".into())
            )?;
        }
    }
    Ok(())
}
