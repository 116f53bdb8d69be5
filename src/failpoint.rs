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

/// For the concurrency tests: `SESSIONIZER_FAILPOINT=pause-after-lock` holds the lock for
/// `SESSIONIZER_PAUSE_MS` (default 3000) milliseconds before working, so that a second run
/// can be started while the first one surely holds it.
pub async fn pause(name: &str) {
    if let Ok(want) = std::env::var("SESSIONIZER_FAILPOINT")
        && want == name
    {
        let ms = std::env::var("SESSIONIZER_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
