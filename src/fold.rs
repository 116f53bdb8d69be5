//! The sessionize stage of one batch: the pure engine run over key buckets on every core, each
//! thread writing the sessions it closes straight into its own Parquet files.
//!
//! Keys never interact, so the batch's new events (cut into key buckets as they were read) and
//! its pending events (cut the same way) are stepped bucket by bucket with the whole batch's
//! watermarks ([`Engine::step_to`]). A bucket's input is freed once it is folded and its closed
//! sessions are freed once they are encoded, so the stage holds the unread buckets plus, per
//! thread, one bucket being folded — not the whole batch's sessions. The outputs that are not
//! streamed (live rows, pending events, rejected rows) are put back in bucket order, so they do
//! not depend on which thread folded what.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use deltalake::kernel::Add;

use crate::delta::FileWriter;
use crate::engine::{Engine, FILE_COL, FilePiece, ROW_COL, StepMetrics, VERSION_COL};
use crate::error::Result;

/// Pending events per bucket for each MiB of `--bucket-size`: the default 4MiB (about 330,000
/// click events of new data) takes 500,000 pending events.
const PENDING_ROWS_PER_MIB: u64 = 125_000;
/// More buckets than this only add overhead.
const MAX_BUCKETS: u64 = 256;

/// How many key buckets of `bucket_bytes` a batch with `new_bytes` of new data files and
/// `pending_rows` pending events is cut into. Any count gives the same sessions; the count only
/// sets how much of the batch is being folded at once.
pub fn bucket_count(new_bytes: u64, pending_rows: usize, bucket_bytes: u64) -> usize {
    let bucket_bytes = bucket_bytes.max(1);
    let pending_per_bucket = (bucket_bytes.saturating_mul(PENDING_ROWS_PER_MIB) >> 20).max(1);
    let n = new_bytes.div_ceil(bucket_bytes) + (pending_rows as u64).div_ceil(pending_per_bucket);
    n.clamp(1, MAX_BUCKETS) as usize
}

/// The threads the stage runs on (and so the session writers it needs).
pub fn threads(buckets: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    cores.min(buckets).max(1)
}

/// What the stage gives the rest of the batch.
#[derive(Debug)]
pub struct Folded {
    /// Add actions of the session files written (none when the writers were skipped).
    pub adds: Vec<Add>,
    pub live: RecordBatch,
    pub pending: RecordBatch,
    /// Late and invalid rows, in read order.
    pub rejected: RecordBatch,
    pub metrics: StepMetrics,
    /// Summed over threads: time folding, and time encoding and writing sessions.
    pub fold_time: Duration,
    pub write_time: Duration,
}

/// One bucket's outputs that are not streamed.
struct BucketOut {
    bucket: usize,
    live: RecordBatch,
    pending: RecordBatch,
    rejected: RecordBatch,
    metrics: StepMetrics,
}

struct ThreadOut {
    buckets: Vec<BucketOut>,
    adds: Vec<Add>,
    fold_time: Duration,
    write_time: Duration,
}

/// Steps every bucket: `pending[b]` and `new[b]` hold bucket `b`'s pending and new events.
/// `writers` holds one writer per thread ([`threads`]), or `None` when the sessions table
/// already holds this batch (a replay), in which case closed sessions are dropped.
#[allow(clippy::too_many_arguments)]
pub async fn fold_buckets(
    engine: &Engine,
    pending: Vec<RecordBatch>,
    new: Vec<Vec<FilePiece>>,
    watermark: Option<i64>,
    new_watermark: Option<i64>,
    flush: bool,
    writers: Option<Vec<FileWriter>>,
    threads: usize,
) -> Result<Folded> {
    let schema = engine.spec.normalized_schema();
    let queue: VecDeque<(usize, RecordBatch, Vec<FilePiece>)> = pending
        .into_iter()
        .zip(new)
        .enumerate()
        .map(|(b, (p, n))| (b, p, n))
        .collect();
    let queue = Arc::new(Mutex::new(queue));
    let writers: Vec<Option<FileWriter>> = match writers {
        Some(w) => w.into_iter().map(Some).collect(),
        None => (0..threads).map(|_| None).collect(),
    };
    let rt = tokio::runtime::Handle::current();
    let mut handles = Vec::new();
    for mut writer in writers {
        let (queue, engine, schema, rt) =
            (queue.clone(), engine.clone(), schema.clone(), rt.clone());
        handles.push(tokio::task::spawn_blocking(move || -> Result<ThreadOut> {
            let mut out = ThreadOut {
                buckets: Vec::new(),
                adds: Vec::new(),
                fold_time: Duration::ZERO,
                write_time: Duration::ZERO,
            };
            let work = |out: &mut ThreadOut, writer: &mut Option<FileWriter>| -> Result<()> {
                loop {
                    let next = queue.lock().expect("queue lock").pop_front();
                    let Some((bucket, pending, pieces)) = next else {
                        return Ok(());
                    };
                    let t = Instant::now();
                    let parts = pieces
                        .into_iter()
                        .map(|p| p.into_normalized(&schema))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let events = concat_batches(&schema, &parts)?;
                    drop(parts);
                    let step = engine.step_to(pending, events, watermark, new_watermark, flush)?;
                    out.fold_time += t.elapsed();
                    let t = Instant::now();
                    if let Some(w) = writer.as_mut() {
                        for part in step.closed_parts {
                            w.write_blocking(&rt, part)?;
                        }
                    }
                    out.write_time += t.elapsed();
                    out.buckets.push(BucketOut {
                        bucket,
                        live: step.live,
                        pending: step.pending,
                        rejected: step.rejected,
                        metrics: step.metrics,
                    });
                }
            };
            if let Err(e) = work(&mut out, &mut writer) {
                // Stop the other threads early: the batch fails as a whole.
                queue.lock().expect("queue lock").clear();
                return Err(e);
            }
            if let Some(w) = writer {
                let t = Instant::now();
                out.adds = rt.block_on(w.finish())?;
                out.write_time += t.elapsed();
            }
            Ok(out)
        }));
    }
    let mut buckets = Vec::new();
    let mut folded = Folded {
        adds: Vec::new(),
        live: RecordBatch::new_empty(crate::engine::live_schema(&engine.spec)),
        pending: RecordBatch::new_empty(schema.clone()),
        rejected: RecordBatch::new_empty(crate::engine::rejected_schema(&engine.spec)),
        metrics: StepMetrics::default(),
        fold_time: Duration::ZERO,
        write_time: Duration::ZERO,
    };
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(t)) => {
                buckets.extend(t.buckets);
                folded.adds.extend(t.adds);
                folded.fold_time += t.fold_time;
                folded.write_time += t.write_time;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            // A panic is a bug: let it end the run as one (exit 101).
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    buckets.sort_by_key(|b| b.bucket);
    for b in &buckets {
        folded.metrics += b.metrics;
    }
    folded.live = concat_batches(&folded.live.schema(), buckets.iter().map(|b| &b.live))?;
    folded.pending = concat_batches(&schema, buckets.iter().map(|b| &b.pending))?;
    let rejected = concat_batches(
        &folded.rejected.schema(),
        buckets.iter().map(|b| &b.rejected),
    )?;
    drop(buckets);
    folded.rejected = in_read_order(rejected)?;
    Ok(folded)
}

/// Adds the rows the reader's event-time guard took out (`future`, `bad_time`) to a folded
/// batch: they are read and invalid, and join the late rows in read order.
pub fn add_read_rejects(folded: &mut Folded, rejects: Vec<RecordBatch>) -> Result<()> {
    let n: u64 = rejects.iter().map(|b| b.num_rows() as u64).sum();
    if n == 0 {
        return Ok(());
    }
    folded.metrics.rows_read += n;
    folded.metrics.rows_invalid += n;
    let schema = folded.rejected.schema();
    let all = concat_batches(
        &schema,
        std::iter::once(&folded.rejected).chain(rejects.iter()),
    )?;
    folded.rejected = in_read_order(all)?;
    Ok(())
}

/// Rows back in (version, file, row) order.
fn in_read_order(batch: RecordBatch) -> Result<RecordBatch> {
    if batch.num_rows() < 2 {
        return Ok(batch);
    }
    let columns: Vec<SortColumn> = [VERSION_COL, FILE_COL, ROW_COL]
        .iter()
        .map(|c| SortColumn {
            values: batch.column_by_name(c).expect("tie-break column").clone(),
            options: None,
        })
        .collect();
    let idx = lexsort_to_indices(&columns, None)?;
    Ok(take_record_batch(&batch, &idx)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_count_follows_the_batch() {
        let mib4 = 4 << 20;
        assert_eq!(bucket_count(0, 0, mib4), 1);
        assert_eq!(bucket_count(150_000, 0, mib4), 1);
        assert_eq!(bucket_count(120 << 20, 0, mib4), 30);
        assert_eq!(bucket_count(120 << 20, 0, 8 << 20), 15);
        assert_eq!(bucket_count(150_000, 530_000, mib4), 3);
        assert_eq!(bucket_count(u64::MAX / 2, 0, mib4), 256);
        assert_eq!(bucket_count(10_000, 10, 1), 256);
        assert_eq!(bucket_count(10_000, 10, 0), 256);
    }
}
