//! The command line, as clap structs that only mirror the flags. Turning them into validated
//! settings happens in `config` and the commands, before any table is touched.

use clap::{Args, Parser, Subcommand, ValueEnum};

use std::collections::BTreeMap;

use crate::config::{
    ByteSize, Collect, Dur, LiveMode, Mode, OnChangeCommit, OutputFormat, Skew, TableLocation,
    Tables, parse_storage_option,
};

/// Help headings, most used first; the global flags come last.
const TABLES: &str = "Tables";
const RULES: &str = "Session rules";
const BATCHES: &str = "Batches and backfill";
const OUTPUT: &str = "Output and logs";
const SHARDS: &str = "More than one machine";
const GLOBAL: &str = "Global";

/// The worked examples that end `sessionize --help`.
const SESSIONIZE_EXAMPLES: &str = "\
Examples:
  # A cron tick (every 5 minutes): read what is new, close sessions, print a JSON summary.
  sessionizer sessionize --base-dir s3://lake/clicks --output json

  # A backfill from events version 1200, in batches of 200 files, then close what is open.
  sessionizer sessionize --checkpoint /data/backfill-cp --starting-version 1200 \\
      --max-files-per-batch 200
  sessionizer sessionize --checkpoint /data/backfill-cp --flush

  # The wallet job's model: a deposit ends the session, wins are summed.
  sessionizer sessionize --key session_id --time-column event_time \\
      --end-when \"action = 'deposit'\" --sum win_amount --watermark-delay 0s";

#[derive(Debug, Parser)]
#[command(
    name = "sessionizer",
    version,
    about = "Turns a click-stream Delta table into user sessions, incrementally and exactly once.",
    long_about = "Turns a click-stream Delta table into user sessions, incrementally and exactly once.\n\n\
        Each `sessionize` run reads the events committed since the last run, folds them into the \
        sessions still open, appends the sessions that closed, upserts the live table, records its \
        progress, and exits. Run it from cron or Airflow as often as you like.",
    after_help = "Quick start:\n  sessionizer demo\n  sessionizer generate-rows && sessionizer sessionize && sessionizer read-tables"
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = GLOBAL, display_order = 900)]
    pub verbose: u8,
    /// Only errors on stderr, and no progress bar.
    #[arg(short, long, global = true, help_heading = GLOBAL, display_order = 901)]
    pub quiet: bool,
    /// Log format on stderr: text for people, json (one object per line) for log shippers.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        display_order = 902,
        value_enum,
        env = "SESSIONIZER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Read flag values from this TOML file (top-level keys, then the `[env.NAME]` section).
    #[arg(long, global = true, env = "SESSIONIZER_CONFIG", help_heading = GLOBAL, display_order = 903)]
    pub config: Option<std::path::PathBuf>,
    /// The environment section of --config to apply over its top-level keys (dev, test, prod…).
    #[arg(long = "env", global = true, env = "SESSIONIZER_ENV", help_heading = GLOBAL, display_order = 904)]
    pub environment: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One available-now run: read new events, close sessions, write sessions, live and state.
    #[command(after_help = SESSIONIZE_EXAMPLES)]
    Sessionize(Box<SessionizeArgs>),
    /// Append demo events to the events table in one commit.
    #[command(
        after_help = "Examples:\n  sessionizer generate-rows\n  sessionizer generate-rows --closing\n  sessionizer generate-rows --users 100 --per-user 5 --seed 7"
    )]
    GenerateRows(GenerateArgs),
    /// Print tables the way Spark's show() does.
    #[command(after_help = "Example:\n  sessionizer read-tables --table sessions --limit 50")]
    ReadTables(ReadArgs),
    /// Where the checkpoint stands: versions processed and available, watermark, pending sessions.
    #[command(
        after_help = "Exit status: 0 when the checkpoint is readable, 3 when there is none yet, 1 when it is corrupt.\n\nExample:\n  sessionizer status --output json"
    )]
    Status(StatusArgs),
    /// Read-only SQL over the tables: events, sessions, live_sessions, pending and late_events.
    #[command(
        after_help = "Example:\n  sessionizer query \"SELECT avg(duration_ms) AS avg_ms FROM sessions\""
    )]
    Query(QueryArgs),
    /// The whole walkthrough on a fresh base directory, explaining each step.
    #[command(after_help = "Example:\n  sessionizer demo --base-dir /tmp/sessionizer-demo")]
    Demo(DemoArgs),
    /// Compact small files, vacuum old ones and write Delta checkpoints, without breaking
    /// exactly-once.
    #[command(
        after_help = "Example (daily, e.g. from cron):\n  sessionizer maintain --base-dir s3://lake/clicks --retention 7d"
    )]
    Maintain(MaintainArgs),
    /// Change the number of shards of a sharded run: redistribute the pending state and the
    /// live table's partitions, under every shard's lock.
    #[command(
        after_help = "Example (all 4 shards at the same events version, none running):\n  sessionizer reshard --base-dir s3://lake/clicks --shards 4 --to 3"
    )]
    Reshard(ReshardArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  sessionizer completions bash > /etc/bash_completion.d/sessionizer"
    )]
    Completions(CompletionsArgs),
    /// Print the man page (roff) generated from these flags.
    #[command(after_help = "Example:\n  sessionizer man > /usr/local/share/man/man1/sessionizer.1")]
    Man,
}

/// Where the tables are. Every location defaults to a folder under `--base-dir`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = TABLES)]
pub struct TableArgs {
    /// Folder under which the default table locations live.
    #[arg(long, env = "SESSIONIZER_BASE_DIR", default_value = "/tmp/sessionizer")]
    pub base_dir: TableLocation,
    /// The events table (input) [default: <base-dir>/events].
    #[arg(long, env = "SESSIONIZER_EVENTS")]
    pub events: Option<TableLocation>,
    /// The sessions table (append-only output) [default: <base-dir>/sessions].
    #[arg(long, env = "SESSIONIZER_SESSIONS")]
    pub sessions: Option<TableLocation>,
    /// The live sessions table (MERGE-upserted) [default: <base-dir>/live_sessions].
    #[arg(long, env = "SESSIONIZER_LIVE")]
    pub live: Option<TableLocation>,
    /// The checkpoint: progress, lock and pending state [default: <base-dir>/checkpoint].
    #[arg(long, env = "SESSIONIZER_CHECKPOINT")]
    pub checkpoint: Option<TableLocation>,
    /// Keep late and invalid rows in this table (default: count them only).
    #[arg(long, env = "SESSIONIZER_LATE_EVENTS")]
    pub late_events: Option<TableLocation>,
    /// Object-store option for every table, e.g. AWS_ENDPOINT_URL=http://localhost:9000
    /// (repeatable; AWS_* environment variables are read too, these win).
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_storage_option)]
    pub storage_option: Vec<(String, String)>,
}

impl TableArgs {
    pub fn resolve(&self) -> Tables {
        let options: BTreeMap<String, String> = self.storage_option.iter().cloned().collect();
        let at = |flag: &Option<TableLocation>, default: &str| {
            flag.clone()
                .unwrap_or_else(|| self.base_dir.join(default))
                .with_options(&options)
        };
        Tables {
            events: at(&self.events, "events"),
            sessions: at(&self.sessions, "sessions"),
            live: at(&self.live, "live_sessions"),
            checkpoint: at(&self.checkpoint, "checkpoint"),
            late_events: self.late_events.clone().map(|l| l.with_options(&options)),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SessionizeArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Key column(s), comma-separated for a composite key.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_KEY", default_value = "user_id")]
    pub key: String,
    /// Event-time column: timestamp, timestamp_ntz, or integer epoch milliseconds.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_TIME_COLUMN", default_value = "visit_time")]
    pub time_column: String,
    /// Inactivity gap that ends a session (90s, 15m, 2h, 1d).
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_GAP", default_value = "30m")]
    pub gap: Dur,
    /// How far behind the largest event time the watermark trails.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_WATERMARK_DELAY", default_value = "15m")]
    pub watermark_delay: Dur,
    /// Columns kept per event in visited_pages: auto (page if present), none, or COL[,COL…].
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_COLLECT", default_value = "auto")]
    pub collect: Collect,
    /// Numeric columns summed per session into <COL>_sum: an exact BIGINT for integer columns
    /// (null if it overflows), a DOUBLE for float and decimal columns.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_SUM", value_delimiter = ',')]
    pub sum: Vec<String>,
    /// sessions (gap-based) or pairs (explicit start and end events).
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_MODE", value_enum, default_value = "sessions")]
    pub mode: Mode,
    /// SQL condition marking an event that ends its session (e.g. "action = 'deposit'").
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_END_WHEN")]
    pub end_when: Option<String>,
    /// Pairs mode: SQL condition marking a start event.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_START_WHEN")]
    pub start_when: Option<String>,
    /// No session spans more than this; an event at or beyond start + max starts a new one.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_MAX_DURATION")]
    pub max_duration: Option<Dur>,
    /// Pairs mode: an open start with no end after this long is reported missing_end.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_PAIR_TIMEOUT", default_value = "1h")]
    pub pair_timeout: Dur,
    /// Events more than this after the commit that added them are invalid (reason `future`)
    /// and never move the watermark; `none` turns the guard off.
    #[arg(help_heading = RULES, long, env = "SESSIONIZER_MAX_EVENT_SKEW", default_value = "1d")]
    pub max_event_skew: Skew,
    /// Close every pending session now (end of a backfill, end of a day).
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_FLUSH")]
    pub flush: bool,
    /// Summary format; json prints one object on stdout.
    #[arg(help_heading = OUTPUT, long, env = "SESSIONIZER_OUTPUT", value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// What to do with source commits that remove data (DELETE, UPDATE, MERGE, overwrite).
    #[arg(help_heading = BATCHES,
        long,
        env = "SESSIONIZER_ON_CHANGE_COMMIT",
        value_enum,
        default_value = "fail"
    )]
    pub on_change_commit: OnChangeCommit,
    /// Cut a backlog into batches of at most this many data files (at version boundaries).
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_MAX_FILES_PER_BATCH", default_value_t = 1000)]
    pub max_files_per_batch: usize,
    /// Cut a backlog into batches of at most this many bytes of data files (512MiB, 2GiB).
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_MAX_BYTES_PER_BATCH")]
    pub max_bytes_per_batch: Option<ByteSize>,
    /// Fold a batch in key buckets of about this many bytes of data files each, on every core.
    /// Smaller buckets hold less memory at once; the sessions are the same for any size.
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_BUCKET_SIZE", default_value = "4MiB")]
    pub bucket_size: ByteSize,
    /// For a new checkpoint only: the first events version to read.
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_STARTING_VERSION")]
    pub starting_version: Option<u64>,
    /// For a new checkpoint only: start at the first events version committed at or after this
    /// time (RFC 3339).
    #[arg(help_heading = BATCHES, long, env = "SESSIONIZER_STARTING_TIMESTAMP")]
    pub starting_timestamp: Option<chrono::DateTime<chrono::Utc>>,
    /// Take over a lock left by another run even if it has not expired.
    #[arg(help_heading = BATCHES, long)]
    pub break_lock: bool,
    /// Warn when one session still open holds more events than this (a key that is never
    /// idle grows the pending state that every batch re-reads and rewrites).
    #[arg(help_heading = OUTPUT,
        long,
        env = "SESSIONIZER_WARN_OPEN_SESSION_EVENTS",
        default_value_t = 100_000
    )]
    pub warn_open_session_events: u64,
    /// How the live table is upserted: rewrite its files (any Delta reader), or
    /// deletion-vectors (a tick writes what it changed; readers must honour deletion vectors).
    #[arg(help_heading = OUTPUT,
        long,
        env = "SESSIONIZER_LIVE_MODE",
        value_enum,
        default_value = "rewrite"
    )]
    pub live_mode: LiveMode,
    /// Split the keys over this many shards (workers), each run with its own --shard.
    #[arg(long, env = "SESSIONIZER_SHARDS", help_heading = SHARDS)]
    pub shards: Option<u32>,
    /// This run's shard, 0..N-1 (default under a Kubernetes Indexed Job: JOB_COMPLETION_INDEX).
    #[arg(long, env = "SESSIONIZER_SHARD", help_heading = SHARDS)]
    pub shard: Option<u32>,
    /// Assign keys to shards by bucket: bucket = Spark's pmod(xxhash64(key columns), B), shard
    /// = bucket mod N. With --bucket-column, a shard skips the files of other shards' buckets.
    #[arg(long, env = "SESSIONIZER_KEY_BUCKETS", help_heading = SHARDS, requires = "bucket_column")]
    pub key_buckets: Option<u32>,
    /// The events column that holds each row's key bucket (the table is partitioned or
    /// clustered by it); every file a shard reads is checked against it.
    #[arg(long, env = "SESSIONIZER_BUCKET_COLUMN", help_heading = SHARDS, requires = "key_buckets")]
    pub bucket_column: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Append one event of a new user 61 minutes after the latest event in the table.
    #[arg(long)]
    pub closing: bool,
    /// Random mode: this many users (ids 1..=N).
    #[arg(long)]
    pub users: Option<u64>,
    /// Random mode: events per user.
    #[arg(long)]
    pub per_user: Option<u64>,
    /// Event time of the rows (RFC 3339 or `YYYY-MM-DD HH:MM:SS`, UTC) [default: now].
    #[arg(long)]
    pub at: Option<String>,
    /// Seed of the random mode.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write one window of a reference job's data instead (its own schema).
    #[arg(long, value_enum, conflicts_with_all = ["closing", "users", "per_user"])]
    pub scenario: Option<crate::commands::scenarios::Scenario>,
    /// Bulk mode: this many random events in total (for benchmarks), over --commits commits
    /// and --users users (default rows / 11). (`--events` names the table, so this is --rows.)
    #[arg(long, conflicts_with_all = ["closing", "per_user", "scenario"])]
    pub rows: Option<u64>,
    /// Bulk mode: number of commits the rows are spread over, in event-time order.
    #[arg(long, default_value_t = 1, requires = "rows")]
    pub commits: u64,
    /// Add a `bucket` column, Spark's pmod(xxhash64(user_id), B), and partition the table by
    /// it: the layout `sessionize --key-buckets B --bucket-column bucket` reads less of.
    #[arg(long, conflicts_with = "scenario")]
    pub key_buckets: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// The SQL; tables are named events, sessions, live_sessions (or live), pending and
    /// late_events (those that exist).
    pub sql: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: QueryFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableChoice {
    Events,
    Sessions,
    Live,
    Pending,
    Late,
}

#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Which table to print (default: events, sessions, live and pending).
    #[arg(long, value_enum)]
    pub table: Option<TableChoice>,
    /// Rows to print per table.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// A sharded run's N: report every shard's checkpoint, and which shard is behind.
    #[arg(long, env = "SESSIONIZER_SHARDS")]
    pub shards: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct MaintainArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// Keep files replaced less than this long ago (readers of older versions may need them).
    #[arg(long, env = "SESSIONIZER_RETENTION", default_value = "7d")]
    pub retention: Dur,
    /// Target size of compacted files (default: Delta's, about 100 MiB).
    #[arg(long)]
    pub target_file_size: Option<ByteSize>,
    /// Skip compaction.
    #[arg(long)]
    pub no_optimize: bool,
    /// Skip the vacuum.
    #[arg(long)]
    pub no_vacuum: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Take over a lock left by another run even if it has not expired.
    #[arg(long)]
    pub break_lock: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReshardArgs {
    #[command(flatten)]
    pub tables: TableArgs,
    /// How many shards there are now.
    #[arg(long, env = "SESSIONIZER_SHARDS")]
    pub shards: u32,
    /// How many shards there will be.
    #[arg(long)]
    pub to: u32,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// The demo's own folder (never taken from a config file or SESSIONIZER_* variable). Tables
    /// the demo created there are deleted and recreated; anything else there stops it.
    #[arg(long, default_value = "/tmp/sessionizer-demo")]
    pub base_dir: TableLocation,
    /// Run one reference job's scenario instead of the walkthrough.
    #[arg(long, value_enum)]
    pub scenario: Option<crate::commands::scenarios::Scenario>,
    /// Object-store option, as for the other commands (repeatable).
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_storage_option)]
    pub storage_option: Vec<(String, String)>,
}
