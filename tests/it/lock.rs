//! Two runs on one checkpoint: one proceeds, the other exits 75 having written nothing.
//! Stale locks (dead holder, expired heartbeat) are taken over; --break-lock forces it.

use crate::util::*;

/// Writes lock epoch 1 as another process would have left it.
fn write_lock(base: &Base, host: &str, pid: u32, expires: chrono::DateTime<chrono::Utc>) {
    let dir = base.table("checkpoint/_sessionizer/lock");
    std::fs::create_dir_all(&dir).unwrap();
    let epoch = std::fs::read_dir(&dir).unwrap().count() as u64 + 1;
    let body = serde_json::json!({
        "epoch": epoch,
        "token": "someone-else",
        "host": host,
        "pid": pid,
        "boot_id": std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim(),
        "pid_ns": std::fs::read_link("/proc/self/ns/pid").unwrap().to_string_lossy(),
        "started": 0,
        "since": "2026-02-15T10:00:00Z",
        "expires_at": expires.to_rfc3339(),
    });
    std::fs::write(dir.join(format!("{epoch:020}.json")), body.to_string()).unwrap();
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_second_concurrent_run_exits_75_and_writes_nothing() {
    let base = Base::new();
    base.gen_at(T0);
    base.ok(&["sessionize"]);
    base.gen_at("2026-02-15T17:06:00Z");
    let before = output_versions(&base);

    let mut first = base.paused_run(8000);
    let second = base.run(&["sessionize"]);
    assert_eq!(second.code(), 75, "{}", second.stderr());
    let err = second.stderr();
    assert!(
        err.contains("another run holds the checkpoint")
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    assert!(err.contains("since"), "says since when: {err}");
    assert_eq!(
        output_versions(&base),
        before,
        "the refused run wrote nothing"
    );

    assert!(first.wait().unwrap().success());
    assert_ne!(
        output_versions(&base)[2],
        before[2],
        "the first run committed"
    );
    assert!(base.held_lock().is_none(), "the lock is released");
}

#[test]
fn a_lock_left_by_a_dead_process_on_this_host_is_taken_over() {
    let base = Base::new();
    base.gen_at(T0);
    // A pid that is not running: the largest possible pid is far above any live one here.
    write_lock(
        &base,
        &this_host(),
        4_194_000,
        chrono::Utc::now() + chrono::Duration::minutes(5),
    );
    let took = base.ok(&["sessionize"]);
    assert!(
        took.stderr().contains("WARN") && took.stderr().contains("taking over a stale"),
        "taking a dead run's lock is worth a warning:\n{}",
        took.stderr()
    );
    // The next run takes the lock the last one released: the normal case, no warning.
    base.gen_at("2026-02-15T17:06:00Z");
    let next = base.ok(&["sessionize"]);
    assert!(
        !next.stderr().contains("WARN"),
        "a released lock is taken without a warning:\n{}",
        next.stderr()
    );
}

#[test]
fn an_expired_lock_is_taken_over_and_a_live_one_needs_break_lock() {
    let base = Base::new();
    base.gen_at(T0);
    write_lock(
        &base,
        "other-host",
        1,
        chrono::Utc::now() - chrono::Duration::minutes(1),
    );
    base.ok(&["sessionize"]);

    base.gen_at("2026-02-15T17:06:00Z");
    write_lock(
        &base,
        "other-host",
        1,
        chrono::Utc::now() + chrono::Duration::minutes(5),
    );
    let refused = base.run(&["sessionize"]);
    assert_eq!(refused.code(), 75, "{}", refused.stderr());
    assert!(
        refused.stderr().contains("--break-lock"),
        "{}",
        refused.stderr()
    );
    base.ok(&["sessionize", "--break-lock"]);
}
