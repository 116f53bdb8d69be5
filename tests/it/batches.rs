//! Backlogs cut into batches: many small commits with --max-files-per-batch 1 end in the same
//! tables as one batch when no event is late; --starting-version skips history.

use crate::util::*;

fn backlog(base: &Base) {
    // Twelve commits, ten minutes apart: sessions of users 1-3 keep going, then a closing row.
    for i in 0..12 {
        let t = chrono::DateTime::parse_from_rfc3339("2026-02-15T08:00:00Z").unwrap()
            + chrono::Duration::minutes(10 * i + if i >= 6 { 60 } else { 0 });
        base.gen_at(&t.to_rfc3339());
    }
    base.ok(&["generate-rows", "--closing"]);
}

#[test]
fn many_small_batches_equal_one_big_batch() {
    let one = Base::new();
    backlog(&one);
    let s1 = one.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(s1["batches"], 1);

    let many = Base::new();
    backlog(&many);
    let s2 = many
        .ok(&[
            "sessionize",
            "--max-files-per-batch",
            "1",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(s2["batches"], 13, "one batch per data file: {s2}");
    assert_eq!(s2["rows_read"], s1["rows_read"]);
    assert_eq!(s2["rows_late"], 0);
    assert_eq!(s1["sessions_closed"], s2["sessions_closed"]);

    assert_eq!(one.rows("sessions"), many.rows("sessions"));
    assert_eq!(one.rows("live_sessions"), many.rows("live_sessions"));
    assert_eq!(one.rows("checkpoint/state"), many.rows("checkpoint/state"));
    // Two rounds of sessions per user (the 60-minute pause splits them).
    let counts = sql(
        &one.table("sessions"),
        "SELECT user_id, count(*) FROM t GROUP BY user_id",
    );
    assert_eq!(counts, vec!["1 | 2", "2 | 2", "3 | 2"]);
}

#[test]
fn max_bytes_per_batch_also_cuts_at_version_boundaries() {
    let base = Base::new();
    backlog(&base);
    let s = base
        .ok(&[
            "sessionize",
            "--max-bytes-per-batch",
            "1B",
            "--output",
            "json",
        ])
        .json();
    assert_eq!(s["batches"], 13, "each version alone exceeds 1 byte: {s}");
}

#[test]
fn starting_version_skips_older_history_for_a_new_checkpoint() {
    let base = Base::new();
    base.gen_at(T0); // versions 0 (create) and 1
    base.gen_at("2026-02-15T17:06:00Z"); // version 2
    let s = base
        .ok(&["sessionize", "--starting-version", "2", "--output", "json"])
        .json();
    assert_eq!(s["source_versions"], "2..2");
    assert_eq!(s["rows_read"], 4);
    // An existing checkpoint ignores it.
    base.gen_at("2026-02-15T17:07:00Z");
    let s = base
        .ok(&["sessionize", "--starting-version", "0", "--output", "json"])
        .json();
    assert_eq!(s["source_versions"], "3..3");
}

#[test]
fn starting_timestamp_picks_the_first_version_committed_at_or_after_it() {
    let base = Base::new();
    base.gen_at(T0); // versions 0 and 1
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cut = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    base.gen_at("2026-02-15T17:06:00Z"); // version 2
    let s = base
        .ok(&[
            "sessionize",
            "--starting-timestamp",
            &cut,
            "--output",
            "json",
        ])
        .json();
    assert_eq!(s["source_versions"], "2..2", "{s}");
    let both = base.run(&[
        "sessionize",
        "--starting-version",
        "1",
        "--starting-timestamp",
        &cut,
    ]);
    assert_eq!(both.code(), 2, "{}", both.stderr());
}

#[test]
fn key_buckets_of_any_size_give_the_same_tables() {
    let generate = |b: &Base| {
        b.ok(&[
            "generate-rows",
            "--rows",
            "30000",
            "--commits",
            "3",
            "--users",
            "900",
            "--seed",
            "11",
            "--at",
            "2026-02-15T00:00:00Z",
        ]);
    };
    let (one, many) = (Base::new(), Base::new());
    // The very same events table for both (file names are random, and the file order is part
    // of the tie-break that session ids hash).
    generate(&one);
    crate::util::copy_dir(&one.table("events"), &many.table("events"));
    let mut summaries = Vec::new();
    // One bucket per batch against the most buckets there can be (256, most nearly empty):
    // two batches each, then a flush.
    for (base, size) in [(&one, "1GiB"), (&many, "1B")] {
        let s = base
            .ok(&[
                "sessionize",
                "--max-files-per-batch",
                "2",
                "--bucket-size",
                size,
                "--output",
                "json",
            ])
            .json();
        assert_eq!(s["batches"], 2, "{s}");
        let f = base
            .ok(&[
                "sessionize",
                "--flush",
                "--bucket-size",
                size,
                "--output",
                "json",
            ])
            .json();
        summaries.push((s, f));
    }
    for key in [
        "rows_read",
        "rows_late",
        "sessions_closed",
        "sessions_pending",
    ] {
        assert_eq!(summaries[0].0[key], summaries[1].0[key], "{key}");
    }
    assert_eq!(summaries[0].0["rows_read"], 30000);
    assert!(summaries[0].0["sessions_pending"].as_u64().unwrap() > 0);
    assert_eq!(
        summaries[0].1["sessions_closed"],
        summaries[1].1["sessions_closed"]
    );
    let sessions = one.rows("sessions");
    assert!(sessions.len() > 900, "{} sessions", sessions.len());
    assert_eq!(sessions, many.rows("sessions"));
    assert_eq!(one.rows("live_sessions"), many.rows("live_sessions"));
    assert_eq!(one.rows("checkpoint/state"), many.rows("checkpoint/state"));
}

#[test]
fn live_files_written_by_a_delta_rs_merge_are_carried_over() {
    use datafusion::prelude::SessionContext;
    use sessionizer::config::TableLocation;

    // Earlier releases upserted the live table with delta-rs's own MERGE, whose files hold the
    // string columns as string views; later runs must carry such files over like their own.
    // A string key (sessions per page) makes the key filter read those columns too.
    let run = ["sessionize", "--key", "page", "--collect", "none"];
    let (plain, merged) = (Base::new(), Base::new());
    for b in [&plain, &merged] {
        b.gen_at(T0);
        b.ok(&run);
    }
    rt().block_on(async {
        let loc = TableLocation::from_path(&merged.table("live_sessions")).unwrap();
        let table = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        let source = SessionContext::new()
            .read_table(table.table_provider().await.unwrap())
            .unwrap();
        let (_, metrics) = table
            .merge(source, "target.page = source.page")
            .with_source_alias("source")
            .with_target_alias("target")
            .when_matched_update(|u| u.update("status", "source.status"))
            .unwrap()
            .await
            .unwrap();
        assert_eq!(metrics.num_target_rows_updated, 4);
    });
    assert_eq!(plain.rows("live_sessions"), merged.rows("live_sessions"));

    // One more event per page, then the closing event: both runs upsert over those files.
    for b in [&plain, &merged] {
        b.gen_at("2026-02-15T17:15:00Z");
        b.ok(&run);
        b.ok(&["generate-rows", "--closing"]);
        b.ok(&run);
    }
    let live = merged.rows("live_sessions");
    assert_eq!(live.len(), 4, "{live:?}");
    assert_eq!(plain.rows("live_sessions"), live);
    assert_eq!(plain.rows("sessions"), merged.rows("sessions"));

    // Each upsert rewrites the live table into at most one file per core, however many runs.
    for i in 0..5 {
        plain.gen_at(&format!("2026-02-15T19:{:02}:00Z", 10 * i));
        plain.ok(&run);
    }
    let files = rt().block_on(async {
        let loc = TableLocation::from_path(&plain.table("live_sessions")).unwrap();
        let table = sessionizer::delta::try_load(&loc).await.unwrap().unwrap();
        table.snapshot().unwrap().log_data().num_files()
    });
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    assert!((1..=cores).contains(&files), "{files} live files");
}
