//! Help texts and error messages, as snapshots (`insta`, in `tests/it/snapshots/`): a change to
//! what a user reads shows up in review. The run's folder, times, uuids and session ids are
//! filtered out. After an intended change: `INSTA_UPDATE=always cargo test --test it help`,
//! then review the `.snap` diff.

use crate::util::*;

/// Asserts `text` against snapshot `name`, with `base`'s folder and volatile values replaced.
fn snapshot(name: &str, text: &str, base: &Base) {
    let dir = base
        .path()
        .to_string_lossy()
        .trim_end_matches('/')
        .to_string();
    let text = text.replace(&dir, "[BASE]");
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("snapshots");
    settings.set_prepend_module_to_snapshot(false);
    for (re, with) in [
        (
            r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?",
            "[TIME]",
        ),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[UUID]",
        ),
        (r"\b[0-9a-f]{32}\b", "[ID]"),
        (r"pid \d+", "pid [PID]"),
    ] {
        settings.add_filter(re, with);
    }
    settings.bind(|| insta::assert_snapshot!(name, text));
}

#[test]
fn help_texts_read_in_groups_and_end_with_examples() {
    let base = Base::new();
    let help = base.ok(&["sessionize", "--help"]).stdout();
    // Most-used first, the global flags last.
    let at = |h: &str| help.find(h).unwrap_or_else(|| panic!("no `{h}` in {help}"));
    assert!(at("Tables:") < at("Session rules:"));
    assert!(at("Session rules:") < at("Batches and backfill:"));
    assert!(at("Batches and backfill:") < at("Output and logs:"));
    assert!(at("Output and logs:") < at("Global:"));
    assert!(at("--events") < at("--sessions") && at("--sessions") < at("--verbose"));
    assert!(at("Examples:") > at("Global:"));
    snapshot("sessionize_help", &help, &base);
    snapshot("top_help", &base.ok(&["--help"]).stdout(), &base);
}

#[test]
fn error_messages_name_the_thing_and_the_fix() {
    let base = Base::new();
    base.gen_at(T0);
    let cases: &[(&str, &[&str])] = &[
        ("error_bad_gap", &["sessionize", "--gap", "10x"]),
        ("error_missing_key", &["sessionize", "--key", "account"]),
        (
            "error_volatile_predicate",
            &["sessionize", "--end-when", "random() < 0.5"],
        ),
        (
            "error_query_writes",
            &["query", "INSERT INTO events VALUES (1, now(), 'x')"],
        ),
    ];
    for (name, args) in cases {
        let out = base.run(args);
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr());
        snapshot(name, &out.stderr(), &base);
    }
    // A checkpoint that disagrees with its outputs.
    base.ok(&["sessionize"]);
    base.ok(&["generate-rows", "--closing"]);
    base.ok(&["sessionize"]);
    std::fs::remove_dir_all(base.table("checkpoint")).unwrap();
    let out = base.run(&["sessionize"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    snapshot("error_foreign_outputs", &out.stderr(), &base);
}
