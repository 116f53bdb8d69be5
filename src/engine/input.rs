//! From the events table's own schema to the engine's normalized event layout.
//!
//! Users bring any schema: integer or string keys, several key columns, a time column of
//! `timestamp`, `timestamp_ntz` or epoch milliseconds. The engine only ever sees one layout:
//! the key columns as they are, the time as `Int64` microseconds, the tie-break columns of
//! SPEC rule 10 (commit version, file ordinal, row position), the end-marker flag, the
//! `--collect` columns and the `--sum` columns, as `Int64` when they are integers (summed
//! exactly) or `Float64` otherwise. The same layout is the pending-state table, so state read
//! back from the checkpoint and new events concatenate directly.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::{END_COL, FILE_COL, ROW_COL, START_COL, TIME_COL, VERSION_COL, field, schema_of};

/// How the time column is stored in the events table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeKind {
    /// `timestamp` / `timestamp_ntz`, any unit; read as UTC.
    Timestamp,
    /// An integer column of milliseconds since the Unix epoch.
    EpochMillis,
}

/// The columns a run uses, resolved against the events schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    pub key_columns: Vec<String>,
    pub key_types: Vec<DataType>,
    pub time_column: String,
    pub time_kind: TimeKind,
    pub collect: Vec<(String, DataType)>,
    pub sums: Vec<String>,
    /// The type each `--sum` column is kept and summed as ([`sum_type`]): `Int64` or `Float64`.
    pub sum_types: Vec<DataType>,
    /// Pairing mode (`--mode pairs`): sessions are start/end pairs, not gap runs.
    pub pairs: bool,
}

/// The evaluated `--start-when` / `--end-when` predicates of one raw batch.
#[derive(Debug, Clone, Default)]
pub struct Markers {
    pub start: Option<BooleanArray>,
    pub end: Option<BooleanArray>,
}

/// A problem with the events schema for the chosen flags. Messages name the column and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "the events table has no column `{column}` (needed as {role}); its columns are: {available}. Pass the right name with {flag}"
    )]
    MissingColumn {
        column: String,
        role: &'static str,
        flag: &'static str,
        available: String,
    },
    #[error(
        "the key column `{column}` has type {found}, which cannot be a session key; use an integer or string column with --key"
    )]
    BadKeyType { column: String, found: DataType },
    #[error(
        "the time column `{column}` has type {found}; it must be a timestamp, timestamp_ntz, or an integer of epoch milliseconds (choose another with --time-column)"
    )]
    BadTimeType { column: String, found: DataType },
    #[error("the --sum column `{column}` has type {found}; only numeric columns can be summed")]
    BadSumType { column: String, found: DataType },
    #[error(
        "the column `{column}` collides with a name sessionizer uses internally; rename it in a view or leave it out of --key/--collect/--sum"
    )]
    ReservedName { column: String },
}

/// A string column of any of Arrow's three layouts: keys of these types are the same keys.
pub fn is_string_type(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn is_key_type(dt: &DataType) -> bool {
    dt.is_integer() || is_string_type(dt)
}

impl EventSpec {
    /// Checks the flags against the events schema and fixes the types every batch must have.
    pub fn resolve(
        schema: &Schema,
        keys: &[String],
        time_column: &str,
        collect: &[String],
        sums: &[String],
    ) -> Result<Self, SpecError> {
        let available = || {
            schema
                .fields()
                .iter()
                .map(|f| format!("{} ({})", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let lookup = |name: &str, role: &'static str, flag: &'static str| {
            if name.starts_with("_src_") || [TIME_COL, END_COL, START_COL].contains(&name) {
                return Err(SpecError::ReservedName {
                    column: name.to_string(),
                });
            }
            schema
                .field_with_name(name)
                .map(|f| f.data_type().clone())
                .map_err(|_| SpecError::MissingColumn {
                    column: name.to_string(),
                    role,
                    flag,
                    available: available(),
                })
        };
        let mut key_types = Vec::new();
        for k in keys {
            let dt = lookup(k, "a session key", "--key")?;
            if !is_key_type(&dt) {
                return Err(SpecError::BadKeyType {
                    column: k.clone(),
                    found: dt,
                });
            }
            key_types.push(dt);
        }
        let time_dt = lookup(time_column, "the event time", "--time-column")?;
        let time_kind = match &time_dt {
            DataType::Timestamp(_, _) => TimeKind::Timestamp,
            DataType::Int64 | DataType::Int32 | DataType::UInt32 | DataType::UInt64 => {
                TimeKind::EpochMillis
            }
            other => {
                return Err(SpecError::BadTimeType {
                    column: time_column.to_string(),
                    found: other.clone(),
                });
            }
        };
        let mut collect_cols = Vec::new();
        for c in collect {
            collect_cols.push((c.clone(), lookup(c, "a --collect column", "--collect")?));
        }
        let mut sum_types = Vec::new();
        for s in sums {
            let dt = lookup(s, "a --sum column", "--sum")?;
            sum_types.push(sum_type(&dt).ok_or_else(|| SpecError::BadSumType {
                column: s.clone(),
                found: dt,
            })?);
        }
        Ok(Self {
            key_columns: keys.to_vec(),
            key_types,
            time_column: time_column.to_string(),
            time_kind,
            collect: collect_cols,
            sums: sums.to_vec(),
            sum_types,
            pairs: false,
        })
    }

    /// The same columns, in pairing mode.
    pub fn with_pairs(mut self, pairs: bool) -> Self {
        self.pairs = pairs;
        self
    }

    /// The name of the generated session id column: `session_id`, unless a key column already
    /// has that name (the wallet job keys on its own `session_id`), then `session_uid`.
    pub fn id_column(&self) -> &'static str {
        if self.key_columns.iter().any(|k| k == "session_id") {
            "session_uid"
        } else {
            "session_id"
        }
    }

    /// The engine's event layout, which is also the pending-state table's schema.
    pub fn normalized_schema(&self) -> SchemaRef {
        let mut fields: Vec<Arc<Field>> = self
            .key_columns
            .iter()
            .zip(&self.key_types)
            .map(|(k, t)| field(k, t.clone(), true))
            .collect();
        fields.push(field(TIME_COL, DataType::Int64, true));
        fields.push(field(VERSION_COL, DataType::Int64, false));
        fields.push(field(FILE_COL, DataType::Int32, false));
        fields.push(field(ROW_COL, DataType::Int64, false));
        fields.push(field(START_COL, DataType::Boolean, true));
        fields.push(field(END_COL, DataType::Boolean, true));
        for (c, t) in &self.collect {
            fields.push(field(c, t.clone(), true));
        }
        for (s, t) in self.sums.iter().zip(&self.sum_types) {
            fields.push(field(&sum_input_name(s), t.clone(), true));
        }
        schema_of(fields)
    }

    /// Every events-table column a run must read (keys, time, collect, sums), deduplicated.
    pub fn source_columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        let all = self
            .key_columns
            .iter()
            .chain(std::iter::once(&self.time_column))
            .chain(self.collect.iter().map(|(c, _)| c))
            .chain(self.sums.iter());
        for c in all {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        }
        cols
    }
}

/// New events from one data file in the normalized layout less the two tie-break columns that
/// are the same for every row of a file (commit version and file ordinal): a fifth of a click
/// event's memory while a batch waits to be folded.
#[derive(Debug, Clone)]
pub struct FilePiece {
    pub version: i64,
    pub file: i32,
    /// The normalized columns without [`VERSION_COL`] and [`FILE_COL`].
    pub rows: RecordBatch,
}

impl FilePiece {
    /// Drops the constant columns of a normalized batch read from one file.
    pub fn from_normalized(
        batch: &RecordBatch,
        version: i64,
        file: i32,
    ) -> Result<Self, ArrowError> {
        let keep: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| {
                let name = batch.schema_ref().field(i).name();
                name != VERSION_COL && name != FILE_COL
            })
            .collect();
        Ok(Self {
            version,
            file,
            rows: batch.project(&keep)?,
        })
    }

    /// The rows in the full normalized layout again.
    pub fn into_normalized(self, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
        let n = self.rows.num_rows();
        let cols = schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                VERSION_COL => Ok(Arc::new(Int64Array::from_value(self.version, n)) as ArrayRef),
                FILE_COL => Ok(Arc::new(Int32Array::from_value(self.file, n)) as ArrayRef),
                name => self.rows.column_by_name(name).cloned().ok_or_else(|| {
                    ArrowError::SchemaError(format!("a file piece lacks column `{name}`"))
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(schema.clone(), cols)
    }
}

/// In the normalized layout a summed column is kept as its [`sum_type`] under this name, so
/// that `--collect x --sum x` can keep both the raw and the summed form.
pub fn sum_input_name(col: &str) -> String {
    format!("_sum_{col}")
}

/// The type a `--sum` column of type `dt` is kept, summed and written as; `None` when it
/// cannot be summed.
///
/// Integers up to 32 bits unsigned and 64 bits signed (and booleans, which count their `true`
/// values) widen to `Int64` without loss, and are summed exactly: `<col>_sum` is a BIGINT.
/// Floating-point and decimal columns are summed as `Float64` (DOUBLE). `UInt64`, which Delta
/// tables cannot hold (Delta's integers are signed), stays `Float64` too, since not every value
/// fits a BIGINT.
pub fn sum_type(dt: &DataType) -> Option<DataType> {
    match dt {
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => Some(DataType::Int64),
        dt if dt.is_numeric() => Some(DataType::Float64),
        _ => None,
    }
}

/// Converts one batch of raw events (as read from one data file) into the normalized layout.
///
/// `version`, `file` and `first_row` are the tie-break coordinates of SPEC rule 10: the commit
/// that added the file, the file's ordinal among that commit's files sorted by path, and the
/// position of the batch's first row in the file. `markers` are the evaluated `--start-when` and
/// `--end-when` predicates (null counts as false). Columns absent from the batch (added to the
/// table later) read as null.
pub fn normalize(
    spec: &EventSpec,
    raw: &RecordBatch,
    version: i64,
    file: i32,
    first_row: i64,
    markers: Markers,
) -> Result<RecordBatch, ArrowError> {
    let n = raw.num_rows();
    let schema = spec.normalized_schema();
    let get = |name: &str, dt: &DataType| -> Result<ArrayRef, ArrowError> {
        match raw.column_by_name(name) {
            Some(c) if c.data_type() == dt => Ok(c.clone()),
            Some(c) => cast(c, dt),
            None => Ok(new_null_array(dt, n)),
        }
    };
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (k, t) in spec.key_columns.iter().zip(&spec.key_types) {
        let c = raw.column_by_name(k).ok_or_else(|| {
            ArrowError::SchemaError(format!(
                "a data file of version {version} has no key column `{k}`"
            ))
        })?;
        if c.data_type() != t && !(is_key_type(c.data_type()) && both_strings(c.data_type(), t)) {
            return Err(ArrowError::SchemaError(format!(
                "the key column `{k}` changed type: {} in version {version}, {t} before; \
                 sessions cannot span a key type change. Start a new checkpoint (--checkpoint) \
                 with --starting-version {version}",
                c.data_type()
            )));
        }
        cols.push(get(k, t)?);
    }
    cols.push(time_micros(spec, raw, version)?);
    cols.push(Arc::new(Int64Array::from_value(version, n)));
    cols.push(Arc::new(Int32Array::from_value(file, n)));
    cols.push(Arc::new(Int64Array::from_iter_values(
        first_row..first_row + n as i64,
    )));
    let flag = |m: Option<BooleanArray>| -> ArrayRef {
        Arc::new(match m {
            Some(m) if m.null_count() > 0 => arrow::compute::prep_null_mask_filter(&m),
            Some(m) => m,
            None => BooleanArray::from(vec![false; n]),
        })
    };
    cols.push(flag(markers.start));
    cols.push(flag(markers.end));
    for (c, t) in &spec.collect {
        cols.push(get(c, t)?);
    }
    for (s, t) in spec.sums.iter().zip(&spec.sum_types) {
        cols.push(get(s, t)?);
    }
    RecordBatch::try_new(schema, cols)
}

fn both_strings(a: &DataType, b: &DataType) -> bool {
    is_string_type(a) && is_string_type(b)
}

fn time_micros(spec: &EventSpec, raw: &RecordBatch, version: i64) -> Result<ArrayRef, ArrowError> {
    let c = raw.column_by_name(&spec.time_column).ok_or_else(|| {
        ArrowError::SchemaError(format!(
            "a data file of version {version} has no time column `{}`",
            spec.time_column
        ))
    })?;
    match (spec.time_kind, c.data_type()) {
        (TimeKind::Timestamp, DataType::Timestamp(_, _)) => {
            let us = cast(c, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            cast(&us, &DataType::Int64)
        }
        (TimeKind::EpochMillis, dt) if dt.is_integer() => {
            // A value beyond what microseconds can hold (microseconds written by mistake into
            // a milliseconds column, say) becomes null here; [`screen`] then rejects it as
            // `bad_time`, rather than failing the run.
            let ms = cast(c, &DataType::Int64)?;
            let us: Int64Array = ms
                .as_primitive::<arrow::datatypes::Int64Type>()
                .unary_opt(|v| v.checked_mul(1000));
            Ok(Arc::new(us))
        }
        (_, dt) => Err(ArrowError::SchemaError(format!(
            "the time column `{}` changed type to {dt} in version {version}; start a new \
             checkpoint with --starting-version {version}",
            spec.time_column
        ))),
    }
}

/// The latest event time of `raw` (rows of one file, in the table's types) that the event-time
/// guard keeps: the maximum of what [`screen`] keeps. A shard takes it from the files that
/// hold only other shards' keys, so that every shard's watermark moves by every key's events.
pub fn guarded_max_time(
    spec: &EventSpec,
    raw: &RecordBatch,
    version: i64,
    latest_us: Option<i64>,
) -> Result<Option<i64>, ArrowError> {
    let us = time_micros(spec, raw, version)?;
    Ok(max_kept(us.as_primitive(), latest_us))
}

/// What [`guarded_max_time`] would find in a file, from the largest time of each of its row
/// groups alone (their Parquet statistics, in the table's type), when those settle it: each is
/// a representable time and none is past `latest_us`. Otherwise `None`: some row may be
/// guarded out, and only its times can say which is the latest kept.
pub fn guarded_max_from_maxes(
    spec: &EventSpec,
    maxes: &RecordBatch,
    version: i64,
    latest_us: Option<i64>,
) -> Result<Option<Option<i64>>, ArrowError> {
    let us = time_micros(spec, maxes, version)?;
    let us: &Int64Array = us.as_primitive();
    if us.null_count() > 0 || latest_us.is_some_and(|l| us.values().iter().any(|&t| t > l)) {
        return Ok(None);
    }
    Ok(Some(arrow::compute::max(us)))
}

/// The latest event time of a normalized batch that [`screen`] would keep.
pub fn kept_max_time(normalized: &RecordBatch, latest_us: Option<i64>) -> Option<i64> {
    let times = normalized
        .column_by_name(TIME_COL)
        .expect("normalized time column");
    max_kept(times.as_primitive(), latest_us)
}

/// The largest time that [`screen`] keeps: not null, and not past `latest_us`.
fn max_kept(times: &Int64Array, latest_us: Option<i64>) -> Option<i64> {
    match latest_us {
        None => arrow::compute::max(times),
        Some(l) => times.iter().flatten().filter(|&t| t <= l).max(),
    }
}

/// The event-time guard (SPEC rule 11) over one normalized batch, whose raw time column had
/// `raw_time_valid` as validity: rows whose time could not be represented in microseconds
/// (`bad_time`) and, with `latest_us`, rows later than it (`future`: more than the allowed
/// skew after the commit that added them) are taken out. Returns the rows kept, and the rows
/// taken out in the rejected-rows layout (normalized columns plus `reason`), if any.
pub fn screen(
    normalized: RecordBatch,
    raw_time_valid: &BooleanArray,
    latest_us: Option<i64>,
) -> Result<(RecordBatch, Option<RecordBatch>), ArrowError> {
    let times = normalized
        .column_by_name(TIME_COL)
        .expect("normalized time column")
        .as_primitive::<arrow::datatypes::Int64Type>();
    let n = normalized.num_rows();
    // The common case, answered column-wise: every null time was null in the file (nothing
    // unrepresentable), and no time passes `latest_us`.
    let raw_nulls = raw_time_valid.len() - raw_time_valid.true_count();
    if times.null_count() == raw_nulls
        && latest_us.is_none_or(|l| arrow::compute::max(times).is_none_or(|m| m <= l))
    {
        return Ok((normalized, None));
    }
    let reasons: Vec<Option<&'static str>> = (0..n)
        .map(|i| {
            if times.is_null(i) {
                raw_time_valid.value(i).then_some(super::REASON_BAD_TIME)
            } else {
                latest_us
                    .filter(|&l| times.value(i) > l)
                    .map(|_| super::REASON_FUTURE)
            }
        })
        .collect();
    if reasons.iter().all(Option::is_none) {
        return Ok((normalized, None));
    }
    let out = BooleanArray::from_iter(reasons.iter().map(|r| Some(r.is_some())));
    let keep = arrow::compute::not(&out)?;
    let rejected = arrow::compute::filter_record_batch(&normalized, &out)?;
    let reason = arrow::array::StringArray::from_iter_values(reasons.iter().flatten());
    let mut fields: Vec<Arc<Field>> = rejected.schema().fields().iter().cloned().collect();
    fields.push(field("reason", DataType::Utf8, true));
    let mut cols = rejected.columns().to_vec();
    cols.push(Arc::new(reason));
    let rejected = RecordBatch::try_new(schema_of(fields), cols)?;
    Ok((
        arrow::compute::filter_record_batch(&normalized, &keep)?,
        Some(rejected),
    ))
}

#[cfg(test)]
mod screen_tests {
    use super::*;

    fn times(v: &[Option<i64>]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            TIME_COL,
            DataType::Int64,
            true,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(v.to_vec()))]).unwrap()
    }

    #[test]
    fn the_guard_takes_out_future_and_unrepresentable_times_wherever_they_are() {
        // A null that was a value in the raw column is a bad time; a raw null stays for the
        // engine (null_time).
        let batch = times(&[Some(50), Some(10), None, None, Some(200)]);
        let raw_valid = BooleanArray::from(vec![true, true, true, false, true]);
        let (kept, out) = screen(batch, &raw_valid, Some(100)).unwrap();
        let out = out.unwrap();
        let reasons = out.column_by_name("reason").unwrap().as_string::<i32>();
        let reasons: Vec<&str> = reasons.iter().flatten().collect();
        assert_eq!(reasons, vec!["bad_time", "future"]);
        assert_eq!(kept.num_rows(), 3);
        // The first row alone, and no bound at all.
        let (kept, out) = screen(
            times(&[Some(101)]),
            &BooleanArray::from(vec![true]),
            Some(100),
        )
        .unwrap();
        assert_eq!((kept.num_rows(), out.unwrap().num_rows()), (0, 1));
        let (kept, out) = screen(
            times(&[Some(i64::MAX)]),
            &BooleanArray::from(vec![true]),
            None,
        )
        .unwrap();
        assert_eq!(kept.num_rows(), 1);
        assert!(out.is_none());
    }

    /// Epoch-millisecond times in column `t` (with a key column `k`), and their spec.
    fn millis(v: &[Option<i64>]) -> (EventSpec, RecordBatch) {
        let schema = Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("t", DataType::Int64, true),
        ]);
        let spec = EventSpec::resolve(&schema, &["k".into()], "t", &[], &[]).unwrap();
        let t = RecordBatch::try_new(
            Arc::new(Schema::new(vec![schema.field(1).clone()])),
            vec![Arc::new(Int64Array::from(v.to_vec()))],
        )
        .unwrap();
        (spec, t)
    }

    proptest::proptest! {
        /// A file's row-group maxima give the latest time the guard keeps whenever they claim
        /// to, and they do claim it when nothing is guarded out.
        #[test]
        fn row_group_maxima_settle_the_latest_time_only_when_they_can(
            rows in proptest::collection::vec(proptest::option::of(proptest::prop_oneof![
                -5i64..5,
                // around the largest millisecond count that microseconds can hold
                (i64::MAX / 1000 - 2)..(i64::MAX / 1000 + 2),
            ]), 0..30),
            group in 1usize..6,
            latest in proptest::option::of(proptest::prop_oneof![-5i64..5, proptest::strategy::Just(i64::MAX - 1)]),
        ) {
            let (spec, all) = millis(&rows);
            let maxes: Vec<Option<i64>> =
                rows.chunks(group).map(|g| g.iter().flatten().copied().max()).collect();
            let (_, maxes) = millis(&maxes);
            let whole = guarded_max_time(&spec, &all, 0, latest).unwrap();
            let settled = guarded_max_from_maxes(&spec, &maxes, 0, latest).unwrap();
            if let Some(m) = settled {
                proptest::prop_assert_eq!(m, whole);
            }
            let plain = rows.chunks(group).all(|g| g.iter().flatten().next().is_some())
                && rows.iter().flatten().all(|&t| t.abs() < 5);
            if plain && latest.is_none() {
                proptest::prop_assert!(settled.is_some());
            }
        }

        /// The column-wise shortcut and the row-wise guard agree: the rows kept are those
        /// neither unrepresentable (null now, a value in the file) nor past the bound.
        #[test]
        fn screen_keeps_exactly_the_rows_the_rules_keep(
            rows in proptest::collection::vec(
                (proptest::option::of(-5i64..5), proptest::bool::ANY), 0..40),
            latest in proptest::option::of(-5i64..5),
        ) {
            // A null in the file is null after conversion too.
            let rows: Vec<(Option<i64>, bool)> =
                rows.into_iter().map(|(t, valid)| (if valid { t } else { None }, valid)).collect();
            let batch = times(&rows.iter().map(|r| r.0).collect::<Vec<_>>());
            let raw_valid = BooleanArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
            let expected: Vec<Option<i64>> = rows
                .iter()
                .filter(|(t, valid)| match t {
                    None => !valid,
                    Some(t) => latest.is_none_or(|l| *t <= l),
                })
                .map(|r| r.0)
                .collect();
            let max = max_kept(batch.column(0).as_primitive(), latest);
            let (kept, out) = screen(batch, &raw_valid, latest).unwrap();
            // A shard that reads only a file's times finds the same latest time.
            proptest::prop_assert_eq!(max, arrow::compute::max(kept.column(0).as_primitive::<arrow::datatypes::Int64Type>()));
            let kept: Vec<Option<i64>> = kept.column(0).as_primitive::<arrow::datatypes::Int64Type>().iter().collect();
            proptest::prop_assert_eq!(&kept, &expected);
            proptest::prop_assert_eq!(out.map_or(0, |o| o.num_rows()), rows.len() - expected.len());
        }
    }
}
