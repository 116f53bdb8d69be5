//! Helpers: run the binary, read tables back as sorted text rows, Delta versions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;
use sessionizer::config::TableLocation;

pub const T0: &str = "2026-02-15T17:05:34Z";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sessionizer")
}

/// A fresh base directory, removed at the end of the test.
pub struct Base {
    pub dir: tempfile::TempDir,
    /// Environment variables of every command run on this base.
    pub env: Vec<(String, String)>,
}

impl Base {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            env: Vec::new(),
        }
    }
    /// A base whose every command runs with these environment variables.
    pub fn with_env(env: &[(&str, &str)]) -> Self {
        let mut b = Self::new();
        b.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        b
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn table(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
    /// Runs `sessionizer <args> --base-dir <base>` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--base-dir").arg(self.path());
        cmd.env_remove("SESSIONIZER_FAILPOINT");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Out(cmd.output().expect("run sessionizer"))
    }
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_env(args, &[])
    }
    /// Runs and insists on success.
    pub fn ok(&self, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(
            out.code(),
            0,
            "sessionizer {args:?} failed:\n{}",
            out.stderr()
        );
        out
    }
    pub fn gen_at(&self, at: &str) {
        self.ok(&["generate-rows", "--at", at]);
    }
    pub fn rows(&self, table: &str) -> Vec<String> {
        rows(&self.table(table))
    }
    pub fn version(&self, table: &str) -> Option<u64> {
        version(&self.table(table))
    }
    /// The newest lock epoch's file, if a run holds it (not released).
    pub fn held_lock(&self) -> Option<serde_json::Value> {
        let dir = self.table("checkpoint/_sessionizer/lock");
        let newest = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .max()?;
        let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(newest).ok()?).ok()?;
        (!lock["released"].as_bool().unwrap_or(false)).then_some(lock)
    }
    /// Starts `sessionize` in the background, paused for `ms` right after it takes the
    /// checkpoint lock, and returns once the lock file exists.
    pub fn paused_run(&self, ms: u64) -> std::process::Child {
        let child = Command::new(bin())
            .args(["sessionize", "--base-dir"])
            .arg(self.path())
            .env("SESSIONIZER_FAILPOINT", "pause-after-lock")
            .env("SESSIONIZER_PAUSE_MS", ms.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while self.held_lock().is_none() {
            assert!(
                start.elapsed().as_secs() < 30,
                "the paused run never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    }
}

/// The demo walkthrough's closed sessions, as `query --format csv` prints them: user 1 with
/// both of its two-row visits, users 2 and 3 with both of their single rows.
pub const DEMO_SESSIONS_SQL: &str =
    "SELECT user_id, event_count, close_reason FROM sessions ORDER BY user_id";
pub const DEMO_SESSIONS_CSV: &str =
    "user_id,event_count,close_reason\n1,4,inactivity\n2,2,inactivity\n3,2,inactivity";

pub struct Out(pub Output);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        let s = self.stdout();
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The Delta table at `p`, loaded (it must exist).
pub fn load(p: &Path) -> deltalake::DeltaTable {
    rt().block_on(sessionizer::delta::try_load(&loc(p)))
        .unwrap()
        .expect("a Delta table")
}

fn loc(p: &Path) -> TableLocation {
    TableLocation::from_path(p).unwrap()
}

/// The table's current Delta version, or `None` if there is no table.
pub fn version(p: &Path) -> Option<u64> {
    rt().block_on(async {
        sessionizer::delta::try_load(&loc(p))
            .await
            .unwrap()
            .and_then(|t| t.version())
    })
}

/// All rows of a table as `a | b | c` strings (columns in table order), sorted.
pub fn rows(p: &Path) -> Vec<String> {
    lines(&read(p))
}

/// Batches as sorted `a | b | c` lines.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let opts = FormatOptions::default().with_null("null");
    let mut out = Vec::new();
    for b in batches {
        let fmts: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(
                fmts.iter()
                    .map(|f| f.value(i).to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
    }
    out.sort();
    out
}

/// Column names of a table.
pub fn columns(p: &Path) -> Vec<String> {
    rt().block_on(async {
        let t = sessionizer::delta::try_load(&loc(p))
            .await
            .unwrap()
            .expect("table exists");
        sessionizer::delta::arrow_schema(&t)
            .unwrap()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    })
}

pub fn read(p: &Path) -> Vec<RecordBatch> {
    rt().block_on(async {
        let Some(t) = sessionizer::delta::try_load(&loc(p)).await.unwrap() else {
            return Vec::new();
        };
        let ctx = SessionContext::new();
        ctx.read_table(t.table_provider().await.unwrap())
            .unwrap()
            .collect()
            .await
            .unwrap()
    })
}

/// Runs a SQL query against one table registered as `t`, returning sorted text rows.
pub fn sql(p: &Path, query: &str) -> Vec<String> {
    let batches = rt().block_on(async {
        let t = sessionizer::delta::try_load(&loc(p))
            .await
            .unwrap()
            .expect("table exists");
        let ctx = SessionContext::new();
        ctx.register_table("t", t.table_provider().await.unwrap())
            .unwrap();
        ctx.sql(query).await.unwrap().collect().await.unwrap()
    });
    lines(&batches)
}

/// The versions of the three output tables (sessions, live, checkpoint state).
pub fn output_versions(base: &Base) -> [Option<u64>; 3] {
    [
        base.version("sessions"),
        base.version("live_sessions"),
        base.version("checkpoint/state"),
    ]
}

/// Copies a folder tree (a table, a checkpoint) as it is.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
