//! The session rules of SPEC.md, on one key's events already sorted by time.
//!
//! This is the only place that knows where a session starts and when it may close. It works on
//! a slice of the sorted time column (microseconds) and returns index ranges, so the caller can
//! gather output columns in bulk.

use std::ops::Range;

use arrow::array::{Array, BooleanArray};

/// Why a session was closed; written to the `close_reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    Inactivity,
    EndMarker,
    MaxDuration,
    Flush,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Inactivity => "inactivity",
            CloseReason::EndMarker => "end_marker",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::Flush => "flush",
        }
    }
}

/// What ended a session's run of events (not yet whether it may close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// The next event is more than `gap` later, or there is no next event yet.
    Gap,
    /// The last event matched `--end-when`.
    EndMarker,
    /// The next event is at or beyond `start + max`.
    MaxDuration,
}

/// One session as a range of rows of the sorted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpan {
    pub start: usize,
    pub end: usize,
    pub boundary: Boundary,
    pub reason: Option<CloseReason>,
}

/// The rule parameters, all in microseconds of event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRules {
    pub gap_us: i64,
    pub delay_us: i64,
    pub max_duration_us: Option<i64>,
    /// Pairing mode: an open start with no end by `start + timeout` is `missing_end`.
    pub pair_timeout_us: i64,
}

impl SessionRules {
    /// Cuts one key's events (rows `range` of the sorted batch) into sessions.
    ///
    /// Rule 1: an event more than `gap` after the previous one starts a new session; exactly
    /// `gap` stays. Rule 7: the event after an end marker starts a new session. Rule 8: an event
    /// at or beyond `start + max` starts a new session.
    pub fn cut(&self, times: &[i64], ends: &BooleanArray, range: Range<usize>) -> Vec<SessionSpan> {
        let mut spans = Vec::new();
        if range.is_empty() {
            return spans;
        }
        let is_end = |i: usize| ends.is_valid(i) && ends.value(i);
        let mut start = range.start;
        for i in range.start + 1..range.end {
            let boundary = if is_end(i - 1) {
                Some(Boundary::EndMarker)
            } else if matches!(self.max_duration_us, Some(m) if times[i] >= times[start].saturating_add(m))
            {
                Some(Boundary::MaxDuration)
            } else if times[i] - times[i - 1] > self.gap_us {
                Some(Boundary::Gap)
            } else {
                None
            };
            if let Some(boundary) = boundary {
                spans.push(SessionSpan {
                    start,
                    end: i,
                    boundary,
                    reason: None,
                });
                start = i;
            }
        }
        let boundary = if is_end(range.end - 1) {
            Boundary::EndMarker
        } else {
            Boundary::Gap
        };
        spans.push(SessionSpan {
            start,
            end: range.end,
            boundary,
            reason: None,
        });
        spans
    }

    /// Rule 3 (and 9): whether a session may close now, and why.
    ///
    /// A session closes once no event that is not late could still join it: every later event
    /// is at least the watermark, so the question is whether the watermark is past the last
    /// instant at which an event could still attach.
    pub fn close_reason(
        &self,
        span: &SessionSpan,
        times: &[i64],
        watermark: Option<i64>,
        flush: bool,
    ) -> Option<CloseReason> {
        let first = times[span.start];
        let last = times[span.end - 1];
        let by_rules = watermark.and_then(|w| {
            if span.boundary == Boundary::EndMarker && w >= last {
                return Some(CloseReason::EndMarker);
            }
            if let Some(max) = self.max_duration_us
                && w >= first.saturating_add(max)
            {
                return Some(CloseReason::MaxDuration);
            }
            if w > last.saturating_add(self.gap_us) {
                return Some(match span.boundary {
                    Boundary::EndMarker => CloseReason::EndMarker,
                    Boundary::MaxDuration => CloseReason::MaxDuration,
                    Boundary::Gap => CloseReason::Inactivity,
                });
            }
            None
        });
        by_rules.or(if flush {
            Some(match span.boundary {
                Boundary::EndMarker => CloseReason::EndMarker,
                Boundary::MaxDuration => CloseReason::MaxDuration,
                Boundary::Gap => CloseReason::Flush,
            })
        } else {
            None
        })
    }
}
