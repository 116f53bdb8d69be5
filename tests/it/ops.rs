//! Operating the tool: SQL, status, maintenance, logs, shell niceties and the scheduler files.

use std::process::Command;

use crate::crash::{RUN, assert_same, clean_run, prepare, snapshot};
use crate::util::*;

#[test]
fn query_answers_over_the_demo_tables() {
    let base = Base::new();
    base.ok(&["demo"]);
    let closed = base.ok(&["query", "--format", "csv", DEMO_SESSIONS_SQL]);
    assert_eq!(closed.stdout().trim(), DEMO_SESSIONS_CSV);
    // live_sessions (and its short name live), pending: the closing row's user is still open.
    let live = base
        .ok(&[
            "query",
            "--format",
            "json",
            "SELECT status, count(*) AS n FROM live_sessions GROUP BY status ORDER BY status",
        ])
        .stdout();
    assert_eq!(
        live.trim(),
        "{\"status\":\"offline\",\"n\":3}\n{\"status\":\"online\",\"n\":1}"
    );
    let pending = base.ok(&[
        "query",
        "--format",
        "csv",
        "SELECT count(*) AS n FROM pending JOIN live ON pending.user_id = live.user_id WHERE live.status = 'online'",
    ]);
    assert_eq!(pending.stdout().trim(), "n\n1");
    let table = base
        .ok(&["query", "SELECT avg(duration_ms) AS avg_ms FROM sessions"])
        .stdout();
    assert!(table.contains("| avg_ms"), "{table}");
    let bad = base.run(&["query", "SELECT * FROM nowhere"]);
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(
        bad.stderr().contains("nowhere") && bad.stderr().contains("live_sessions"),
        "names the table and the ones available: {}",
        bad.stderr()
    );
}

#[test]
fn status_reports_lag_before_and_after_runs() {
    let base = Base::new();
    let none = base.run(&["status"]);
    assert_eq!(none.code(), 3, "no checkpoint yet: {}", none.stderr());
    assert!(none.stderr().contains("no checkpoint"), "{}", none.stderr());

    base.gen_at("2026-02-15T10:00:00Z");
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T11:00:00Z");
    let behind = base.ok(&["status", "--output", "json"]).json();
    assert_eq!(behind["last_version_processed"], 1, "{behind}");
    assert_eq!(behind["latest_version_available"], 2, "{behind}");
    assert_eq!(behind["versions_behind"], 1, "{behind}");
    assert_eq!(behind["max_event_time_processed"], "2026-02-15T10:00:00Z");
    assert_eq!(behind["max_event_time_available"], "2026-02-15T11:00:00Z");
    assert_eq!(behind["event_time_lag_seconds"], 3600, "{behind}");
    assert_eq!(behind["watermark"], "2026-02-15T09:45:00Z");
    assert_eq!(behind["sessions_pending"], 3);
    assert!(behind["last_run_at"].is_string(), "{behind}");
    assert_eq!(behind["lock"], serde_json::Value::Null);

    base.ok(&["sessionize"]);
    let caught_up = base.ok(&["status", "--output", "json"]).json();
    assert_eq!(caught_up["versions_behind"], 0, "{caught_up}");
    assert_eq!(caught_up["event_time_lag_seconds"], 0, "{caught_up}");
    assert_eq!(caught_up["watermark"], "2026-02-15T10:45:00Z");
    let text = base.ok(&["status"]).stdout();
    assert!(text.contains("event-time lag:            0 s"), "{text}");

    std::fs::write(
        base.table("checkpoint/_sessionizer/checkpoint.json"),
        "{ not json",
    )
    .unwrap();
    let corrupt = base.run(&["status"]);
    assert_eq!(corrupt.code(), 1, "{}", corrupt.stderr());
    assert!(corrupt.stderr().contains("corrupt"), "{}", corrupt.stderr());
}

fn data_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".parquet")
        })
        .count()
}

#[test]
fn maintain_compacts_and_vacuums_without_changing_any_row() {
    let base = Base::new();
    for at in ["10:00", "10:50", "11:40", "12:30"] {
        base.gen_at(&format!("2026-02-15T{at}:00Z"));
        base.ok(&["sessionize"]);
    }
    let before = snapshot(&base);
    assert_eq!(before.sessions.len(), 9, "three rounds closed");
    let files_before = data_files(&base.table("sessions"));
    assert!(files_before >= 3, "one file per closing run");

    let report = base
        .ok(&["maintain", "--retention", "0s", "--output", "json"])
        .json();
    let tables = report["tables"].as_array().unwrap();
    let of = |name: &str| {
        tables
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    assert_eq!(of("sessions")["files_compacted"], files_before as u64);
    assert_eq!(of("sessions")["files_written"], 1);
    assert_eq!(of("sessions")["files_vacuumed"], files_before as u64);
    assert!(
        of("pending")["files_vacuumed"].as_u64().unwrap() >= 3,
        "{report}"
    );
    assert!(of("live_sessions")["checkpoint_version"].is_number());
    assert_eq!(data_files(&base.table("sessions")), 1);
    assert!(
        base.table("sessions/_delta_log/_last_checkpoint").exists(),
        "a Delta checkpoint was written"
    );

    assert_same(&before, &snapshot(&base), "maintain");
    // The progress survives the vacuum commits on the state table, and runs go on.
    let status = base.ok(&["status", "--output", "json"]).json();
    assert_eq!(status["last_version_processed"], 4, "{status}");
    base.gen_at("2026-02-15T13:20:00Z");
    let s = base.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(s["sessions_closed"], 3, "{s}");
    assert_eq!(base.rows("sessions").len(), 12);
}

#[test]
fn maintain_after_a_crash_keeps_the_rerun_exactly_once() {
    let clean = clean_run();
    for fp in ["after-sessions-commit", "after-live-commit"] {
        let base = Base::new();
        prepare(&base);
        let crashed = base.run_env(RUN, &[("SESSIONIZER_FAILPOINT", fp)]);
        assert_eq!(crashed.code(), 101, "{}", crashed.stderr());
        // The crashed run left its lock (a dead process): maintain takes it over.
        base.ok(&["maintain", "--retention", "0s"]);
        base.ok(RUN);
        assert_same(&clean, &snapshot(&base), &format!("{fp} then maintain"));
    }
}

#[test]
fn maintain_needs_a_checkpoint() {
    let base = Base::new();
    let out = base.run(&["maintain"]);
    assert_eq!(out.code(), 3, "{}", out.stderr());
    assert!(out.stderr().contains("no checkpoint"), "{}", out.stderr());
}

#[test]
fn every_run_logs_its_summary_and_json_logs_are_json() {
    let base = Base::new();
    base.gen_at(T0);
    let text = base.ok(&["sessionize"]);
    assert!(
        text.stderr().contains("sessionize finished") && text.stderr().contains("rows_read=4"),
        "{}",
        text.stderr()
    );
    assert!(
        !text.stderr().contains('\r'),
        "no progress bar off a terminal"
    );
    base.gen_at("2026-02-15T18:00:00Z");
    let json = base.ok(&["sessionize", "--log-format", "json"]);
    let line = json
        .stderr()
        .lines()
        .find(|l| l.contains("sessionize finished"))
        .unwrap_or_else(|| panic!("{}", json.stderr()))
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["rows_read"], 4, "{v}");
    assert_eq!(v["sessions_closed"], 3, "{v}");
    let quiet = base.ok(&["sessionize", "-q"]);
    assert_eq!(quiet.stderr(), "");
}

#[test]
fn completions_man_page_and_help_examples() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("complete") && bash.contains("maintain") && bash.contains("--gap"),
        "{bash}"
    );
    assert!(run(&["completions", "zsh"]).contains("#compdef sessionizer"));
    let man = run(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH sessionizer"),
        "{man}"
    );
    assert!(man.contains("sessionize") && man.contains("maintain"));
    for sub in [
        "sessionize",
        "generate-rows",
        "read-tables",
        "status",
        "query",
        "demo",
        "maintain",
        "completions",
        "man",
    ] {
        let help = run(&[sub, "--help"]);
        assert!(
            help.contains("Example"),
            "`{sub} --help` has an example:\n{help}"
        );
    }
}

#[test]
fn the_airflow_dag_parses_and_names_the_exit_codes() {
    let dag = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/airflow/sessionize_dag.py"
    );
    let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import ast, sys; ast.parse(open(sys.argv[1]).read())",
            dag,
        ])
        .output()
    else {
        eprintln!("SKIPPED: python3 is not installed, the DAG was not parsed");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dag).unwrap();
    for needle in [
        "EXIT_LOCKED = 75",
        "EXIT_USAGE = 2",
        "EXIT_FAILURE = 1",
        "AirflowFailException",
        "\"--output\",\n        \"json\"",
        "return summary",
    ] {
        assert!(text.contains(needle), "the DAG names `{needle}`");
    }
}

#[test]
fn the_cron_wrapper_keeps_summaries_and_treats_a_held_lock_as_normal() {
    let base = Base::new();
    base.gen_at(T0);
    let logs = tempfile::tempdir().unwrap();
    let wrapper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/cron/run-sessionizer.sh"
    );
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("bash");
        cmd.arg(wrapper)
            .arg("sessionize")
            .arg("--base-dir")
            .arg(base.path())
            .env("SESSIONIZER_BIN", bin())
            .env("SESSIONIZER_SUMMARY_DIR", logs.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let first = run(&[]);
    assert!(first.status.success(), "{first:?}");
    let summaries: Vec<_> = std::fs::read_dir(logs.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summaries[0]).unwrap()).unwrap();
    assert_eq!(s["rows_read"], 4);
    // A run that cannot get the lock (another holds it) is logged and exits 0.
    let mut pause = base.paused_run(8000);
    let locked = run(&[]);
    pause.wait().unwrap();
    assert!(locked.status.success(), "{locked:?}");
    let log = std::fs::read_to_string(logs.path().join("sessionize.log")).unwrap();
    assert!(log.contains("exit 75"), "{log}");
    // A usage error is passed on.
    let bad = run(&[("SESSIONIZER_GAP", "soon")]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
