//! Rule-by-rule tests of the pure engine, and the property test of SPEC rule 6: any split into
//! commits, any arrival order with disorder under the watermark delay, then `--flush`, gives
//! exactly the sessions of one batch run, which in turn equal a naive oracle written here
//! independently of the engine's code.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit, TimestampMicrosecondType};
use proptest::prelude::*;

use super::*;

const MIN: i64 = 60_000_000;

fn spec() -> EventSpec {
    let schema = Schema::new(vec![
        Field::new("user_id", DataType::Int64, true),
        Field::new(
            "visit_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("page", DataType::Utf8, true),
    ]);
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
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
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
    let s = sessions(&out.closed);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].3, 2);
}

#[test]
fn one_microsecond_past_gap_starts_a_new_session() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 30 * MIN + 1)])], None, true)
        .unwrap();
    let s = sessions(&out.closed);
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
    assert_eq!(first.closed.num_rows(), 0);
    // Watermark = 45m - 15m = 30m == last + gap: not yet.
    let second = e
        .step(
            &first.pending,
            &[ev(1, &[(2, 45 * MIN)])],
            first.watermark,
            false,
        )
        .unwrap();
    assert_eq!(second.closed.num_rows(), 0);
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
        sessions(&third.closed),
        vec![(1, 0, 0, 1, vec![("p".into(), 0)])]
    );
    assert_eq!(reasons(&third.closed), vec!["inactivity"]);
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
    let s = sessions(&flushed.closed);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].1, s[0].2, s[0].3), (0, 50 * MIN, 3));
    let times: Vec<i64> = s[0].4.iter().map(|p| p.1).collect();
    assert_eq!(
        times,
        vec![0, 25 * 60_000, 50 * 60_000],
        "pages in time order"
    );
    assert_eq!(reasons(&flushed.closed), vec!["flush"]);
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
    assert_eq!(sessions(&flushed.closed)[0].1, 86 * MIN);
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
fn session_ids_depend_on_key_and_start_only() {
    let e = engine(30, 15);
    let a = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, MIN)])], None, true)
        .unwrap();
    let b = e
        .step(&empty(), &[ev(7, &[(1, MIN), (1, 0)])], None, true)
        .unwrap();
    let id = |b: &RecordBatch| b.column(0).as_string::<i32>().value(0).to_string();
    assert_eq!(id(&a.closed), id(&b.closed));
    assert_eq!(id(&a.closed).len(), 32);
    let c = e.step(&empty(), &[ev(0, &[(2, 0)])], None, true).unwrap();
    assert_ne!(id(&a.closed), id(&c.closed));
}

#[test]
fn duration_is_whole_milliseconds_rounded_down() {
    let e = engine(30, 15);
    let out = e
        .step(&empty(), &[ev(0, &[(1, 0), (1, 1_999)])], None, true)
        .unwrap();
    let d = out
        .closed
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
    let norm = normalize(&spec, &raw, 3, 0, 0, None).unwrap();
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
        },
    );
    let out = e.step(&norm, &[], None, true).unwrap();
    let sums = out
        .closed
        .column_by_name("win_sum")
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .clone();
    let keys = out.closed.column_by_name("k").unwrap().as_string::<i32>();
    let by_key: BTreeMap<&str, Option<f64>> = (0..2)
        .map(|i| (keys.value(i), sums.is_valid(i).then(|| sums.value(i))))
        .collect();
    assert_eq!(by_key["a"], Some(3.0));
    assert_eq!(by_key["b"], None);
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

// ---------------------------------------------------------------------------------------------
// Property: incremental == batch == oracle.

/// The naive oracle: per key, sort by (time, version, row) and cut where the gap is exceeded.
fn oracle(rows: &[(i64, i64, i64, i64)], gap: i64) -> Vec<Sess> {
    let mut by_key: BTreeMap<i64, Vec<(i64, i64, i64)>> = BTreeMap::new();
    for &(k, t, v, r) in rows {
        by_key.entry(k).or_default().push((t, v, r));
    }
    let mut out = Vec::new();
    for (k, mut evs) in by_key {
        evs.sort();
        let mut cur: Vec<(i64, i64, i64)> = Vec::new();
        for e in evs {
            if let Some(last) = cur.last()
                && e.0 - last.0 > gap
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

fn to_sess(k: i64, evs: &[(i64, i64, i64)]) -> Sess {
    let pages = evs
        .iter()
        .map(|&(t, v, r)| (format!("v{v}r{r}"), t.div_euclid(1000)))
        .collect();
    (k, evs[0].0, evs[evs.len() - 1].0, evs.len() as i64, pages)
}

fn commit(version: i64, rows: &[(i64, i64)]) -> RecordBatch {
    let pages: Vec<String> = (0..rows.len()).map(|r| format!("v{version}r{r}")).collect();
    let rows: Vec<_> = rows
        .iter()
        .zip(&pages)
        .map(|(&(k, t), p)| (Some(k), Some(t), p.as_str()))
        .collect();
    events(version, &rows)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn incremental_runs_then_flush_equal_one_batch_run(
        // (key, base time in minutes) of each event; events are then jittered per commit.
        raw in prop::collection::vec((0i64..4, 0i64..600, 0i64..60_000_000), 1..120),
        cuts in prop::collection::vec(0usize..120, 0..12),
        disorder in 0i64..14,
        gap_min in 1i64..40,
        runs_per_commit in 1usize..3,
    ) {
        let delay = 15i64;
        // Arrival order: sorted by time, then each event may be displaced backwards by less
        // than the watermark delay, so nothing is late.
        let mut evs: Vec<(i64, i64)> = raw.iter().map(|&(k, m, us)| (k, m * MIN + us)).collect();
        evs.sort_by_key(|e| e.1);
        let mut arrival: Vec<(i64, (i64, i64))> = evs
            .iter()
            .enumerate()
            .map(|(i, &(k, t))| (t - ((i as i64 * 7919) % (disorder + 1)) * MIN, (k, t)))
            .collect();
        arrival.sort_by_key(|a| a.0);
        let ordered: Vec<(i64, i64)> = arrival.into_iter().map(|a| a.1).collect();

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

        let e = engine(gap_min, delay);
        // Incremental: a run every `runs_per_commit` commits, then a flush.
        let mut pending = empty();
        let mut wm = None;
        let mut closed = Vec::new();
        for chunk in commits.chunks(runs_per_commit) {
            let out = e.step(&pending, chunk, wm, false).unwrap();
            prop_assert_eq!(out.metrics.rows_late, 0);
            closed.extend(sessions(&out.closed));
            pending = out.pending;
            wm = out.watermark;
        }
        let out = e.step(&pending, &[], wm, true).unwrap();
        closed.extend(sessions(&out.closed));
        prop_assert_eq!(out.pending.num_rows(), 0);
        closed.sort();

        let batch = e.step(&empty(), &commits, None, true).unwrap();
        let batch = sessions(&batch.closed);
        prop_assert_eq!(&closed, &batch);

        // Both equal the independent oracle.
        let mut flat = Vec::new();
        for (v, w) in bounds.windows(2).enumerate() {
            for (r, &(k, t)) in ordered[w[0]..w[1]].iter().enumerate() {
                flat.push((k, t, v as i64, r as i64));
            }
        }
        prop_assert_eq!(&batch, &oracle(&flat, gap_min * MIN));
    }
}
