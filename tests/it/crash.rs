//! Exactly-once across crashes: for every failpoint, and for SIGKILL at several moments, a
//! crashed run followed by a plain rerun leaves the same sessions, live and pending tables as a
//! run that was never interrupted, and no session twice.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// History before the interrupted run: two commits whose sessions stay pending.
pub fn prepare(base: &Base) {
    base.gen_at("2026-02-15T10:00:00Z");
    base.gen_at("2026-02-15T10:05:00Z");
    base.ok(&["sessionize"]);
    // The interrupted run sees three more commits: the first closes every session, the last
    // closes the second round, in three batches.
    base.gen_at("2026-02-15T11:00:00Z");
    base.gen_at("2026-02-15T11:10:00Z");
    base.ok(&["generate-rows", "--closing"]);
}

pub const RUN: &[&str] = &[
    "sessionize",
    "--max-files-per-batch",
    "1",
    "--output",
    "json",
];

pub struct Snapshot {
    pub sessions: Vec<String>,
    live: Vec<String>,
    pending: Vec<String>,
}

pub fn snapshot(base: &Base) -> Snapshot {
    let dup = sql(
        &base.table("sessions"),
        "SELECT session_id, count(*) FROM t GROUP BY session_id HAVING count(*) > 1",
    );
    assert!(dup.is_empty(), "duplicate sessions: {dup:?}");
    Snapshot {
        sessions: base.rows("sessions"),
        live: base.rows("live_sessions"),
        pending: base.rows("checkpoint/state"),
    }
}

pub fn assert_same(clean: &Snapshot, other: &Snapshot, what: &str) {
    assert_eq!(
        clean.sessions, other.sessions,
        "sessions differ after {what}"
    );
    assert_eq!(clean.live, other.live, "live differs after {what}");
    assert_eq!(clean.pending, other.pending, "pending differs after {what}");
}

pub fn clean_run() -> Snapshot {
    let base = Base::new();
    prepare(&base);
    let s = base.ok(RUN).json();
    assert_eq!(s["batches"], 3, "{s}");
    assert_eq!(s["sessions_closed"], 6, "{s}");
    let snap = snapshot(&base);
    assert_eq!(snap.sessions.len(), 6);
    snap
}

#[test]
fn every_failpoint_then_a_rerun_equals_an_uninterrupted_run() {
    let clean = clean_run();
    for fp in [
        "after-plan",
        "after-read",
        "after-sessions-commit",
        "after-live-commit",
        "after-state-commit",
        "after-batch-1",
        "after-batch-2",
    ] {
        let base = Base::new();
        prepare(&base);
        let crashed = base.run_env(RUN, &[("SESSIONIZER_FAILPOINT", fp)]);
        assert_eq!(
            crashed.code(),
            101,
            "failpoint {fp} should exit 101: {}",
            crashed.stderr()
        );
        assert!(crashed.stderr().contains(fp), "{}", crashed.stderr());
        let rerun = base.ok(RUN).json();
        assert!(rerun["batches"].as_u64().unwrap() >= 1, "{rerun}");
        assert_same(&clean, &snapshot(&base), fp);
        // And a further run finds nothing to do.
        let idle = base.ok(RUN).json();
        assert_eq!(idle["batches"], 0, "{idle}");
    }
}

#[test]
fn sigkill_at_random_moments_then_a_rerun_equals_an_uninterrupted_run() {
    let clean = clean_run();
    for delay_ms in [5u64, 60, 150, 300, 600] {
        let base = Base::new();
        prepare(&base);
        let mut child = Command::new(bin())
            .args(RUN)
            .arg("--base-dir")
            .arg(base.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL on Unix
        let _ = child.wait();
        base.ok(RUN);
        assert_same(
            &clean,
            &snapshot(&base),
            &format!("SIGKILL at {delay_ms} ms"),
        );
    }
}
