//! Careless hands (issue 12): `query` never writes, `demo` cannot reach or delete a real
//! table, and tables nested inside one another are refused.

use std::path::Path;
use std::process::Command;

use crate::util::*;

/// A base with all four tables: two generated commits, one run.
fn with_tables() -> Base {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T17:06:47Z");
    base.ok(&["sessionize"]);
    base
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn versions(base: &Base) -> [Option<u64>; 4] {
    [
        base.version("events"),
        base.version("sessions"),
        base.version("live_sessions"),
        base.version("checkpoint/state"),
    ]
}

#[test]
fn query_refuses_every_statement_that_writes_and_changes_nothing() {
    let base = with_tables();
    let before = versions(&base);
    let tables_before = files(base.path());
    let cwd = tempfile::tempdir().unwrap();
    let query = |sql: &str| {
        Out(Command::new(bin())
            .args(["query", sql, "--base-dir"])
            .arg(base.path())
            .current_dir(cwd.path())
            .output()
            .unwrap())
    };
    let refused = [
        ("INSERT INTO sessions SELECT * FROM sessions", "INSERT"),
        (
            "INSERT INTO events VALUES (9, TIMESTAMP '2026-02-15 17:10:00', 'x')",
            "INSERT",
        ),
        ("COPY (SELECT 1) TO 'x.csv'", "COPY"),
        ("COPY sessions TO 'sessions.parquet'", "COPY"),
        ("CREATE TABLE t AS SELECT * FROM sessions", "CREATE TABLE"),
        (
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 'x.csv'",
            "CREATE EXTERNAL TABLE",
        ),
        ("DELETE FROM sessions", "DELETE"),
        ("SET datafusion.execution.batch_size = 1", "SET"),
        (
            "EXPLAIN ANALYZE INSERT INTO sessions SELECT * FROM sessions",
            "INSERT",
        ),
        (
            "SELECT * INTO copy_of_sessions FROM sessions",
            "SELECT … INTO",
        ),
    ];
    for (sql, named) in refused {
        let out = query(sql);
        assert_eq!(out.code(), 2, "{sql}: {}{}", out.stdout(), out.stderr());
        let err = out.stderr();
        assert!(
            err.contains("read-only") && err.contains(&format!("{named} is not allowed")),
            "{sql}: {err}"
        );
        assert_eq!(versions(&base), before, "{sql} changed a table");
        assert_eq!(files(base.path()), tables_before, "{sql} wrote a file");
        assert_eq!(
            files(cwd.path()),
            Vec::<String>::new(),
            "{sql} wrote a file"
        );
    }
    for sql in [
        "SELECT count(*) AS n FROM sessions",
        "WITH s AS (SELECT * FROM live) SELECT count(*) AS n FROM s",
        "EXPLAIN SELECT * FROM sessions",
        "SHOW TABLES",
        "DESCRIBE sessions",
    ] {
        let out = query(sql);
        assert_eq!(out.code(), 0, "{sql}: {}", out.stderr());
    }
    let tables = query("SHOW TABLES").stdout();
    assert!(
        tables.contains("sessions") && tables.contains("live_sessions"),
        "{tables}"
    );
    assert_eq!(versions(&base), before);
}

#[test]
fn demo_refuses_a_table_it_did_not_create_and_leaves_it_as_it_was() {
    let base = Base::new();
    base.gen_at(T0); // a real-looking events table, written by generate-rows
    let before = base.rows("events");
    let version = base.version("events");
    let out = base.run(&["demo"]);
    assert_eq!(out.code(), 2, "{}{}", out.stdout(), out.stderr());
    let err = out.stderr();
    let events = base.table("events");
    assert!(
        err.contains(&events.display().to_string())
            && err.contains("a Delta table (version 1")
            && err.contains("did not create")
            && err.contains("--base-dir"),
        "{err}"
    );
    assert_eq!(base.version("events"), version);
    assert_eq!(base.rows("events"), before);
    assert!(!base.table("sessions").exists() && !base.table("checkpoint").exists());

    // Files that are not a table at one of the demo's locations: refused the same way.
    let other = Base::new();
    std::fs::create_dir_all(other.table("checkpoint")).unwrap();
    std::fs::write(other.table("checkpoint/notes.txt"), "mine").unwrap();
    let out = other.run(&["demo"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("notes.txt"), "{}", out.stderr());
    assert_eq!(
        std::fs::read_to_string(other.table("checkpoint/notes.txt")).unwrap(),
        "mine"
    );
    assert!(!other.table("events").exists());
}

#[test]
fn demo_ignores_config_files_and_table_variables_and_reruns_on_its_own_tables() {
    // A "real lake" elsewhere, with its own events table.
    let lake = Base::new();
    lake.gen_at(T0);
    let lake_rows = lake.rows("events");
    let lake_version = lake.version("events");
    let lake_path = lake.path().to_str().unwrap().to_string();
    let config = lake.path().join("sessionizer.toml");
    std::fs::write(
        &config,
        format!("base-dir = \"{lake_path}\"\ngap = \"1m\"\n"),
    )
    .unwrap();
    let events = format!("{lake_path}/events");
    let sessions = format!("{lake_path}/sessions");
    let live = format!("{lake_path}/live_sessions");
    let checkpoint = format!("{lake_path}/checkpoint");
    let env = [
        ("SESSIONIZER_CONFIG", config.to_str().unwrap()),
        ("SESSIONIZER_EVENTS", events.as_str()),
        ("SESSIONIZER_SESSIONS", sessions.as_str()),
        ("SESSIONIZER_LIVE", live.as_str()),
        ("SESSIONIZER_CHECKPOINT", checkpoint.as_str()),
        ("SESSIONIZER_GAP", "1m"),
    ];
    let demo = Base::new();
    for run in 1..=2 {
        let out = demo.run_env(&["demo"], &env);
        assert_eq!(out.code(), 0, "run {run}: {}", out.stderr());
        assert!(
            out.stdout().contains("3 sessions closed, 1 pending"),
            "run {run}: {}",
            out.stdout()
        );
        let closed = sql(
            &demo.table("sessions"),
            "SELECT user_id, event_count, close_reason FROM t",
        );
        assert_eq!(
            closed,
            [
                "1 | 4 | inactivity",
                "2 | 2 | inactivity",
                "3 | 2 | inactivity"
            ],
            "run {run}: the demo's own 40-minute gap, its own tables"
        );
    }
    assert_eq!(lake.version("events"), lake_version);
    assert_eq!(lake.rows("events"), lake_rows);
    for name in ["sessions", "live_sessions", "checkpoint"] {
        assert!(
            !lake.table(name).exists(),
            "the demo wrote {name} in the lake"
        );
    }
    // A maintained demo (compacted and vacuumed tables) is still the demo's own.
    demo.ok(&["maintain", "--retention", "0s"]);
    demo.ok(&["demo"]);
}

#[test]
fn nested_locations_are_refused_before_anything_is_written() {
    let base = Base::new();
    base.gen_at(T0);
    let version = base.version("events");
    let inner = base.table("sessions").join("_checkpoint");
    let out = base.run(&["sessionize", "--checkpoint", inner.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    let err = out.stderr();
    assert!(
        err.contains(&format!("--checkpoint ({}/)", inner.display()))
            && err.contains(&format!(
                "inside --sessions ({}/)",
                base.table("sessions").display()
            )),
        "{err}"
    );
    assert!(!base.table("sessions").exists() && !inner.exists());
    assert_eq!(base.version("events"), version);

    // Late events inside the events table, on an object store: refused without any I/O.
    let out = base.run(&[
        "sessionize",
        "--events",
        "s3://lake/clicks/events",
        "--late-events",
        "s3://lake/clicks/events/_late",
        "--sessions",
        "s3://lake/clicks/sessions",
        "--live",
        "s3://lake/clicks/live",
        "--checkpoint",
        "s3://lake/clicks/checkpoint",
    ]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr()
            .contains("--late-events (s3://lake/clicks/events/_late/) is inside --events"),
        "{}",
        out.stderr()
    );
    // A sibling whose name only starts the same is not nested.
    base.ok(&[
        "sessionize",
        "--checkpoint",
        base.table("sessions_checkpoint").to_str().unwrap(),
    ]);
    // maintain, which vacuums, refuses them too.
    let out = base.run(&[
        "maintain",
        "--late-events",
        base.table("live_sessions/late").to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("is inside --live"),
        "{}",
        out.stderr()
    );
}
