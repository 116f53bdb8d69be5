//! Faults that schedulers really produce: a run frozen while another takes its lock over, a
//! checkpoint behind its outputs (lost or restored state, a lost checkpoint), changed rules,
//! and a refused first run. Every one ends with every event in exactly one session, or with a
//! refusal that wrote nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A run frozen at a pause point (as a stopped VM or SIGSTOP would leave it) until the test
/// wakes it.
pub struct Frozen {
    child: Child,
    wake: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Frozen {
    /// Starts `sessionize` with `args`, frozen at `point`, and returns once it got there.
    pub fn start(base: &Base, args: &[&str], point: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let wake = dir.path().join("wake");
        let child = Command::new(bin())
            .args(args)
            .arg("--base-dir")
            .arg(base.path())
            .envs(base.env.iter().map(|(k, v)| (k, v)))
            .env("SESSIONIZER_FAILPOINT", point)
            .env("SESSIONIZER_PAUSE_UNTIL", &wake)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let paused = dir.path().join("wake.paused");
        let start = Instant::now();
        while !paused.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the run never got to {point}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            wake,
            _dir: dir,
        }
    }

    /// Another run takes the checkpoint over (`--break-lock`) and finishes; then this one
    /// wakes. It must exit 75 and leave `state` (the output versions, the files...) as the
    /// takeover left it. Returns its stderr.
    pub fn taken_over<T: PartialEq + std::fmt::Debug>(
        self,
        base: &Base,
        what: &str,
        state: impl Fn(&Base) -> T,
    ) -> String {
        base.ok(&["sessionize", "--max-files-per-batch", "1", "--break-lock"]);
        let after_takeover = state(base);
        let (code, err) = self.wake();
        assert_eq!(code, Some(75), "{what}: the stale run must stop: {err}");
        assert_eq!(state(base), after_takeover, "{what}: the stale run wrote");
        err
    }

    /// Wakes the run and waits for it: exit code and stderr.
    pub fn wake(self) -> (Option<i32>, String) {
        std::fs::write(&self.wake, b"").unwrap();
        let out = self.child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Every event in exactly one session: no id twice, and the sessions hold every event.
fn assert_exactly_once(base: &Base) {
    let dup = sql(
        &base.table("sessions"),
        "SELECT session_id, count(*) FROM t GROUP BY session_id HAVING count(*) > 1",
    );
    assert!(dup.is_empty(), "duplicate session ids: {dup:?}");
    let events = sql(&base.table("events"), "SELECT count(*) AS n FROM t");
    let counted = sql(
        &base.table("sessions"),
        "SELECT CAST(sum(event_count) AS BIGINT) AS n FROM t",
    );
    assert_eq!(counted, events, "events in sessions vs events in the table");
}

/// Four commits of events spread over hours, sessionized in batches of one commit.
fn history(base: &Base) {
    for at in [
        "2026-02-15T10:00:00Z",
        "2026-02-15T10:40:00Z",
        "2026-02-15T11:30:00Z",
        "2026-02-15T12:30:00Z",
    ] {
        base.gen_at(at);
    }
}

const BATCHED: &[&str] = &["sessionize", "--max-files-per-batch", "1"];

/// A run frozen at `point` while another run (with `--break-lock`) takes the checkpoint over
/// and finishes, after `more` new events arrived; then the frozen run wakes. It must exit 75
/// having written nothing, and after a final flush every event is in exactly one session.
/// Returns its stderr.
fn frozen_and_taken_over(point: &str, more: bool) -> String {
    let base = Base::new();
    history(&base);
    let frozen = Frozen::start(&base, BATCHED, point);
    if more {
        base.gen_at("2026-02-15T13:30:00Z");
    }
    let err = frozen.taken_over(&base, point, output_versions);
    assert!(
        base.held_lock().is_none(),
        "the lock of the run that took over is released"
    );
    base.ok(&["sessionize", "--flush"]);
    assert_exactly_once(&base);
    err
}

#[test]
fn a_run_frozen_after_its_plan_is_fenced_when_it_wakes() {
    let err = frozen_and_taken_over("pause-after-plan", true);
    assert!(err.contains("lost the"), "{err}");
}

#[test]
fn a_run_frozen_between_its_fence_check_and_its_commit_cannot_land_it() {
    // Frozen right before its first commit, after its last ownership check: only the commit
    // itself can refuse it now.
    frozen_and_taken_over("pause-before-commit", true);
}

#[test]
fn a_run_frozen_before_any_work_whose_lock_was_taken_exits_75_too() {
    // Nothing is left for it to do when it wakes, but it was not the run that owned the
    // checkpoint.
    frozen_and_taken_over("pause-after-lock", false);
}

/// Every file under a table's folder, for checking that nothing was deleted.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn a_maintain_frozen_while_its_lock_is_taken_over_does_nothing_when_it_wakes() {
    let base = Base::new();
    history(&base);
    // One small sessions file per batch: work for OPTIMIZE, and old files for VACUUM.
    base.ok(BATCHED);
    let frozen = Frozen::start(
        &base,
        &["maintain", "--retention", "0s"],
        "pause-after-lock",
    );
    base.gen_at("2026-02-15T13:30:00Z");
    // Neither a commit nor a written or deleted file.
    let err = frozen.taken_over(&base, "maintain", |base| {
        (
            output_versions(base),
            ["sessions", "live_sessions", "checkpoint/state"].map(|t| files_under(&base.table(t))),
        )
    });
    assert!(err.contains("lost the"), "{err}");
    // The checkpoint goes on, and a maintain that keeps its lock still compacts.
    base.ok(&["sessionize", "--flush"]);
    assert_exactly_once(&base);
    let report = base
        .ok(&["maintain", "--retention", "0s", "--output", "json"])
        .json();
    assert!(
        report["tables"][0]["files_compacted"].as_u64().unwrap() > 1,
        "{report}"
    );
    assert_exactly_once(&base);
}

#[test]
fn lost_pending_state_is_refused_before_anything_is_written() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.ok(&["generate-rows", "--closing"]);
    base.ok(&["sessionize"]);
    std::fs::remove_dir_all(base.table("checkpoint/state")).unwrap();
    base.ok(&["generate-rows", "--closing"]);
    let before = output_versions(&base);
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    let err = out.stderr();
    assert!(
        err.contains("disagree") && err.contains("--sessions") && err.contains("restore"),
        "names the table and the ways out: {err}"
    );
    assert_eq!(output_versions(&base), before, "the refused run wrote");
    assert!(
        !base.table("checkpoint/state").exists(),
        "the refused run recreated the state"
    );
}

#[test]
fn a_checkpoint_restored_from_an_older_backup_is_refused() {
    let base = Base::new();
    base.gen_at("2026-02-15T10:00:00Z");
    base.ok(&["sessionize"]);
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&base.table("checkpoint"), backup.path());
    base.gen_at("2026-02-15T11:00:00Z");
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T12:00:00Z");
    base.ok(&["sessionize"]);
    std::fs::remove_dir_all(base.table("checkpoint")).unwrap();
    copy_dir(backup.path(), &base.table("checkpoint"));
    let before = output_versions(&base);
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("behind its outputs"),
        "{}",
        out.stderr()
    );
    assert_eq!(output_versions(&base), before);
}

#[test]
fn a_new_checkpoint_on_tables_another_checkpoint_wrote_is_refused() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.ok(&["generate-rows", "--closing"]);
    base.ok(&["sessionize"]);
    std::fs::remove_dir_all(base.table("checkpoint")).unwrap();
    let before = output_versions(&base);
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("another sessionizer checkpoint"),
        "{}",
        out.stderr()
    );
    assert_eq!(output_versions(&base), before);
    assert!(
        !base.table("checkpoint").exists(),
        "a refused first run leaves no checkpoint behind"
    );
}

#[test]
fn a_checkpoint_made_with_an_end_marker_refuses_a_run_without_it() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize", "--end-when", "page = 'page_1.html'"]);
    base.gen_at("2026-02-15T17:10:00Z");
    let before = output_versions(&base);
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("session rules") && out.stderr().contains("end-when"),
        "{}",
        out.stderr()
    );
    assert_eq!(output_versions(&base), before);
    // With the same rules it goes on.
    base.ok(&["sessionize", "--end-when", "page = 'page_1.html'"]);
}

#[test]
fn a_refused_first_run_writes_no_checkpoint() {
    let base = Base::new();
    base.gen_at(T0);
    let out = base.run(&["sessionize", "--gap", "10m", "--starting-version", "99"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        !base.table("checkpoint").exists(),
        "the refused run wrote into the checkpoint"
    );
    // The next plain run is not bound to the refused run's settings.
    base.ok(&["sessionize"]);
}

#[test]
fn sessions_cut_by_an_end_marker_at_one_instant_have_distinct_ids() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&[
        "sessionize",
        "--end-when",
        "page = 'page_1.html'",
        "--watermark-delay",
        "0s",
        "--flush",
    ]);
    let all = sql(&base.table("sessions"), "SELECT count(*) AS n FROM t");
    let distinct = sql(
        &base.table("sessions"),
        "SELECT count(DISTINCT session_id) AS n FROM t",
    );
    assert_eq!(all, distinct);
    assert_exactly_once(&base);
}

#[test]
fn non_deterministic_predicates_are_refused() {
    let base = Base::new();
    base.gen_at(T0);
    for (pred, name) in [("random() < 0.5", "random"), ("visit_time < now()", "now")] {
        let out = base.run(&["sessionize", "--end-when", pred]);
        assert_eq!(out.code(), 2, "{pred}: {}", out.stderr());
        assert!(
            out.stderr().contains(&format!("`{name}()`")),
            "{}",
            out.stderr()
        );
    }
    assert!(!base.table("checkpoint").exists());
}
