//! Tables as other writers and careless clients leave them: the fixture tables of `testdata/`
//! (see its README for how each was made), and far-future or unrepresentable event times.

use std::path::{Path, PathBuf};

use crate::util::*;

/// A copy of fixture `name` (runs never write into `testdata/`), inside `base`.
fn fixture(base: &Base, name: &str) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    let to = base.table("events");
    copy_dir(&from, &to);
    to
}

/// The sessions table as `user_id,start_time,end_time,event_count` CSV lines.
fn sessions_csv(base: &Base) -> Vec<String> {
    let out = base.ok(&[
        "query",
        "--format",
        "csv",
        "SELECT user_id, start_time, end_time, event_count FROM sessions \
         ORDER BY user_id, start_time",
    ]);
    out.stdout().lines().map(str::to_string).collect()
}

fn expected(name: &str) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
        .join("expected_sessions.csv");
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Sessionizes fixture `name` to the end (`--flush`) and compares with its expected sessions.
fn sessionizes_as_expected(name: &str, extra: &[&str]) -> serde_json::Value {
    let base = Base::new();
    fixture(&base, name);
    let mut args = vec!["sessionize", "--flush", "--output", "json"];
    args.extend_from_slice(extra);
    let summary = base.ok(&args).json();
    assert_eq!(sessions_csv(&base), expected(name), "{name}: {summary}");
    summary
}

#[test]
fn a_far_future_event_is_invalid_and_never_moves_the_watermark() {
    let base = Base::new();
    base.gen_at(T0);
    // A client clock at the end of time: its commit is made now, so it is far beyond the skew.
    base.gen_at("9999-12-31T00:00:00Z");
    let late = base.table("late");
    let late_arg = late.to_str().unwrap();
    let s = base
        .ok(&["sessionize", "--late-events", late_arg, "--output", "json"])
        .json();
    assert_eq!(s["rows_invalid"], 4, "{s}");
    assert!(
        s["watermark"].as_str().unwrap().starts_with("2026-02-15"),
        "{s}"
    );
    let reasons = sql(&late, "SELECT DISTINCT reason FROM t");
    assert_eq!(reasons, vec!["future"]);
    // The pipeline goes on: the next rows are not late.
    base.gen_at("2026-02-15T17:10:00Z");
    let s = base
        .ok(&["sessionize", "--late-events", late_arg, "--output", "json"])
        .json();
    assert_eq!(
        (s["rows_late"].as_u64(), s["rows_invalid"].as_u64()),
        (Some(0), Some(0))
    );
    // With the guard off, the same row would have moved the watermark to the end of time.
    let off = Base::new();
    off.gen_at(T0);
    off.gen_at("9999-12-31T00:00:00Z");
    let s = off
        .ok(&["sessionize", "--max-event-skew", "none", "--output", "json"])
        .json();
    assert!(s["watermark"].as_str().unwrap().starts_with("9999"), "{s}");
}

#[test]
fn epoch_milliseconds_that_overflow_or_lie_are_invalid_not_fatal() {
    let s = sessionizes_as_expected("epoch_millis_poison", &[]);
    assert_eq!(s["rows_invalid"], 2, "{s}");
    let base = Base::new();
    fixture(&base, "epoch_millis_poison");
    let late = base.table("late");
    base.ok(&["sessionize", "--late-events", late.to_str().unwrap()]);
    let mut reasons = sql(&late, "SELECT reason FROM t");
    reasons.sort();
    assert_eq!(reasons, vec!["bad_time", "future"]);
}

#[test]
fn timestamp_ntz_tables_are_read() {
    sessionizes_as_expected("timestamp_ntz", &[]);
}

#[test]
fn tables_partitioned_by_date_are_read() {
    sessionizes_as_expected("partitioned_by_date", &[]);
}

#[test]
fn tables_with_checkpoints_are_read() {
    sessionizes_as_expected("checkpointed", &[]);
    sessionizes_as_expected("v2_checkpoint", &[]);
}

#[test]
fn column_mapping_by_name_and_by_id_with_renamed_and_dropped_columns_is_read() {
    for name in [
        "column_mapping_name",
        "column_mapping_id",
        "column_mapping_id_by_field_id",
    ] {
        let s = sessionizes_as_expected(name, &[]);
        assert_eq!(s["rows_invalid"], 0, "{name}: {s}");
    }
}

#[test]
fn an_added_file_with_a_deletion_vector_is_refused_naming_the_feature() {
    let base = Base::new();
    fixture(&base, "deletion_vectors_added");
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("deletionVectors"), "{}", out.stderr());
    assert_eq!(
        output_versions(&base),
        [None, None, None],
        "nothing written"
    );
    // A table with the feature whose deleting commit is skipped reads the files it added.
    sessionizes_as_expected("deletion_vectors", &["--on-change-commit", "skip"]);
}

#[test]
fn an_unknown_reader_feature_is_refused_before_anything_is_read() {
    let base = Base::new();
    let events = fixture(&base, "timestamp_ntz");
    let first = events.join("_delta_log/00000000000000000000.json");
    let log = std::fs::read_to_string(&first).unwrap();
    assert!(
        log.contains("\"readerFeatures\":[\"timestampNtz\"]"),
        "{log}"
    );
    let log = log.replace(
        "\"readerFeatures\":[\"timestampNtz\"]",
        "\"readerFeatures\":[\"timestampNtz\",\"variantType\"]",
    );
    let log = log.replace(
        "\"writerFeatures\":[\"timestampNtz\"]",
        "\"writerFeatures\":[\"timestampNtz\",\"variantType\"]",
    );
    std::fs::write(&first, log).unwrap();
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("`variantType`"), "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("does not read (it reads: columnMapping"),
        "{}",
        out.stderr()
    );
    assert!(!base.table("checkpoint").exists());
}

#[test]
fn a_key_that_is_never_idle_is_named_by_status_and_warned_about() {
    let base = Base::new();
    // User 7 (a bot) clicks every minute for two hours; the others once.
    base.ok(&[
        "generate-rows",
        "--users",
        "3",
        "--per-user",
        "1",
        "--at",
        "2026-02-15T10:00:00Z",
    ]);
    for m in (0..120).step_by(20) {
        let at = format!("2026-02-15T{:02}:{:02}:00Z", 10 + m / 60, m % 60);
        base.ok(&[
            "generate-rows",
            "--users",
            "1",
            "--per-user",
            "20",
            "--at",
            &at,
        ]);
    }
    let out = base.ok(&[
        "sessionize",
        "--warn-open-session-events",
        "10",
        "--gap",
        "3h",
    ]);
    assert!(
        out.stderr().contains("events in a session still open"),
        "{}",
        out.stderr()
    );
    let quiet = base.ok(&["sessionize", "--gap", "3h"]);
    assert!(!quiet.stderr().contains("still open"), "{}", quiet.stderr());
    let s = base.ok(&["status", "--output", "json"]).json();
    let keys = s["largest_pending_keys"].as_array().unwrap();
    assert!(!keys.is_empty(), "{s}");
    let top = keys[0]["events"].as_u64().unwrap();
    assert!(top > 20, "the busiest key comes first: {s}");
    assert!(
        keys.windows(2)
            .all(|w| w[0]["events"].as_u64() >= w[1]["events"].as_u64())
    );
    assert!(s["max_event_time_seen"].as_str().is_some(), "{s}");
    assert!(s["max_event_committed_at"].as_str().is_some(), "{s}");
}
