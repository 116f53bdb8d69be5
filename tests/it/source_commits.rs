//! Source commits that are not plain appends: DELETE stops the run (or is skipped on request),
//! OPTIMIZE is skipped silently, and neither reads a row twice.

use std::num::NonZeroU64;

use crate::util::*;
use sessionizer::config::TableLocation;

fn events_table(base: &Base) -> deltalake::DeltaTable {
    let loc = TableLocation::from_path(&base.table("events")).unwrap();
    rt().block_on(async { sessionizer::delta::try_load(&loc).await.unwrap().unwrap() })
}

#[test]
fn a_delete_on_the_events_table_stops_the_run_and_writes_nothing() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T17:06:00Z");
    let table = events_table(&base);
    let (table, _) =
        rt().block_on(async { table.delete().with_predicate("user_id = 2").await.unwrap() });
    let delete_version = table.version().unwrap();
    let before = output_versions(&base);

    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 1, "{}", out.stderr());
    let err = out.stderr();
    assert!(err.contains(&format!("version {delete_version}")), "{err}");
    assert!(err.contains("DELETE"), "names the operation: {err}");
    assert!(
        err.contains("--on-change-commit skip"),
        "says how to proceed: {err}"
    );
    assert_eq!(output_versions(&base), before, "no table was written");
    assert!(base.held_lock().is_none(), "the lock was released");

    // Skipping the commit lets the run go on; the delete's rewritten rows are not read.
    let ok = base
        .ok(&[
            "sessionize",
            "--on-change-commit",
            "skip",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(ok["rows_read"], 4, "only the second append's rows: {ok}");
}

#[test]
fn optimize_is_skipped_and_no_row_is_read_twice() {
    let base = Base::new();
    base.gen_at(T0);
    base.gen_at("2026-02-15T17:06:00Z");
    base.gen_at("2026-02-15T17:07:00Z");
    let first = base.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(first["rows_read"], 12);
    let table = events_table(&base);
    let (_, metrics) = rt().block_on(async {
        table
            .optimize()
            .with_target_size(NonZeroU64::new(1 << 30).unwrap())
            .await
            .unwrap()
    });
    assert!(
        metrics.num_files_removed >= 2,
        "OPTIMIZE compacted files: {metrics:?}"
    );
    base.gen_at("2026-02-15T17:08:00Z");
    let second = base.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(
        second["rows_read"], 4,
        "the compacted files are not read again: {second}"
    );
    base.ok(&["sessionize", "--flush"]);
    let counts = sql(
        &base.table("sessions"),
        "SELECT user_id, event_count FROM t",
    );
    assert_eq!(counts, vec!["1 | 8", "2 | 4", "3 | 4"]);
}

#[test]
fn a_new_nullable_column_in_the_events_table_keeps_working() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    // Append rows with an extra column, merging the schema.
    let loc = TableLocation::from_path(&base.table("events")).unwrap();
    rt().block_on(async {
        use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use std::sync::Arc;
        let demo = sessionizer::commands::generate_rows::demo_schema();
        let mut fields: Vec<Field> = demo.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("referrer", DataType::Utf8, true));
        let schema = Arc::new(Schema::new(fields));
        let t = chrono::DateTime::parse_from_rfc3339("2026-02-15T17:06:00Z")
            .unwrap()
            .timestamp_micros();
        let batch = arrow::array::RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1])),
                Arc::new(TimestampMicrosecondArray::from(vec![t]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["page_9.html"])),
                Arc::new(StringArray::from(vec!["search"])),
            ],
        )
        .unwrap();
        let table = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        table
            .write(vec![batch])
            .with_schema_mode(deltalake::operations::write::SchemaMode::Merge)
            .await
            .unwrap();
    });
    let out = base.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(out["rows_read"], 1);
    base.ok(&["sessionize", "--flush"]);
    let counts = sql(
        &base.table("sessions"),
        "SELECT user_id, event_count FROM t",
    );
    assert_eq!(counts, vec!["1 | 3", "2 | 1", "3 | 1"]);
}
