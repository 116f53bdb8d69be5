//! Bad input: each case gets a message naming the problem and the fix, a documented exit code,
//! and leaves every table exactly as it was (same Delta versions).

use crate::util::*;

/// A base with one successful run, so that outputs exist and must stay untouched.
fn with_outputs() -> Base {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T17:06:00Z");
    base
}

/// Runs `args`, expects `code` and every needle in stderr, and no table changed.
fn refused(base: &Base, args: &[&str], code: i32, needles: &[&str]) {
    let before = output_versions(base);
    let events_before = base.version("events");
    let out = base.run(args);
    assert_eq!(out.code(), code, "{args:?}: {}", out.stderr());
    let err = out.stderr();
    for n in needles {
        assert!(
            err.contains(n),
            "{args:?}: message should mention `{n}`: {err}"
        );
    }
    assert_eq!(output_versions(base), before, "{args:?} wrote to an output");
    assert_eq!(
        base.version("events"),
        events_before,
        "{args:?} wrote to the events table"
    );
    assert!(base.held_lock().is_none(), "{args:?} left its lock");
}

#[test]
fn a_missing_events_table_is_a_usage_error_and_creates_nothing() {
    let base = Base::new();
    refused(
        &base,
        &["sessionize"],
        2,
        &["--events", "is not a Delta table", "generate-rows"],
    );
    assert!(!base.table("checkpoint").exists());
    assert!(!base.table("sessions").exists());
}

#[test]
fn a_folder_that_is_not_a_delta_table_is_refused() {
    let base = Base::new();
    std::fs::create_dir_all(base.table("events")).unwrap();
    std::fs::write(
        base.table("events/data.csv"),
        "user_id,visit_time\n1,2026\n",
    )
    .unwrap();
    refused(&base, &["sessionize"], 2, &["is not a Delta table"]);
}

#[test]
fn missing_key_and_time_columns_name_the_column_and_the_flag() {
    let base = with_outputs();
    refused(
        &base,
        &["sessionize", "--key", "uid"],
        2,
        &["`uid`", "--key", "user_id (Int64)"],
    );
    refused(
        &base,
        &["sessionize", "--time-column", "ts"],
        2,
        &["`ts`", "--time-column"],
    );
}

#[test]
fn a_time_column_of_an_unsupported_type_is_refused() {
    let base = with_outputs();
    refused(
        &base,
        &["sessionize", "--time-column", "page"],
        2,
        &["`page`", "must be a timestamp"],
    );
}

#[test]
fn a_checkpoint_made_for_other_settings_is_refused_with_the_way_out() {
    let base = with_outputs();
    refused(
        &base,
        &["sessionize", "--gap", "10m"],
        2,
        &["gap `30m`", "`10m`", "new --checkpoint"],
    );
    refused(
        &base,
        &["sessionize", "--watermark-delay", "1h"],
        2,
        &["watermark delay"],
    );
    // Another events table with this checkpoint.
    let other = base.table("other_events");
    base.ok(&[
        "generate-rows",
        "--events",
        other.to_str().unwrap(),
        "--at",
        T0,
    ]);
    refused(
        &base,
        &["sessionize", "--events", other.to_str().unwrap()],
        2,
        &["events table"],
    );
}

#[test]
fn a_corrupt_checkpoint_file_is_refused() {
    let base = with_outputs();
    let id = base.table("checkpoint/_sessionizer/checkpoint.json");
    let good = std::fs::read(&id).unwrap();
    std::fs::write(&id, &good[..good.len() / 2]).unwrap();
    refused(
        &base,
        &["sessionize"],
        1,
        &["corrupt", "checkpoint.json", "new --checkpoint"],
    );
}

#[test]
fn a_truncated_state_commit_is_refused() {
    let base = with_outputs();
    let log = base.table("checkpoint/state/_delta_log");
    let mut commits: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    let last = commits.last().unwrap();
    let body = std::fs::read(last).unwrap();
    std::fs::write(last, &body[..body.len() / 3]).unwrap();
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 1, "{}", out.stderr());
    assert!(out.stderr().contains("pending state"), "{}", out.stderr());
    assert_eq!(base.rows("sessions").len(), 0);
}

#[test]
fn events_versions_removed_by_log_cleanup_are_named() {
    let base = with_outputs(); // processed 0..1; version 2 is new
    base.gen_at("2026-02-15T17:07:00Z");
    base.gen_at("2026-02-15T17:08:00Z");
    let loc = sessionizer::config::TableLocation::from_path(&base.table("events")).unwrap();
    rt().block_on(async {
        let t = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        deltalake::checkpoints::create_checkpoint(&t, None)
            .await
            .unwrap();
    });
    for v in [0, 1, 2, 3] {
        std::fs::remove_file(base.table(&format!("events/_delta_log/{v:020}.json"))).unwrap();
    }
    refused(
        &base,
        &["sessionize"],
        1,
        &["version 2", "log clean-up", "--starting-version"],
    );
}

#[test]
fn unknown_flag_values_are_usage_errors() {
    let base = with_outputs();
    refused(
        &base,
        &["sessionize", "--gap", "5x"],
        2,
        &["--gap", "unknown unit `x`"],
    );
    refused(
        &base,
        &["sessionize", "--on-change-commit", "maybe"],
        2,
        &["--on-change-commit", "fail", "skip"],
    );
    refused(
        &base,
        &["sessionize", "--gap", "0"],
        2,
        &["--gap must be positive"],
    );
    refused(
        &base,
        &["sessionize", "--max-bytes-per-batch", "lots"],
        2,
        &["--max-bytes-per-batch"],
    );
}

#[test]
fn an_output_table_with_an_incompatible_schema_is_refused() {
    let base = Base::new();
    base.gen_at(T0);
    // Something else already lives where the sessions should go.
    let sessions = base.table("sessions");
    base.ok(&[
        "generate-rows",
        "--events",
        sessions.to_str().unwrap(),
        "--at",
        T0,
    ]);
    let sessions_before = base.version("sessions");
    refused(
        &base,
        &["sessionize"],
        2,
        &["--sessions", "session_id", "new location"],
    );
    assert_eq!(base.version("sessions"), sessions_before);
}

#[test]
fn rows_with_null_keys_or_times_are_counted_not_fatal() {
    use arrow::array::{Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
    let base = Base::new();
    base.gen_at(T0);
    let loc = sessionizer::config::TableLocation::from_path(&base.table("events")).unwrap();
    rt().block_on(async {
        let t = chrono::DateTime::parse_from_rfc3339(T0)
            .unwrap()
            .timestamp_micros();
        let batch = RecordBatch::try_new(
            sessionizer::commands::generate_rows::demo_schema(),
            vec![
                std::sync::Arc::new(Int64Array::from(vec![None, Some(7)])),
                std::sync::Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(t), None]).with_timezone("UTC"),
                ),
                std::sync::Arc::new(StringArray::from(vec!["a", "b"])),
            ],
        )
        .unwrap();
        let table = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        table.write(vec![batch]).await.unwrap();
    });
    let late = base.table("late");
    let out = base
        .ok(&[
            "sessionize",
            "--late-events",
            late.to_str().unwrap(),
            "--output",
            "json",
        ])
        .json();
    assert_eq!(out["rows_invalid"], 2, "{out}");
    assert_eq!(out["rows_read"], 6);
    assert_eq!(out["sessions_pending"], 3);
    let kept = sql(&late, "SELECT reason FROM t");
    assert_eq!(kept, vec!["null_key", "null_time"]);
}

#[test]
fn a_key_column_whose_type_changed_is_refused() {
    use arrow::array::{RecordBatch, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::sync::Arc;
    let base = with_outputs();
    let loc = sessionizer::config::TableLocation::from_path(&base.table("events")).unwrap();
    rt().block_on(async {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Utf8, true),
            Field::new(
                "visit_time",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("page", DataType::Utf8, true),
        ]));
        let t = chrono::DateTime::parse_from_rfc3339(T0)
            .unwrap()
            .timestamp_micros();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["u-1"])),
                Arc::new(TimestampMicrosecondArray::from(vec![t]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["p"])),
            ],
        )
        .unwrap();
        let table = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        table
            .write(vec![batch])
            .with_save_mode(deltalake::protocol::SaveMode::Overwrite)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
            .await
            .unwrap();
    });
    refused(
        &base,
        &["sessionize"],
        2,
        &["key column types", "Int64", "Utf8", "new --checkpoint"],
    );
}
