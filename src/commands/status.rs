//! `sessionizer status`: where the checkpoint stands, for a person or a monitor.
//!
//! Exit 0 when the checkpoint is readable (whatever the lag), 3 when there is no checkpoint at
//! that location yet, 1 when it is corrupt or unreadable.

use std::io::Write;

use chrono::{DateTime, NaiveDateTime, Utc};
use deltalake::kernel::Action;
use deltalake::logstore::LogStoreRef;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::cli::StatusArgs;
use crate::commands::sessionize::format_micros;
use crate::config::{Dur, OutputFormat};
use crate::error::Result;
use crate::source;

/// How many of the newest unprocessed commits are looked at for the event-time lag.
const LAG_SCAN_VERSIONS: u64 = 200;

#[derive(Debug, Serialize)]
pub struct Status {
    pub checkpoint: String,
    pub events_table: String,
    pub last_version_processed: Option<u64>,
    pub latest_version_available: Option<u64>,
    pub versions_behind: Option<u64>,
    /// Largest event time processed (the watermark plus its delay).
    pub max_event_time_processed: Option<String>,
    /// Largest event time in the unprocessed commits, from their file statistics.
    pub max_event_time_available: Option<String>,
    /// How far the processed event time trails the available one, in seconds (0 when caught
    /// up; null when the unprocessed files carry no statistics).
    pub event_time_lag_seconds: Option<i64>,
    pub watermark: Option<String>,
    pub sessions_pending: u64,
    pub batches_committed: i64,
    pub last_run_at: Option<String>,
    pub lock: Option<String>,
    /// The largest event time ever folded, and when the events version that brought it was
    /// committed (what the event-time guard, `--max-event-skew`, measures against).
    pub max_event_time_seen: Option<String>,
    pub max_event_committed_at: Option<String>,
    /// The keys holding the most pending events: a key that is never idle keeps growing its
    /// open session, which every batch re-reads and rewrites.
    pub largest_pending_keys: Vec<PendingKey>,
}

/// One key of the pending state and its events.
#[derive(Debug, Serialize)]
pub struct PendingKey {
    /// The key's values, comma-separated.
    pub key: String,
    pub events: u64,
    pub first_event: Option<String>,
    pub last_event: Option<String>,
}

/// How many keys `status` lists under `largest_pending_keys`.
const TOP_PENDING_KEYS: usize = 5;

/// The keys of the pending state with the most events, most first.
async fn largest_pending_keys(
    state: &deltalake::DeltaTable,
    keys: &[String],
) -> Result<Vec<PendingKey>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("pending", state.table_provider().await?)?;
    let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let cols = keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", ");
    let key = keys
        .iter()
        .map(|k| format!("CAST({} AS VARCHAR)", q(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT concat_ws(',', {key}) AS key, count(*) AS events, min(_time_us) AS first, \
         max(_time_us) AS last FROM pending GROUP BY {cols} ORDER BY events DESC, key \
         LIMIT {TOP_PENDING_KEYS}"
    );
    let mut out = Vec::new();
    for b in ctx.sql(&sql).await?.collect().await? {
        let key = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let key = key.as_string::<i32>();
        let events = b.column(1).as_primitive::<Int64Type>();
        let first = b.column(2).as_primitive::<Int64Type>();
        let last = b.column(3).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let t =
                |a: &arrow::array::Int64Array| (!a.is_null(i)).then(|| format_micros(a.value(i)));
            out.push(PendingKey {
                key: key.value(i).to_string(),
                events: events.value(i) as u64,
                first_event: t(first),
                last_event: t(last),
            });
        }
    }
    Ok(out)
}

pub async fn status(args: &StatusArgs) -> Result<Status> {
    status_of(&args.tables.resolve()).await
}

/// Every shard of a sharded run, and which one is behind.
#[derive(Debug, Serialize)]
pub struct ShardsStatus {
    pub shards: u32,
    /// One entry per shard, in shard order (`null` for a shard with no checkpoint yet).
    pub each: Vec<Option<Status>>,
    /// The shard that has processed the fewest events versions (or has not started).
    pub behind: Option<u32>,
    /// How many versions the shards' progress spans (0 when they are all at one version).
    pub spread_versions: u64,
}

pub async fn shards_status(args: &StatusArgs, count: u32) -> Result<ShardsStatus> {
    let tables = args.tables.resolve();
    let mut each = Vec::new();
    for index in 0..count {
        let mut t = tables.clone();
        t.checkpoint = tables
            .checkpoint
            .join(&crate::config::shard_checkpoint_name(index, count));
        each.push(match status_of(&t).await {
            Ok(s) => Some(s),
            Err(crate::Error::NoCheckpoint(_)) => None,
            Err(e) => return Err(e),
        });
    }
    // A shard with no checkpoint is the furthest behind; otherwise the lowest last version.
    let rank = |s: &Option<Status>| s.as_ref().map(|s| s.last_version_processed.map(|v| v + 1));
    let behind = (0..count)
        .min_by_key(|&i| rank(&each[i as usize]))
        .filter(|_| count > 0);
    let versions: Vec<u64> = each
        .iter()
        .map(|s| {
            s.as_ref()
                .and_then(|s| s.last_version_processed.map(|v| v + 1))
                .unwrap_or(0)
        })
        .collect();
    let spread = versions.iter().max().unwrap_or(&0) - versions.iter().min().unwrap_or(&0);
    Ok(ShardsStatus {
        shards: count,
        behind: behind.filter(|_| spread > 0 || each.iter().any(Option::is_none)),
        each,
        spread_versions: spread,
    })
}

async fn status_of(tables: &crate::config::Tables) -> Result<Status> {
    let (cp, identity) = Checkpoint::open_existing(&tables.checkpoint).await?;
    let state = cp.state_table().await?;
    let progress = cp.progress(state.as_ref()).await?;
    let events = source::open_events(&tables.events).await.ok();
    let latest = events.as_ref().and_then(|t| t.version());
    let delay_us = identity
        .watermark_delay
        .parse::<Dur>()
        .map(|d| d.as_micros())
        .unwrap_or(0);
    let processed_us = progress.watermark_us.map(|w| w + delay_us);
    let first_unprocessed = progress.last_version.map_or(0, |v| v + 1);
    let available_us = match (&events, latest) {
        (Some(t), Some(l)) if l >= first_unprocessed => {
            let from = first_unprocessed.max(l.saturating_sub(LAG_SCAN_VERSIONS - 1));
            max_event_time(&t.log_store(), from, l, &identity.time_column).await
        }
        _ => None,
    };
    let caught_up = latest.is_some_and(|l| l < first_unprocessed);
    let lag = if caught_up {
        Some(0)
    } else {
        available_us.map(|a| ((a - processed_us.unwrap_or(a)).max(0)) / 1_000_000)
    };
    Ok(Status {
        checkpoint: tables.checkpoint.to_string(),
        events_table: tables.events.to_string(),
        last_version_processed: progress.last_version,
        latest_version_available: latest,
        versions_behind: latest.map(|l| (l + 1).saturating_sub(first_unprocessed)),
        max_event_time_processed: processed_us.map(format_micros),
        max_event_time_available: available_us.map(format_micros),
        event_time_lag_seconds: lag,
        watermark: progress.watermark_us.map(format_micros),
        sessions_pending: progress.sessions_pending,
        batches_committed: progress.seq,
        last_run_at: progress.committed_at,
        lock: cp.lock_holder().await?,
        max_event_time_seen: progress.max_event_us.map(format_micros),
        max_event_committed_at: progress
            .max_event_committed_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        largest_pending_keys: match &state {
            Some(t) if progress.sessions_pending > 0 => {
                largest_pending_keys(t, &identity.keys).await?
            }
            _ => Vec::new(),
        },
    })
}

/// The largest `maxValues[time_column]` over the files added by versions `from..=to`.
async fn max_event_time(log: &LogStoreRef, from: u64, to: u64, column: &str) -> Option<i64> {
    let maxima: Vec<Option<i64>> = futures::stream::iter(from..=to)
        .map(|v| async move {
            let Some(actions) = crate::delta::log_actions(log, v).await? else {
                return Ok::<_, crate::Error>(None);
            };
            Ok(actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Add(add) if add.data_change => add.stats,
                    _ => None,
                })
                .filter_map(|stats| stats_max_us(&stats, column))
                .max())
        })
        .buffer_unordered(16)
        .try_collect()
        .await
        .ok()?;
    maxima.into_iter().flatten().max()
}

/// Reads a file's maximum event time from its Delta statistics: a timestamp string, or a
/// number of epoch milliseconds.
fn stats_max_us(stats: &str, column: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(stats).ok()?;
    match v.get("maxValues")?.get(column)? {
        serde_json::Value::Number(n) => n.as_i64().map(|ms| ms * 1000),
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| {
                NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
            })
            .ok()
            .map(|t| t.timestamp_micros()),
        _ => None,
    }
}

pub async fn command(args: &StatusArgs, out: &mut dyn Write) -> Result<()> {
    if let Some(count) = args.shards.filter(|&n| n > 1) {
        let all = shards_status(args, count).await?;
        match args.output {
            OutputFormat::Json => writeln!(
                out,
                "{}",
                serde_json::to_string(&all).expect("serializable")
            )?,
            OutputFormat::Text => {
                writeln!(
                    out,
                    "{:<7}{:>10}{:>10}{:>9}  {:<28} lock",
                    "shard", "version", "behind", "pending", "watermark"
                )?;
                for (i, s) in all.each.iter().enumerate() {
                    match s {
                        None => writeln!(out, "{i:<7}no checkpoint yet")?,
                        Some(s) => writeln!(
                            out,
                            "{i:<7}{:>10}{:>10}{:>9}  {:<28} {}",
                            s.last_version_processed
                                .map_or("-".into(), |v| v.to_string()),
                            s.versions_behind.map_or("-".into(), |v| v.to_string()),
                            s.sessions_pending,
                            s.watermark.clone().unwrap_or_else(|| "-".into()),
                            s.lock.clone().unwrap_or_else(|| "free".into())
                        )?,
                    }
                }
                match all.behind {
                    Some(b) => writeln!(
                        out,
                        "shard {b} is behind ({} versions between the shards)",
                        all.spread_versions
                    )?,
                    None => writeln!(out, "every shard is at the same version")?,
                }
            }
        }
        return Ok(());
    }
    let s = status(args).await?;
    match args.output {
        OutputFormat::Json => {
            writeln!(out, "{}", serde_json::to_string(&s).expect("serializable"))?
        }
        OutputFormat::Text => {
            let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
            let rows = [
                ("checkpoint", s.checkpoint.clone()),
                ("events table", s.events_table.clone()),
                ("last version processed", n(s.last_version_processed)),
                ("latest version available", n(s.latest_version_available)),
                ("versions behind", n(s.versions_behind)),
                ("max event time processed", o(&s.max_event_time_processed)),
                ("max event time available", o(&s.max_event_time_available)),
                (
                    "event-time lag",
                    s.event_time_lag_seconds
                        .map_or("-".into(), |l| format!("{l} s")),
                ),
                ("watermark", o(&s.watermark)),
                ("pending sessions", s.sessions_pending.to_string()),
                ("batches committed", s.batches_committed.to_string()),
                ("last run at", o(&s.last_run_at)),
                ("lock", s.lock.clone().unwrap_or_else(|| "free".into())),
                ("max event time seen", o(&s.max_event_time_seen)),
                ("  committed at", o(&s.max_event_committed_at)),
            ];
            for (name, value) in rows {
                writeln!(out, "{:<27}{value}", format!("{name}:"))?;
            }
            if !s.largest_pending_keys.is_empty() {
                writeln!(out, "largest pending keys:")?;
                for k in &s.largest_pending_keys {
                    writeln!(
                        out,
                        "  {:<25}{} events, {} .. {}",
                        k.key,
                        k.events,
                        o(&k.first_event),
                        o(&k.last_event)
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stats_max_us;

    #[test]
    fn reads_the_max_event_time_of_each_stats_flavour() {
        let ts = r#"{"numRecords":2,"maxValues":{"visit_time":"2026-01-02T03:04:05.123Z"}}"#;
        assert_eq!(stats_max_us(ts, "visit_time"), Some(1_767_323_045_123_000));
        let ntz = r#"{"maxValues":{"t":"2026-01-02T03:04:05.123"}}"#;
        assert_eq!(stats_max_us(ntz, "t"), Some(1_767_323_045_123_000));
        let ms = r#"{"maxValues":{"t":1767323045123}}"#;
        assert_eq!(stats_max_us(ms, "t"), Some(1_767_323_045_123_000));
        assert_eq!(stats_max_us(ms, "other"), None);
        assert_eq!(stats_max_us("not json", "t"), None);
    }
}
