//! Demo data for the session models of the reference jobs, and the flags that sessionize it.
//!
//! Each scenario writes one window of about 25 minutes of events from `--at` on, seeded, so
//! that two calls with different `--at` give two commits whose sessions continue across runs.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIN: i64 = 60_000_000;

/// The scenarios of `generate-rows --scenario` and `demo --scenario`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Retail click-stream: 10-minute inactivity timeout, event counts, online/offline.
    Clicks,
    /// Betting wallet: a deposit ends the session; the wins are summed.
    Wallet,
    /// Page paths: 16-minute timeout, every page in time order, duration.
    Pages,
    /// Start/end events paired per (userID, sessionID), epoch-millisecond times.
    Pairs,
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Clicks => "clicks",
            Scenario::Wallet => "wallet",
            Scenario::Pages => "pages",
            Scenario::Pairs => "pairs",
        }
    }

    pub fn schema(self) -> SchemaRef {
        let f = |n: &str, t: DataType| Field::new(n, t, true);
        Arc::new(Schema::new(match self {
            Scenario::Clicks => vec![
                f("user_id", DataType::Int64),
                f("event_id", DataType::Utf8),
                f("event_datetime", ts()),
                f("platform", DataType::Utf8),
                f("action", DataType::Utf8),
                f("uri", DataType::Utf8),
            ],
            Scenario::Wallet => vec![
                f("session_id", DataType::Utf8),
                f("event_time", ts()),
                f("win_amount", DataType::Float64),
                f("deposit", DataType::Boolean),
            ],
            Scenario::Pages => vec![
                f("user_id", DataType::Int64),
                f("visit_time", ts()),
                f("page", DataType::Utf8),
            ],
            Scenario::Pairs => vec![
                f("userID", DataType::Int64),
                f("sessionID", DataType::Utf8),
                f("eventType", DataType::Utf8),
                f("timestamp", DataType::Int64),
            ],
        }))
    }

    /// The `sessionize` flags that model this job.
    pub fn sessionize_flags(self) -> &'static [&'static str] {
        match self {
            Scenario::Clicks => &[
                "--time-column",
                "event_datetime",
                "--gap",
                "10m",
                "--collect",
                "action,uri",
            ],
            Scenario::Wallet => &[
                "--key",
                "session_id",
                "--time-column",
                "event_time",
                "--end-when",
                "deposit",
                "--sum",
                "win_amount",
                "--watermark-delay",
                "0",
                "--gap",
                "1h",
            ],
            Scenario::Pages => &["--gap", "16m"],
            Scenario::Pairs => &[
                "--mode",
                "pairs",
                "--key",
                "userID,sessionID",
                "--time-column",
                "timestamp",
                "--start-when",
                "eventType = 'SessionStart'",
                "--end-when",
                "eventType = 'SessionEnd'",
                "--pair-timeout",
                "1h",
                "--watermark-delay",
                "5m",
            ],
        }
    }

    /// One window of events from `at_us` on.
    pub fn rows(self, at_us: i64, seed: u64) -> RecordBatch {
        let mut rng = StdRng::seed_from_u64(seed ^ (at_us as u64));
        let cols: Vec<ArrayRef> = match self {
            Scenario::Clicks => clicks(&mut rng, at_us, seed),
            Scenario::Wallet => wallet(&mut rng, at_us),
            Scenario::Pages => pages(&mut rng, at_us),
            Scenario::Pairs => pairs(at_us),
        };
        RecordBatch::try_new(self.schema(), cols).expect("scenario columns match the schema")
    }
}

fn timestamps(t: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(t).with_timezone("UTC"))
}

fn clicks(rng: &mut StdRng, at: i64, seed: u64) -> Vec<ArrayRef> {
    let (mut user, mut id, mut time, mut platform, mut action, mut uri) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let platforms = ["web", "ios", "android"];
    let actions = ["view", "view", "click", "add_to_cart", "purchase"];
    for u in 1..=5i64 {
        let mut t = at + rng.random_range(0..3 * MIN);
        let p = platforms[rng.random_range(0..platforms.len())];
        for _ in 0..6 {
            user.push(u);
            id.push(format!("evt-{seed}-{}-{}", at / 1_000_000, id.len()));
            time.push(t);
            platform.push(p);
            action.push(actions[rng.random_range(0..actions.len())]);
            uri.push(format!("/products/{}", rng.random_range(100..120)));
            // Mostly short pauses, sometimes a pause past the 10-minute timeout.
            t += if rng.random_bool(0.15) {
                12 * MIN
            } else {
                rng.random_range(MIN / 2..4 * MIN)
            };
        }
    }
    vec![
        Arc::new(Int64Array::from(user)),
        Arc::new(StringArray::from(id)),
        timestamps(time),
        Arc::new(StringArray::from(platform)),
        Arc::new(StringArray::from(action)),
        Arc::new(StringArray::from(uri)),
    ]
}

fn wallet(rng: &mut StdRng, at: i64) -> Vec<ArrayRef> {
    let (mut sid, mut time, mut win, mut dep) = (vec![], vec![], vec![], vec![]);
    for w in 1..=4 {
        let mut t = at + rng.random_range(0..2 * MIN);
        let bets = rng.random_range(3..7);
        // Wallets 1 and 3 deposit at the end of the window; 2 and 4 keep playing.
        let deposits = w % 2 == 1;
        for b in 0..bets {
            let last = b == bets - 1;
            sid.push(format!("wallet-{w}"));
            time.push(t);
            win.push(if last && deposits {
                0.0
            } else {
                (rng.random_range(-500..1000) as f64) / 100.0
            });
            dep.push(last && deposits);
            t += rng.random_range(MIN..3 * MIN);
        }
    }
    vec![
        Arc::new(StringArray::from(sid)),
        timestamps(time),
        Arc::new(Float64Array::from(win)),
        Arc::new(BooleanArray::from(dep)),
    ]
}

fn pages(rng: &mut StdRng, at: i64) -> Vec<ArrayRef> {
    let (mut user, mut time, mut page) = (vec![], vec![], vec![]);
    for u in 1..=4i64 {
        let mut t = at + rng.random_range(0..2 * MIN);
        for _ in 0..5 {
            user.push(u);
            time.push(t);
            page.push(format!(
                "/{}.html",
                ["home", "search", "product", "cart", "checkout"][rng.random_range(0..5)]
            ));
            t += if rng.random_bool(0.2) {
                20 * MIN
            } else {
                rng.random_range(MIN..6 * MIN)
            };
        }
    }
    vec![
        Arc::new(Int64Array::from(user)),
        timestamps(time),
        Arc::new(StringArray::from(page)),
    ]
}

/// A fixed pattern per window, so that every status shows up and one pair spans two windows:
/// (1, s1) complete; (1, s2) starts at the end of the window and ends in the next one;
/// (2, s1) starts twice (missing_end); (3, s1) ends without a start (missing_start).
fn pairs(at: i64) -> Vec<ArrayRef> {
    let ms = |m: i64| (at + m * MIN) / 1000;
    let rows: Vec<(i64, &str, &str, i64)> = vec![
        (1, "s2", "SessionEnd", ms(1)),
        (1, "s1", "SessionStart", ms(2)),
        (2, "s1", "SessionStart", ms(3)),
        (2, "s1", "SessionStart", ms(5)),
        (1, "s1", "PageView", ms(6)),
        (1, "s1", "SessionEnd", ms(9)),
        (2, "s1", "SessionEnd", ms(12)),
        (3, "s1", "SessionEnd", ms(14)),
        (1, "s2", "SessionStart", ms(20)),
    ];
    vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
    ]
}
