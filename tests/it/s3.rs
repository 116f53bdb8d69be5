//! The walkthrough with all four tables on S3: a moto server on loopback stands in for the
//! store. Delta commits and the checkpoint lock rely on conditional put (`If-None-Match: *`),
//! which moto honours, so the lock and crash tests run against it too.
//!
//! Needs `python3` with `moto[server]` (`.ci/run` installs it and sets
//! `SESSIONIZER_REQUIRE_S3=1`, which turns a missing server into a failure instead of a skip).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

const SERVER: &str = r#"
import os, socket, sys
import boto3
from moto.server import ThreadedMotoServer
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
             aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="lake")
print(port, flush=True)
# Nobody reads the server's output from here on: a full pipe would stall it.
quiet = os.open(os.devnull, os.O_WRONLY)
os.dup2(quiet, 1)
os.dup2(quiet, 2)
sys.stdin.read()
server.stop()
"#;

/// A moto S3 server with a bucket `lake`; stopped when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Option<Moto> {
        let required = std::env::var("SESSIONIZER_REQUIRE_S3").is_ok_and(|v| v == "1");
        let skip = |why: String| -> Option<Moto> {
            assert!(!required, "SESSIONIZER_REQUIRE_S3=1 but {why}");
            eprintln!("SKIPPED the S3 tests: {why} (pip install 'moto[server]')");
            None
        };
        let mut child = match Command::new("python3")
            .args(["-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return skip(format!("python3 cannot be started: {e}")),
        };
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        match line.trim().parse::<u16>() {
            Ok(port) => Some(Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            }),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                skip(format!(
                    "the moto server did not start: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ))
            }
        }
    }

    /// `sessionizer <args>` against `s3://lake/<prefix>`, credentials from AWS_* variables and
    /// plain HTTP allowed through --storage-option.
    fn cmd(&self, prefix: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .arg("--base-dir")
            .arg(format!("s3://lake/{prefix}"))
            .arg("--storage-option")
            .arg("AWS_ALLOW_HTTP=true")
            .env_remove("SESSIONIZER_FAILPOINT")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1");
        cmd
    }

    fn run(&self, prefix: &str, args: &[&str]) -> Out {
        Out(self.cmd(prefix, args).output().unwrap())
    }

    fn ok(&self, prefix: &str, args: &[&str]) -> Out {
        let out = self.run(prefix, args);
        assert_eq!(out.code(), 0, "{args:?} on S3:\n{}", out.stderr());
        out
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_walkthrough_runs_with_every_table_on_s3() {
    let Some(s3) = Moto::start() else { return };

    // The demo, all four tables on the store.
    let demo = s3.ok("demo", &["demo"]).stdout();
    assert!(demo.contains("3 sessions closed, 1 pending"), "{demo}");
    let closed = s3.ok("demo", &["query", "--format", "csv", DEMO_SESSIONS_SQL]);
    assert_eq!(closed.stdout().trim(), DEMO_SESSIONS_CSV);
    let status = s3.ok("demo", &["status", "--output", "json"]).json();
    assert_eq!(status["versions_behind"], 0, "{status}");
    assert_eq!(status["sessions_pending"], 1, "{status}");
    s3.ok("demo", &["maintain", "--retention", "0s"]);
    let demo_again = s3.ok("demo", &["demo"]).stdout();
    assert!(
        demo_again.contains("3 sessions closed, 1 pending"),
        "the demo resets its tables on the store too: {demo_again}"
    );

    // A second run while the first holds the lock (a conditional put) exits 75.
    s3.ok("lock", &["generate-rows", "--at", T0]);
    s3.ok("lock", &["sessionize"]);
    let mut first = s3
        .cmd("lock", &["sessionize"])
        .env("SESSIONIZER_FAILPOINT", "pause-after-lock")
        .env("SESSIONIZER_PAUSE_MS", "6000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let st = s3.ok("lock", &["status", "--output", "json"]).json();
        if st["lock"].is_string() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no lock seen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = s3.run("lock", &["sessionize"]);
    assert_eq!(second.code(), 75, "{}", second.stderr());
    assert!(first.wait().unwrap().success());

    // A crash after the sessions commit, then a rerun: no session twice.
    s3.ok("crash", &["generate-rows", "--at", "2026-02-15T10:00:00Z"]);
    s3.ok("crash", &["sessionize"]);
    s3.ok("crash", &["generate-rows", "--closing"]);
    let crashed = Out(s3
        .cmd("crash", &["sessionize"])
        .env("SESSIONIZER_FAILPOINT", "after-sessions-commit")
        .output()
        .unwrap());
    assert_eq!(crashed.code(), 101, "{}", crashed.stderr());
    let rerun = s3.ok("crash", &["sessionize", "--output", "json"]).json();
    assert_eq!(rerun["sessions_closed"], 3, "{rerun}");
    let counts = s3.ok(
        "crash",
        &[
            "query",
            "--format",
            "csv",
            "SELECT count(*) AS n, count(DISTINCT session_id) AS d FROM sessions",
        ],
    );
    assert_eq!(counts.stdout().trim(), "n,d\n3,3");

    // Four shards side by side on the store (concurrent commits through conditional puts)
    // give the sessions of one unsharded run; so do four that skip other shards' key-bucket
    // files, reading footers and statistics through the store.
    let events = [
        "generate-rows",
        "--rows",
        "3000",
        "--commits",
        "3",
        "--users",
        "200",
        "--seed",
        "9",
        "--at",
        "2026-02-15T00:00:00Z",
    ];
    for prefix in ["one", "four"] {
        s3.ok(prefix, &events);
    }
    s3.ok("buckets", &[&events[..], &["--key-buckets", "8"]].concat());
    s3.ok("one", &["sessionize", "--flush"]);
    let four_shards = |prefix: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let shards: Vec<Child> = (0..4)
            .map(|i| {
                let i = i.to_string();
                let args = [
                    &["sessionize", "--flush", "--output", "json"][..],
                    &["--shards", "4", "--shard", &i],
                    extra,
                ]
                .concat();
                s3.cmd(prefix, &args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        shards
            .into_iter()
            .map(|shard| {
                let out = shard.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                serde_json::from_slice(&out.stdout).unwrap()
            })
            .collect()
    };
    four_shards("four", &[]);
    let skipping = four_shards(
        "buckets",
        &["--key-buckets", "8", "--bucket-column", "bucket"],
    );
    // 3 commits of 8 bucket partitions: a shard decodes the 6 files of its 2 buckets.
    for s in &skipping {
        assert_eq!(
            (s["files_read"].as_u64(), s["files_watermark_only"].as_u64()),
            (Some(6), Some(18)),
            "{s}"
        );
    }
    let q = "SELECT user_id, start_time, end_time, event_count, close_reason FROM sessions \
             ORDER BY user_id, start_time";
    let one = s3.ok("one", &["query", "--format", "csv", q]).stdout();
    assert!(one.lines().count() > 200, "{one}");
    for prefix in ["four", "buckets"] {
        let sharded = s3.ok(prefix, &["query", "--format", "csv", q]).stdout();
        assert_eq!(one, sharded, "{prefix}");
    }
}
