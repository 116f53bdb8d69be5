//! Named crash points for the exactly-once tests.
//!
//! `SESSIONIZER_FAILPOINT=<name>` makes the process exit at once with code 101 when it reaches
//! that point: `std::process::exit` runs no destructors of the current stack, flushes nothing
//! we hold, and releases no lock, which is what a `kill -9` at that instant would leave behind.

/// Exits the process with code 101 if `SESSIONIZER_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if let Ok(want) = std::env::var("SESSIONIZER_FAILPOINT")
        && want == name
    {
        eprintln!("sessionizer: failpoint `{name}` hit, exiting with code 101");
        std::process::exit(101);
    }
}

/// For the concurrency and fencing tests: `SESSIONIZER_FAILPOINT=pause-after-lock` (or
/// `pause-after-plan`, `pause-before-commit` (the first commit after the fence check),
/// `pause-before-commit-to-<table folder>`, e.g. `pause-before-commit-to-live_sessions`)
/// stops the run there for `SESSIONIZER_PAUSE_MS`
/// (default 3000) milliseconds, as a frozen process would, so that another run can be started
/// meanwhile (see also `SESSIONIZER_PAUSE_UNTIL` below).
pub async fn pause(name: &str) {
    if let Ok(want) = std::env::var("SESSIONIZER_FAILPOINT")
        && want == name
    {
        tracing::warn!(
            failpoint = name,
            "paused at a test failpoint (SESSIONIZER_FAILPOINT)"
        );
        // With SESSIONIZER_PAUSE_UNTIL=<file>, the pause lasts until that file exists (up to
        // five minutes): a test then decides exactly when the frozen run wakes up. The run
        // creates `<file>.paused` when it stops, so the test knows it got there.
        if let Ok(file) = std::env::var("SESSIONIZER_PAUSE_UNTIL") {
            let _ = std::fs::write(format!("{file}.paused"), b"");
            let start = std::time::Instant::now();
            while !std::path::Path::new(&file).exists() && start.elapsed().as_secs() < 300 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            return;
        }
        let ms = std::env::var("SESSIONIZER_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
