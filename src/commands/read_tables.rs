//! `sessionizer read-tables`: prints tables the way Spark's `show()` does.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::util::display::FormatOptions;
use arrow::util::pretty::pretty_format_batches_with_options;
use datafusion::prelude::SessionContext;

use crate::cli::{ReadArgs, TableChoice};
use crate::config::{TableLocation, Tables};
use crate::error::Result;

/// The table a choice names, and the columns to sort it by when they exist.
fn location(
    tables: &Tables,
    which: TableChoice,
) -> Option<(TableLocation, &'static [&'static str])> {
    match which {
        TableChoice::Events => Some((tables.events.clone(), &["visit_time", "user_id"])),
        TableChoice::Sessions => Some((tables.sessions.clone(), &["start_time", "session_id"])),
        TableChoice::Live => Some((tables.live.clone(), &["start_time", "session_id"])),
        TableChoice::Pending => Some((
            tables.checkpoint.join("state"),
            &["_time_us", "_src_version", "_src_row"],
        )),
        TableChoice::Late => tables.late_events.clone().map(|l| (l, &["_time_us"][..])),
    }
}

/// Reads a whole Delta table (sorted by `order` columns that exist), or `None` if there is no
/// table at `loc`.
pub async fn read_table(
    loc: &TableLocation,
    order: &[&str],
    limit: Option<usize>,
) -> Result<Option<Vec<RecordBatch>>> {
    let Some(table) = crate::delta::try_load(loc).await? else {
        return Ok(None);
    };
    let ctx = SessionContext::new();
    let provider = table.table_provider().await?;
    let names: Vec<String> = provider
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    ctx.register_table("t", provider)?;
    let order: Vec<String> = order
        .iter()
        .filter(|c| names.iter().any(|n| n == *c))
        .map(|c| format!("\"{c}\""))
        .collect();
    let mut sql = "SELECT * FROM t".to_string();
    if !order.is_empty() {
        sql += &format!(" ORDER BY {}", order.join(", "));
    }
    if let Some(n) = limit {
        sql += &format!(" LIMIT {n}");
    }
    Ok(Some(ctx.sql(&sql).await?.collect().await?))
}

/// Spark-like rendering: a boxed table, timestamps as `YYYY-MM-DD HH:MM:SS.ffffff`.
pub fn render(batches: &[RecordBatch], out: &mut dyn Write) -> Result<()> {
    let opts = FormatOptions::default()
        .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f"))
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"))
        .with_null("null");
    if batches.iter().all(|b| b.num_rows() == 0) {
        if let Some(b) = batches.first() {
            // Header only, as Spark prints for an empty table.
            writeln!(
                out,
                "{}",
                pretty_format_batches_with_options(&[RecordBatch::new_empty(b.schema())], &opts)?
            )?;
        } else {
            writeln!(out, "(empty)")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{}",
        pretty_format_batches_with_options(batches, &opts)?
    )?;
    Ok(())
}

/// Prints one table with a title line.
pub async fn show(
    tables: &Tables,
    which: TableChoice,
    limit: usize,
    out: &mut dyn Write,
) -> Result<()> {
    let Some((loc, order)) = location(tables, which) else {
        writeln!(out, "late: no --late-events table configured")?;
        return Ok(());
    };
    let name = format!("{which:?}").to_lowercase();
    match read_table(&loc, order, Some(limit)).await? {
        None => writeln!(out, "{name} ({loc}): no table yet")?,
        Some(batches) => {
            let n: usize = batches.iter().map(|b| b.num_rows()).sum();
            writeln!(
                out,
                "{name} ({loc}): {n} row(s) shown{}",
                if n == limit {
                    format!(", limit {limit}")
                } else {
                    String::new()
                }
            )?;
            render(&batches, out)?;
        }
    }
    Ok(())
}

pub async fn command(args: &ReadArgs, out: &mut dyn Write) -> Result<()> {
    let tables = args.tables.resolve();
    let which: Vec<TableChoice> = match args.table {
        Some(t) => vec![t],
        None => vec![
            TableChoice::Events,
            TableChoice::Sessions,
            TableChoice::Live,
            TableChoice::Pending,
        ],
    };
    for w in which {
        show(&tables, w, args.limit, out).await?;
    }
    Ok(())
}
