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
