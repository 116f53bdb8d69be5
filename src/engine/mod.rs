//! The pure sessionization engine: no I/O, no clock, no async. Arrow in, Arrow out.
//!
//! One call to [`Engine::step`] is one batch of a run:
//! `(pending events, new events, watermark) -> (closed sessions, pending events, live rows,
//! rejected rows, new watermark)`.
//!
//! The engine keeps the *events* of open sessions as its state rather than running aggregates.
//! That is what makes the rules order-independent: a late-arriving (but not late) event can land
//! anywhere among a key's pending events, bridge two sessions or split nothing, and the key is
//! simply sessionized again from its pending events. Closed sessions never need to be revisited
//! because the closing rule guarantees that no event that is not late can still reach them.
//! The state is bounded by the events of open sessions, not by the table's history.
//!
//! Everything here works on whole columns: one concatenation, one lexicographic sort, one
//! partition by key, and a scan over the sorted time column that only records index ranges.
//! Output columns are then gathered with `take` and list offsets, never row by row.

mod input;
mod output;
mod pairs;
mod rules;
mod shard;

pub use input::{
    EventSpec, FilePiece, Markers, SpecError, TimeKind, guarded_max_from_maxes, guarded_max_time,
    is_string_type, kept_max_time, normalize, screen, sum_input_name, sum_type,
};
pub use output::{live_schema, rejected_schema, session_id, sessions_schema};
pub use pairs::PairStatus;
pub use rules::{CloseReason, SessionRules, SessionSpan};
pub use shard::{ShardFn, in_shard, shard_of, spark_buckets};

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::kernels::cmp::lt;
use arrow::compute::{
    SortOptions, concat_batches, filter_record_batch, is_null, not, or, take_record_batch,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

/// Internal column names of the normalized event schema (see [`EventSpec::normalized_schema`]).
pub const TIME_COL: &str = "_time_us";
pub const VERSION_COL: &str = "_src_version";
pub const FILE_COL: &str = "_src_file";
pub const ROW_COL: &str = "_src_row";
pub const END_COL: &str = "_end_marker";
pub const START_COL: &str = "_start_marker";

/// Why a row was not folded into any session.
pub const REASON_LATE: &str = "late";
pub const REASON_NULL_KEY: &str = "null_key";
pub const REASON_NULL_TIME: &str = "null_time";
/// More than `--max-event-skew` after the commit that added it (SPEC rule 11).
pub const REASON_FUTURE: &str = "future";
/// A time that cannot be represented (it overflows microseconds since the epoch).
pub const REASON_BAD_TIME: &str = "bad_time";

/// Counts of one engine step; they feed the run summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StepMetrics {
    pub rows_read: u64,
    pub rows_late: u64,
    pub rows_invalid: u64,
    pub sessions_closed: u64,
    pub sessions_pending: u64,
    /// Events in the largest session still open: a key that is never idle for a gap (a bot,
    /// an anonymous id) keeps growing it, and every batch re-reads and rewrites it.
    pub largest_open: u64,
}

impl std::ops::AddAssign for StepMetrics {
    /// Counts of two parts of one batch (key buckets) add up to the batch's counts.
    fn add_assign(&mut self, other: Self) {
        self.rows_read += other.rows_read;
        self.rows_late += other.rows_late;
        self.rows_invalid += other.rows_invalid;
        self.sessions_closed += other.sessions_closed;
        self.sessions_pending += other.sessions_pending;
        self.largest_open = self.largest_open.max(other.largest_open);
    }
}

/// The result of one engine step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Closed sessions in the sessions-table schema, in parts (one per key shard) so a large
    /// batch's sessions are never copied into one buffer; see [`StepOutput::closed`].
    pub closed_parts: Vec<RecordBatch>,
    /// The events of sessions still open, in the normalized schema.
    pub pending: RecordBatch,
    /// One row per key whose current session changed, in the live-table schema.
    pub live: RecordBatch,
    /// Late and invalid rows (normalized schema plus `reason`).
    pub rejected: RecordBatch,
    /// The watermark after this step, in microseconds; `None` before the first event.
    pub watermark: Option<i64>,
    pub metrics: StepMetrics,
}

/// Row classes of a step's new events, as masks over its rows.
pub(crate) struct Classes {
    /// Rows folded into sessions.
    pub good: BooleanArray,
    pub null_key: BooleanArray,
    pub null_time: BooleanArray,
    /// `null_key | null_time`.
    pub invalid: BooleanArray,
    /// Older than the watermark, with a key and a time.
    pub late: BooleanArray,
}

impl Classes {
    /// Why row `i` was rejected, if it was.
    pub fn reason(&self, i: usize) -> Option<&'static str> {
        if self.null_key.value(i) {
            Some(REASON_NULL_KEY)
        } else if self.null_time.value(i) {
            Some(REASON_NULL_TIME)
        } else if self.late.value(i) {
            Some(REASON_LATE)
        } else {
            None
        }
    }
}

impl StepOutput {
    /// The closed sessions as one batch (a copy when there are several parts).
    pub fn closed(&self) -> RecordBatch {
        match self.closed_parts.as_slice() {
            [one] => one.clone(),
            parts => concat_batches(&parts[0].schema(), parts).expect("parts share a schema"),
        }
    }
}

/// The engine: the event layout plus the session rules. Cheap to clone, holds no data.
#[derive(Debug, Clone)]
pub struct Engine {
    pub spec: EventSpec,
    pub rules: SessionRules,
    /// Batches of at least this many rows are folded in key shards on their own threads.
    pub shard_min_rows: usize,
}

impl Engine {
    pub fn new(spec: EventSpec, rules: SessionRules) -> Self {
        Self {
            spec,
            rules,
            shard_min_rows: SHARD_MIN_ROWS,
        }
    }

    /// Runs one batch.
    ///
    /// `pending` holds the events of open sessions from earlier steps, `events` the new
    /// events of this batch (both in the normalized schema). `watermark` is the watermark as
    /// it stood before this batch: events older than it are late. With `flush`, every session
    /// still open at the end is closed.
    pub fn step(
        &self,
        pending: &RecordBatch,
        events: &[RecordBatch],
        watermark: Option<i64>,
        flush: bool,
    ) -> Result<StepOutput, ArrowError> {
        let schema = self.spec.normalized_schema();
        let events = match events {
            [one] => one.clone(),
            many => concat_batches(&schema, many)?,
        };
        self.step_owned(pending.clone(), events, watermark, flush)
    }

    /// [`Engine::step`] on batches it owns: the input buffers are freed as soon as the sorted
    /// shards are built, which keeps a large batch's peak memory down.
    pub fn step_owned(
        &self,
        pending: RecordBatch,
        events: RecordBatch,
        watermark: Option<i64>,
        flush: bool,
    ) -> Result<StepOutput, ArrowError> {
        let after = self.watermark_after(watermark, arrow::compute::max(time_column(&events)));
        self.step_to(pending, events, watermark, after, flush)
    }

    /// The watermark once a batch whose latest event time is `max_time` has been read: it
    /// never moves back, and trails the latest event by the watermark delay.
    pub fn watermark_after(&self, before: Option<i64>, max_time: Option<i64>) -> Option<i64> {
        match (before, max_time) {
            (w, None) => w,
            (None, Some(m)) => Some(m.saturating_sub(self.rules.delay_us)),
            (Some(w), Some(m)) => Some(w.max(m.saturating_sub(self.rules.delay_us))),
        }
    }

    /// One step of the keys in `pending` and `events`, with the batch's watermarks given: the
    /// one before the batch (which decides what is late) and the one after it (which decides
    /// what closes). Keys never interact, so a batch may be cut by key ([`split_by_key`]) and
    /// each part stepped on its own with the whole batch's watermarks: the union of the parts'
    /// outputs is the output of the whole.
    pub fn step_to(
        &self,
        pending: RecordBatch,
        events: RecordBatch,
        watermark: Option<i64>,
        new_watermark: Option<i64>,
        flush: bool,
    ) -> Result<StepOutput, ArrowError> {
        let schema = self.spec.normalized_schema();
        let pending = if pending.num_rows() == 0 {
            RecordBatch::new_empty(schema.clone())
        } else {
            pending
        };
        let mut metrics = StepMetrics {
            rows_read: events.num_rows() as u64,
            ..Default::default()
        };

        // 1. Classify the new rows: null key, null time, late, or good (whole-column masks).
        let class = self.classify(&events, watermark)?;
        let rejected = output::rejected_rows(&events, &class)?;
        metrics.rows_invalid = class.invalid.true_count() as u64;
        metrics.rows_late = class.late.true_count() as u64;
        let good_mask = class.good;

        // 2. Pending events plus good new events, sorted by key then time then tie-breaks.
        //    In pairing mode, events that are neither a start nor an end play no part.
        let mut keep = good_mask;
        if self.spec.pairs {
            let marked = or(
                flag_column(&events, START_COL),
                flag_column(&events, END_COL),
            )?;
            keep = arrow::compute::and(&keep, &marked)?;
        }
        let good = if keep.true_count() == events.num_rows() {
            events
        } else {
            let good = filter_record_batch(&events, &keep)?;
            drop(events);
            good
        };
        let pending_rows = pending.num_rows();
        let all = if pending_rows == 0 {
            good
        } else {
            let all = concat_batches(&schema, [&pending, &good])?;
            drop((pending, good));
            all
        };
        let folded = if all.num_rows() < self.shard_min_rows.max(1) {
            self.fold(&all, pending_rows, new_watermark, flush)?
        } else {
            // Keys never interact, so large batches are cut into key shards folded on their
            // own threads. The shard count is fixed (not the machine's core count), so the
            // output is the same everywhere.
            let shards = shard_by_key(&all, &self.spec.key_columns, pending_rows, SHARDS)?;
            drop(all);
            let results = on_threads(shards.iter().collect(), |(batch, pending)| {
                self.fold(batch, *pending, new_watermark, flush)
            });
            drop(shards);
            let parts: Vec<Folded> = results.into_iter().collect::<Result<_, _>>()?;
            let cat = |f: fn(&Folded) -> &RecordBatch| -> Result<RecordBatch, ArrowError> {
                concat_batches(&f(&parts[0]).schema(), parts.iter().map(f))
            };
            // The closed sessions, the largest output, stay in their shard parts.
            let live = cat(|p| &p.live)?;
            let pending = cat(|p| &p.pending)?;
            Folded {
                live,
                pending,
                open_count: parts.iter().map(|p| p.open_count).sum(),
                largest_open: parts.iter().map(|p| p.largest_open).max().unwrap_or(0),
                closed: parts.into_iter().flat_map(|p| p.closed).collect(),
            }
        };
        metrics.sessions_closed = folded.closed.iter().map(|b| b.num_rows() as u64).sum();
        metrics.sessions_pending = folded.open_count;
        metrics.largest_open = folded.largest_open;
        Ok(StepOutput {
            closed_parts: folded.closed,
            pending: folded.pending,
            live: folded.live,
            rejected,
            watermark: new_watermark,
            metrics,
        })
    }

    /// Sorts `all` (its first `pending_rows` rows are pending events, the rest new) and cuts
    /// it into sessions or pairs.
    fn fold(
        &self,
        all: &RecordBatch,
        pending_rows: usize,
        new_watermark: Option<i64>,
        flush: bool,
    ) -> Result<Folded, ArrowError> {
        let schema = self.spec.normalized_schema();
        let sorted_idx = self.sort_indices(all)?;
        // Only the columns the rules and the outputs read are put in order (keys, time,
        // markers, summed columns). The collected columns (page strings, the widest part of an
        // event) are gathered once, for closed sessions, straight from the unsorted batch
        // through the permutation; pending rows are taken whole from it the same way; the
        // tie-break columns were only needed by the sort.
        let sums: Vec<String> = self.spec.sums.iter().map(|s| sum_input_name(s)).collect();
        let narrow: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                let n = f.name();
                self.spec.key_columns.contains(n)
                    || [TIME_COL, END_COL, START_COL].contains(&n.as_str())
                    || sums.contains(n)
            })
            .map(|(i, _)| i)
            .collect();
        let sorted = take_record_batch(&all.project(&narrow)?, &sorted_idx)?;
        let unsorted = output::Unsorted {
            all,
            perm: sorted_idx.values(),
        };
        // For each sorted row: did it arrive in this batch?
        let is_new: Vec<bool> = sorted_idx
            .values()
            .iter()
            .map(|&i| (i as usize) >= pending_rows)
            .collect();
        let key_cols: Vec<ArrayRef> = self
            .spec
            .key_columns
            .iter()
            .map(|k| sorted.column_by_name(k).expect("key column").clone())
            .collect();
        let ranges = if sorted.num_rows() == 0 {
            Vec::new()
        } else {
            arrow::compute::partition(&key_cols)?.ranges()
        };

        // 3. Per key, cut sessions (or pairs) and decide which close.
        let cut = if self.spec.pairs {
            self.cut_pairs(&sorted, &unsorted, &ranges, &is_new, new_watermark, flush)?
        } else {
            self.cut_sessions(&sorted, &unsorted, &ranges, &is_new, new_watermark, flush)?
        };
        let pending = take_record_batch(all, &unsorted.rows(cut.pending_rows.into_iter()))?;
        Ok(Folded {
            closed: vec![cut.closed],
            live: cut.live,
            pending,
            open_count: cut.open_count,
            largest_open: cut.largest_open,
        })
    }

    /// Gap sessions (rules 1, 3, 7, 8, 9) over each key's sorted events.
    fn cut_sessions(
        &self,
        sorted: &RecordBatch,
        unsorted: &output::Unsorted,
        ranges: &[std::ops::Range<usize>],
        is_new: &[bool],
        watermark: Option<i64>,
        flush: bool,
    ) -> Result<Cut, ArrowError> {
        let times = time_column(sorted);
        let ends = flag_column(sorted, END_COL);
        let mut closed: Vec<SessionSpan> = Vec::new();
        let mut open: Vec<SessionSpan> = Vec::new();
        let mut live: Vec<(SessionSpan, bool)> = Vec::new();
        for range in ranges {
            let spans = self.rules.cut(times.values(), ends, range.clone());
            let touched = is_new[range.clone()].iter().any(|&b| b);
            let mut any_closed = false;
            let last = spans.len() - 1;
            for (i, span) in spans.into_iter().enumerate() {
                let reason = self
                    .rules
                    .close_reason(&span, times.values(), watermark, flush);
                let span = SessionSpan { reason, ..span };
                let is_closed = reason.is_some();
                any_closed |= is_closed;
                if i == last && (touched || any_closed) {
                    live.push((span.clone(), !is_closed));
                }
                if is_closed {
                    closed.push(span);
                } else {
                    open.push(span);
                }
            }
        }
        Ok(Cut {
            closed: output::closed_sessions(&self.spec, sorted, unsorted, &closed)?,
            live: output::live_rows(&self.spec, sorted, unsorted, &live)?,
            pending_rows: open
                .iter()
                .flat_map(|s| (s.start as u32)..(s.end as u32))
                .collect(),
            open_count: open.len() as u64,
            largest_open: open
                .iter()
                .map(|s| (s.end - s.start) as u64)
                .max()
                .unwrap_or(0),
        })
    }

    /// Start/end pairs (SPEC "Pairing mode") over each key's sorted start and end events.
    fn cut_pairs(
        &self,
        sorted: &RecordBatch,
        unsorted: &output::Unsorted,
        ranges: &[std::ops::Range<usize>],
        is_new: &[bool],
        watermark: Option<i64>,
        flush: bool,
    ) -> Result<Cut, ArrowError> {
        let times = time_column(sorted).values();
        let starts = flag_column(sorted, START_COL);
        let ends = flag_column(sorted, END_COL);
        let mut closed = Vec::new();
        let mut live = Vec::new();
        let mut pending_rows = Vec::new();
        let mut open_count = 0u64;
        for range in ranges {
            let rows = pairs::walk(
                times,
                starts,
                ends,
                range.clone(),
                self.rules.pair_timeout_us,
            );
            let touched = is_new[range.clone()].iter().any(|&b| b);
            let mut any_closed = false;
            let last = rows.len().saturating_sub(1);
            for (i, row) in rows.into_iter().enumerate() {
                let done = pairs::emitted(&row, watermark, flush);
                any_closed |= done;
                if i == last && (touched || any_closed) {
                    live.push((row.clone(), done));
                }
                if done {
                    closed.push(row);
                } else {
                    open_count += 1;
                    pending_rows.extend(row.start.iter().chain(row.end.iter()).map(|&r| r as u32));
                }
            }
        }
        pending_rows.sort_unstable();
        Ok(Cut {
            closed: pairs::closed_pairs(&self.spec, sorted, unsorted, times, &closed)?,
            live: pairs::live_pairs(&self.spec, sorted, unsorted, times, &live)?,
            pending_rows,
            open_count,
            largest_open: 0,
        })
    }

    /// The masks of rows to fold and of each reason to reject one.
    fn classify(
        &self,
        events: &RecordBatch,
        watermark: Option<i64>,
    ) -> Result<Classes, ArrowError> {
        let n = events.num_rows();
        let mut null_key = BooleanArray::from(vec![false; n]);
        for k in &self.spec.key_columns {
            let col = events.column_by_name(k).expect("key column");
            if col.null_count() > 0 {
                null_key = or(&null_key, &is_null(col)?)?;
            }
        }
        let times = events.column_by_name(TIME_COL).expect("time column");
        let null_time = is_null(times)?;
        let late = match watermark {
            Some(w) => lt(times, &Int64Array::new_scalar(w))?,
            None => BooleanArray::from(vec![false; n]),
        };
        // `late` is null where the time is null; those rows are covered by null_time.
        let late = if late.null_count() > 0 {
            arrow::compute::prep_null_mask_filter(&late)
        } else {
            late
        };
        let invalid = or(&null_key, &null_time)?;
        let late = arrow::compute::and_not(&late, &invalid)?;
        let good = not(&or(&invalid, &late)?)?;
        Ok(Classes {
            good,
            null_key,
            null_time,
            invalid,
            late,
        })
    }

    /// The permutation that sorts `batch` by (key, time, commit version, file, row).
    ///
    /// This is the hot spot of a run. Rather than a generic multi-column comparator, rows are
    /// sorted by materialized `(key, time, position)` tuples when the key is one integer
    /// column, or by `(row-encoded key, time, position)` otherwise. Ties in (key, time) are rare
    /// and are put in tie-break order afterwards.
    fn sort_indices(&self, batch: &RecordBatch) -> Result<arrow::array::UInt32Array, ArrowError> {
        let n = batch.num_rows();
        let times = time_column(batch).values();
        let keys: Vec<ArrayRef> = self
            .spec
            .key_columns
            .iter()
            .map(|k| batch.column_by_name(k).expect("key column").clone())
            .collect();
        let mut idx: Vec<u32> = if keys.len() == 1 && keys[0].data_type().is_integer() {
            let k = arrow::compute::cast(&keys[0], &DataType::Int64)?;
            let k = k
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("cast to Int64")
                .values();
            let mut tuples: Vec<(i64, i64, u32)> =
                (0..n).map(|i| (k[i], times[i], i as u32)).collect();
            tuples.sort_unstable();
            tuples.into_iter().map(|t| t.2).collect()
        } else {
            let fields = keys
                .iter()
                .map(|k| arrow::row::SortField::new(k.data_type().clone()))
                .collect();
            let rows = arrow::row::RowConverter::new(fields)?.convert_columns(&keys)?;
            let mut idx: Vec<u32> = (0..n as u32).collect();
            idx.sort_unstable_by(|&a, &b| {
                let (a, b) = (a as usize, b as usize);
                rows.row(a)
                    .cmp(&rows.row(b))
                    .then(times[a].cmp(&times[b]))
                    .then(a.cmp(&b))
            });
            idx
        };
        // Within runs of equal (key, time), order by (version, file, row) (SPEC rule 10).
        let versions = batch
            .column_by_name(VERSION_COL)
            .expect("version")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("Int64")
            .values();
        let files = batch
            .column_by_name(FILE_COL)
            .expect("file")
            .as_any()
            .downcast_ref::<arrow::array::Int32Array>()
            .expect("Int32")
            .values();
        let rows = batch
            .column_by_name(ROW_COL)
            .expect("row")
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("Int64")
            .values();
        let comparators = keys
            .iter()
            .map(|k| arrow::array::make_comparator(k.as_ref(), k.as_ref(), SortOptions::default()))
            .collect::<Result<Vec<_>, _>>()?;
        let same_key = |a: usize, b: usize| comparators.iter().all(|c| c(a, b).is_eq());
        let mut start = 0;
        while start < n {
            let t = times[idx[start] as usize];
            let mut end = start + 1;
            while end < n
                && times[idx[end] as usize] == t
                && same_key(idx[start] as usize, idx[end] as usize)
            {
                end += 1;
            }
            if end - start > 1 {
                idx[start..end].sort_unstable_by_key(|&i| {
                    let i = i as usize;
                    (versions[i], files[i], rows[i])
                });
            }
            start = end;
        }
        Ok(arrow::array::UInt32Array::from(idx))
    }
}

fn time_column(batch: &RecordBatch) -> &Int64Array {
    batch
        .column_by_name(TIME_COL)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .expect("normalized time column is Int64")
}

fn flag_column<'a>(batch: &'a RecordBatch, name: &str) -> &'a BooleanArray {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        .expect("normalized marker columns are Boolean")
}

/// What folding one batch (or one key shard of it) gives.
struct Folded {
    closed: Vec<RecordBatch>,
    live: RecordBatch,
    pending: RecordBatch,
    open_count: u64,
    largest_open: u64,
}

/// Batches with fewer rows are folded on one thread.
const SHARD_MIN_ROWS: usize = 1_000_000;
/// Key shards of a large batch.
const SHARDS: usize = 2;

/// The key bucket (`0..n`) of each row: a hash of the key columns, the same for a key in
/// every batch and every run. Different `salt`s give independent bucketings, so the engine's
/// own shards of a bucket still split it evenly.
fn bucket_ids(batch: &RecordBatch, keys: &[String], n: usize, salt: u64) -> Vec<u32> {
    let cols: Vec<ArrayRef> = keys
        .iter()
        .map(|k| batch.column_by_name(k).expect("key column").clone())
        .collect();
    let n = n.max(1) as u64;
    match cols.as_slice() {
        [one] if one.data_type() == &DataType::Int64 => {
            let v = one
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("Int64")
                .values();
            v.iter()
                .map(|&k| (mix(k as u64, salt) % n) as u32)
                .collect()
        }
        _ => {
            let mut buf = Vec::with_capacity(64);
            (0..batch.num_rows())
                .map(|r| (mix(output::key_hash(&mut buf, &cols, r), salt) % n) as u32)
                .collect()
        }
    }
}

/// A multiplicative mix of a key hash with a salt, keeping the well-mixed high half.
fn mix(h: u64, salt: u64) -> u64 {
    (h ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32
}

/// Salts of the three bucketings: the run's key buckets, the engine's own shards, and the
/// machine shards of `sessionize --shards`.
const BUCKET_SALT: u64 = 0;
const SHARD_SALT: u64 = 1;
const MACHINE_SALT: u64 = 2;

/// Row indices of each bucket, in row order.
fn bucket_rows(batch: &RecordBatch, keys: &[String], n: usize, salt: u64) -> Vec<Vec<u32>> {
    let ids = bucket_ids(batch, keys, n, salt);
    let mut idx: Vec<Vec<u32>> = vec![Vec::with_capacity(ids.len() / n + 1); n];
    for (r, &b) in ids.iter().enumerate() {
        idx[b as usize].push(r as u32);
    }
    idx
}

/// Cuts `batch` into `n` batches by a hash of its key columns, keeping row order within each.
/// Every row of a key lands in the same bucket whatever batch it comes in, so pending events
/// and new events cut with the same `n` can be stepped bucket by bucket ([`Engine::step_to`]).
pub fn split_by_key(
    batch: &RecordBatch,
    keys: &[String],
    n: usize,
) -> Result<Vec<RecordBatch>, ArrowError> {
    if n <= 1 {
        return Ok(vec![batch.clone()]);
    }
    bucket_rows(batch, keys, n, BUCKET_SALT)
        .into_iter()
        .map(|idx| take_record_batch(batch, &arrow::array::UInt32Array::from(idx)))
        .collect()
}

/// [`split_by_key`] for the engine's own shards, gathered on a thread per shard and returned
/// with each shard's count of pending rows (they still come first).
fn shard_by_key(
    all: &RecordBatch,
    keys: &[String],
    pending_rows: usize,
    n: usize,
) -> Result<Vec<(RecordBatch, usize)>, ArrowError> {
    // The gathers copy every column, strings included: one thread per shard.
    on_threads(bucket_rows(all, keys, n, SHARD_SALT), |idx| {
        let pending = idx.partition_point(|&r| (r as usize) < pending_rows);
        take_record_batch(all, &arrow::array::UInt32Array::from(idx)).map(|b| (b, pending))
    })
    .into_iter()
    .collect()
}

/// Runs `f` on each item on a thread of its own and returns the results in item order (so
/// the output never depends on scheduling).
fn on_threads<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an engine thread panicked"))
            .collect()
    })
}

/// What cutting one step's sorted events produced.
struct Cut {
    closed: RecordBatch,
    live: RecordBatch,
    /// Rows of the sorted batch that stay pending.
    pending_rows: Vec<u32>,
    /// Sessions (or pairs) still open.
    open_count: u64,
    /// Events in the largest session still open (0 in pairing mode).
    largest_open: u64,
}

pub(crate) fn field(name: &str, dt: DataType, nullable: bool) -> Arc<Field> {
    Arc::new(Field::new(name, dt, nullable))
}

pub(crate) fn schema_of(fields: Vec<Arc<Field>>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests;
