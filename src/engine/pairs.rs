//! Pairing mode (`--mode pairs`): explicit start and end events, paired per key in event-time
//! order, as SPEC.md's "Pairing mode" defines.
//!
//! Walking a key's start/end events in time order: a start with no open start opens one; a start
//! while one is open is reported `missing_end` (the open one stays open); an end with an open
//! start completes the pair; an end with none is `missing_start`. An open start times out when
//! an event at or beyond `start + timeout` arrives, or when the watermark reaches that instant.
//!
//! Each row is *decided* at an event time (the end, the extra start, or `start + timeout`), and
//! decided times never decrease along the walk. A row is emitted once the watermark reaches its
//! decided time: no event that is not late can then change it. Rows not yet emitted keep their
//! events in the pending state, and the key is walked again next time; removing emitted rows'
//! events does not change how the remaining ones pair.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt32Array,
};
use arrow::compute::take;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::error::ArrowError;

use super::input::EventSpec;
use super::output::{Unsorted, key_fields, ts_type};
use super::{field, schema_of};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairStatus {
    Complete,
    MissingEnd,
    MissingStart,
}

impl PairStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PairStatus::Complete => "complete",
            PairStatus::MissingEnd => "missing_end",
            PairStatus::MissingStart => "missing_start",
        }
    }
}

/// One pair row: the rows of the sorted batch holding its start and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRow {
    pub start: Option<usize>,
    pub end: Option<usize>,
    pub status: PairStatus,
    /// The event time at which the row became certain.
    pub decided: i64,
    /// True for a start still open at the end of the walk (no event decided it yet).
    pub open_tail: bool,
}

/// Walks one key's start/end events (rows `range`, sorted by time).
pub fn walk(
    times: &[i64],
    starts: &BooleanArray,
    ends: &BooleanArray,
    range: Range<usize>,
    timeout_us: i64,
) -> Vec<PairRow> {
    let mut rows = Vec::new();
    let mut open: Option<usize> = None;
    let row = |start, end, status, decided| PairRow {
        start,
        end,
        status,
        decided,
        open_tail: false,
    };
    for i in range {
        if let Some(o) = open
            && times[i] >= times[o].saturating_add(timeout_us)
        {
            let decided = times[o].saturating_add(timeout_us);
            rows.push(row(Some(o), None, PairStatus::MissingEnd, decided));
            open = None;
        }
        if starts.value(i) {
            if open.is_none() {
                open = Some(i);
            } else {
                rows.push(row(Some(i), None, PairStatus::MissingEnd, times[i]));
            }
        } else if ends.value(i) {
            match open.take() {
                Some(o) => rows.push(row(Some(o), Some(i), PairStatus::Complete, times[i])),
                None => rows.push(row(None, Some(i), PairStatus::MissingStart, times[i])),
            }
        }
    }
    if let Some(o) = open {
        rows.push(PairRow {
            open_tail: true,
            ..row(
                Some(o),
                None,
                PairStatus::MissingEnd,
                times[o].saturating_add(timeout_us),
            )
        });
    }
    rows
}

/// Whether a row may be emitted now.
pub fn emitted(row: &PairRow, watermark: Option<i64>, flush: bool) -> bool {
    flush || watermark.is_some_and(|w| w >= row.decided)
}

/// The sessions table in pairing mode.
pub fn pairs_schema(spec: &EventSpec) -> SchemaRef {
    let mut fs = vec![field(spec.id_column(), DataType::Utf8, true)];
    fs.extend(key_fields(spec));
    fs.push(field("start_time", ts_type(), true));
    fs.push(field("end_time", ts_type(), true));
    fs.push(field("duration_ms", DataType::Int64, true));
    fs.push(field("status", DataType::Utf8, true));
    schema_of(fs)
}

/// The live table in pairing mode.
pub fn pairs_live_schema(spec: &EventSpec) -> SchemaRef {
    let mut fs = key_fields(spec);
    fs.push(field(spec.id_column(), DataType::Utf8, true));
    fs.push(field("start_time", ts_type(), true));
    fs.push(field("end_time", ts_type(), true));
    fs.push(field("pair_status", DataType::Utf8, true));
    fs.push(field("status", DataType::Utf8, true));
    schema_of(fs)
}

/// A pair's id: key values, start and end (either may be missing), and the position
/// (version, file, row) of its first event, so that two rows of one key with the same times
/// (two ends at one instant, each `missing_start`) get two ids, the same on every replay.
fn pair_id(
    keys: &[ArrayRef],
    row: usize,
    start: Option<i64>,
    end: Option<i64>,
    first: (i64, i32, i64),
) -> String {
    let missing = i64::MIN;
    super::output::hash_id(
        keys,
        row,
        &[
            start.unwrap_or(missing),
            end.unwrap_or(missing),
            first.0,
            first.1 as i64,
            first.2,
        ],
    )
}

struct Cols {
    keys: Vec<ArrayRef>,
    ids: StringArray,
    start: TimestampMicrosecondArray,
    end: TimestampMicrosecondArray,
}

fn gather(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    times: &[i64],
    rows: &[&PairRow],
) -> Result<Cols, ArrowError> {
    let any = UInt32Array::from_iter_values(
        rows.iter()
            .map(|r| r.start.or(r.end).expect("a pair row has an event") as u32),
    );
    let keys: Vec<ArrayRef> = spec
        .key_columns
        .iter()
        .map(|k| take(sorted.column_by_name(k).expect("key column"), &any, None))
        .collect::<Result<_, _>>()?;
    let start_of = |r: &PairRow| r.start.map(|i| times[i]);
    let end_of = |r: &PairRow| r.end.map(|i| times[i]);
    let positions = unsorted.positions();
    let ids = StringArray::from_iter_values(rows.iter().enumerate().map(|(i, r)| {
        let first = r.start.or(r.end).expect("a pair row has an event");
        let at = positions.of(unsorted.perm[first] as usize);
        pair_id(&keys, i, start_of(r), end_of(r), at)
    }));
    let start =
        TimestampMicrosecondArray::from(rows.iter().map(|r| start_of(r)).collect::<Vec<_>>())
            .with_timezone("UTC");
    let end = TimestampMicrosecondArray::from(rows.iter().map(|r| end_of(r)).collect::<Vec<_>>())
        .with_timezone("UTC");
    Ok(Cols {
        keys,
        ids,
        start,
        end,
    })
}

/// Emitted pair rows in the pairs sessions schema.
pub fn closed_pairs(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    times: &[i64],
    rows: &[PairRow],
) -> Result<RecordBatch, ArrowError> {
    let refs: Vec<&PairRow> = rows.iter().collect();
    let c = gather(spec, sorted, unsorted, times, &refs)?;
    let duration: Int64Array = rows
        .iter()
        .map(|r| match (r.start, r.end) {
            (Some(s), Some(e)) => Some((times[e] - times[s]).div_euclid(1000)),
            _ => None,
        })
        .collect();
    let mut cols: Vec<ArrayRef> = vec![Arc::new(c.ids)];
    cols.extend(c.keys);
    cols.push(Arc::new(c.start));
    cols.push(Arc::new(c.end));
    cols.push(Arc::new(duration));
    cols.push(Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.status.as_str()),
    )));
    RecordBatch::try_new(pairs_schema(spec), cols)
}

/// Live rows in pairing mode: `(row, emitted)` per key.
pub fn live_pairs(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    times: &[i64],
    rows: &[(PairRow, bool)],
) -> Result<RecordBatch, ArrowError> {
    let refs: Vec<&PairRow> = rows.iter().map(|(r, _)| r).collect();
    let c = gather(spec, sorted, unsorted, times, &refs)?;
    let mut cols: Vec<ArrayRef> = c.keys;
    cols.push(Arc::new(c.ids));
    cols.push(Arc::new(c.start));
    cols.push(Arc::new(c.end));
    cols.push(Arc::new(StringArray::from_iter(rows.iter().map(
        |(r, done)| {
            (*done || !r.open_tail)
                .then_some(r.status.as_str())
                .or(Some("open"))
        },
    ))));
    cols.push(Arc::new(StringArray::from_iter_values(
        rows.iter()
            .map(|(_, done)| if *done { "offline" } else { "online" }),
    )));
    RecordBatch::try_new(pairs_live_schema(spec), cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        events: &[(i64, char)],
        timeout: i64,
    ) -> Vec<(Option<i64>, Option<i64>, &'static str, bool)> {
        let times: Vec<i64> = events.iter().map(|e| e.0).collect();
        let starts = BooleanArray::from(events.iter().map(|e| e.1 == 'S').collect::<Vec<_>>());
        let ends = BooleanArray::from(events.iter().map(|e| e.1 == 'E').collect::<Vec<_>>());
        walk(&times, &starts, &ends, 0..events.len(), timeout)
            .into_iter()
            .map(|r| {
                (
                    r.start.map(|i| times[i]),
                    r.end.map(|i| times[i]),
                    r.status.as_str(),
                    r.open_tail,
                )
            })
            .collect()
    }

    #[test]
    fn statuses_follow_the_spec() {
        assert_eq!(
            run(&[(1, 'S'), (2, 'E')], 100),
            vec![(Some(1), Some(2), "complete", false)]
        );
        assert_eq!(
            run(&[(2, 'E')], 100),
            vec![(None, Some(2), "missing_start", false)]
        );
        // A second start while one is open is the missing_end; the first stays open and pairs.
        assert_eq!(
            run(&[(1, 'S'), (2, 'S'), (3, 'E')], 100),
            vec![
                (Some(2), None, "missing_end", false),
                (Some(1), Some(3), "complete", false)
            ]
        );
        assert_eq!(
            run(&[(1, 'S')], 100),
            vec![(Some(1), None, "missing_end", true)]
        );
    }

    #[test]
    fn an_open_start_times_out_before_a_late_end() {
        assert_eq!(
            run(&[(1, 'S'), (101, 'E')], 100),
            vec![
                (Some(1), None, "missing_end", false),
                (None, Some(101), "missing_start", false)
            ]
        );
        assert_eq!(
            run(&[(0, 'S'), (100, 'E')], 100)[0].2,
            "missing_end",
            "timeout is start + t <= event"
        );
        assert_eq!(run(&[(0, 'S'), (99, 'E')], 100)[0].2, "complete");
    }

    #[test]
    fn rows_wait_for_the_watermark_to_reach_their_deciding_event() {
        let r = PairRow {
            start: Some(0),
            end: Some(1),
            status: PairStatus::Complete,
            decided: 50,
            open_tail: false,
        };
        assert!(!emitted(&r, Some(49), false));
        assert!(emitted(&r, Some(50), false));
        assert!(!emitted(&r, None, false));
        assert!(emitted(&r, None, true));
    }
}
