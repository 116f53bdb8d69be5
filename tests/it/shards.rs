//! More than one machine: `--shards N --shard I` runs, started side by side as separate
//! processes, write one set of tables that equals one unsharded run over the same batches.

use std::process::{Command, Stdio};

use crate::util::*;

fn generate(base: &Base) {
    generate_with(base, &[]);
}

/// [`generate`]'s events, with more `generate-rows` flags.
fn generate_with(base: &Base, extra: &[&str]) {
    let args = [
        "generate-rows",
        "--rows",
        "6000",
        "--commits",
        "4",
        "--users",
        "300",
        "--seed",
        "5",
        "--at",
        "2026-02-15T00:00:00Z",
    ];
    base.ok(&[&args[..], extra].concat());
}

/// Runs `sessionize` for every shard at once, as separate processes, and checks they succeed.
fn all_shards(base: &Base, n: u32, extra: &[&str]) -> Vec<serde_json::Value> {
    some_shards(base, n, &(0..n).collect::<Vec<_>>(), extra)
}

/// [`all_shards`] for the shards in `which` only.
fn some_shards(base: &Base, n: u32, which: &[u32], extra: &[&str]) -> Vec<serde_json::Value> {
    let children: Vec<_> = which
        .iter()
        .map(|i| {
            Command::new(bin())
                .args(["sessionize", "--output", "json", "--base-dir"])
                .arg(base.path())
                .args(["--shards", &n.to_string(), "--shard", &i.to_string()])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "a shard failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

const LIVE: &str =
    "SELECT user_id, session_id, start_time, end_time, event_count, status FROM t ORDER BY user_id";

#[test]
fn four_shards_side_by_side_equal_one_unsharded_run() {
    let (one, four) = (Base::new(), Base::new());
    generate(&one);
    copy_dir(&one.table("events"), &four.table("events"));
    let late_one = one.table("late");
    let late_four = four.table("late");
    let batches = ["--max-files-per-batch", "1"];

    let whole = one
        .ok(&[
            "sessionize",
            "--output",
            "json",
            "--max-files-per-batch",
            "1",
            "--late-events",
            late_one.to_str().unwrap(),
        ])
        .json();
    let mut extra: Vec<&str> = batches.to_vec();
    extra.extend(["--late-events", late_four.to_str().unwrap()]);
    let parts = all_shards(&four, 4, &extra);
    let sum = |k: &str| parts.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("rows_read"), whole["rows_read"].as_u64().unwrap());
    assert_eq!(
        sum("sessions_closed"),
        whole["sessions_closed"].as_u64().unwrap()
    );
    assert!(
        parts.iter().all(|p| p["rows_read"].as_u64().unwrap() > 0),
        "{parts:?}"
    );
    // One watermark for all: every shard computed it from every key's events.
    assert!(
        parts.iter().all(|p| p["watermark"] == whole["watermark"]),
        "{parts:?}"
    );
    assert_eq!(one.rows("sessions"), four.rows("sessions"));
    assert_eq!(
        sql(&one.table("live_sessions"), LIVE),
        sql(&four.table("live_sessions"), LIVE)
    );

    // More events, then everything closed: still the same.
    for b in [&one, &four] {
        b.ok(&["generate-rows", "--closing"]);
    }
    one.ok(&[
        "sessionize",
        "--flush",
        "--late-events",
        late_one.to_str().unwrap(),
    ]);
    let mut extra = vec!["--flush", "--late-events", late_four.to_str().unwrap()];
    extra.extend(batches);
    some_shards(&four, 4, &[0, 1, 3], &extra);
    // Shard 2 is killed mid-batch (after its sessions commit), and is then behind.
    let mut crashed = vec!["sessionize", "--shards", "4", "--shard", "2"];
    crashed.extend(&extra);
    let out = four.run_env(
        &crashed,
        &[("SESSIONIZER_FAILPOINT", "after-sessions-commit")],
    );
    assert_eq!(out.code(), 101, "{}", out.stderr());
    let status = four
        .ok(&["status", "--shards", "4", "--output", "json"])
        .json();
    assert_eq!(status["behind"], 2, "{status}");
    assert!(status["spread_versions"].as_u64().unwrap() > 0, "{status}");
    // Rerun as it is: the same tables as one unsharded run.
    some_shards(&four, 4, &[2], &extra);
    let status = four
        .ok(&["status", "--shards", "4", "--output", "json"])
        .json();
    assert!(status["behind"].is_null(), "{status}");
    assert_eq!(one.rows("sessions"), four.rows("sessions"));
    assert_eq!(
        sql(&one.table("live_sessions"), LIVE),
        sql(&four.table("live_sessions"), LIVE)
    );
    let dup = sql(
        &four.table("sessions"),
        "SELECT session_id FROM t GROUP BY session_id HAVING count(*) > 1",
    );
    assert!(dup.is_empty(), "{dup:?}");
    // The live table is partitioned by shard, one partition per shard.
    let shards = sql(
        &four.table("live_sessions"),
        "SELECT DISTINCT shard FROM t ORDER BY shard",
    );
    assert_eq!(shards, vec!["0", "1", "2", "3"]);
}

#[test]
fn a_shard_flag_without_a_count_or_out_of_range_is_a_usage_error() {
    let base = Base::new();
    base.gen_at(T0);
    for args in [
        &["sessionize", "--shard", "1"][..],
        &["sessionize", "--shards", "4", "--shard", "4"],
        &["sessionize", "--shards", "4"],
    ] {
        let out = base.run(args);
        assert_eq!(out.code(), 2, "{args:?}: {}", out.stderr());
        assert!(out.stderr().contains("--shard"), "{}", out.stderr());
    }
    // Under a Kubernetes Indexed Job the index comes from JOB_COMPLETION_INDEX.
    let out = base.run_env(
        &["sessionize", "--shards", "2", "--output", "json"],
        &[("JOB_COMPLETION_INDEX", "1")],
    );
    assert_eq!(out.code(), 0, "{}", out.stderr());
    assert!(base.table("checkpoint/shard-1-of-2/_sessionizer").exists());
    // The live table is laid out per shard: an unsharded run on it is refused, and the other
    // way round (here already as tables another checkpoint wrote).
    let out = base.run(&[
        "sessionize",
        "--checkpoint",
        base.table("cp2").to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    let other = Base::new();
    other.gen_at(T0);
    other.ok(&["sessionize"]);
    let out = other.run(&["sessionize", "--shards", "2", "--shard", "0"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
}

#[test]
fn reshard_four_to_three_then_more_events_equals_one_unsharded_run() {
    let (one, many) = (Base::new(), Base::new());
    generate(&one);
    copy_dir(&one.table("events"), &many.table("events"));
    one.ok(&["sessionize"]);
    all_shards(&many, 4, &[]);
    // A reshard killed half-way (after the new states, then after the live table) leaves
    // tables no run can write to, and the same command then finishes the job.
    for point in ["reshard-after-states", "reshard-after-live"] {
        let out = many.run_env(
            &["reshard", "--shards", "4", "--to", "3"],
            &[("SESSIONIZER_FAILPOINT", point)],
        );
        assert_eq!(out.code(), 101, "{point}: {}", out.stderr());
        let old = many.run(&["sessionize", "--shards", "4", "--shard", "1"]);
        assert_eq!(old.code(), 2, "{point}: {}", old.stderr());
        let new = many.run(&["sessionize", "--shards", "3", "--shard", "1"]);
        assert_eq!(new.code(), 2, "{point}: {}", new.stderr());
    }
    let r = many
        .ok(&["reshard", "--shards", "4", "--to", "3", "--output", "json"])
        .json();
    assert!(r["pending_events"].as_u64().unwrap() > 0, "{r}");
    assert!(r["live_rows"].as_u64().unwrap() > 0, "{r}");
    // The old shards are retired: a run on them is refused, and writes nothing.
    let before = output_versions(&many);
    let out = many.run(&["sessionize", "--shards", "4", "--shard", "0"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("reshard"), "{}", out.stderr());
    assert_eq!(output_versions(&many), before);
    // More events, three shards, then everything closed: the same as one unsharded run.
    for b in [&one, &many] {
        b.gen_at("2026-02-15T11:00:00Z");
        b.ok(&["generate-rows", "--closing"]);
    }
    one.ok(&["sessionize", "--flush"]);
    all_shards(&many, 3, &["--flush"]);
    assert_eq!(one.rows("sessions"), many.rows("sessions"));
    assert_eq!(
        sql(&one.table("live_sessions"), LIVE),
        sql(&many.table("live_sessions"), LIVE)
    );
    let shards = sql(
        &many.table("live_sessions"),
        "SELECT DISTINCT shard FROM t ORDER BY shard",
    );
    assert_eq!(shards, vec!["0", "1", "2"]);
    let status = many
        .ok(&["status", "--shards", "3", "--output", "json"])
        .json();
    assert!(status["behind"].is_null(), "{status}");
}

#[test]
fn reshard_refuses_shards_at_different_versions() {
    let base = Base::new();
    generate(&base);
    all_shards(&base, 2, &[]);
    base.ok(&["generate-rows", "--closing"]);
    base.ok(&["sessionize", "--shards", "2", "--shard", "0"]);
    let out = base.run(&["reshard", "--shards", "2", "--to", "3"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("same events version"),
        "{}",
        out.stderr()
    );
    // Nothing changed: shard 1 still runs.
    base.ok(&["sessionize", "--shards", "2", "--shard", "1"]);
}

/// The flags of a shard that skips other shards' files: the events carry Spark's
/// `pmod(xxhash64(user_id), 16)` in `bucket`, and are partitioned by it.
const BUCKETS: [&str; 4] = ["--key-buckets", "16", "--bucket-column", "bucket"];

#[test]
fn key_bucket_shards_read_only_their_files_and_equal_one_unsharded_run() {
    let (one, four) = (Base::new(), Base::new());
    generate_with(&one, &["--key-buckets", "16"]);
    copy_dir(&one.table("events"), &four.table("events"));
    let (late_one, late_four) = (one.table("late"), four.table("late"));
    let whole = one
        .ok(&[
            "sessionize",
            "--output",
            "json",
            "--max-files-per-batch",
            "1",
            "--late-events",
            late_one.to_str().unwrap(),
        ])
        .json();
    // 4 commits of 16 bucket partitions: 64 files, a shard of 4 owns 4 buckets of each commit.
    assert_eq!(whole["files_read"], 64, "{whole}");
    let mut extra = vec![
        "--max-files-per-batch",
        "1",
        "--late-events",
        late_four.to_str().unwrap(),
    ];
    extra.extend(BUCKETS);
    let parts = all_shards(&four, 4, &extra);
    for p in &parts {
        assert_eq!(p["files_read"], 16, "{p}");
        assert_eq!(p["files_watermark_only"], 48, "{p}");
        // One watermark for all, though each shard decoded a quarter of the files.
        assert_eq!(p["watermark"], whole["watermark"], "{p}");
    }
    let sum = |k: &str| parts.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("rows_read"), whole["rows_read"].as_u64().unwrap());
    assert_eq!(one.rows("sessions"), four.rows("sessions"));
    assert_eq!(
        sql(&one.table("live_sessions"), LIVE),
        sql(&four.table("live_sessions"), LIVE)
    );

    // A commit of events from a client clock in 2099: the event-time guard takes them out, so
    // the footers' maxima cannot give the other shards' files their latest kept time, and
    // those files' times are read; the watermark still stays where the unsharded run keeps it.
    for b in [&one, &four] {
        b.ok(&[
            "generate-rows",
            "--users",
            "40",
            "--per-user",
            "2",
            "--at",
            "2099-01-01T00:00:00Z",
            "--key-buckets",
            "16",
        ]);
    }
    let whole = one.ok(&["sessionize", "--output", "json"]).json();
    assert_eq!(whole["rows_invalid"], 80, "{whole}");
    let parts = all_shards(&four, 4, &BUCKETS);
    for p in &parts {
        assert_eq!(p["watermark"], whole["watermark"], "{p}");
        assert!(p["files_watermark_only"].as_u64().unwrap() > 0, "{p}");
    }
    let sum = |k: &str| parts.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("rows_invalid"), 80);

    // Reshard 4 -> 3 by the same buckets, more events, everything closed: still the same.
    four.ok(&["reshard", "--shards", "4", "--to", "3"]);
    for b in [&one, &four] {
        b.ok(&["generate-rows", "--closing", "--key-buckets", "16"]);
    }
    one.ok(&["sessionize", "--flush"]);
    let mut extra = vec!["--flush"];
    extra.extend(BUCKETS);
    all_shards(&four, 3, &extra);
    assert_eq!(one.rows("sessions"), four.rows("sessions"));
    assert_eq!(
        sql(&one.table("live_sessions"), LIVE),
        sql(&four.table("live_sessions"), LIVE)
    );
    // The checkpoints recorded the bucket function: a shard run without it is refused.
    let out = four.run(&["sessionize", "--shards", "3", "--shard", "0"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("--key-buckets"), "{}", out.stderr());
}

#[test]
fn a_bucket_column_that_does_not_hold_the_keys_bucket_is_refused_before_any_write() {
    let base = Base::new();
    base.ok(&[
        "generate-rows",
        "--rows",
        "2000",
        "--users",
        "100",
        "--at",
        "2026-02-15T00:00:00Z",
        "--key-buckets",
        "16",
    ]);
    // The writer used B = 16; shards told 8 find a row whose bucket is not pmod(xxhash64, 8).
    for i in 0..2 {
        let out = base.run(&[
            "sessionize",
            "--shards",
            "2",
            "--shard",
            &i.to_string(),
            "--key-buckets",
            "8",
            "--bucket-column",
            "bucket",
        ]);
        assert_eq!(out.code(), 2, "{}", out.stderr());
        assert!(
            out.stderr().contains("pmod(xxhash64(user_id), 8)"),
            "{}",
            out.stderr()
        );
    }
    // A refused run leaves no trace: no table, no checkpoint identity (only its released lock).
    assert_eq!(output_versions(&base), [None, None, None]);
    let identity = base
        .path()
        .join("checkpoint/shard-0-of-2/_sessionizer/checkpoint.json");
    assert!(!identity.exists());
    // A shard that starts with other flags than its sibling is refused, naming the sibling's.
    base.ok(&[
        "sessionize",
        "--shards",
        "2",
        "--shard",
        "0",
        "--key-buckets",
        "16",
        "--bucket-column",
        "bucket",
    ]);
    let out = base.run(&["sessionize", "--shards", "2", "--shard", "1"]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(
        out.stderr().contains("--key-buckets 16"),
        "{}",
        out.stderr()
    );
}

#[test]
fn clustered_key_buckets_are_skipped_by_their_file_statistics() {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray};

    use crate::models::{append, ts_utc};

    let (one, four) = (Base::new(), Base::new());
    // 400 users with string ids, 3 events each. Commit c holds the users of buckets 2c and 2c+1
    // of 8, in a table not partitioned by bucket: each file's min and max of `kb` span two
    // buckets, as after OPTIMIZE ... ZORDER BY (kb). Shard s of 4 owns buckets s and s + 4.
    let users: Vec<String> = (0..400).map(|u| format!("user-{u}")).collect();
    let ids: ArrayRef = Arc::new(StringArray::from(users.clone()));
    let buckets = sessionizer::engine::spark_buckets(&[ids], 8).unwrap();
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-02-15T00:00:00Z")
        .unwrap()
        .timestamp_micros();
    for c in 0..4i64 {
        let (mut who, mut at, mut kb) = (Vec::new(), Vec::new(), Vec::new());
        for (i, user) in users.iter().enumerate() {
            if buckets[i] / 2 != c {
                continue;
            }
            for e in 0..3 {
                who.push(user.clone());
                at.push(t0 + (c * 3 + e) * 20 * 60_000_000 + i as i64 * 1_000_000);
                kb.push(buckets[i]);
            }
        }
        for b in [&one, &four] {
            append(
                &b.table("events"),
                vec![
                    ("user", Arc::new(StringArray::from(who.clone())) as ArrayRef),
                    ("visit_time", ts_utc(at.clone())),
                    ("kb", Arc::new(Int64Array::from(kb.clone())) as ArrayRef),
                ],
            );
        }
    }
    let whole = one
        .ok(&["sessionize", "--key", "user", "--output", "json"])
        .json();
    let parts = all_shards(
        &four,
        4,
        &[
            "--key",
            "user",
            "--key-buckets",
            "8",
            "--bucket-column",
            "kb",
        ],
    );
    for p in &parts {
        assert_eq!(
            (p["files_read"].as_u64(), p["files_watermark_only"].as_u64()),
            (Some(2), Some(2)),
            "{p}"
        );
        assert_eq!(p["watermark"], whole["watermark"], "{p}");
    }
    let sum = |k: &str| parts.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("rows_read"), 1200);
    assert_eq!(one.rows("sessions"), four.rows("sessions"));
    let live = "SELECT user, session_id, start_time, event_count FROM t ORDER BY user";
    assert_eq!(
        sql(&one.table("live_sessions"), live),
        sql(&four.table("live_sessions"), live)
    );
}

#[test]
fn a_layout_that_no_shard_can_skip_is_named_in_a_warning() {
    // Key buckets written but the table neither partitioned nor clustered by them: the one
    // file holds every bucket, so every shard decodes it, and says so.
    let base = Base::new();
    every_bucket_in_one_file(&base);
    let out = base.ok(&[
        "sessionize",
        "--output",
        "json",
        "--shards",
        "2",
        "--shard",
        "0",
        "--key-buckets",
        "8",
        "--bucket-column",
        "kb",
    ]);
    assert!(
        out.stderr()
            .contains("1 of 1 new data files may hold the keys of every shard"),
        "{}",
        out.stderr()
    );
    let s = out.json();
    assert_eq!(
        (s["files_read"].as_u64(), s["files_watermark_only"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
}

#[test]
fn a_log_whose_bucket_statistics_disagree_with_the_data_is_refused() {
    // One unpartitioned file of every bucket of 8; then its log entry is edited to claim
    // buckets 4..=7 only (a writer or a tool that recorded statistics of other data). Shard 1
    // of 4 (buckets 1 and 5) reads it on the log's word and finds a row of bucket 0..3:
    // trusting the log would have lost that row to every shard.
    let base = Base::new();
    let kb = every_bucket_in_one_file(&base);
    assert!(kb.iter().any(|&b| b < 4));
    let log = base.table("events").join("_delta_log");
    let mut edited = 0;
    for entry in std::fs::read_dir(&log).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let mut action: serde_json::Value = serde_json::from_str(line).unwrap();
                if let Some(stats) = action["add"]["stats"].as_str() {
                    let mut stats: serde_json::Value = serde_json::from_str(stats).unwrap();
                    stats["minValues"]["kb"] = 4.into();
                    action["add"]["stats"] = stats.to_string().into();
                    edited += 1;
                }
                action.to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }
    assert_eq!(edited, 1);
    let out = base.run(&[
        "sessionize",
        "--shards",
        "4",
        "--shard",
        "1",
        "--key-buckets",
        "8",
        "--bucket-column",
        "kb",
    ]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("buckets 4..=7"), "{}", out.stderr());
    assert_eq!(output_versions(&base), [None, None, None]);
}

/// Events of users 1..=60 in one unpartitioned file, with their bucket of 8 in `kb` (so every
/// bucket is in it); returns the buckets.
fn every_bucket_in_one_file(base: &Base) -> Vec<i64> {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array};

    use crate::models::{append, ts_utc};

    let users: Vec<i64> = (1..=60).collect();
    let ids: ArrayRef = Arc::new(Int64Array::from(users.clone()));
    let kb = sessionizer::engine::spark_buckets(std::slice::from_ref(&ids), 8).unwrap();
    let t0 = 1_771_113_600_000_000i64; // 2026-02-15T00:00:00Z
    let times = users.iter().map(|u| t0 + u * 1_000_000).collect();
    append(
        &base.table("events"),
        vec![
            ("user_id", ids),
            ("visit_time", ts_utc(times)),
            ("kb", Arc::new(Int64Array::from(kb.clone())) as ArrayRef),
        ],
    );
    kb
}
