//! The reference walkthrough (issue 2), through the real binary, asserting table contents.

use crate::util::*;

const RUN: &[&str] = &[
    "sessionize",
    "--gap",
    "40m",
    "--watermark-delay",
    "15m",
    "--output",
    "json",
];

#[test]
fn sessions_close_at_the_third_run_and_live_follows() {
    let base = Base::new();
    base.gen_at(T0);
    let s1 = base.ok(RUN).json();
    assert_eq!(s1["sessions_closed"], 0);
    assert_eq!(s1["sessions_pending"], 3);
    assert_eq!(s1["rows_read"], 4);
    assert_eq!(s1["watermark"], "2026-02-15T16:50:34Z");
    assert!(base.rows("sessions").is_empty());
    let live = sql(
        &base.table("live_sessions"),
        "SELECT user_id, event_count, status FROM t",
    );
    assert_eq!(
        live,
        vec!["1 | 2 | online", "2 | 1 | online", "3 | 1 | online"]
    );

    base.gen_at("2026-02-15T17:06:47Z");
    let s2 = base.ok(RUN).json();
    assert_eq!(
        (s2["sessions_closed"].as_u64(), s2["rows_read"].as_u64()),
        (Some(0), Some(4))
    );
    assert!(base.rows("sessions").is_empty());

    base.ok(&["generate-rows", "--closing"]);
    let s3 = base.ok(RUN).json();
    assert_eq!(s3["sessions_closed"], 3);
    assert_eq!(s3["sessions_pending"], 1);
    assert_eq!(s3["source_versions"], "3..3");
    let sessions = sql(
        &base.table("sessions"),
        "SELECT user_id, CAST(start_time AS VARCHAR), CAST(end_time AS VARCHAR), duration_ms, event_count, close_reason FROM t",
    );
    assert_eq!(
        sessions,
        vec![
            "1 | 2026-02-15T17:05:34Z | 2026-02-15T17:06:47Z | 73000 | 4 | inactivity",
            "2 | 2026-02-15T17:05:34Z | 2026-02-15T17:06:47Z | 73000 | 2 | inactivity",
            "3 | 2026-02-15T17:05:34Z | 2026-02-15T17:06:47Z | 73000 | 2 | inactivity",
        ]
    );
    let pages = sql(
        &base.table("sessions"),
        "SELECT user_id, visited_pages FROM t WHERE user_id = 1",
    );
    assert_eq!(
        pages,
        vec![
            "1 | [{page: page_1.html, visit_time_ms: 1771175134000}, {page: page_2.html, visit_time_ms: 1771175134000}, \
             {page: page_1.html, visit_time_ms: 1771175207000}, {page: page_2.html, visit_time_ms: 1771175207000}]"
        ]
    );
    let live = sql(
        &base.table("live_sessions"),
        "SELECT user_id, event_count, status FROM t",
    );
    assert_eq!(
        live,
        vec![
            "1 | 4 | offline",
            "2 | 2 | offline",
            "3 | 2 | offline",
            "4 | 1 | online"
        ]
    );
    // Live session ids are the closed sessions' ids.
    let joined = sql(
        &base.table("live_sessions"),
        "SELECT count(*) FROM t WHERE status = 'offline'",
    );
    assert_eq!(joined, vec!["3"]);

    // The sessions table is append-only, and a run with nothing new writes nothing.
    let before = output_versions(&base);
    let s4 = base.ok(RUN).json();
    assert_eq!(s4["source_versions"], serde_json::Value::Null);
    assert_eq!(s4["rows_read"], 0);
    assert_eq!(output_versions(&base), before);
}

#[test]
fn flush_closes_every_pending_session() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(RUN);
    let out = base.ok(&[RUN, &["--flush"]].concat()).json();
    assert_eq!(out["sessions_closed"], 3);
    assert_eq!(out["sessions_pending"], 0);
    let reasons = sql(
        &base.table("sessions"),
        "SELECT user_id, close_reason FROM t",
    );
    assert_eq!(reasons, vec!["1 | flush", "2 | flush", "3 | flush"]);
    assert!(base.rows("checkpoint/state").is_empty());
}

#[test]
fn read_tables_and_status_describe_the_run() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(RUN);
    let shown = base.ok(&["read-tables", "--table", "live"]).stdout();
    assert!(
        shown.contains("| user_id |") && shown.contains("online"),
        "{shown}"
    );
    assert!(
        shown.contains("2026-02-15 17:05:34"),
        "Spark-like timestamps: {shown}"
    );
    let status = base.ok(&["status", "--output", "json"]).json();
    assert_eq!(status["last_version_processed"], 1);
    assert_eq!(status["latest_version_available"], 1);
    assert_eq!(status["sessions_pending"], 3);
    assert_eq!(status["lock"], serde_json::Value::Null);
}

#[test]
fn the_outputs_are_plain_delta_tables_with_the_documented_columns() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(RUN);
    base.ok(&[RUN, &["--flush"]].concat());
    assert_eq!(
        columns(&base.table("sessions")),
        [
            "session_id",
            "user_id",
            "start_time",
            "end_time",
            "duration_ms",
            "event_count",
            "visited_pages",
            "close_reason"
        ]
    );
    assert_eq!(
        columns(&base.table("live_sessions")),
        [
            "user_id",
            "session_id",
            "start_time",
            "end_time",
            "event_count",
            "status"
        ]
    );
    // appendOnly is set on the sessions table.
    let log0 = std::fs::read_to_string(base.table("sessions/_delta_log/00000000000000000000.json"))
        .unwrap();
    assert!(log0.contains("\"delta.appendOnly\":\"true\""), "{log0}");
}

#[test]
fn the_demo_walkthrough_closes_the_sessions_at_the_third_run() {
    let base = Base::new();
    let out = base.ok(&["demo"]).stdout();
    let runs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("sessionize:"))
        .collect();
    assert_eq!(runs.len(), 3, "{out}");
    assert!(
        runs[0].contains("0 sessions closed") && runs[1].contains("0 sessions closed"),
        "{out}"
    );
    assert!(runs[2].contains("3 sessions closed, 1 pending"), "{out}");
    let closed = sql(
        &base.table("sessions"),
        "SELECT user_id, event_count, close_reason FROM t",
    );
    assert_eq!(
        closed,
        vec![
            "1 | 4 | inactivity",
            "2 | 2 | inactivity",
            "3 | 2 | inactivity"
        ]
    );
}
