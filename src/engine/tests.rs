//! Rule-by-rule tests of the pure engine, and the property test of SPEC rule 6: any split into
//! commits, any arrival order with disorder under the watermark delay, then `--flush`, gives
//! exactly the sessions of one batch run, which in turn equal a naive oracle written here
//! independently of the engine's code.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimestampMicrosecondType};
use proptest::prelude::*;

use super::*;

const MIN: i64 = 60_000_000;

fn spec() -> EventSpec {
    let schema = crate::commands::generate_rows::demo_schema();
    EventSpec::resolve(
        &schema,
        &["user_id".into()],
        "visit_time",
        &["page".into()],
        &[],
    )
    .unwrap()
}

fn engine(gap_min: i64, delay_min: i64) -> Engine {
    Engine::new(
        spec(),
        SessionRules {
            gap_us: gap_min * MIN,
            delay_us: delay_min * MIN,
            max_duration_us: None,
            pair_timeout_us: 0,
        },
    )
}

/// A normalized batch of `(user, time_us, page)` rows, all from commit `version`, one file.
fn events(version: i64, rows: &[(Option<i64>, Option<i64>, &str)]) -> RecordBatch {
    let n = rows.len();
    RecordBatch::try_new(
        spec().normalized_schema(),
        vec![
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from_value(version, n)),
            Arc::new(Int32Array::from_value(0, n)),
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(BooleanArray::from(vec![false; n])),
            Arc::new(BooleanArray::from(vec![false; n])),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// Like [`events`], with an end-marker flag per row: `(user, time_us, page, is_end)`.
fn marked(version: i64, rows: &[(i64, i64, &str, bool)]) -> RecordBatch {
    let plain: Vec<_> = rows.iter().map(|r| (Some(r.0), Some(r.1), r.2)).collect();
    let b = events(version, &plain);
    let mut cols = b.columns().to_vec();
    let idx = b.schema().index_of(END_COL).unwrap();
    cols[idx] = Arc::new(BooleanArray::from(
        rows.iter().map(|r| r.3).collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(b.schema(), cols).unwrap()
}

fn engine_with(gap_min: i64, delay_min: i64, max_min: Option<i64>) -> Engine {
    let mut e = engine(gap_min, delay_min);
    e.rules.max_duration_us = max_min.map(|m| m * MIN);
    e
}

fn ev(version: i64, rows: &[(i64, i64)]) -> RecordBatch {
    let rows: Vec<_> = rows.iter().map(|&(u, t)| (Some(u), Some(t), "p")).collect();
    events(version, &rows)
}

fn empty() -> RecordBatch {
    RecordBatch::new_empty(spec().normalized_schema())
}

/// A closed session reduced to comparable values: (user, start, end, count, pages).
type Sess = (i64, i64, i64, i64, Vec<(String, i64)>);

fn sessions(batch: &RecordBatch) -> Vec<Sess> {
    let users = batch
        .column_by_name("user_id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let start = batch
        .column_by_name("start_time")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    let end = batch
        .column_by_name("end_time")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    let count = batch
        .column_by_name("event_count")
        .unwrap()
        .as_primitive::<Int64Type>();
    let pages = batch
        .column_by_name("visited_pages")
        .unwrap()
        .as_list::<i32>();
    let mut out: Vec<Sess> = (0..batch.num_rows())
        .map(|i| {
            let p = pages.value(i);
            let p = p.as_struct();
            let names = p.column(0).as_string::<i32>();
            let ms = p.column(1).as_primitive::<Int64Type>();
            let pv = (0..p.len())
                .map(|j| (names.value(j).to_string(), ms.value(j)))
                .collect();
            (
                users.value(i),
                start.value(i),
                end.value(i),
                count.value(i),
                pv,
            )
        })
        .collect();
    out.sort();
    out
}

fn reasons(batch: &RecordBatch) -> Vec<String> {
    let r = batch
        .column_by_name("close_reason")
        .unwrap()
        .as_string::<i32>();
    (0..r.len()).map(|i| r.value(i).to_string()).collect()
}

#[test]
fn events_exactly_gap_apart_stay_in_one_session() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 30 * MIN)])], None, true)
        .unwrap();
    let s = sessions(&out.closed());
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].3, 2);
}

#[test]
fn one_microsecond_past_gap_starts_a_new_session() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 30 * MIN + 1)])], None, true)
        .unwrap();
    let s = sessions(&out.closed());
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!((s[0].1, s[0].2), (0, 0));
    assert_eq!((s[1].1, s[1].2), (30 * MIN + 1, 30 * MIN + 1));
}

#[test]
fn watermark_trails_the_largest_event_time_by_the_delay_and_never_moves_back() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 100 * MIN)])], None, false)
        .unwrap();
    assert_eq!(out.watermark, Some(85 * MIN));
    let out2 = e
        .step(
            &out.pending,
            &[ev(1, &[(2, 90 * MIN)])],
            out.watermark,
            false,
        )
        .unwrap();
    assert_eq!(out2.watermark, Some(85 * MIN));
    let out3 = e.step(&out2.pending, &[], out2.watermark, false).unwrap();
    assert_eq!(out3.watermark, Some(85 * MIN), "no events: watermark stays");
    assert_eq!(e.step(&empty(), &[], None, false).unwrap().watermark, None);
}

#[test]
fn a_session_closes_only_once_the_watermark_is_past_last_event_plus_gap() {
    let e = engine(30, 15);
    let first = e.step(&empty(), &[ev(0, &[(1, 0)])], None, false).unwrap();
    assert_eq!(first.closed().num_rows(), 0);
    // Watermark = 45m - 15m = 30m == last + gap: not yet.
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(2, 45 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(second.closed().num_rows(), 0);
    assert_eq!(second.metrics.sessions_pending, 2);
    // Watermark = 30m + 1us > last + gap: closes, by inactivity.
    let third = e
        .step(
            &second.pending,
            &[ev(2, &[(2, 45 * MIN + 1)])],
            second.watermark,
            false,
        )
        .unwrap();
    assert_eq!(
        sessions(&third.closed()),
        vec![(1, 0, 0, 1, vec![("p".into(), 0)])]
    );
    assert_eq!(reasons(&third.closed()), vec!["inactivity"]);
    assert_eq!(third.metrics.sessions_pending, 1);
}

#[test]
fn a_bridging_event_merges_two_pending_sessions() {
    let e = engine(30, 60);
    let first = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 50 * MIN)])], None, false)
        .unwrap();
    assert_eq!(first.metrics.sessions_pending, 2);
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(1, 25 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(second.metrics.sessions_pending, 1);
    let flushed = e
        .step(&second.pending, &[], second.watermark, true)
        .unwrap();
    let s = sessions(&flushed.closed());
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].1, s[0].2, s[0].3), (0, 50 * MIN, 3));
    let times: Vec<i64> = s[0].4.iter().map(|p| p.1).collect();
    assert_eq!(
        times,
        vec![0, 25 * 60_000, 50 * 60_000],
        "pages in time order"
    );
    assert_eq!(reasons(&flushed.closed()), vec!["flush"]);
}

#[test]
fn a_late_event_is_counted_and_folded_into_no_session() {
    let e = engine(30, 15);
    let first = e
        .step(&empty(), &[ev(0, &[(1, 100 * MIN)])], None, false)
        .unwrap();
    // Watermark is 85m; an event at 84m is late even though user 1's session is open.
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(1, 84 * MIN), (1, 86 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(second.metrics.rows_late, 1);
    assert_eq!(second.metrics.rows_read, 2);
    assert_eq!(
        second.pending.num_rows(),
        2,
        "only the on-time event joined"
    );
    let reason = second
        .rejected
        .column_by_name("reason")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(reason.value(0), "late");
    let flushed = e
        .step(&second.pending, &[], second.watermark, true)
        .unwrap();
    assert_eq!(sessions(&flushed.closed())[0].1, 86 * MIN);
}

#[test]
fn null_keys_and_null_times_are_invalid_not_fatal() {
    let e = engine(30, 15);
    let batch = events(
        0,
        &[
            (None, Some(0), "a"),
            (Some(1), None, "b"),
            (Some(1), Some(5), "c"),
        ],
    );
    let out = e.step(&empty(), &[batch], None, false).unwrap();
    assert_eq!(out.metrics.rows_invalid, 2);
    assert_eq!(out.metrics.rows_late, 0);
    let reason = out
        .rejected
        .column_by_name("reason")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(
        (reason.value(0), reason.value(1)),
        ("null_key", "null_time")
    );
    assert_eq!(out.pending.num_rows(), 1);
}

#[test]
fn live_rows_show_the_current_session_per_key() {
    let e = engine(30, 15);
    let first = e
        .step(&empty(), &[ev(0, &[(1, 0), (2, 0), (2, MIN)])], None, false)
        .unwrap();
    assert_eq!(first.live.num_rows(), 2);
    let status = first
        .live
        .column_by_name("status")
        .unwrap()
        .as_string::<i32>();
    assert!((0..2).all(|i| status.value(i) == "online"));
    // User 3 far later: both earlier sessions close, and only they and user 3 are upserted.
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(3, 100 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    let users = second
        .live
        .column_by_name("user_id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let status = second
        .live
        .column_by_name("status")
        .unwrap()
        .as_string::<i32>();
    let mut rows: Vec<(i64, String)> = (0..second.live.num_rows())
        .map(|i| (users.value(i), status.value(i).to_string()))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            (1, "offline".into()),
            (2, "offline".into()),
            (3, "online".into())
        ]
    );
    let count = second
        .live
        .column_by_name("event_count")
        .unwrap()
        .as_primitive::<Int64Type>();
    let i2 = (0..3).find(|&i| users.value(i) == 2).unwrap();
    assert_eq!(count.value(i2), 2);
}

#[test]
fn session_ids_depend_on_key_start_and_first_event_position_only() {
    let e = engine(30, 15);
    let id = |b: &RecordBatch| b.column(0).as_string::<i32>().value(0).to_string();
    // The same events, arriving in one step or in two: the same id.
    let a = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, MIN)])], None, true)
        .unwrap();
    let first = e.step(&empty(), &[ev(0, &[(1, 0)])], None, false).unwrap();
    let b = e
        .step(&first.pending, &[ev(1, &[(1, MIN)])], None, true)
        .unwrap();
    assert_eq!(id(&a.closed()), id(&b.closed()));
    assert_eq!(id(&a.closed()).len(), 32);
    // Another key, or the same start from another event: another id.
    let c = e.step(&empty(), &[ev(0, &[(2, 0)])], None, true).unwrap();
    assert_ne!(id(&a.closed()), id(&c.closed()));
    let d = e.step(&empty(), &[ev(7, &[(1, 0)])], None, true).unwrap();
    assert_ne!(id(&a.closed()), id(&d.closed()));
}

#[test]
fn sessions_of_one_key_starting_at_one_instant_get_distinct_ids() {
    // An end marker, then an event at the very same instant: two sessions of user 1 that both
    // start at 0.
    let e = engine(30, 0);
    let b = marked(0, &[(1, 0, "deposit", true), (1, 0, "next", false)]);
    let out = e
        .step(&empty(), std::slice::from_ref(&b), None, true)
        .unwrap();
    let closed = out.closed();
    assert_eq!(closed.num_rows(), 2);
    let ids = closed.column(0).as_string::<i32>();
    assert_ne!(ids.value(0), ids.value(1));
    // And a replay gives the same two ids.
    let again = e.step(&empty(), &[b], None, true).unwrap().closed();
    let again_ids = again.column(0).as_string::<i32>();
    assert_eq!(
        (ids.value(0), ids.value(1)),
        (again_ids.value(0), again_ids.value(1))
    );
}

#[test]
fn duration_is_whole_milliseconds_rounded_down() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 1_999)])], None, true)
        .unwrap();
    let closed = out.closed();
    let d = closed
        .column_by_name("duration_ms")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(d.value(0), 1);
}

#[test]
fn sums_add_up_per_session_and_ignore_nulls() {
    let schema = Schema::new(vec![
        Field::new("k", DataType::Utf8, true),
        Field::new("t", DataType::Int64, true),
        Field::new("win", DataType::Int32, true),
    ]);
    let spec = EventSpec::resolve(&schema, &["k".into()], "t", &[], &["win".into()]).unwrap();
    assert_eq!(spec.time_kind, TimeKind::EpochMillis);
    let raw = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(StringArray::from(vec!["a", "a", "a", "b"])),
            Arc::new(Int64Array::from(vec![1_000, 2_000, 3_000, 1_000])),
            Arc::new(Int32Array::from(vec![Some(5), None, Some(-2), None])),
        ],
    )
    .unwrap();
    let norm = normalize(&spec, &raw, 3, 0, 0, Markers::default()).unwrap();
    let t = norm
        .column_by_name(TIME_COL)
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(t.value(0), 1_000_000, "epoch millis become micros");
    let e = Engine::new(
        spec,
        SessionRules {
            gap_us: MIN,
            delay_us: 0,
            max_duration_us: None,
            pair_timeout_us: 0,
        },
    );
    let out = e.step(&norm, &[], None, true).unwrap();
    let sums = out
        .closed()
        .column_by_name("win_sum")
        .unwrap()
        .as_primitive::<Int64Type>()
        .clone();
    let closed = out.closed();
    let keys = closed.column_by_name("k").unwrap().as_string::<i32>();
    let by_key: BTreeMap<&str, Option<i64>> = (0..2)
        .map(|i| (keys.value(i), sums.is_valid(i).then(|| sums.value(i))))
        .collect();
    assert_eq!(
        by_key["a"],
        Some(3),
        "an integer column sums to an exact BIGINT"
    );
    assert_eq!(by_key["b"], None);
}

/// A spec over `(k BIGINT, t epoch ms, amount, ratio DOUBLE, flag BOOLEAN)` summing the last
/// three; `amount` has type `amount_type`.
fn sum_spec(amount_type: DataType) -> (Arc<Schema>, EventSpec) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("t", DataType::Int64, true),
        Field::new("amount", amount_type, true),
        Field::new("ratio", DataType::Float64, true),
        Field::new("flag", DataType::Boolean, true),
    ]));
    let sums = ["amount".to_string(), "ratio".into(), "flag".into()];
    let spec = EventSpec::resolve(&schema, &["k".into()], "t", &[], &sums).unwrap();
    (schema, spec)
}

#[test]
fn integers_and_booleans_sum_as_bigint_floats_as_double() {
    for (amount, kept) in [
        (DataType::Int8, DataType::Int64),
        (DataType::Int32, DataType::Int64),
        (DataType::Int64, DataType::Int64),
        (DataType::UInt32, DataType::Int64),
        (DataType::UInt64, DataType::Float64),
        (DataType::Float32, DataType::Float64),
        (DataType::Decimal128(12, 2), DataType::Float64),
    ] {
        let (_, spec) = sum_spec(amount.clone());
        assert_eq!(
            spec.sum_types,
            [kept.clone(), DataType::Float64, DataType::Int64],
            "{amount}"
        );
        let normalized = spec.normalized_schema();
        assert_eq!(
            normalized
                .field_with_name("_sum_amount")
                .unwrap()
                .data_type(),
            &kept
        );
        for schema in [sessions_schema(&spec), live_schema(&spec)] {
            let f = |n: &str| schema.field_with_name(n).unwrap().data_type().clone();
            assert_eq!(
                [f("amount_sum"), f("ratio_sum"), f("flag_sum")],
                [kept.clone(), DataType::Float64, DataType::Int64]
            );
        }
    }
    let schema = Schema::new(vec![Field::new("s", DataType::Utf8, true)]);
    let err = EventSpec::resolve(&schema, &["s".into()], "s", &[], &["s".into()]);
    assert!(err.is_err());
}

#[test]
fn integer_sums_are_exact_and_null_when_they_leave_the_bigint_range() {
    let (schema, spec) = sum_spec(DataType::Int64);
    // Keys 1..=4, one session each. 2^53 + 1 is the first integer a double cannot hold.
    let rows: [(i64, Option<i64>); 9] = [
        (1, Some((1 << 53) + 1)),
        (1, Some(1)),
        (2, Some(i64::MAX)),
        (2, Some(1)),
        (3, Some(i64::MAX)),
        (3, Some(1)),
        (3, Some(-2)), // back in range: the total decides, not the order of additions
        (4, Some(i64::MIN)),
        (4, None),
    ];
    let raw = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(
                (0..rows.len() as i64).map(|i| i * 1000),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(vec![0.5; rows.len()])),
            Arc::new(BooleanArray::from(
                (0..rows.len()).map(|i| i % 2 == 0).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let norm = normalize(&spec, &raw, 1, 0, 0, Markers::default()).unwrap();
    let e = Engine::new(
        spec,
        SessionRules {
            gap_us: MIN,
            delay_us: 0,
            max_duration_us: None,
            pair_timeout_us: 0,
        },
    );
    let out = e.step(&empty_of(&e), &[norm], None, true).unwrap();
    let closed = out.closed();
    let col = |n: &str| closed.column_by_name(n).unwrap().clone();
    let (keys, amount, flags) = (col("k"), col("amount_sum"), col("flag_sum"));
    let (keys, amount, flags) = (
        keys.as_primitive::<Int64Type>(),
        amount.as_primitive::<Int64Type>(),
        flags.as_primitive::<Int64Type>(),
    );
    let got: BTreeMap<i64, (Option<i64>, i64)> = (0..closed.num_rows())
        .map(|i| {
            (
                keys.value(i),
                (amount.is_valid(i).then(|| amount.value(i)), flags.value(i)),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([
            (1, (Some((1 << 53) + 2), 1)),
            (2, (None, 1)),
            (3, (Some(i64::MAX - 1), 2)),
            (4, (Some(i64::MIN), 1)),
        ])
    );
}

fn empty_of(e: &Engine) -> RecordBatch {
    RecordBatch::new_empty(e.spec.normalized_schema())
}

#[test]
fn resolve_names_the_missing_column_and_the_flag() {
    let schema = Schema::new(vec![Field::new("user_id", DataType::Int64, true)]);
    let err = EventSpec::resolve(&schema, &["user".into()], "visit_time", &[], &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`user`") && msg.contains("--key") && msg.contains("user_id"),
        "{msg}"
    );
    let err = EventSpec::resolve(&schema, &["user_id".into()], "visit_time", &[], &[]).unwrap_err();
    assert!(err.to_string().contains("--time-column"), "{err}");
    let bad_time = Schema::new(vec![
        Field::new("user_id", DataType::Int64, true),
        Field::new("visit_time", DataType::Utf8, true),
    ]);
    let err =
        EventSpec::resolve(&bad_time, &["user_id".into()], "visit_time", &[], &[]).unwrap_err();
    assert!(matches!(err, SpecError::BadTimeType { .. }), "{err}");
}

#[test]
fn an_end_marker_ends_its_session_whatever_the_gap() {
    let e = engine(30, 15);
    let b = marked(
        0,
        &[
            (1, 0, "a", false),
            (1, MIN, "deposit", true),
            (1, 2 * MIN, "c", false),
        ],
    );
    let out = e.step(&empty(), &[b], None, true).unwrap();
    let s = sessions(&out.closed());
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(
        (s[0].1, s[0].2, s[0].3),
        (0, MIN, 2),
        "the marker is the session's last event"
    );
    assert_eq!(
        (s[1].1, s[1].3),
        (2 * MIN, 1),
        "the next event starts a new session"
    );
    let mut r = reasons(&out.closed());
    r.sort();
    assert_eq!(r, vec!["end_marker", "flush"]);
}

#[test]
fn with_no_watermark_delay_a_marked_session_closes_in_the_same_run() {
    let e = engine(30, 0);
    let b = marked(0, &[(1, 0, "a", false), (1, MIN, "deposit", true)]);
    let out = e.step(&empty(), &[b], None, false).unwrap();
    assert_eq!(reasons(&out.closed()), vec!["end_marker"]);
    assert_eq!(out.pending.num_rows(), 0);
    // With a delay it waits for the watermark to reach the marker.
    let e = engine(30, 5);
    let b = marked(0, &[(1, 0, "a", false), (1, MIN, "deposit", true)]);
    let out = e.step(&empty(), &[b], None, false).unwrap();
    assert_eq!(out.closed().num_rows(), 0);
}

#[test]
fn max_duration_splits_a_bot_into_sessions_no_longer_than_the_maximum() {
    let e = engine_with(30, 15, Some(60));
    // One event a minute for five hours.
    let rows: Vec<(i64, i64)> = (0..300).map(|m| (1, m * MIN)).collect();
    let out = e.step(&empty(), &[ev(0, &rows)], None, true).unwrap();
    let s = sessions(&out.closed());
    assert_eq!(
        s.len(),
        5,
        "{:?}",
        s.iter().map(|x| (x.1, x.2, x.3)).collect::<Vec<_>>()
    );
    assert!(
        s.iter().all(|x| x.2 - x.1 < 60 * MIN),
        "no session spans the maximum"
    );
    assert!(
        s.iter().all(|x| x.3 == 60),
        "every event is kept: nothing dropped"
    );
    let mut r = reasons(&out.closed());
    r.sort();
    assert_eq!(
        r,
        vec![
            "flush",
            "max_duration",
            "max_duration",
            "max_duration",
            "max_duration"
        ]
    );
}

#[test]
fn a_session_reaching_its_maximum_closes_on_the_watermark() {
    let e = engine_with(30, 15, Some(60));
    let rows: Vec<(i64, i64)> = (0..50).map(|m| (1, m * MIN)).collect();
    let first = e.step(&empty(), &[ev(0, &rows)], None, false).unwrap();
    assert_eq!(first.closed().num_rows(), 0);
    // Another key moves the watermark to 60m = start + max: the session is over.
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(2, 75 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(reasons(&second.closed()), vec!["max_duration"]);
}

// ---------------------------------------------------------------------------------------------
// Property: incremental == batch == oracle.

/// The naive oracle: per key, sort by (time, version, row) and cut after an end marker, at
/// `start + max`, or where the gap is exceeded. Rows are `(key, time, version, row, is_end)`.
fn oracle(rows: &[(i64, i64, i64, i64, bool)], gap: i64, max: Option<i64>) -> Vec<Sess> {
    let mut by_key: BTreeMap<i64, Vec<(i64, i64, i64, bool)>> = BTreeMap::new();
    for &(k, t, v, r, end) in rows {
        by_key.entry(k).or_default().push((t, v, r, end));
    }
    let mut out = Vec::new();
    for (k, mut evs) in by_key {
        evs.sort();
        let mut cur: Vec<(i64, i64, i64, bool)> = Vec::new();
        for e in evs {
            if let (Some(first), Some(last)) = (cur.first(), cur.last())
                && (last.3 || e.0 - last.0 > gap || max.is_some_and(|m| e.0 >= first.0 + m))
            {
                out.push(to_sess(k, &cur));
                cur.clear();
            }
            cur.push(e);
        }
        out.push(to_sess(k, &cur));
    }
    out.sort();
    out
}

fn to_sess(k: i64, evs: &[(i64, i64, i64, bool)]) -> Sess {
    let pages = evs
        .iter()
        .map(|&(t, v, r, _)| (format!("v{v}r{r}"), t.div_euclid(1000)))
        .collect();
    (k, evs[0].0, evs[evs.len() - 1].0, evs.len() as i64, pages)
}

fn commit(version: i64, rows: &[(i64, i64, bool)]) -> RecordBatch {
    let pages: Vec<String> = (0..rows.len()).map(|r| format!("v{version}r{r}")).collect();
    let rows: Vec<_> = rows
        .iter()
        .zip(&pages)
        .map(|(&(k, t, end), p)| (k, t, p.as_str(), end))
        .collect();
    marked(version, &rows)
}

#[test]
fn the_engine_shards_of_a_run_bucket_still_split_it() {
    let rows: Vec<(i64, i64)> = (0..10_000).map(|k| (k, 0)).collect();
    let keys = ["user_id".to_string()];
    for bucket in split_by_key(&ev(0, &rows), &keys, 4).unwrap() {
        let shards = shard_by_key(&bucket, &keys, 0, SHARDS).unwrap();
        let (a, b) = (shards[0].0.num_rows(), shards[1].0.num_rows());
        assert_eq!(a + b, bucket.num_rows());
        assert!(a.min(b) * 3 > a.max(b), "{a} rows against {b}");
    }
}

/// What a run does with a batch (see `crate::fold`): new events cut into `n` key buckets as
/// file pieces, pending events cut the same way, each bucket stepped on its own with the whole
/// batch's watermarks, the outputs put together in bucket order.
fn step_in_buckets(
    e: &Engine,
    pending: &RecordBatch,
    new: &[RecordBatch],
    watermark: Option<i64>,
    flush: bool,
    n: usize,
) -> (Vec<Sess>, RecordBatch, Option<i64>, StepMetrics) {
    let schema = e.spec.normalized_schema();
    let max_time = new
        .iter()
        .filter_map(|b| arrow::compute::max(time_column(b)))
        .max();
    let after = e.watermark_after(watermark, max_time);
    let mut buckets: Vec<Vec<FilePiece>> = vec![Vec::new(); n];
    for b in new {
        let file = b
            .column_by_name(FILE_COL)
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>();
        let version = b
            .column_by_name(VERSION_COL)
            .unwrap()
            .as_primitive::<Int64Type>();
        if b.num_rows() == 0 {
            continue;
        }
        let piece = FilePiece::from_normalized(b, version.value(0), file.value(0)).unwrap();
        for (bucket, rows) in buckets
            .iter_mut()
            .zip(split_by_key(&piece.rows, &e.spec.key_columns, n).unwrap())
        {
            bucket.push(FilePiece {
                rows,
                ..piece.clone()
            });
        }
    }
    let pending_parts = split_by_key(pending, &e.spec.key_columns, n).unwrap();
    let (mut closed, mut pend, mut metrics) = (Vec::new(), Vec::new(), StepMetrics::default());
    for (p, pieces) in pending_parts.into_iter().zip(buckets) {
        let batches: Vec<RecordBatch> = pieces
            .into_iter()
            .map(|piece| piece.into_normalized(&schema).unwrap())
            .collect();
        let events = concat_batches(&schema, &batches).unwrap();
        let out = e.step_to(p, events, watermark, after, flush).unwrap();
        assert_eq!(out.watermark, after);
        closed.extend(sessions(&out.closed()));
        pend.push(out.pending);
        metrics += out.metrics;
    }
    closed.sort();
    (
        closed,
        concat_batches(&schema, &pend).unwrap(),
        after,
        metrics,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn incremental_runs_then_flush_equal_one_batch_run(
        // (key, base time in minutes, microseconds, end marker?) of each event.
        raw in prop::collection::vec(
            (0i64..4, 0i64..600, 0i64..60_000_000, prop::bool::weighted(0.1)),
            1..120,
        ),
        max_min in prop::option::of(5i64..90),
        cuts in prop::collection::vec(0usize..120, 0..12),
        disorder in 0i64..14,
        gap_min in 1i64..40,
        runs_per_commit in 1usize..3,
        buckets in 1usize..6,
    ) {
        let delay = 15i64;
        // Arrival order: sorted by time, then each event may be displaced backwards by less
        // than the watermark delay, so nothing is late.
        let mut evs: Vec<(i64, i64, bool)> =
            raw.iter().map(|&(k, m, us, end)| (k, m * MIN + us, end)).collect();
        evs.sort_by_key(|e| e.1);
        let mut arrival: Vec<(i64, (i64, i64, bool))> = evs
            .iter()
            .enumerate()
            .map(|(i, &e)| (e.1 - ((i as i64 * 7919) % (disorder + 1)) * MIN, e))
            .collect();
        arrival.sort_by_key(|a| a.0);
        let ordered: Vec<(i64, i64, bool)> = arrival.into_iter().map(|a| a.1).collect();

        // Split into commits at the random cut points.
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(ordered.len())).collect();
        bounds.push(0);
        bounds.push(ordered.len());
        bounds.sort();
        bounds.dedup();
        let commits: Vec<RecordBatch> = bounds
            .windows(2)
            .enumerate()
            .map(|(v, w)| commit(v as i64, &ordered[w[0]..w[1]]))
            .collect();

        let e = engine_with(gap_min, delay, max_min);
        // The incremental runs fold in key shards (as large batches do); the batch run not.
        let sharded = Engine { shard_min_rows: 1, ..e.clone() };
        // Incremental: a run every `runs_per_commit` commits, then a flush.
        let mut pending = empty();
        let mut wm = None;
        let mut closed = Vec::new();
        // Every other run goes through key buckets, as the run driver does.
        for (i, chunk) in commits.chunks(runs_per_commit).enumerate() {
            if i % 2 == 1 {
                let (c, p, w, m) = step_in_buckets(&sharded, &pending, chunk, wm, false, buckets);
                prop_assert_eq!(m.rows_late, 0);
                prop_assert_eq!(m.rows_read, chunk.iter().map(|b| b.num_rows() as u64).sum::<u64>());
                closed.extend(c);
                (pending, wm) = (p, w);
                continue;
            }
            let out = sharded.step(&pending, chunk, wm, false).unwrap();
            prop_assert_eq!(out.metrics.rows_late, 0);
            closed.extend(sessions(&out.closed()));
            pending = out.pending;
            wm = out.watermark;
        }
        let (c, p, _, m) = step_in_buckets(&sharded, &pending, &[], wm, true, buckets);
        closed.extend(c);
        prop_assert_eq!(p.num_rows(), 0);
        prop_assert_eq!(m.sessions_pending, 0);
        closed.sort();

        let batch = e.step(&empty(), &commits, None, true).unwrap();
        let batch = sessions(&batch.closed());
        prop_assert_eq!(&closed, &batch);

        // Both equal the independent oracle.
        let mut flat = Vec::new();
        for (v, w) in bounds.windows(2).enumerate() {
            for (r, &(k, t, end)) in ordered[w[0]..w[1]].iter().enumerate() {
                flat.push((k, t, v as i64, r as i64, end));
            }
        }
        prop_assert_eq!(&batch, &oracle(&flat, gap_min * MIN, max_min.map(|m| m * MIN)));
    }
}

/// Closed sessions reduced to `(key, start, count, amount_sum)`.
fn amount_sums(batch: &RecordBatch) -> Vec<(i64, i64, i64, Option<i64>)> {
    let col = |n: &str| batch.column_by_name(n).unwrap().clone();
    let (k, start, count, sum) = (
        col("k"),
        col("start_time"),
        col("event_count"),
        col("amount_sum"),
    );
    let k = k.as_primitive::<Int64Type>();
    let start = start.as_primitive::<TimestampMicrosecondType>();
    let count = count.as_primitive::<Int64Type>();
    let sum = sum.as_primitive::<Int64Type>();
    let mut out: Vec<_> = (0..batch.num_rows())
        .map(|i| {
            (
                k.value(i),
                start.value(i),
                count.value(i),
                sum.is_valid(i).then(|| sum.value(i)),
            )
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Integer sums through the pending state: incremental runs then a flush give the exact
    /// sums of one batch run, which equal the oracle's (null past the BIGINT range).
    #[test]
    fn integer_sums_are_exact_across_runs(
        raw in prop::collection::vec(
            (
                0i64..3,
                0i64..240,
                prop_oneof![
                    (-1000i64..1000).prop_map(Some),
                    (i64::MAX / 2 - 10..i64::MAX / 2 + 10).prop_map(Some),
                    (i64::MIN / 2 - 10..i64::MIN / 2 + 10).prop_map(Some),
                    Just(None),
                ],
            ),
            1..60,
        ),
        cuts in prop::collection::vec(0usize..60, 0..8),
    ) {
        let (schema, spec) = sum_spec(DataType::Int64);
        let gap = 10 * MIN;
        let e = Engine::new(
            spec.clone(),
            SessionRules { gap_us: gap, delay_us: 15 * MIN, max_duration_us: None, pair_timeout_us: 0 },
        );
        // Arrival in time order, so nothing is late; times in epoch milliseconds.
        let mut evs: Vec<(i64, i64, Option<i64>)> =
            raw.iter().map(|&(k, m, a)| (k, m * 60_000 + k, a)).collect();
        evs.sort_by_key(|e| e.1);
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(evs.len())).collect();
        bounds.extend([0, evs.len()]);
        bounds.sort();
        bounds.dedup();
        let commits: Vec<RecordBatch> = bounds
            .windows(2)
            .enumerate()
            .map(|(v, w)| {
                let part = &evs[w[0]..w[1]];
                let raw = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from_iter_values(part.iter().map(|r| r.0))),
                        Arc::new(Int64Array::from_iter_values(part.iter().map(|r| r.1))),
                        Arc::new(Int64Array::from(part.iter().map(|r| r.2).collect::<Vec<_>>())),
                        Arc::new(Float64Array::from(vec![1.0; part.len()])),
                        Arc::new(BooleanArray::from(vec![true; part.len()])),
                    ],
                )
                .unwrap();
                normalize(&spec, &raw, v as i64, 0, 0, Markers::default()).unwrap()
            })
            .collect();
        let (mut pending, mut wm, mut closed) = (empty_of(&e), None, Vec::new());
        for c in &commits {
            let out = e.step(&pending, std::slice::from_ref(c), wm, false).unwrap();
            prop_assert_eq!(out.metrics.rows_late, 0);
            closed.extend(amount_sums(&out.closed()));
            pending = out.pending;
            wm = out.watermark;
        }
        closed.extend(amount_sums(&e.step(&pending, &[], wm, true).unwrap().closed()));
        closed.sort();
        let batch = amount_sums(&e.step(&empty_of(&e), &commits, None, true).unwrap().closed());
        prop_assert_eq!(&closed, &batch);

        // The oracle: cut each key's events at gaps, add the amounts in 128 bits.
        let mut by_key: BTreeMap<i64, Vec<(i64, Option<i64>)>> = BTreeMap::new();
        for &(k, t, a) in &evs {
            by_key.entry(k).or_default().push((t * 1000, a));
        }
        let mut oracle = Vec::new();
        for (k, evs) in by_key {
            let mut cur: Vec<(i64, Option<i64>)> = Vec::new();
            let mut emit = |cur: &[(i64, Option<i64>)]| {
                let valid: Vec<i128> = cur.iter().filter_map(|e| e.1.map(i128::from)).collect();
                let sum = (!valid.is_empty())
                    .then(|| i64::try_from(valid.iter().sum::<i128>()).ok())
                    .flatten();
                oracle.push((k, cur[0].0, cur.len() as i64, sum));
            };
            for ev in evs {
                if cur.last().is_some_and(|last| ev.0 - last.0 > gap) {
                    emit(&cur);
                    cur.clear();
                }
                cur.push(ev);
            }
            emit(&cur);
        }
        oracle.sort();
        prop_assert_eq!(&batch, &oracle);
    }
}

// ---------------------------------------------------------------------------------------------
// Pairing mode.

fn pairs_engine(delay_min: i64, timeout_min: i64) -> Engine {
    Engine::new(
        spec().with_pairs(true),
        SessionRules {
            gap_us: MIN,
            delay_us: delay_min * MIN,
            max_duration_us: None,
            pair_timeout_us: timeout_min * MIN,
        },
    )
}

/// `(user, time_us, kind)` rows where kind is 'S' (start), 'E' (end) or anything else.
fn pair_events(version: i64, rows: &[(i64, i64, char)]) -> RecordBatch {
    let plain: Vec<_> = rows.iter().map(|r| (Some(r.0), Some(r.1), "x")).collect();
    let b = events(version, &plain);
    let mut cols = b.columns().to_vec();
    let s = b.schema().index_of(START_COL).unwrap();
    let e = b.schema().index_of(END_COL).unwrap();
    cols[s] = Arc::new(BooleanArray::from(
        rows.iter().map(|r| r.2 == 'S').collect::<Vec<_>>(),
    ));
    cols[e] = Arc::new(BooleanArray::from(
        rows.iter().map(|r| r.2 == 'E').collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(b.schema(), cols).unwrap()
}

type PairOut = (i64, Option<i64>, Option<i64>, String);

fn pair_rows(batch: &RecordBatch) -> Vec<PairOut> {
    let users = batch
        .column_by_name("user_id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let ts = |n: &str| {
        batch
            .column_by_name(n)
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>()
            .clone()
    };
    let (start, end) = (ts("start_time"), ts("end_time"));
    let status = batch.column_by_name("status").unwrap().as_string::<i32>();
    let mut out: Vec<PairOut> = (0..batch.num_rows())
        .map(|i| {
            (
                users.value(i),
                start.is_valid(i).then(|| start.value(i)),
                end.is_valid(i).then(|| end.value(i)),
                status.value(i).to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn pair_rows_of_one_key_at_one_instant_get_distinct_ids() {
    // Two ends at the same instant with no start: two `missing_start` rows, same key and times.
    let e = pairs_engine(0, 60);
    let batch = pair_events(0, &[(1, 0, 'E'), (1, 0, 'E')]);
    let out = e
        .step(&empty(), std::slice::from_ref(&batch), None, true)
        .unwrap();
    let closed = out.closed();
    assert_eq!(pair_rows(&closed).len(), 2);
    let ids = closed.column(0).as_string::<i32>();
    assert_ne!(ids.value(0), ids.value(1));
    let again = e.step(&empty(), &[batch], None, true).unwrap().closed();
    let again = again.column(0).as_string::<i32>();
    assert_eq!(
        (ids.value(0), ids.value(1)),
        (again.value(0), again.value(1))
    );
}

#[test]
fn a_pair_started_in_one_run_completes_in_a_later_one() {
    let e = pairs_engine(5, 60);
    let first = e
        .step(
            &empty(),
            &[pair_events(0, &[(1, 0, 'S'), (1, MIN, 'x'), (2, MIN, 'E')])],
            None,
            false,
        )
        .unwrap();
    assert_eq!(
        first.closed().num_rows(),
        0,
        "nothing decided before the watermark reaches it"
    );
    assert_eq!(first.pending.num_rows(), 2, "the page view is not kept");
    let second = e
        .step(
            &first.pending,
            &[pair_events(1, &[(1, 20 * MIN, 'E')])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(
        pair_rows(&second.closed()),
        vec![(2, None, Some(MIN), "missing_start".into())],
        "the watermark (15m) reached user 2's end, not yet user 1's"
    );
    let third = e
        .step(
            &second.pending,
            &[pair_events(2, &[(3, 30 * MIN, 'x')])],
            second.watermark,
            false,
        )
        .unwrap();
    assert_eq!(
        pair_rows(&third.closed()),
        vec![(1, Some(0), Some(20 * MIN), "complete".into())]
    );
    let status = third
        .live
        .column_by_name("pair_status")
        .unwrap()
        .as_string::<i32>();
    assert_eq!(status.value(0), "complete");
}

#[test]
fn an_open_start_times_out_on_the_watermark() {
    let e = pairs_engine(0, 60);
    let first = e
        .step(&empty(), &[pair_events(0, &[(1, 0, 'S')])], None, false)
        .unwrap();
    assert_eq!(first.closed().num_rows(), 0);
    let second = e
        .step(
            &first.pending,
            &[pair_events(1, &[(2, 60 * MIN, 'x')])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(
        pair_rows(&second.closed()),
        vec![(1, Some(0), None, "missing_end".into())]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn pairs_incremental_then_flush_equal_one_batch_run(
        raw in prop::collection::vec((0i64..3, 0i64..300, prop::sample::select(vec!['S', 'E', 'x'])), 1..80),
        cuts in prop::collection::vec(0usize..80, 0..8),
        disorder in 0i64..9,
    ) {
        // A timeout longer than the whole history: rows are decided by events alone.
        let e = pairs_engine(10, 100_000);
        let sharded = Engine { shard_min_rows: 1, ..e.clone() };
        let mut evs: Vec<(i64, i64, char)> = raw.iter().map(|&(k, m, c)| (k, m * MIN + k, c)).collect();
        evs.sort_by_key(|e| e.1);
        let mut arrival: Vec<(i64, (i64, i64, char))> = evs
            .iter()
            .enumerate()
            .map(|(i, &ev)| (ev.1 - ((i as i64 * 31) % (disorder + 1)) * MIN, ev))
            .collect();
        arrival.sort_by_key(|a| a.0);
        let ordered: Vec<(i64, i64, char)> = arrival.into_iter().map(|a| a.1).collect();
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(ordered.len())).collect();
        bounds.extend([0, ordered.len()]);
        bounds.sort();
        bounds.dedup();
        let commits: Vec<RecordBatch> = bounds
            .windows(2)
            .enumerate()
            .map(|(v, w)| pair_events(v as i64, &ordered[w[0]..w[1]]))
            .collect();
        let (mut pending, mut wm, mut closed) = (empty(), None, Vec::new());
        for c in &commits {
            let out = sharded.step(&pending, std::slice::from_ref(c), wm, false).unwrap();
            prop_assert_eq!(out.metrics.rows_late, 0);
            closed.extend(pair_rows(&out.closed()));
            pending = out.pending;
            wm = out.watermark;
        }
        let out = sharded.step(&pending, &[], wm, true).unwrap();
        closed.extend(pair_rows(&out.closed()));
        closed.sort();
        let batch = pair_rows(&e.step(&empty(), &commits, None, true).unwrap().closed());
        prop_assert_eq!(closed, batch);
    }
}

#[test]
fn ties_in_event_time_follow_version_file_and_row_whatever_the_arrival_order() {
    let e = engine(30, 15);
    let later = events(2, &[(Some(1), Some(0), "from-v2")]);
    let earlier = events(
        1,
        &[
            (Some(1), Some(0), "from-v1-r0"),
            (Some(1), Some(0), "from-v1-r1"),
        ],
    );
    let out = e.step(&empty(), &[later, earlier], None, true).unwrap();
    let pages: Vec<String> = sessions(&out.closed())[0]
        .4
        .iter()
        .map(|p| p.0.clone())
        .collect();
    assert_eq!(pages, vec!["from-v1-r0", "from-v1-r1", "from-v2"]);

    // The same with a string key (the row-encoded sort path).
    let schema = Schema::new(vec![
        Field::new("k", DataType::Utf8, true),
        Field::new("t", DataType::Int64, true),
        Field::new("page", DataType::Utf8, true),
    ]);
    let spec = EventSpec::resolve(&schema, &["k".into()], "t", &["page".into()], &[]).unwrap();
    let raw = |pages: Vec<&str>| {
        RecordBatch::try_new(
            Arc::new(schema.clone()),
            vec![
                Arc::new(StringArray::from(vec!["a"; pages.len()])),
                Arc::new(Int64Array::from(vec![5; pages.len()])),
                Arc::new(StringArray::from(pages)),
            ],
        )
        .unwrap()
    };
    let v2 = normalize(&spec, &raw(vec!["v2"]), 2, 0, 0, Markers::default()).unwrap();
    let v1 = normalize(&spec, &raw(vec!["v1f1"]), 1, 1, 0, Markers::default()).unwrap();
    let v1f0 = normalize(&spec, &raw(vec!["v1f0"]), 1, 0, 0, Markers::default()).unwrap();
    let e = Engine::new(spec, e.rules);
    let out = e.step(&v2, &[v1, v1f0], None, true).unwrap();
    let pages = out
        .closed()
        .column_by_name("visited_pages")
        .unwrap()
        .as_list::<i32>()
        .value(0);
    let names = pages.as_struct().column(0).as_string::<i32>().clone();
    let got: Vec<&str> = (0..names.len()).map(|i| names.value(i)).collect();
    assert_eq!(got, vec!["v1f0", "v1f1", "v2"]);
}
