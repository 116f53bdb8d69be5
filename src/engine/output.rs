//! Building the output tables' columns from session spans over the sorted event batch.
//!
//! Keys are gathered with one `take` per column, `visited_pages` is a list array whose offsets
//! are the session spans themselves, and the per-session aggregates are single passes over
//! contiguous ranges. Output schemas are defined here so that the sinks, the tests and the
//! readers agree on them.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{filter_record_batch, not, take};
use arrow::datatypes::{DataType, Field, Fields, Float64Type, Int64Type, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::input::{EventSpec, sum_input_name};
use super::rules::SessionSpan;
use super::{FILE_COL, ROW_COL, TIME_COL, VERSION_COL, field, schema_of};

pub(super) fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn page_struct_fields(spec: &EventSpec) -> Fields {
    let mut fs: Vec<Arc<Field>> = spec
        .collect
        .iter()
        .map(|(c, t)| field(c, t.clone(), true))
        .collect();
    fs.push(field("visit_time_ms", DataType::Int64, true));
    Fields::from(fs)
}

fn pages_type(spec: &EventSpec) -> DataType {
    DataType::List(Arc::new(Field::new(
        "element",
        DataType::Struct(page_struct_fields(spec)),
        true,
    )))
}

pub(super) fn key_fields(spec: &EventSpec) -> Vec<Arc<Field>> {
    spec.key_columns
        .iter()
        .zip(&spec.key_types)
        .map(|(k, t)| field(k, t.clone(), true))
        .collect()
}

/// The sessions table: one row per closed session.
pub fn sessions_schema(spec: &EventSpec) -> SchemaRef {
    if spec.pairs {
        return super::pairs::pairs_schema(spec);
    }
    let mut fs = vec![field(spec.id_column(), DataType::Utf8, true)];
    fs.extend(key_fields(spec));
    fs.push(field("start_time", ts_type(), true));
    fs.push(field("end_time", ts_type(), true));
    fs.push(field("duration_ms", DataType::Int64, true));
    fs.push(field("event_count", DataType::Int64, true));
    if !spec.collect.is_empty() {
        fs.push(field("visited_pages", pages_type(spec), true));
    }
    for (s, t) in spec.sums.iter().zip(&spec.sum_types) {
        fs.push(field(&format!("{s}_sum"), t.clone(), true));
    }
    fs.push(field("close_reason", DataType::Utf8, true));
    schema_of(fs)
}

/// The live table: one row per key, its current session.
pub fn live_schema(spec: &EventSpec) -> SchemaRef {
    if spec.pairs {
        return super::pairs::pairs_live_schema(spec);
    }
    let mut fs = key_fields(spec);
    fs.push(field(spec.id_column(), DataType::Utf8, true));
    fs.push(field("start_time", ts_type(), true));
    fs.push(field("end_time", ts_type(), true));
    fs.push(field("event_count", DataType::Int64, true));
    for (s, t) in spec.sums.iter().zip(&spec.sum_types) {
        fs.push(field(&format!("{s}_sum"), t.clone(), true));
    }
    fs.push(field("status", DataType::Utf8, true));
    schema_of(fs)
}

/// Late and invalid rows: the normalized layout plus the reason.
pub fn rejected_schema(spec: &EventSpec) -> SchemaRef {
    let mut fs: Vec<Arc<Field>> = spec.normalized_schema().fields().iter().cloned().collect();
    fs.push(field("reason", DataType::Utf8, true));
    schema_of(fs)
}

/// A session's id: a 128-bit hash of its key values, its start time and the position of its
/// first event (commit version, file ordinal, row in file: the tie-break of SPEC rule 10), as
/// 32 hex digits.
///
/// The start time alone is not enough: an end marker followed by an event at the same instant
/// gives two sessions of one key with one start time. The first event's position tells them
/// apart, and it is the same on every replay, so the id stays deterministic. The encoding is
/// ours (type tag, then fixed-width little-endian integers or length-prefixed UTF-8), so the id
/// does not depend on Arrow's internal row format and stays stable across releases.
pub fn session_id(keys: &[ArrayRef], row: usize, start_us: i64, first: (i64, i32, i64)) -> String {
    hash_id(keys, row, &[start_us, first.0, first.1 as i64, first.2])
}

/// The hash behind [`session_id`]: key values of `row`, then `instants` (microseconds).
pub(super) fn hash_id(keys: &[ArrayRef], row: usize, instants: &[i64]) -> String {
    hex_id(&mut Vec::new(), keys, row, instants)
        .as_str()
        .to_string()
}

/// [`hash_id`] into a stack buffer, reusing `buf` for the encoded key: no allocation per id.
fn hex_id(buf: &mut Vec<u8>, keys: &[ArrayRef], row: usize, instants: &[i64]) -> HexId {
    buf.clear();
    for k in keys {
        encode_key(k.as_ref(), row, buf);
    }
    for t in instants {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    let h = twox_hash::XxHash3_128::oneshot(buf);
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, d) in out.iter_mut().enumerate() {
        *d = DIGITS[((h >> (4 * (31 - i))) & 0xf) as usize];
    }
    HexId(out)
}

/// A 64-bit hash of the key values of `row` (for sharding), reusing `buf`.
pub(super) fn key_hash(buf: &mut Vec<u8>, keys: &[ArrayRef], row: usize) -> u64 {
    buf.clear();
    for k in keys {
        encode_key(k.as_ref(), row, buf);
    }
    twox_hash::XxHash3_64::oneshot(buf)
}

/// 32 lowercase hex digits.
struct HexId([u8; 32]);

impl HexId {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

fn encode_key(col: &dyn Array, row: usize, buf: &mut Vec<u8>) {
    use arrow::datatypes::*;
    macro_rules! int {
        ($t:ty) => {{
            buf.push(b'i');
            let v = col.as_primitive::<$t>().value(row) as i128;
            buf.extend_from_slice(&v.to_le_bytes());
        }};
    }
    let s = |v: &str, buf: &mut Vec<u8>| {
        buf.push(b's');
        buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
        buf.extend_from_slice(v.as_bytes());
    };
    match col.data_type() {
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Utf8 => s(col.as_string::<i32>().value(row), buf),
        DataType::LargeUtf8 => s(col.as_string::<i64>().value(row), buf),
        DataType::Utf8View => s(col.as_string_view().value(row), buf),
        other => unreachable!("key type {other} is rejected by EventSpec::resolve"),
    }
}

/// The step's events before sorting, and the permutation that sorts them: the wide collected
/// columns are taken from here, only for the rows that need them.
pub(super) struct Unsorted<'a> {
    pub all: &'a RecordBatch,
    pub perm: &'a [u32],
}

impl Unsorted<'_> {
    /// Indices into `all` of the given sorted positions.
    pub fn rows(&self, sorted_rows: impl Iterator<Item = u32>) -> UInt32Array {
        UInt32Array::from_iter_values(sorted_rows.map(|r| self.perm[r as usize]))
    }

    /// The tie-break columns of `all`.
    pub(super) fn positions(&self) -> Positions<'_> {
        let col = |name: &str| self.all.column_by_name(name).expect("tie-break column");
        Positions {
            versions: col(VERSION_COL).as_primitive::<Int64Type>().values(),
            files: col(FILE_COL)
                .as_primitive::<arrow::datatypes::Int32Type>()
                .values(),
            rows: col(ROW_COL).as_primitive::<Int64Type>().values(),
        }
    }
}

/// Where each event came from: (commit version, file ordinal, row in file).
pub(super) struct Positions<'a> {
    versions: &'a [i64],
    files: &'a [i32],
    rows: &'a [i64],
}

impl Positions<'_> {
    pub(super) fn of(&self, i: usize) -> (i64, i32, i64) {
        (self.versions[i], self.files[i], self.rows[i])
    }
}

/// Columns shared by the sessions and live outputs, gathered for a list of spans.
struct Gathered {
    keys: Vec<ArrayRef>,
    session_ids: StringArray,
    start: TimestampMicrosecondArray,
    end: TimestampMicrosecondArray,
    count: Int64Array,
    sums: Vec<ArrayRef>,
}

fn gather(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    spans: &[&SessionSpan],
) -> Result<Gathered, ArrowError> {
    let times = sorted
        .column_by_name(TIME_COL)
        .expect("time column")
        .as_primitive::<Int64Type>()
        .values();
    let firsts = UInt32Array::from_iter_values(spans.iter().map(|s| s.start as u32));
    let keys: Vec<ArrayRef> = spec
        .key_columns
        .iter()
        .map(|k| take(sorted.column_by_name(k).expect("key column"), &firsts, None))
        .collect::<Result<_, _>>()?;
    let mut ids = arrow::array::StringBuilder::with_capacity(spans.len(), spans.len() * 32);
    let mut buf = Vec::with_capacity(64);
    let positions = unsorted.positions();
    for (i, s) in spans.iter().enumerate() {
        let (v, f, r) = positions.of(unsorted.perm[s.start] as usize);
        let instants = [times[s.start], v, f as i64, r];
        ids.append_value(hex_id(&mut buf, &keys, i, &instants).as_str());
    }
    let session_ids = ids.finish();
    let start = TimestampMicrosecondArray::from_iter_values(spans.iter().map(|s| times[s.start]))
        .with_timezone("UTC");
    let end = TimestampMicrosecondArray::from_iter_values(spans.iter().map(|s| times[s.end - 1]))
        .with_timezone("UTC");
    let count = Int64Array::from_iter_values(spans.iter().map(|s| (s.end - s.start) as i64));
    let mut sums: Vec<ArrayRef> = Vec::new();
    for s in &spec.sums {
        let col = sorted
            .column_by_name(&sum_input_name(s))
            .expect("sum column");
        sums.push(match col.data_type() {
            DataType::Int64 => Arc::new(int_sums(col.as_primitive::<Int64Type>(), spans)),
            _ => Arc::new(float_sums(col.as_primitive::<Float64Type>(), spans)),
        });
    }
    Ok(Gathered {
        keys,
        session_ids,
        start,
        end,
        count,
        sums,
    })
}

/// Per span, the sum of the valid values; null when there are none.
fn float_sums(col: &Float64Array, spans: &[&SessionSpan]) -> Float64Array {
    spans
        .iter()
        .map(|sp| {
            let mut acc: Option<f64> = None;
            for i in sp.start..sp.end {
                if col.is_valid(i) {
                    *acc.get_or_insert(0.0) += col.value(i);
                }
            }
            acc
        })
        .collect()
}

/// Per span, the exact sum of the valid values; null when there are none, and null when the
/// sum does not fit 64 bits (it never wraps around). The sum is taken in 128 bits, so only
/// the total decides, not the order in which the values are added.
fn int_sums(col: &Int64Array, spans: &[&SessionSpan]) -> Int64Array {
    let values = col.values();
    spans
        .iter()
        .map(|sp| {
            let range = sp.start..sp.end;
            let total: i128 = if col.null_count() == 0 {
                values[range].iter().map(|&v| i128::from(v)).sum()
            } else {
                let mut valid = range.filter(|&i| col.is_valid(i)).peekable();
                valid.peek()?;
                valid.map(|i| i128::from(values[i])).sum()
            };
            i64::try_from(total).ok()
        })
        .collect()
}

/// The closed sessions of one step, in the sessions-table schema.
pub(super) fn closed_sessions(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    spans: &[SessionSpan],
) -> Result<RecordBatch, ArrowError> {
    let refs: Vec<&SessionSpan> = spans.iter().collect();
    let g = gather(spec, sorted, unsorted, &refs)?;
    let duration = Int64Array::from_iter_values(
        g.start
            .values()
            .iter()
            .zip(g.end.values().iter())
            .map(|(s, e)| (e - s).div_euclid(1000)),
    );
    let mut cols: Vec<ArrayRef> = vec![Arc::new(g.session_ids)];
    cols.extend(g.keys);
    cols.push(Arc::new(g.start));
    cols.push(Arc::new(g.end));
    cols.push(Arc::new(duration));
    cols.push(Arc::new(g.count));
    if !spec.collect.is_empty() {
        cols.push(Arc::new(visited_pages(spec, sorted, unsorted, spans)?));
    }
    cols.extend(g.sums);
    cols.push(Arc::new(StringArray::from_iter_values(
        spans
            .iter()
            .map(|s| s.reason.expect("closed span has a reason").as_str()),
    )));
    RecordBatch::try_new(sessions_schema(spec), cols)
}

/// `visited_pages`: the collected columns of each session's events, in time order.
fn visited_pages(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    spans: &[SessionSpan],
) -> Result<ListArray, ArrowError> {
    let idx =
        UInt32Array::from_iter_values(spans.iter().flat_map(|s| (s.start as u32)..(s.end as u32)));
    let source = unsorted.rows(idx.values().iter().copied());
    let mut children: Vec<ArrayRef> = Vec::new();
    for (c, _) in &spec.collect {
        children.push(take(
            unsorted.all.column_by_name(c).expect("collect column"),
            &source,
            None,
        )?);
    }
    let times = take(sorted.column_by_name(TIME_COL).expect("time"), &idx, None)?;
    let ms: Int64Array = times
        .as_primitive::<Int64Type>()
        .unary(|us: i64| us.div_euclid(1000));
    children.push(Arc::new(ms));
    let values = StructArray::try_new(page_struct_fields(spec), children, None)?;
    let offsets = OffsetBuffer::from_lengths(spans.iter().map(|s| s.end - s.start));
    let item = match pages_type(spec) {
        DataType::List(f) => f,
        _ => unreachable!(),
    };
    ListArray::try_new(item, offsets, Arc::new(values), None)
}

/// The live rows of one step: `(span, online)` per key.
pub(super) fn live_rows(
    spec: &EventSpec,
    sorted: &RecordBatch,
    unsorted: &Unsorted,
    rows: &[(SessionSpan, bool)],
) -> Result<RecordBatch, ArrowError> {
    let refs: Vec<&SessionSpan> = rows.iter().map(|(s, _)| s).collect();
    let g = gather(spec, sorted, unsorted, &refs)?;
    let mut cols: Vec<ArrayRef> = g.keys;
    cols.push(Arc::new(g.session_ids));
    cols.push(Arc::new(g.start));
    cols.push(Arc::new(g.end));
    cols.push(Arc::new(g.count));
    cols.extend(g.sums);
    cols.push(Arc::new(StringArray::from_iter_values(
        rows.iter()
            .map(|(_, online)| if *online { "online" } else { "offline" }),
    )));
    RecordBatch::try_new(live_schema(spec), cols)
}

/// The rows that were not folded, with their reason.
pub(super) fn rejected_rows(
    events: &RecordBatch,
    class: &super::Classes,
) -> Result<RecordBatch, ArrowError> {
    let bad = not(&class.good)?;
    let rows = filter_record_batch(events, &bad)?;
    let mut reason =
        arrow::array::StringBuilder::with_capacity(rows.num_rows(), rows.num_rows() * 8);
    for i in arrow::compute::SlicesIterator::new(&bad).flat_map(|(a, b)| a..b) {
        reason.append_value(class.reason(i).expect("a rejected row has a reason"));
    }
    let reason = reason.finish();
    let mut fields: Vec<Arc<Field>> = rows.schema().fields().iter().cloned().collect();
    fields.push(field("reason", DataType::Utf8, true));
    let mut cols = rows.columns().to_vec();
    cols.push(Arc::new(reason));
    RecordBatch::try_new(schema_of(fields), cols)
}
