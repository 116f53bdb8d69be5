//! `--live-mode deletion-vectors`: the live table upserted with deletion vectors holds the
//! rows the rewrite mode leaves, one per key, after many ticks, mode switches, crashes and
//! replays, and shards; read through delta-rs (Rust) and python deltalake. `maintain` purges
//! the deletion vectors.

use std::path::Path;
use std::process::Command;

use crate::crash;
use crate::fencing::Frozen;
use crate::util::*;

const DV: (&str, &str) = ("SESSIONIZER_LIVE_MODE", "deletion-vectors");
/// `generate-rows`' default `--seed`.
const GENERATE_SEED: u32 = 42;

/// One commit of events: `users` users (ids 1..=users) with two events each, at `minute`
/// past 10:00.
fn generate(base: &Base, users: u32, minute: u32, seed: u32) {
    base.ok(&[
        "generate-rows",
        "--users",
        &users.to_string(),
        "--per-user",
        "2",
        "--seed",
        &seed.to_string(),
        "--at",
        &format!("2026-02-15T{:02}:{:02}:00Z", 10 + minute / 60, minute % 60),
    ]);
}

/// One tick: [`generate`], then a sessionize.
fn tick(base: &Base, users: u32, minute: u32, seed: u32) -> serde_json::Value {
    generate(base, users, minute, seed);
    base.ok(&["sessionize", "--output", "json"]).json()
}

/// Files of the table's current version that carry a deletion vector.
fn files_with_dv(table: &Path) -> usize {
    load(table)
        .snapshot()
        .unwrap()
        .log_data()
        .iter()
        .filter(|f| f.deletion_vector_descriptor().is_some())
        .count()
}

/// Every log entry of the live table of this kind (`add`, `remove`), across all commits.
fn log_entries(table: &Path, kind: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(a) = v.get(kind) {
                out.push(a.clone());
            }
        }
    }
    out
}

/// Adds that carry a deletion vector, over the whole log.
fn dv_adds(table: &Path) -> usize {
    log_entries(table, "add")
        .iter()
        .filter(|a| a.get("deletionVector").is_some_and(|d| !d.is_null()))
        .count()
}

/// The files of the table's current version (adds not removed since), keyed by path + DV.
fn active_files(table: &Path) -> usize {
    load(table).snapshot().unwrap().log_data().num_files()
}

/// The live table's rows as python deltalake reads them (its DataFusion query engine, which
/// honours deletion vectors), or `None` when python deltalake is not installed (`.ci/run`
/// installs it and sets SESSIONIZER_REQUIRE_PY_DELTALAKE, which makes that a failure).
fn python_rows(table: &Path) -> Option<Vec<String>> {
    let script = r#"
import sys
from deltalake import DeltaTable, QueryBuilder
dt = DeltaTable(sys.argv[1])
for line in QueryBuilder().register('t', dt).execute(sys.argv[2]).read_all().column('l').to_pylist():
    print(line)
"#;
    let probe = Command::new("python3")
        .args(["-c", "import deltalake"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("SESSIONIZER_REQUIRE_PY_DELTALAKE").is_none(),
            "python deltalake is required (pip install deltalake) but not importable"
        );
        eprintln!("SKIPPED the python deltalake read: pip install deltalake");
        return None;
    }
    let out = Command::new("python3")
        .args(["-c", script, table.to_str().unwrap(), ROW_QUERY])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python deltalake failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    rows.sort();
    Some(rows)
}

/// The live rows as one text column `l`, timestamps as integers (the same text from any
/// DataFusion version).
const ROW_QUERY: &str = "select concat_ws(' | ', user_id, session_id, \
    arrow_cast(start_time, 'Int64'), arrow_cast(end_time, 'Int64'), event_count, status) as l \
    from t";

/// The same rows through delta-rs.
fn rust_rows(table: &Path) -> Vec<String> {
    sql(table, ROW_QUERY)
}

#[test]
fn deletion_vectors_hold_the_rewrite_modes_rows_tick_after_tick() {
    let rewrite = Base::new();
    let dv = Base::with_env(&[DV]);
    // A first load of 400 keys, then ticks touching the first 20 to 170 of them (so files
    // get deletion vectors, or are purged when mostly deleted), and once 450 keys (new ones
    // among them), sessions closing along the way.
    let plan: Vec<(u32, u32)> = [(400, 0)]
        .into_iter()
        .chain((1..=14).map(|i| (if i == 7 { 450 } else { 20 + (i * 37) % 150 }, i * 9)))
        .collect();
    for (i, (users, minute)) in plan.iter().enumerate() {
        let a = tick(&rewrite, *users, *minute, i as u32);
        let b = tick(&dv, *users, *minute, i as u32);
        assert_eq!(a["live_rows_upserted"], b["live_rows_upserted"], "tick {i}");
        assert_eq!(
            rewrite.rows("live_sessions"),
            dv.rows("live_sessions"),
            "live rows differ after tick {i}"
        );
    }
    let live = dv.table("live_sessions");
    let keys = sql(&live, "select count(*) - count(distinct user_id) from t");
    assert_eq!(keys, ["0"], "one row per key");
    let written = dv_adds(&live);
    assert!(written > 5, "the ticks wrote {written} deletion vectors");
    assert_eq!(dv_adds(&rewrite.table("live_sessions")), 0);
    // The layout stays small: files are merged by size tier and purged when mostly deleted.
    let files = active_files(&live);
    assert!(files < 8, "{files} live files after 15 ticks");
    // The tables checkpoint every ten commits, so that opening them stays cheap tick after
    // tick (delta-rs's default is every hundred).
    for t in ["live_sessions", "checkpoint/state"] {
        let has = std::fs::read_dir(dv.table(t).join("_delta_log"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(".checkpoint.parquet")
            });
        assert!(has, "{t} has no Delta checkpoint after 15 ticks");
    }
    let removed = log_entries(&live, "remove").len();
    assert!(
        removed > 20,
        "files were purged or merged: {removed} removes"
    );
    // Other readers: python deltalake (through its DataFusion engine) sees the same rows.
    if let Some(py) = python_rows(&live) {
        assert_eq!(py, rust_rows(&rewrite.table("live_sessions")));
    }
    // VACUUM keeps the deletion-vector files that live files still reference, however short
    // the retention: the rows read the same after it.
    let before = dv.rows("live_sessions");
    dv.ok(&["maintain", "--no-optimize", "--retention", "0s"]);
    assert_eq!(
        dv.rows("live_sessions"),
        before,
        "VACUUM lost deletion vectors"
    );
    // maintain purges the deletion vectors: no file has one, the rows are the same.
    let m = dv.ok(&["maintain", "--output", "json"]).json();
    let purged = m["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "live_sessions")
        .unwrap()["files_purged"]
        .as_u64()
        .unwrap();
    assert!(purged > 0, "{m}");
    assert_eq!(dv.rows("live_sessions"), before);
    assert_eq!(
        files_with_dv(&live),
        0,
        "maintain left files with deletion vectors"
    );
    // And the next tick goes on from the purged table.
    tick(&rewrite, 60, 200, 99);
    tick(&dv, 60, 200, 99);
    assert_eq!(rewrite.rows("live_sessions"), dv.rows("live_sessions"));
}

#[test]
fn switching_the_live_mode_either_way_keeps_the_rows() {
    let rewrite = Base::new();
    let mixed = Base::new();
    let modes = [
        "rewrite",
        "deletion-vectors",
        "deletion-vectors",
        "rewrite",
        "deletion-vectors",
    ];
    for (i, (mode, users)) in modes.iter().zip([300u32, 40, 120, 60, 200]).enumerate() {
        for b in [&rewrite, &mixed] {
            generate(b, users, i as u32 * 5, i as u32);
        }
        rewrite.ok(&["sessionize"]);
        mixed.ok(&["sessionize", "--live-mode", mode]);
        assert_eq!(
            rewrite.rows("live_sessions"),
            mixed.rows("live_sessions"),
            "after a run in {mode} mode"
        );
    }
    // The rewrite in the middle read through the deletion vectors and left none.
    assert!(dv_adds(&mixed.table("live_sessions")) > 0);
}

/// 400 keys whose sessions stay pending, then three commits for one interrupted run: two
/// touch some of the keys (deletion vectors), the last closes every session.
fn prepare(base: &Base) {
    tick(base, 400, 0, 1);
    for (users, minute) in [(30, 10), (60, 20)] {
        generate(base, users, minute, GENERATE_SEED);
    }
    base.ok(&["generate-rows", "--closing"]);
}

#[test]
fn a_crash_at_every_failpoint_with_deletion_vectors_then_a_rerun_equals_a_clean_run() {
    let clean = Base::new();
    prepare(&clean);
    clean.ok(crash::RUN);
    let clean = crash::snapshot(&clean);
    for fp in [
        "after-plan",
        "after-sessions-commit",
        "after-live-commit",
        "after-state-commit",
        "after-batch-1",
        "after-batch-2",
    ] {
        let base = Base::with_env(&[DV]);
        prepare(&base);
        let crashed = base.run_env(crash::RUN, &[("SESSIONIZER_FAILPOINT", fp)]);
        assert_eq!(crashed.code(), 101, "{fp}: {}", crashed.stderr());
        base.ok(crash::RUN);
        crash::assert_same(&clean, &crash::snapshot(&base), fp);
        assert!(dv_adds(&base.table("live_sessions")) > 0, "{fp}");
    }
}

#[test]
fn a_run_frozen_before_its_live_commit_is_fenced_with_deletion_vectors() {
    let clean = Base::new();
    prepare(&clean);
    clean.ok(crash::RUN);
    let base = Base::with_env(&[DV]);
    prepare(&base);
    // Frozen after its fence check, right before its first commit to the live table (its
    // deletion vectors already written): another run takes the checkpoint over and finishes.
    let frozen = Frozen::start(&base, crash::RUN, "pause-before-commit-to-live_sessions");
    frozen.taken_over(&base, "deletion vectors", output_versions);
    crash::assert_same(
        &crash::snapshot(&clean),
        &crash::snapshot(&base),
        "takeover",
    );
    assert!(dv_adds(&base.table("live_sessions")) > 0);
}

#[test]
fn shards_with_deletion_vectors_and_a_reshard_equal_one_unsharded_rewrite_run() {
    let one = Base::new();
    let sharded = Base::with_env(&[DV]);
    let mut shards = 2;
    for (i, users) in [300u32, 40, 120, 40, 90, 30].into_iter().enumerate() {
        if i == 4 {
            // Reshard 2 -> 3: the deletion-vector live table is repartitioned exactly.
            sharded.ok(&["reshard", "--shards", "2", "--to", "3"]);
            shards = 3;
        }
        for b in [&one, &sharded] {
            generate(b, users, i as u32 * 7, i as u32);
        }
        one.ok(&["sessionize"]);
        // The shards side by side, committing to one live table.
        let children: Vec<_> = (0..shards)
            .map(|s| {
                Command::new(bin())
                    .args(["sessionize", "--shards", &shards.to_string()])
                    .args(["--shard", &s.to_string()])
                    .arg("--base-dir")
                    .arg(sharded.path())
                    .env(DV.0, DV.1)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let c = c.wait_with_output().unwrap();
            assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
        }
        let without_shard = sql(
            &sharded.table("live_sessions"),
            "select user_id, session_id, start_time, end_time, event_count, status from t",
        );
        let expected = sql(
            &one.table("live_sessions"),
            "select user_id, session_id, start_time, end_time, event_count, status from t",
        );
        assert_eq!(without_shard, expected, "round {i}");
    }
    assert!(dv_adds(&sharded.table("live_sessions")) > 0);
    // maintain (under one shard's lock) purges every partition, one commit each.
    let before = sharded.rows("live_sessions");
    let cp = sharded.table("checkpoint/shard-0-of-3");
    let m = sharded
        .ok(&[
            "maintain",
            "--output",
            "json",
            "--checkpoint",
            cp.to_str().unwrap(),
        ])
        .json();
    assert!(m.to_string().contains("\"files_purged\":"), "{m}");
    assert_eq!(sharded.rows("live_sessions"), before);
    assert_eq!(files_with_dv(&sharded.table("live_sessions")), 0, "{m}");
}

#[test]
fn a_live_table_whose_deletion_vectors_were_turned_off_is_refused_not_overridden() {
    let base = Base::with_env(&[DV]);
    tick(&base, 100, 0, 1);
    let live = base.table("live_sessions");
    let props = [(
        "delta.enableDeletionVectors".to_string(),
        "false".to_string(),
    )];
    rt().block_on(
        load(&live)
            .set_tbl_properties()
            .with_properties(props.into_iter().collect())
            .into_future(),
    )
    .unwrap();
    let version = base.version("live_sessions");
    generate(&base, 20, 9, GENERATE_SEED);
    let refused = base.run(&["sessionize"]);
    assert_eq!(refused.code(), 2, "{}", refused.stderr());
    assert!(
        refused
            .stderr()
            .contains("delta.enableDeletionVectors = false"),
        "{}",
        refused.stderr()
    );
    assert_eq!(base.version("live_sessions"), version, "nothing written");
    // The rewrite mode still upserts it.
    base.ok(&["sessionize", "--live-mode", "rewrite"]);
    assert_eq!(
        sql(&live, "select count(*) - count(distinct user_id) from t"),
        ["0"]
    );
}
