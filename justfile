# The same commands as the README, for people who have `just`.

# The walkthrough on local tables under /tmp.
demo:
    cargo run -- demo

# The whole test suite.
test:
    cargo test

# Formatting, lints (warnings are errors) and tests.
check:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    cargo test

# The benchmark: 10M events by default; see scripts/bench.sh --help-free options.
bench:
    scripts/bench.sh
