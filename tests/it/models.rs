//! Every session model of the reference jobs (issue 4), end to end through the binary, each
//! over at least two `sessionize` runs so that state crosses a run boundary.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{Field, Schema};

use crate::util::*;

const M: i64 = 60_000_000;

fn t(hm: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&format!("2026-02-15T{hm}:00Z"))
        .unwrap()
        .timestamp_micros()
}

pub fn ts_utc(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

pub fn append(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema, columns.into_iter().map(|c| c.1).collect()).unwrap();
    let loc = sessionizer::config::TableLocation::from_path(path).unwrap();
    rt().block_on(sessionizer::commands::generate_rows::append_batch(
        &loc, batch, None,
    ))
    .unwrap();
}

fn with(base: &Base, flags: &[&str], extra: &[&str]) -> serde_json::Value {
    let args: Vec<&str> = [&["sessionize", "--output", "json"][..], flags, extra].concat();
    base.ok(&args).json()
}

#[test]
fn clicks_with_a_ten_minute_timeout_and_the_average_duration_query() {
    let base = Base::new();
    let ev = base.table("events");
    let clicks = |users: Vec<i64>, times: Vec<i64>| {
        let n = users.len();
        append(
            &ev,
            vec![
                ("user_id", Arc::new(Int64Array::from(users)) as ArrayRef),
                (
                    "event_id",
                    Arc::new(StringArray::from_iter_values(
                        (0..n).map(|i| format!("e{i}")),
                    )),
                ),
                ("event_datetime", ts_utc(times)),
                ("platform", Arc::new(StringArray::from(vec!["web"; n]))),
                ("action", Arc::new(StringArray::from(vec!["click"; n]))),
                ("uri", Arc::new(StringArray::from(vec!["/p/1"; n]))),
            ],
        );
    };
    let flags = &[
        "--time-column",
        "event_datetime",
        "--gap",
        "10m",
        "--collect",
        "none",
    ];
    clicks(vec![1, 1, 2], vec![t("10:00"), t("10:05"), t("10:01")]);
    with(&base, flags, &[]);
    let live = sql(
        &base.table("live_sessions"),
        "SELECT user_id, event_count, status FROM t",
    );
    assert_eq!(live, vec!["1 | 2 | online", "2 | 1 | online"]);
    clicks(vec![1, 1, 2], vec![t("10:12"), t("10:30"), t("10:40")]);
    let s = with(&base, flags, &[]);
    assert_eq!(s["sessions_closed"], 2, "{s}");
    let sessions = sql(
        &base.table("sessions"),
        "SELECT user_id, event_count, duration_ms FROM t",
    );
    assert_eq!(sessions, vec!["1 | 3 | 720000", "2 | 1 | 0"]);
    let live = sql(
        &base.table("live_sessions"),
        "SELECT user_id, event_count, status FROM t",
    );
    assert_eq!(live, vec!["1 | 1 | online", "2 | 1 | online"]);
    let avg = base.ok(&[
        "query",
        "--format",
        "csv",
        "SELECT avg(duration_ms) AS avg_ms FROM sessions",
    ]);
    assert_eq!(avg.stdout().trim(), "avg_ms\n360000.0", "{}", avg.stdout());
    let bad = base.run(&["query", "SELECT nope FROM sessions"]);
    assert_eq!(bad.code(), 2);
    assert!(bad.stderr().contains("nope"), "{}", bad.stderr());
}

#[test]
fn wallet_deposit_ends_the_session_and_wins_are_summed() {
    let base = Base::new();
    let ev = base.table("events");
    let wallet = |times: Vec<i64>, wins: Vec<f64>, deposit: Vec<bool>| {
        let n = times.len();
        append(
            &ev,
            vec![
                (
                    "session_id",
                    Arc::new(StringArray::from(vec!["w-1"; n])) as ArrayRef,
                ),
                ("event_time", ts_utc(times)),
                ("win_amount", Arc::new(Float64Array::from(wins))),
                ("deposit", Arc::new(BooleanArray::from(deposit))),
            ],
        );
    };
    // The wallet job's flags, as `demo --scenario wallet` runs them.
    let flags = sessionizer::commands::scenarios::Scenario::Wallet.sessionize_flags();
    wallet(
        vec![t("10:00"), t("10:01")],
        vec![5.0, -2.0],
        vec![false, false],
    );
    let s = with(&base, flags, &[]);
    assert_eq!(s["sessions_closed"], 0);
    wallet(
        vec![t("10:02"), t("10:03")],
        vec![0.5, 4.0],
        vec![true, false],
    );
    let s = with(&base, flags, &[]);
    assert_eq!(
        s["sessions_closed"], 1,
        "the deposit closes the session in the same run: {s}"
    );
    let rows = sql(
        &base.table("sessions"),
        "SELECT session_id, event_count, win_amount_sum, close_reason, length(session_uid) FROM t",
    );
    assert_eq!(rows, vec!["w-1 | 3 | 3.5 | end_marker | 32"]);
    let live = sql(
        &base.table("live_sessions"),
        "SELECT session_id, event_count, win_amount_sum, status FROM t",
    );
    assert_eq!(
        live,
        vec!["w-1 | 1 | 4.0 | online"],
        "the next bet started a new session"
    );

    let bad = base.run(&[
        "sessionize",
        "--key",
        "session_id",
        "--time-column",
        "event_time",
        "--end-when",
        "nosuch = 1",
    ]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(
        bad.stderr().contains("--end-when") && bad.stderr().contains("nosuch"),
        "{}",
        bad.stderr()
    );
}

#[test]
fn max_duration_splits_bots_into_bounded_sessions_and_drops_nothing() {
    let base = Base::new();
    let ev = base.table("events");
    let bot = |from: i64, minutes: std::ops::Range<i64>| {
        let times: Vec<i64> = minutes.map(|m| from + m * M).collect();
        let n = times.len();
        append(
            &ev,
            vec![
                (
                    "user_id",
                    Arc::new(Int64Array::from(vec![66; n])) as ArrayRef,
                ),
                ("visit_time", ts_utc(times)),
                ("page", Arc::new(StringArray::from(vec!["/api"; n]))),
            ],
        );
    };
    let flags = &["--max-duration", "1h", "--collect", "none"];
    bot(t("00:00"), 0..100);
    let first = with(&base, flags, &[]);
    assert_eq!(first["sessions_closed"], 1, "{first}");
    bot(t("00:00"), 100..180);
    with(&base, flags, &[]);
    with(&base, flags, &["--flush"]);
    let rows = sql(
        &base.table("sessions"),
        "SELECT count(*), sum(event_count), max(duration_ms) FROM t",
    );
    assert_eq!(rows, vec![format!("3 | 180 | {}", 59 * 60_000)]);
    let reasons = sql(
        &base.table("sessions"),
        "SELECT close_reason, count(*) FROM t GROUP BY close_reason",
    );
    assert_eq!(reasons, vec!["flush | 1", "max_duration | 2"]);
}

#[test]
fn page_paths_with_a_sixteen_minute_timeout() {
    let base = Base::new();
    let ev = base.table("events");
    let visit = |times: Vec<i64>, pages: Vec<&str>| {
        let n = times.len();
        append(
            &ev,
            vec![
                (
                    "user_id",
                    Arc::new(Int64Array::from(vec![7; n])) as ArrayRef,
                ),
                ("visit_time", ts_utc(times)),
                ("page", Arc::new(StringArray::from(pages))),
            ],
        );
    };
    let flags = &["--gap", "16m"];
    visit(vec![t("10:10"), t("10:00")], vec!["/b", "/a"]);
    with(&base, flags, &[]);
    visit(vec![t("10:40"), t("10:20")], vec!["/d", "/c"]);
    with(&base, flags, &[]);
    with(&base, flags, &["--flush"]);
    let rows = sql(
        &base.table("sessions"),
        "SELECT visited_pages, duration_ms FROM t",
    );
    assert_eq!(
        rows,
        vec![
            "[{page: /a, visit_time_ms: 1771149600000}, {page: /b, visit_time_ms: 1771150200000}, {page: /c, visit_time_ms: 1771150800000}] | 1200000",
            "[{page: /d, visit_time_ms: 1771152000000}] | 0",
        ]
    );
}

#[test]
fn start_end_pairing_across_runs_with_composite_keys() {
    let base = Base::new();
    let flags = sessionizer::commands::scenarios::Scenario::Pairs.sessionize_flags();
    base.ok(&[
        "generate-rows",
        "--scenario",
        "pairs",
        "--at",
        "2026-02-15T10:00:00Z",
    ]);
    with(&base, flags, &[]);
    let pending = sql(
        &base.table("live_sessions"),
        "SELECT \"userID\", \"sessionID\", pair_status, status FROM t WHERE status = 'online'",
    );
    assert_eq!(pending, vec!["1 | s2 | open | online"]);
    base.ok(&[
        "generate-rows",
        "--scenario",
        "pairs",
        "--at",
        "2026-02-15T10:30:00Z",
    ]);
    with(&base, flags, &[]);
    let sessions = base.table("sessions");
    let by_status = sql(&sessions, "SELECT status, count(*) FROM t GROUP BY status");
    assert_eq!(
        by_status,
        vec!["complete | 5", "missing_end | 2", "missing_start | 3"]
    );
    let crossing = sql(
        &sessions,
        "SELECT CAST(start_time AS VARCHAR), CAST(end_time AS VARCHAR), duration_ms FROM t WHERE \"userID\" = 1 AND \"sessionID\" = 's2' AND status = 'complete'",
    );
    assert_eq!(
        crossing,
        vec!["2026-02-15T10:20:00Z | 2026-02-15T10:31:00Z | 660000"]
    );
    let s = with(&base, flags, &["--flush"]);
    assert_eq!(
        s["sessions_closed"], 1,
        "the open start becomes missing_end: {s}"
    );
    let by_status = sql(&sessions, "SELECT status, count(*) FROM t GROUP BY status");
    assert_eq!(
        by_status,
        vec!["complete | 5", "missing_end | 3", "missing_start | 3"]
    );
}

#[test]
fn string_composite_and_epoch_millisecond_keys_and_times() {
    // A string key with timestamp_ntz times.
    let base = Base::new();
    let ev = base.table("events");
    let ntz = |v: Vec<i64>| Arc::new(TimestampMicrosecondArray::from(v)) as ArrayRef;
    append(
        &ev,
        vec![
            (
                "visitor",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("at", ntz(vec![t("10:00"), t("10:00")])),
        ],
    );
    with(&base, &["--key", "visitor", "--time-column", "at"], &[]);
    append(
        &ev,
        vec![
            (
                "visitor",
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
            ),
            ("at", ntz(vec![t("10:20")])),
        ],
    );
    with(
        &base,
        &["--key", "visitor", "--time-column", "at"],
        &["--flush"],
    );
    let rows = sql(
        &base.table("sessions"),
        "SELECT visitor, event_count FROM t",
    );
    assert_eq!(rows, vec!["a | 2", "b | 1"]);

    // A composite (int32, string) key with epoch-millisecond times.
    let base = Base::new();
    let ev = base.table("events");
    let ms = |v: Vec<i64>| {
        Arc::new(Int64Array::from(
            v.into_iter().map(|x| x / 1000).collect::<Vec<_>>(),
        )) as ArrayRef
    };
    append(
        &ev,
        vec![
            (
                "shop",
                Arc::new(Int32Array::from(vec![1, 1, 2])) as ArrayRef,
            ),
            ("device", Arc::new(StringArray::from(vec!["x", "y", "x"]))),
            ("ts", ms(vec![t("10:00"), t("10:01"), t("10:02")])),
        ],
    );
    let flags = &["--key", "shop,device", "--time-column", "ts"];
    with(&base, flags, &[]);
    append(
        &ev,
        vec![
            ("shop", Arc::new(Int32Array::from(vec![1])) as ArrayRef),
            ("device", Arc::new(StringArray::from(vec!["x"]))),
            ("ts", ms(vec![t("10:05")])),
        ],
    );
    with(&base, flags, &[]);
    with(&base, flags, &["--flush"]);
    let rows = sql(
        &base.table("sessions"),
        "SELECT shop, device, event_count, CAST(end_time AS VARCHAR) FROM t",
    );
    assert_eq!(
        rows,
        vec![
            "1 | x | 2 | 2026-02-15T10:05:00Z",
            "1 | y | 1 | 2026-02-15T10:01:00Z",
            "2 | x | 1 | 2026-02-15T10:02:00Z"
        ]
    );
}

#[test]
fn collect_and_sum_choose_what_each_session_keeps() {
    let base = Base::new();
    let ev = base.table("events");
    let buy = |times: Vec<i64>, price: Vec<f64>, qty: Vec<i32>| {
        let n = times.len();
        append(
            &ev,
            vec![
                (
                    "user_id",
                    Arc::new(Int64Array::from(vec![1; n])) as ArrayRef,
                ),
                ("visit_time", ts_utc(times)),
                ("page", Arc::new(StringArray::from(vec!["/buy"; n]))),
                ("price", Arc::new(Float64Array::from(price))),
                ("qty", Arc::new(Int32Array::from(qty))),
            ],
        );
    };
    let flags = &["--collect", "price,qty", "--sum", "price,qty"];
    buy(vec![t("10:00")], vec![2.5], vec![1]);
    with(&base, flags, &[]);
    buy(vec![t("10:05")], vec![4.0], vec![3]);
    with(&base, flags, &["--flush"]);
    let rows = sql(
        &base.table("sessions"),
        "SELECT visited_pages, price_sum, qty_sum FROM t",
    );
    assert_eq!(
        rows,
        vec![
            "[{price: 2.5, qty: 1, visit_time_ms: 1771149600000}, {price: 4.0, qty: 3, visit_time_ms: 1771149900000}] | 6.5 | 4"
        ]
    );
    assert!(!columns(&base.table("sessions")).contains(&"page".to_string()));
}

/// Appends `(user, time, amount, ratio, small)` rows: an exact BIGINT, a DOUBLE and an INT.
fn append_amounts(base: &Base, rows: &[(i64, &str, i64, f64, i32)]) {
    append(
        &base.table("events"),
        vec![
            (
                "user_id",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            ("visit_time", ts_utc(rows.iter().map(|r| t(r.1)).collect())),
            (
                "amount",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ),
            (
                "ratio",
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.3))),
            ),
            (
                "small",
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.4))),
            ),
        ],
    );
}

#[test]
fn integer_sums_are_exact_bigints_across_runs_and_overflow_is_null() {
    let base = Base::new();
    let flags = &["--sum", "amount,ratio,small"];
    // 2^53 + 1 is the first integer a double cannot hold.
    append_amounts(
        &base,
        &[
            (1, "10:00", (1 << 53) + 1, 0.5, 1),
            (2, "10:00", i64::MAX, 0.25, 2),
        ],
    );
    with(&base, flags, &[]);
    // The pending state carries the integers to the next run.
    append_amounts(&base, &[(1, "10:05", 1, 1.0, 2), (2, "10:05", 1, 0.25, 3)]);
    with(&base, flags, &["--flush"]);
    let types = sql(
        &base.table("sessions"),
        "SELECT arrow_typeof(amount_sum), arrow_typeof(ratio_sum), arrow_typeof(small_sum) FROM t LIMIT 1",
    );
    assert_eq!(types, ["Int64 | Float64 | Int64"]);
    let rows = sql(
        &base.table("sessions"),
        "SELECT user_id, amount_sum, ratio_sum, small_sum FROM t",
    );
    assert_eq!(
        rows,
        ["1 | 9007199254740994 | 1.5 | 3", "2 | null | 0.5 | 5"],
        "exact, and a sum past the BIGINT range is null, never wrapped"
    );
    let live = sql(
        &base.table("live_sessions"),
        "SELECT user_id, amount_sum, arrow_typeof(amount_sum), small_sum FROM t",
    );
    assert_eq!(
        live,
        ["1 | 9007199254740994 | Int64 | 3", "2 | null | Int64 | 5"]
    );
}

#[test]
fn a_checkpoint_that_kept_integer_sums_as_doubles_is_refused_with_the_fix() {
    // What a checkpoint written before integer sums were exact looks like: no `sum_types`.
    let forget_sum_types = |base: &Base| {
        let file = base.table("checkpoint/_sessionizer/checkpoint.json");
        let mut id: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        id.as_object_mut().unwrap().remove("sum_types");
        std::fs::write(&file, serde_json::to_string_pretty(&id).unwrap()).unwrap();
    };
    let old = Base::new();
    append_amounts(&old, &[(1, "10:00", 5, 0.5, 1)]);
    with(&old, &["--sum", "amount"], &[]);
    forget_sum_types(&old);
    append_amounts(&old, &[(1, "10:05", 5, 0.5, 1)]);
    let before = output_versions(&old);
    let out = old.run(&["sessionize", "--sum", "amount"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    let err = out.stderr();
    assert!(
        err.contains("keeps the summed columns `amount` as `Float64`")
            && err.contains("sums them as `Int64`")
            && err.contains("new --checkpoint location"),
        "{err}"
    );
    assert_eq!(output_versions(&old), before, "nothing written");

    // Summed doubles were kept as doubles before too: such a checkpoint carries on.
    let doubles = Base::new();
    append_amounts(&doubles, &[(1, "10:00", 5, 0.5, 1)]);
    with(&doubles, &["--sum", "ratio"], &[]);
    forget_sum_types(&doubles);
    append_amounts(&doubles, &[(1, "10:05", 5, 0.25, 1)]);
    with(&doubles, &["--sum", "ratio"], &["--flush"]);
    let rows = sql(&doubles.table("sessions"), "SELECT ratio_sum FROM t");
    assert_eq!(rows, ["0.75"]);
}

#[test]
fn late_and_invalid_rows_are_kept_with_reason_and_version() {
    let base = Base::new();
    let late = base.table("late");
    let late_flag = late.to_str().unwrap();
    append_rows(&base, &[(1, "10:00"), (2, "11:00")]);
    with(&base, &["--late-events", late_flag], &[]);
    append_rows(&base, &[(3, "10:30"), (2, "11:05")]); // watermark is 10:45: 10:30 is late
    let s = with(&base, &["--late-events", late_flag], &[]);
    assert_eq!(s["rows_late"], 1, "{s}");
    let rows = sql(&late, "SELECT user_id, reason, _src_version FROM t");
    assert_eq!(rows, vec!["3 | late | 2"]);
}

fn append_rows(base: &Base, rows: &[(i64, &str)]) {
    let n = rows.len();
    append(
        &base.table("events"),
        vec![
            (
                "user_id",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            ),
            ("visit_time", ts_utc(rows.iter().map(|r| t(r.1)).collect())),
            ("page", Arc::new(StringArray::from(vec!["/"; n]))),
        ],
    );
}

fn checkpoint_setting(base: &Base, key: &str) -> String {
    let id =
        std::fs::read_to_string(base.table("checkpoint/_sessionizer/checkpoint.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&id).unwrap();
    v[key].as_str().unwrap().to_string()
}

#[test]
fn layered_config_file_then_env_section_then_variables_then_flags() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sessionizer.toml");
    let run = |base: &Base, args: &[&str], env: &[(&str, &str)]| {
        let argv: Vec<&str> = [&["--config", file][..], args].concat();
        for _ in 0..2 {
            let out = base.run_env(&argv, env);
            assert_eq!(out.code(), 0, "{argv:?} {env:?}: {}", out.stderr());
        }
    };
    // Top-level keys only.
    let b = Base::new();
    b.gen_at(T0);
    run(&b, &["sessionize"], &[]);
    assert_eq!(
        (
            checkpoint_setting(&b, "gap"),
            checkpoint_setting(&b, "watermark_delay")
        ),
        ("30m".into(), "15m".into())
    );
    // The environment section overrides them.
    let b = Base::new();
    b.gen_at(T0);
    run(&b, &["--env", "dev", "sessionize"], &[]);
    assert_eq!(checkpoint_setting(&b, "watermark_delay"), "1m");
    let b = Base::new();
    b.gen_at(T0);
    run(&b, &["--env", "test", "sessionize"], &[]);
    assert_eq!(checkpoint_setting(&b, "gap"), "10m");
    // A variable overrides the section; a flag overrides the variable.
    let b = Base::new();
    b.gen_at(T0);
    run(
        &b,
        &["--env", "test", "sessionize"],
        &[("SESSIONIZER_GAP", "7m")],
    );
    assert_eq!(checkpoint_setting(&b, "gap"), "7m");
    let b = Base::new();
    b.gen_at(T0);
    run(
        &b,
        &["--env", "test", "sessionize", "--gap", "5m"],
        &[("SESSIONIZER_GAP", "7m")],
    );
    assert_eq!(checkpoint_setting(&b, "gap"), "5m");
    // Mistakes are usage errors.
    let b = Base::new();
    let out = b.run(&["--config", file, "--env", "staging", "sessionize"]);
    assert_eq!(out.code(), 2);
    assert!(
        out.stderr().contains("no [env.staging]") && out.stderr().contains("dev, prod, test"),
        "{}",
        out.stderr()
    );
}

#[test]
fn every_scenario_runs_in_the_generator_and_the_demo() {
    use sessionizer::commands::scenarios::Scenario;
    for (scenario, name) in [
        (Scenario::Clicks, "clicks"),
        (Scenario::Wallet, "wallet"),
        (Scenario::Pages, "pages"),
        (Scenario::Pairs, "pairs"),
    ] {
        let base = Base::new();
        base.ok(&[
            "generate-rows",
            "--scenario",
            name,
            "--at",
            "2026-02-15T10:00:00Z",
        ]);
        with(&base, scenario.sessionize_flags(), &[]);
        base.ok(&[
            "generate-rows",
            "--scenario",
            name,
            "--at",
            "2026-02-15T10:20:00Z",
        ]);
        with(&base, scenario.sessionize_flags(), &[]);
        let s = with(&base, scenario.sessionize_flags(), &["--flush"]);
        assert_eq!(s["sessions_pending"], 0, "{name}: {s}");
        let closed = sql(&base.table("sessions"), "SELECT count(*) FROM t");
        assert_ne!(closed, vec!["0"], "{name} closed sessions");

        // The demo on its own base: it refuses tables it did not create.
        let demo = Base::new().ok(&["demo", "--scenario", name]);
        assert!(
            demo.stdout().contains("=== step 3"),
            "{name}: {}",
            demo.stdout()
        );
    }
}
