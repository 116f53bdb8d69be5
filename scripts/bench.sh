#!/usr/bin/env bash
# Benchmark: a backlog of N events sessionized in one run, then the incremental case.
#
#   scripts/bench.sh [--events N] [--commits C] [--users U] [--seed S] [--small-commits K]
#                    [--batch-limit SIZE] [--shards N [--key-buckets B]]
#   scripts/bench.sh --live-keys K1,K2,... [--live-modes rewrite,deletion-vectors]
#                    [--live-ticks T] [--seed S]
#
# With `--live-keys`, only the tick on a large live table is measured, for each number of
# live keys and each `--live-mode`: K users with two events each, one backlog run, one
# closing tick (every key goes offline), then T ticks (default 3) of 10,000 events over
# random keys. It prints, per tick, the wall time, the live upsert's time, the bytes the tick
# added to the live table's folder, and the peak RSS; then the medians and the slowest tick.
#
# The backlog is also run once more, on a copy of the same events, with
# `--max-bytes-per-batch SIZE` (default 32MiB) to show the peak memory following the batch.
# With `--shards N`, the backlog is run a third time, on another copy, as N shard processes
# started together on this machine (`sessionize --shards N --shard I`): the wall time of the
# whole, and the largest peak RSS of one shard. Then the same events are generated again with
# a key-bucket column (`generate-rows --key-buckets B`, default 16: Spark's
# pmod(xxhash64(user_id), B), the table partitioned by it) and run as N shards with
# `--key-buckets B --bucket-column bucket`, so that each shard decodes only its buckets' files.
# Shard 0 is also run alone on each layout, for one shard's own read time without the others
# competing for the cores.
#
# Prints the figures of each run (wall seconds, events/s, peak RSS, per-phase times from the
# JSON summary) and ends with `bench: N events in S s = E events/s, peak RSS M MiB`.
# Timing belongs here, never in `cargo test`: the machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=10000000
COMMITS=10
USERS=""
SEED=7
SMALL_COMMITS=1000
BATCH_LIMIT=32MiB
SHARDS=""
KEY_BUCKETS=16
LIVE_KEYS=""
LIVE_MODES="rewrite,deletion-vectors"
LIVE_TICKS=3
while [ $# -gt 0 ]; do
    case "$1" in
        --events) EVENTS="$2"; shift 2 ;;
        --commits) COMMITS="$2"; shift 2 ;;
        --users) USERS="$2"; shift 2 ;;
        --seed) SEED="$2"; shift 2 ;;
        --small-commits) SMALL_COMMITS="$2"; shift 2 ;;
        --batch-limit) BATCH_LIMIT="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --key-buckets) KEY_BUCKETS="$2"; shift 2 ;;
        --live-keys) LIVE_KEYS="$2"; shift 2 ;;
        --live-modes) LIVE_MODES="$2"; shift 2 ;;
        --live-ticks) LIVE_TICKS="$2"; shift 2 ;;
        *) echo "bench: unknown option $1" >&2; exit 2 ;;
    esac
done
USERS="${USERS:-$((EVENTS / 11))}"

if [ ! -x /usr/bin/time ]; then
    echo "bench: installing GNU time for peak-RSS figures" >&2
    apt-get update -qq && apt-get install -y -qq time >/dev/null
fi

cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sessionizer"
BASE="$(mktemp -d /tmp/sessionizer-bench.XXXXXX)"
trap 'rm -rf "$BASE"' EXIT
AT="2026-02-15T00:00:00Z"

# --live-keys: the tick on a large live table, per number of keys and live mode.
if [ -n "$LIVE_KEYS" ]; then
    echo "| live keys | mode | tick | wall s | merge_live ms | bytes added to live | peak RSS MiB | plan/read/sessionize/sessions/state ms |"
    echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    for keys in ${LIVE_KEYS//,/ }; do
        for mode in ${LIVE_MODES//,/ }; do
            dir="$BASE/live-$mode-$keys"
            run() { "$BIN" sessionize --base-dir "$dir" --live-mode "$mode" --output json "$@"; }
            "$BIN" generate-rows --base-dir "$dir" --users "$keys" --per-user 2 --seed "$SEED" \
                --at "2026-02-15T00:00:00Z" >/dev/null
            run >/dev/null 2>&1
            "$BIN" generate-rows --base-dir "$dir" --closing >/dev/null
            run >/dev/null 2>&1
            for t in $(seq 1 "$LIVE_TICKS"); do
                at=$(date -u -d "2026-02-15T02:00:00Z + $(((t - 1) * 10)) hours" +%Y-%m-%dT%H:%M:%SZ)
                "$BIN" generate-rows --base-dir "$dir" --rows 10000 --commits 1 --users "$keys" \
                    --seed $((SEED + t)) --at "$at" >/dev/null
                before=$(du -sb "$dir/live_sessions" | cut -f1)
                /usr/bin/time -v "$BIN" sessionize --base-dir "$dir" --live-mode "$mode" \
                    --output json >"$BASE/tick.json" 2>"$BASE/tick.time" \
                    || { cat "$BASE/tick.time" >&2; exit 1; }
                after=$(du -sb "$dir/live_sessions" | cut -f1)
                python3 - "$keys" "$mode" "$t" "$BASE/tick.json" "$BASE/tick.time" \
                    "$((after - before))" <<'PY' | tee -a "$BASE/live.rows"
import json, re, sys
keys, mode, t, summary, timing, added = sys.argv[1:7]
s = json.load(open(summary))
tm = open(timing).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", tm).group(1)) / 1024
w = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", tm).group(1).strip()
m, sec = w.split(":")[-2:]
wall = int(m) * 60 + float(sec)
ph = s["phases"]
other = "/".join(str(ph[k]) for k in ["plan", "read", "sessionize", "write_sessions", "write_state"])
print(f"| {int(keys):,} | {mode} | {t} | {wall:.2f} | {ph['merge_live']} | "
      f"{int(added) / 2**20:.1f} MiB | {rss:.0f} | {other} |")
PY
            done
            rm -rf "$dir"
        done
    done
    python3 - "$BASE/live.rows" <<'PY'
import statistics, sys
by = {}
for line in open(sys.argv[1]):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    by.setdefault((c[0], c[1]), []).append((float(c[3]), float(c[4]), c[5]))
for (keys, mode), v in by.items():
    wall = statistics.median(x[0] for x in v)
    live = statistics.median(x[1] for x in v)
    added = sorted(x[2] for x in v)[len(v) // 2]
    print(f"bench: {keys} live keys, {mode}, {len(v)} ticks: median {wall:.2f} s (slowest "
          f"{max(x[0] for x in v):.2f} s), live upsert {live:.0f} ms, {added} added to the live table")
PY
    exit 0
fi

# Runs `sessionize` under /usr/bin/time; prints one table row; leaves the JSON in $BASE/last.json.
measure() {
    local label="$1"; shift
    /usr/bin/time -v "$BIN" sessionize --base-dir "${RUN_BASE:-$BASE}" --output json "$@" \
        >"$BASE/last.json" 2>"$BASE/time.txt" || { cat "$BASE/time.txt" >&2; exit 1; }
    python3 - "$label" "$BASE/last.json" "$BASE/time.txt" <<'PY'
import json, re, sys
label, summary, timing = sys.argv[1], json.load(open(sys.argv[2])), open(sys.argv[3]).read()
rss_mib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1)) / 1024
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", timing).group(1).strip()
parts = [float(p) for p in wall.split(":")]
secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
rows = summary["rows_read"]
rate = rows / secs if secs > 0 else 0
ph = summary["phases"]
print(f"| {label} | {rows} | {summary['sessions_closed']} | {summary['sessions_pending']} | "
      f"{secs:.2f} | {rate:,.0f} | {rss_mib:.0f} | "
      + " | ".join(str(ph[k]) for k in ["plan", "read", "sessionize", "write_sessions", "merge_live", "write_state", "commit"]) + " |")
open(sys.argv[2] + ".line", "w").write(f"{rows} {secs:.2f} {rate:.0f} {rss_mib:.0f}")
PY
}

echo "bench: generating $EVENTS events of $USERS users in $COMMITS commits under $BASE" >&2
start=$(date +%s.%N)
"$BIN" generate-rows --base-dir "$BASE" --rows "$EVENTS" --commits "$COMMITS" --users "$USERS" --seed "$SEED" --at "$AT" >&2
echo "bench: generated in $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s" >&2
# Let the generated files reach the disk first: a real backlog was written long before the run,
# and write-back of freshly generated files otherwise lands in the read phase (seconds here).
# A copy of the same events for the run with a batch limit.
mkdir -p "$BASE/limited" && cp -r "$BASE/events" "$BASE/limited/events"
if [ -n "$SHARDS" ]; then
    for d in sharded alone; do mkdir -p "$BASE/$d" && cp -r "$BASE/events" "$BASE/$d/events"; done
    # The same events with their key bucket, partitioned by it, for --key-buckets.
    for d in bucketed bucketed-alone; do
        "$BIN" generate-rows --base-dir "$BASE/$d" --rows "$EVENTS" --commits "$COMMITS" \
            --users "$USERS" --seed "$SEED" --at "$AT" --key-buckets "$KEY_BUCKETS" >&2
    done
fi
sync

echo "| run | events | closed | pending | wall s | events/s | peak RSS MiB | plan | read | sessionize | write_sessions | merge_live | write_state | commit |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
measure "backlog, one run"
read -r B_ROWS B_SECS B_RATE B_RSS < "$BASE/last.json.line" || true

measure "nothing new"

# Bulk rows span ten hours from --at, so each later step starts where the previous one ended.
"$BIN" generate-rows --base-dir "$BASE" --rows 10000 --commits 1 --users "$USERS" --seed $((SEED + 1)) --at "2026-02-15T10:00:00Z" >/dev/null
measure "+1 commit of 10,000"

"$BIN" generate-rows --base-dir "$BASE" --rows $((SMALL_COMMITS * 10)) --commits "$SMALL_COMMITS" --users "$USERS" --seed $((SEED + 2)) --at "2026-02-15T20:00:00Z" >/dev/null
measure "+$SMALL_COMMITS small commits"
"$BIN" generate-rows --base-dir "$BASE" --rows 10000 --commits 1 --users "$USERS" --seed $((SEED + 3)) --at "2026-02-16T06:00:00Z" >/dev/null
measure "+1 commit of 10,000, after them"

RUN_BASE="$BASE/limited" measure "backlog, --max-bytes-per-batch $BATCH_LIMIT" --max-bytes-per-batch "$BATCH_LIMIT"
read -r L_ROWS L_SECS L_RATE L_RSS < "$BASE/last.json.line" || true

echo "bench: with --max-bytes-per-batch $BATCH_LIMIT: $L_ROWS events in $L_SECS s, peak RSS $L_RSS MiB"
echo "bench: $B_ROWS events in $B_SECS s = $B_RATE events/s, peak RSS $B_RSS MiB"

if [ -n "$SHARDS" ]; then
    # N shard processes at once on one machine: they share its cores, so this shows the cost
    # of the shared reads and concurrent commits rather than N machines' speed.
    all_shards() {
        local label="$1" base="$2"; shift 2
        local start end pids=()
        start=$(date +%s.%N)
        for i in $(seq 0 $((SHARDS - 1))); do
            /usr/bin/time -v "$BIN" sessionize --base-dir "$base" --output json \
                --shards "$SHARDS" --shard "$i" "$@" >"$BASE/shard$i.json" 2>"$BASE/shard$i.time" &
            pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || { cat "$BASE"/shard*.time >&2; exit 1; }; done
        end=$(date +%s.%N)
        python3 - "$SHARDS" "$start" "$end" "$BASE" "$label" <<'PY'
import json, re, sys
n, start, end, base, label = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = closed = decoded = times_only = 0
rss, reads = [], []
for i in range(n):
    s = json.load(open(f"{base}/shard{i}.json"))
    rows += s["rows_read"]; closed += s["sessions_closed"]
    decoded += s["files_read"]; times_only += s["files_watermark_only"]
    reads.append(s["phases"]["read"])
    t = open(f"{base}/shard{i}.time").read()
    rss.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024)
secs = end - start
print(f"bench: backlog as {n} shard processes on this machine, {label}: {rows} events ({closed} "
      f"sessions closed) in {secs:.2f} s = {rows / secs:,.0f} events/s; files decoded "
      f"{decoded}, time column only {times_only}; read phase per shard "
      f"{min(reads)}-{max(reads)} ms; largest peak RSS of one shard {max(rss):.0f} MiB")
PY
    }
    all_shards "every file decoded by every shard" "$BASE/sharded"
    all_shards "--key-buckets $KEY_BUCKETS" "$BASE/bucketed" --key-buckets "$KEY_BUCKETS" --bucket-column bucket
    # Shard 0 alone: one shard's own cost, as on a machine of its own.
    echo "| run | events | closed | pending | wall s | events/s | peak RSS MiB | plan | read | sessionize | write_sessions | merge_live | write_state | commit |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    RUN_BASE="$BASE/alone" measure "shard 0 of $SHARDS alone" --shards "$SHARDS" --shard 0
    RUN_BASE="$BASE/bucketed-alone" measure "shard 0 of $SHARDS alone, --key-buckets $KEY_BUCKETS" \
        --shards "$SHARDS" --shard 0 --key-buckets "$KEY_BUCKETS" --bucket-column bucket
fi
