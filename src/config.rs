//! From raw flags to one validated [`Settings`], before any I/O.
//!
//! Flag values have their own types ([`Dur`], [`ByteSize`], [`TableLocation`], [`Collect`],
//! [`OnChangeCommit`]) with `FromStr` and `Display`, so clap rejects a bad value with a message
//! that names the flag, and nothing has been read or written yet. Environment variables
//! (`SESSIONIZER_*`) are read by clap itself, below flags in precedence.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use url::Url;

/// A duration of event time, written `500ms`, `90s`, `15m`, `2h`, `1d` (or `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur {
    micros: i64,
}

impl Dur {
    pub const fn from_micros(micros: i64) -> Self {
        Self { micros }
    }
    pub const fn from_minutes(m: i64) -> Self {
        Self {
            micros: m * 60_000_000,
        }
    }
    pub const fn as_micros(self) -> i64 {
        self.micros
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t == "0" {
            return Ok(Self { micros: 0 });
        }
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{s}` has no unit; write it like 90s, 15m, 2h or 1d"))?;
        let (num, unit) = t.split_at(split);
        let n: i64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration; write it like 90s, 15m, 2h or 1d"))?;
        let per: i64 = match unit {
            "ms" => 1_000,
            "s" => 1_000_000,
            "m" | "min" => 60_000_000,
            "h" => 3_600_000_000,
            "d" => 86_400_000_000,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}`; use ms, s, m, h or d (e.g. 15m)"
                ));
            }
        };
        n.checked_mul(per)
            .map(|micros| Self { micros })
            .ok_or_else(|| format!("`{s}` is too long a duration"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.micros;
        for (unit, per) in [
            ("d", 86_400_000_000),
            ("h", 3_600_000_000),
            ("m", 60_000_000),
            ("s", 1_000_000),
            ("ms", 1_000),
        ] {
            if us != 0 && us % per == 0 {
                return write!(f, "{}{unit}", us / per);
            }
        }
        if us == 0 {
            write!(f, "0")
        } else {
            write!(f, "{us}us")
        }
    }
}

/// One machine shard of a sharded run: keys whose stable hash falls in shard `index` of
/// `count` (see [`crate::engine::in_shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
    /// Which hash assigns keys to shards (`--key-buckets`).
    pub function: crate::engine::ShardFn,
}

impl Shard {
    /// The folder of this shard's own checkpoint, under the checkpoint location.
    pub fn checkpoint_name(&self) -> String {
        shard_checkpoint_name(self.index, self.count)
    }
}

/// The folder of shard `index` of `count`'s checkpoint, under the checkpoint location.
pub fn shard_checkpoint_name(index: u32, count: u32) -> String {
    format!("shard-{index}-of-{count}")
}

/// How far after the commit that added it an event may be (SPEC rule 11): a duration, or
/// `none` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skew(pub Option<Dur>);

impl FromStr for Skew {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Self(None));
        }
        let d: Dur = s.parse()?;
        if d.as_micros() < 0 {
            return Err(format!(
                "`{s}` is negative; give a duration like 1d, or none"
            ));
        }
        Ok(Self(Some(d)))
    }
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{d}"),
            None => write!(f, "none"),
        }
    }
}

/// A size in bytes, written `4096`, `64KiB`, `512MiB`, `1GiB` (or `KB`/`MB`/`GB`, decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write it like 512MiB or 1GiB"))?;
        let per: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return Err(format!("`{s}` has an unknown unit; use B, KiB, MiB or GiB")),
        };
        n.checked_mul(per)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B", self.0)
    }
}

/// Parses one `--storage-option KEY=VALUE`.
pub fn parse_storage_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "`{s}` is not KEY=VALUE; write it like AWS_ENDPOINT_URL=http://localhost:9000"
        )),
    }
}

/// Where a table lives: a local path, `file://…`, or an object-store URL, with the storage
/// options (`--storage-option KEY=VALUE`) used to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLocation {
    url: Url,
    options: BTreeMap<String, String>,
}

impl TableLocation {
    pub fn url(&self) -> &Url {
        &self.url
    }
    pub fn options(&self) -> &BTreeMap<String, String> {
        &self.options
    }
    /// The location this one is directly inside (`<parent>/<name>/`).
    pub fn parent(&self) -> TableLocation {
        let mut url = self.url.clone();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        TableLocation {
            url: url.join("../").expect("a parent joins"),
            options: self.options.clone(),
        }
    }
    /// The same location, reached with these storage options.
    pub fn with_options(mut self, options: &BTreeMap<String, String>) -> Self {
        self.options = options.clone();
        self
    }
    /// A Delta table builder for this location, with its storage options. `AWS_*` variables
    /// in the environment are read by the S3 store itself; options given here win.
    pub fn builder(&self) -> Result<deltalake::DeltaTableBuilder, deltalake::DeltaTableError> {
        let builder = deltalake::DeltaTableBuilder::from_url(self.url.clone())?;
        Ok(if self.options.is_empty() {
            builder
        } else {
            builder.with_storage_options(self.options.clone().into_iter().collect())
        })
    }
    /// The local directory, when the table is on the local filesystem.
    pub fn local_path(&self) -> Option<PathBuf> {
        (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()
    }
    /// A location below this one (`<self>/<name>`).
    pub fn join(&self, name: &str) -> TableLocation {
        let mut url = self.url.clone();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        TableLocation {
            url: url
                .join(&format!("{name}/"))
                .expect("a plain child name joins"),
            options: self.options.clone(),
        }
    }
    /// The location as comparable parts: scheme (`s3a` is `s3`), authority, and the path's
    /// segments with `.`, `..` and empty segments resolved.
    fn normalized(&self) -> (String, String, Vec<String>) {
        let scheme = match self.url.scheme() {
            "s3a" => "s3".to_string(),
            other => other.to_ascii_lowercase(),
        };
        let authority = format!(
            "{}@{}:{}",
            self.url.username(),
            self.url.host_str().unwrap_or("").to_ascii_lowercase(),
            self.url.port().map_or(String::new(), |p| p.to_string())
        );
        let mut segments: Vec<String> = Vec::new();
        for seg in self.url.path().split('/') {
            match seg {
                "" | "." | "%2E" | "%2e" => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s.to_string()),
            }
        }
        (scheme, authority, segments)
    }

    /// Whether `self` is `other` or lies inside it, comparing whole path segments: `/a/b` is
    /// inside `/a`, `/a/bc` is not.
    pub fn is_within(&self, other: &TableLocation) -> bool {
        let (s1, a1, p1) = self.normalized();
        let (s2, a2, p2) = other.normalized();
        s1 == s2 && a1 == a2 && p1.starts_with(&p2)
    }

    pub fn from_path(p: &Path) -> Result<Self, String> {
        let abs = std::path::absolute(p).map_err(|e| format!("`{}`: {e}", p.display()))?;
        let url = Url::from_directory_path(&abs)
            .map_err(|_| format!("`{}` is not a usable directory path", p.display()))?;
        Ok(Self {
            url,
            options: BTreeMap::new(),
        })
    }
}

impl FromStr for TableLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("a table location cannot be empty".into());
        }
        if s.contains("://") {
            let mut url = Url::parse(s).map_err(|e| format!("`{s}` is not a valid URL: {e}"))?;
            match url.scheme() {
                "file" | "memory" | "s3" | "s3a" | "az" | "abfs" | "abfss" | "gs" => {}
                other => {
                    return Err(format!(
                        "`{s}`: the scheme `{other}` is not supported; use a local path, file://, s3://, az:// or gs://"
                    ));
                }
            }
            if !url.path().ends_with('/') {
                let p = format!("{}/", url.path());
                url.set_path(&p);
            }
            Ok(Self {
                url,
                options: BTreeMap::new(),
            })
        } else {
            Self::from_path(Path::new(s))
        }
    }
}

impl fmt::Display for TableLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.local_path() {
            Some(p) => write!(f, "{}", p.display()),
            None => write!(f, "{}", self.url),
        }
    }
}

/// What `visited_pages` collects: `auto` (the `page` column when the events have one),
/// `none`, or a list of columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collect {
    Auto,
    None,
    Columns(Vec<String>),
}

impl FromStr for Collect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Collect::Auto),
            "none" | "" => Ok(Collect::None),
            list => Ok(Collect::Columns(split_list(list))),
        }
    }
}

impl fmt::Display for Collect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Collect::Auto => write!(f, "auto"),
            Collect::None => write!(f, "none"),
            Collect::Columns(c) => write!(f, "{}", c.join(",")),
        }
    }
}

/// What to do with a source commit that removes data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnChangeCommit {
    /// Stop the run with an error naming the version (the default).
    Fail,
    /// Skip the commit's removals and read only what it added.
    Skip,
}

/// How a batch upserts the live table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LiveMode {
    /// Rewrite the live table's files whole (every Delta reader reads the result).
    #[default]
    Rewrite,
    /// Mark the changed keys' old rows deleted with deletion vectors and append the new rows
    /// (a tick writes what it changed; readers must honour deletion vectors).
    DeletionVectors,
}

/// How sessions are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Inactivity gaps, end markers and a maximum length cut sessions.
    Sessions,
    /// Explicit start and end events are paired per key.
    Pairs,
}

/// How the run summary is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Splits `a,b , c` into names.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The four table locations of a run, after defaults under `--base-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub events: TableLocation,
    pub sessions: TableLocation,
    pub live: TableLocation,
    pub checkpoint: TableLocation,
    pub late_events: Option<TableLocation>,
}

impl Tables {
    /// Refuses two locations that are the same or nest (one inside the other).
    ///
    /// A table inside another one's folder is lost to the outer table's VACUUM (`maintain`,
    /// Spark, Databricks), which deletes files it does not know; and Delta readers of the
    /// outer table may trip over the inner one's files.
    pub fn check_nesting(&self) -> Result<(), String> {
        let mut all = vec![
            ("--events", &self.events),
            ("--sessions", &self.sessions),
            ("--live", &self.live),
            ("--checkpoint", &self.checkpoint),
        ];
        if let Some(l) = &self.late_events {
            all.push(("--late-events", l));
        }
        for (i, &(flag_a, a)) in all.iter().enumerate() {
            for &(flag_b, b) in &all[i + 1..] {
                let (a_in_b, b_in_a) = (a.is_within(b), b.is_within(a));
                if a_in_b && b_in_a {
                    return Err(format!(
                        "{flag_a} and {flag_b} are the same location ({a}); each table needs \
                         its own folder, e.g. side by side under --base-dir"
                    ));
                }
                let (inner_flag, inner, outer_flag, outer) = match (a_in_b, b_in_a) {
                    (true, _) => (flag_a, a, flag_b, b),
                    (_, true) => (flag_b, b, flag_a, a),
                    _ => continue,
                };
                return Err(format!(
                    "{inner_flag} ({inner}) is inside {outer_flag} ({outer}): a VACUUM of the \
                     outer table (sessionizer maintain, Spark, Databricks) would delete the \
                     inner one's files. Give each table its own folder, none inside another, \
                     e.g. side by side under --base-dir"
                ));
            }
        }
        Ok(())
    }
}

/// Everything `sessionize` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tables: Tables,
    pub keys: Vec<String>,
    pub time_column: String,
    pub gap: Dur,
    pub watermark_delay: Dur,
    pub collect: Collect,
    pub sums: Vec<String>,
    pub mode: Mode,
    pub start_when: Option<String>,
    pub end_when: Option<String>,
    pub max_duration: Option<Dur>,
    pub pair_timeout: Dur,
    pub max_event_skew: Skew,
    pub flush: bool,
    pub output: OutputFormat,
    pub on_change_commit: OnChangeCommit,
    pub max_files_per_batch: usize,
    pub max_bytes_per_batch: Option<ByteSize>,
    pub bucket_size: ByteSize,
    pub starting_version: Option<u64>,
    pub starting_timestamp: Option<chrono::DateTime<chrono::Utc>>,
    pub break_lock: bool,
    pub warn_open_session_events: u64,
    pub live_mode: LiveMode,
    /// `--shards N --shard I`: this run folds only shard I's keys, with its own checkpoint.
    pub shard: Option<Shard>,
    /// `--bucket-column`: the events column holding each row's key bucket (`--key-buckets`).
    pub bucket_column: Option<String>,
}

impl Settings {
    /// Cross-field checks that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.keys.is_empty() {
            return Err("--key needs at least one column name".into());
        }
        if self.gap.as_micros() <= 0 {
            return Err(format!("--gap must be positive, got {}", self.gap));
        }
        if self.watermark_delay.as_micros() < 0 {
            return Err("--watermark-delay cannot be negative".into());
        }
        match self.mode {
            Mode::Pairs => {
                if self.start_when.is_none() || self.end_when.is_none() {
                    return Err("--mode pairs needs both --start-when and --end-when, e.g. \
                         --start-when \"eventType = 'SessionStart'\" --end-when \"eventType = 'SessionEnd'\""
                        .into());
                }
                if self.max_duration.is_some() {
                    return Err("--max-duration applies to --mode sessions; in pairs mode use --pair-timeout".into());
                }
                if self.pair_timeout.as_micros() <= 0 {
                    return Err("--pair-timeout must be positive".into());
                }
            }
            Mode::Sessions => {
                if self.start_when.is_some() {
                    return Err("--start-when is only used with --mode pairs; to end sessions at an event use --end-when".into());
                }
            }
        }
        if self.max_duration.is_some_and(|m| m.as_micros() <= 0) {
            return Err("--max-duration must be positive".into());
        }
        if self.starting_version.is_some() && self.starting_timestamp.is_some() {
            return Err("give --starting-version or --starting-timestamp, not both".into());
        }
        if self.max_files_per_batch == 0 {
            return Err("--max-files-per-batch must be at least 1".into());
        }
        if self.bucket_size.0 == 0 {
            return Err("--bucket-size must be at least 1B (the default is 4MiB)".into());
        }
        let t = &self.tables;
        let outputs = [
            ("--sessions", &t.sessions),
            ("--live", &t.live),
            ("--checkpoint", &t.checkpoint),
        ];
        for (flag, loc) in outputs {
            if loc == &t.events {
                return Err(format!(
                    "{flag} points at the events table ({loc}); sessionize never writes the events table, give {flag} its own location"
                ));
            }
        }
        if t.sessions == t.live {
            return Err(format!(
                "--sessions and --live are the same location ({}); they are different tables",
                t.sessions
            ));
        }
        t.check_nesting()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        let good = [
            ("90s", 90_000_000),
            ("15m", 900_000_000),
            ("2h", 7_200_000_000),
            ("1d", 86_400_000_000),
            ("250ms", 250_000),
            ("0", 0),
        ];
        for (s, us) in good {
            let d: Dur = s.parse().unwrap();
            assert_eq!(d.as_micros(), us, "{s}");
            assert_eq!(d.to_string().parse::<Dur>().unwrap(), d, "{s} round-trips");
        }
        assert_eq!(Dur::from_minutes(60).to_string(), "1h");
        for bad in [
            "",
            "15",
            "m",
            "15 minutes",
            "1.5h",
            "-3m",
            "99999999999999999d",
        ] {
            assert!(bad.parse::<Dur>().is_err(), "{bad} should be rejected");
        }
        let err = "15x".parse::<Dur>().unwrap_err();
        assert!(err.contains("unknown unit `x`"), "{err}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1GB".parse::<ByteSize>().unwrap().0, 1_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("3 parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn locations_are_urls_with_a_trailing_slash() {
        let l: TableLocation = "/tmp/x/events".parse().unwrap();
        assert_eq!(l.url().as_str(), "file:///tmp/x/events/");
        assert_eq!(l.local_path().unwrap(), PathBuf::from("/tmp/x/events"));
        assert_eq!(
            l.join("state").url().as_str(),
            "file:///tmp/x/events/state/"
        );
        let s: TableLocation = "s3://bucket/events".parse().unwrap();
        assert_eq!(s.url().as_str(), "s3://bucket/events/");
        assert!(s.local_path().is_none());
        assert!("ftp://host/x".parse::<TableLocation>().is_err());
        assert!("".parse::<TableLocation>().is_err());
    }

    #[test]
    fn nesting_compares_whole_path_segments() {
        let loc = |s: &str| s.parse::<TableLocation>().unwrap();
        // (inner, outer, is inner within outer)
        let cases = [
            ("/a/b", "/a", true),
            ("/a/b/c", "/a", true),
            ("/a", "/a", true),
            ("/a/", "/a", true),
            ("/a//b", "/a", true),
            ("/a/./b", "/a", true),
            ("/a/x/../b", "/a/b", true),
            ("/a/bc", "/a/b", false),
            ("/a/b", "/a/bc", false),
            ("/a", "/a/b", false),
            ("/ab", "/a", false),
            ("file:///a/b", "/a", true),
            ("s3://bucket/a/b", "s3://bucket/a", true),
            ("s3a://bucket/a/b", "s3://bucket/a", true),
            ("s3://bucket/a", "s3://bucket/a/", true),
            ("s3://bucket/ab", "s3://bucket/a", false),
            ("s3://other/a/b", "s3://bucket/a", false),
            ("s3://bucket/a/b", "gs://bucket/a", false),
            ("s3://bucket/a/b", "/a", false),
            ("s3://bucket/a/b", "s3://bucket", true),
            ("az://container/lake/cp", "az://container/lake", true),
        ];
        for (inner, outer, within) in cases {
            assert_eq!(
                loc(inner).is_within(&loc(outer)),
                within,
                "{inner} within {outer}"
            );
        }
    }

    #[test]
    fn nested_tables_are_refused_naming_both_flags_and_paths() {
        let loc = |s: &str| s.parse::<TableLocation>().unwrap();
        let tables = |cp: &str, late: Option<&str>| Tables {
            events: loc("/lake/events"),
            sessions: loc("/lake/sessions"),
            live: loc("/lake/live"),
            checkpoint: loc(cp),
            late_events: late.map(loc),
        };
        assert_eq!(
            tables("/lake/checkpoint", Some("/lake/late")).check_nesting(),
            Ok(())
        );
        assert_eq!(
            tables("/lake/sessions_checkpoint", None).check_nesting(),
            Ok(()),
            "a sibling whose name starts like another is not inside it"
        );
        let cases = [
            (
                ("/lake/sessions/_cp", None),
                [
                    "--checkpoint (/lake/sessions/_cp/)",
                    "inside --sessions (/lake/sessions/)",
                ],
            ),
            (
                ("/lake/checkpoint", Some("/lake/checkpoint/late")),
                [
                    "--late-events (/lake/checkpoint/late/)",
                    "inside --checkpoint (/lake/checkpoint/)",
                ],
            ),
            (
                ("/lake/checkpoint", Some("/lake/events/late")),
                [
                    "--late-events (/lake/events/late/)",
                    "inside --events (/lake/events/)",
                ],
            ),
            (
                ("/lake", None),
                ["--events (/lake/events/)", "inside --checkpoint (/lake/)"],
            ),
            (
                ("/lake/checkpoint", Some("/lake/live")),
                ["--live and --late-events", "same location (/lake/live/)"],
            ),
        ];
        for ((cp, late), wanted) in cases {
            let err = tables(cp, late).check_nesting().unwrap_err();
            for w in wanted {
                assert!(err.contains(w), "{cp} {late:?}: `{w}` not in: {err}");
            }
        }
    }

    #[test]
    fn collect_values() {
        assert_eq!("auto".parse::<Collect>().unwrap(), Collect::Auto);
        assert_eq!("none".parse::<Collect>().unwrap(), Collect::None);
        assert_eq!(
            "page, uri".parse::<Collect>().unwrap(),
            Collect::Columns(vec!["page".into(), "uri".into()])
        );
    }
}

/// Applies `--config FILE [--env NAME]` beneath the command line and the environment.
///
/// Precedence, lowest first: built-in default < file's top-level keys < the file's
/// `[env.NAME]` section < `SESSIONIZER_*` variables < flags. clap already orders the last
/// three; this adds the file by appending `--flag value` for exactly the flags whose value
/// still comes from the default, then parsing again. Keys are flag names (`max-duration` or
/// `max_duration`); a key no subcommand knows is an error, so a typo does not pass silently.
/// `demo` takes no layers at all: it must not be steered into a real lake by a config file.
pub fn parse_layered<I, T>(argv: I) -> Result<crate::cli::Cli, LayerError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
    let mut argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = crate::cli::Cli::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    if matches.subcommand_name() == Some("demo") {
        // The demo deletes and rewrites its tables: it goes where its own --base-dir says,
        // never where a config file (--config, SESSIONIZER_CONFIG) points.
        return Ok(crate::cli::Cli::from_arg_matches(&matches)?);
    }
    let file = matches.get_one::<PathBuf>("config").cloned();
    let env = matches.get_one::<String>("environment").cloned();
    let Some(file) = file else {
        if let Some(env) = env {
            return Err(LayerError::Usage(format!(
                "--env {env} needs --config FILE, the TOML file that defines [env.{env}]"
            )));
        }
        return Ok(crate::cli::Cli::from_arg_matches(&matches)?);
    };
    let layers = load_layers(&file, env.as_deref())?;
    let (name, sub_matches) = matches.subcommand().expect("a subcommand is required");
    let sub = cmd.find_subcommand(name).expect("parsed subcommand exists");
    let known_anywhere = |flag: &str| {
        cmd.get_subcommands()
            .any(|c| c.get_arguments().any(|a| a.get_long() == Some(flag)))
    };
    for (key, value) in layers {
        let flag = key.replace('_', "-");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
        else {
            if known_anywhere(&flag) {
                continue; // meant for another subcommand
            }
            return Err(LayerError::Usage(format!(
                "{}: `{key}` is not a sessionizer flag; keys are flag names without the dashes \
                 (e.g. gap = \"30m\", max-files-per-batch = 100)",
                file.display()
            )));
        };
        let from_default = matches!(
            sub_matches.value_source(arg.get_id().as_str()),
            None | Some(ValueSource::DefaultValue)
        );
        if !from_default {
            continue;
        }
        match value {
            toml::Value::Boolean(true) => argv.push(format!("--{flag}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => argv.push(format!("--{flag}={s}").into()),
            toml::Value::Integer(i) => argv.push(format!("--{flag}={i}").into()),
            toml::Value::Float(f) => argv.push(format!("--{flag}={f}").into()),
            toml::Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                if matches!(arg.get_action(), clap::ArgAction::Append) {
                    // A repeatable flag (`--storage-option`): once per item.
                    argv.extend(parts.iter().map(|p| format!("--{flag}={p}").into()));
                } else {
                    argv.push(format!("--{flag}={}", parts.join(",")).into());
                }
            }
            other => {
                return Err(LayerError::Usage(format!(
                    "{}: `{key}` has a value of type {} that no flag takes",
                    file.display(),
                    other.type_str()
                )));
            }
        }
    }
    let matches = cmd.try_get_matches_from(&argv)?;
    Ok(crate::cli::Cli::from_arg_matches(&matches)?)
}

/// The file's keys in the order they apply: top-level first, then the environment section.
fn load_layers(file: &Path, env: Option<&str>) -> Result<Vec<(String, toml::Value)>, LayerError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        LayerError::Usage(format!("--config {}: cannot read it: {e}", file.display()))
    })?;
    let mut table: toml::Table = text.parse().map_err(|e| {
        LayerError::Usage(format!("--config {}: not valid TOML: {e}", file.display()))
    })?;
    let envs = match table.remove("env") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(LayerError::Usage(format!(
                "{}: `env` must be a table of sections like [env.prod]",
                file.display()
            )));
        }
        None => toml::Table::new(),
    };
    let mut merged: std::collections::BTreeMap<String, toml::Value> = table.into_iter().collect();
    if let Some(name) = env {
        let section = match envs.get(name) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => {
                let names: Vec<&String> = envs.keys().collect();
                return Err(LayerError::Usage(format!(
                    "--env {name}: {} has no [env.{name}] section (it has: {})",
                    file.display(),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
            }
        };
        merged.extend(section);
    }
    Ok(merged.into_iter().collect())
}

/// Why the command line (with its config file) could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("{0}")]
    Usage(String),
}

#[cfg(test)]
mod layer_tests {
    use super::parse_layered;
    use crate::cli::Command;

    #[test]
    fn the_demo_takes_no_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "base-dir = \"/data/lake\"\n[env.prod]\nbase-dir = \"/data/prod\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        for argv in [
            vec!["sessionizer", "demo", "--config", file],
            vec!["sessionizer", "--config", file, "--env", "prod", "demo"],
        ] {
            let cli = parse_layered(argv.clone()).unwrap_or_else(|_| panic!("{argv:?} parses"));
            let Command::Demo(args) = cli.command else {
                panic!("demo")
            };
            assert_eq!(
                args.base_dir.to_string(),
                "/tmp/sessionizer-demo/",
                "{argv:?}"
            );
        }
    }

    #[test]
    fn a_repeatable_flag_from_a_file_keeps_its_items_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "[env.prod]\nbase-dir = \"s3://lake/clicks\"\nstorage-option = [\"AWS_ENDPOINT_URL=http://minio:9000\", \"AWS_ALLOW_HTTP=true\"]\n",
        )
        .unwrap();
        let cli = parse_layered([
            "sessionizer",
            "status",
            "--config",
            file.to_str().unwrap(),
            "--env",
            "prod",
        ])
        .unwrap_or_else(|_| panic!("parses"));
        let Command::Status(args) = cli.command else {
            panic!("status")
        };
        let events = args.tables.resolve().events;
        assert_eq!(events.url().as_str(), "s3://lake/clicks/events/");
        let opts: Vec<(&str, &str)> = events
            .options()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            opts,
            [
                ("AWS_ALLOW_HTTP", "true"),
                ("AWS_ENDPOINT_URL", "http://minio:9000")
            ]
        );
    }
}
