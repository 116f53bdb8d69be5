#!/usr/bin/env bash
# Fault soak for the exactly-once promise (README "Guarantees", SPEC "Never lose, never
# duplicate"): many incremental `sessionize` runs, most of them hurt on purpose, must leave the
# same tables as one run that was never hurt.
#
#   scripts/soak.sh [--bin PATH] [--rounds N] [--seed S] [--dir DIR] [--short]
#                   [--live-mode M] [--shards N [--key-buckets B]]
#
#   --bin PATH   the sessionizer binary (default:
#                ${CARGO_TARGET_DIR:-$HOME/.cache/sessionizer-target}/debug/sessionizer);
#                it is hard-linked (or copied) into DIR first, so a rebuild during the soak
#                does not change the binary under test
#   --rounds N   rounds of "append events, run with a fault" (default 40; 20 with --short)
#   --seed S     every random choice (data, fault kinds, batch sizes, fault instants as a
#                fraction of a run's duration, failpoints) comes from this seed (default 1);
#                the plan is written to DIR/plan.txt. Only the wall-clock timing of a fault
#                within a run varies between two runs with the same seed.
#   --dir DIR    where the tables and logs go (default: a fresh mktemp dir under /tmp, deleted
#                at the end when every check passed; a --dir is always kept)
#   --short      a CI-sized run: fewer rounds and commits (1-2 minutes with a debug binary)
#   --live-mode M  the soak's runs upsert the live table with `--live-mode M` (rewrite or
#                deletion-vectors); the reference always rewrites, so check 3 compares the two
#   --shards N   every run is one shard of N (`--shards N --shard I`): each round first runs
#                the other shards cleanly, then hurts shard (round mod N); the final clean and
#                flush runs go over every shard. The reference stays one unsharded run, so
#                check 3 also checks that N shards cutting their own batches equal it
#   --key-buckets B  with --shards: the events carry Spark's pmod(xxhash64(user_id), B) and are
#                partitioned by it (`generate-rows --key-buckets B`), and every shard run skips
#                other shards' files (`--key-buckets B --bucket-column bucket`)
#
# Each round appends 1-3 commits of random events (`generate-rows --users U --per-user P
# --seed S --at T`, T = 40 minutes later for each commit, so that every commit's events come
# after the previous commit's: nothing is ever late) to DIR/soak/events, then runs
# `sessionize --gap 30m --watermark-delay 20m --max-files-per-batch 1|2` (a run has several
# batches; sessions close two commits later, so state crosses batches and runs) with one fault:
#
#   kill        kill -9 at a random instant of the run
#   stop        SIGSTOP at a random instant (`status` tells whether the frozen run holds the
#               lock; if so, a run without --break-lock must exit 75); then a `--break-lock` run
#               takes the checkpoint over and finishes; then SIGCONT the first run and wait for
#               it. A first run that held the lock when frozen is "stale" once the other run has
#               committed: SPEC says it must write nothing more and exit 75. Each stale run that
#               exits 0 is counted (that is the fencing bug).
#   concurrent  2-3 runs started together: one works, the others exit 75 (or 0 with nothing
#               to do, if they reach the lock after the first one released it)
#   failpoint   SESSIONIZER_FAILPOINT=after-plan|after-read|after-sessions-commit|
#               after-live-commit|after-state-commit|after-batch-1|after-batch-2 (exit 101)
#   none        an ordinary run (also measures how long a run takes, to place the faults)
#
# The damage of a round is repaired by the next round's run, which also has new commits. After
# the rounds: one clean run, then `sessionize --flush`. Then the checks (tables are read with
# the binary's own `query`, so nothing else is needed):
#
#   1. no session_id appears twice in the sessions table;
#   2. sum(event_count) over sessions = rows in events - late - invalid (the late/invalid rows
#      are kept with --late-events and counted; here both must be 0);
#   3. the sessions and live tables equal, row for row, those of a reference: a copy of the same
#      events table sessionized by one uninterrupted run with the same flags, then --flush.
#      This comparison is valid although the batches differ: with nothing late, "everything
#      closed plus --flush equals one batch sessionization of all events" (README rule 6), and
#      session ids are a hash of key, start time and first event's position (version, file,
#      row), which the copy keeps. The close reasons agree too: both sides end
#      at the same watermark, a session the watermark closed on one side is closed by it on the
#      other, and `flush` marks exactly those it would not have closed. Live rows: every key's
#      last session, offline after the flush, on both sides.
#   4. fencing: every stale run (see `stop`) exited 75;
#   5. exit codes: every run exited 0, 75, 101 (its failpoint) or was killed; no group of
#      concurrent runs had two runs commit batches; no run ignored a frozen run's lock; the
#      final clean and flush runs exited 0; every round ran.
#
# Prints one line per round, PASS/FAIL with figures per check, and a summary line (faults per
# kind, runs per exit code, checks passed). Exits 1 when a check fails, 2 on bad usage.
# Per-run stdout/stderr are in DIR/logs/. Nothing here builds: point --bin at a built binary.
set -uo pipefail

BIN="${CARGO_TARGET_DIR:-$HOME/.cache/sessionizer-target}/debug/sessionizer"
# Every flag also reads SESSIONIZER_<FLAG> (and SESSIONIZER_CONFIG a config file): none of the
# caller's may change the runs; the failpoint is set per run.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^SESSIONIZER_')
ROUNDS=""
SEED=1
DIR=""
SHORT=0
LIVE_MODE=rewrite
SHARDS=""
KEY_BUCKETS=""
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="${2:?--bin needs a path}"; shift 2 ;;
        --rounds) ROUNDS="${2:?--rounds needs a number}"; shift 2 ;;
        --seed) SEED="${2:?--seed needs a number}"; shift 2 ;;
        --dir) DIR="${2:?--dir needs a path}"; shift 2 ;;
        --short) SHORT=1; shift ;;
        --live-mode) LIVE_MODE="${2:?--live-mode needs rewrite or deletion-vectors}"; shift 2 ;;
        --shards) SHARDS="${2:?--shards needs a number}"; shift 2 ;;
        --key-buckets) KEY_BUCKETS="${2:?--key-buckets needs a number}"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "soak: unknown option $1" >&2; usage ;;
    esac
done
ROUNDS="${ROUNDS:-$([ "$SHORT" = 1 ] && echo 20 || echo 40)}"
case "$ROUNDS$SEED$SHARDS$KEY_BUCKETS" in *[!0-9]*) echo "soak: --rounds, --seed, --shards and --key-buckets take integers" >&2; exit 2 ;; esac
if [ -n "$KEY_BUCKETS" ] && [ -z "$SHARDS" ]; then
    echo "soak: --key-buckets needs --shards" >&2; exit 2
fi
GEN_FLAGS=()   # of every generate-rows
[ -n "$KEY_BUCKETS" ] && GEN_FLAGS=(--key-buckets "$KEY_BUCKETS")
SHARD=0        # the shard the next run is (with --shards)
if [ ! -x "$BIN" ]; then
    echo "soak: no sessionizer binary at $BIN (build it, or pass --bin)" >&2
    exit 2
fi
KEEP=1
if [ -z "$DIR" ]; then
    DIR="$(mktemp -d /tmp/sessionizer-soak.XXXXXX)"
    KEEP=0
fi
mkdir -p "$DIR/logs"
DIR="$(cd "$DIR" && pwd)"
if [ -e "$DIR/soak" ] || [ -e "$DIR/ref" ]; then
    echo "soak: $DIR already holds a soak (soak/ or ref/); give an empty --dir" >&2
    exit 2
fi
LOGS="$DIR/logs"
BASE="$DIR/soak"
REF="$DIR/ref"
SBIN="$DIR/sessionizer"
ln -f "$BIN" "$SBIN" 2>/dev/null || cp "$BIN" "$SBIN"
GAP=30m
DELAY=20m
T0=1772323200 # 2026-03-01T00:00:00Z; commit v has its events from T0 + v * 40 min on
STEP=2400

# Runs still going (pid -> tag), so that an interrupted soak leaves no frozen process behind.
declare -A RUNNING=()
cleanup() {
    local p
    for p in "${!RUNNING[@]}"; do
        kill -CONT "$p" 2>/dev/null
        kill -9 "$p" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
sleep_ms() { sleep "$(printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )))"; }
# A field of a JSON summary (stdout of `sessionize --output json`), or "-" when there is none.
json_field() {
    python3 - "$1" "$2" <<'PY'
import json, sys
try:
    print(json.load(open(sys.argv[1])).get(sys.argv[2], "-"))
except Exception:
    print("-")
PY
}

# ---- the plan: every random choice, from the seed --------------------------------------------
python3 - "$SEED" "$ROUNDS" "$SHORT" >"$DIR/plan.txt" <<'PY'
import random, sys
seed, rounds, short = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
rng = random.Random(seed)
kinds = ["kill", "stop", "concurrent", "failpoint", "none"]
weights = [30, 25, 15, 15, 15]
first = kinds[:]
rng.shuffle(first)  # every kind at least once, even in a short soak
points = ["after-plan", "after-read", "after-sessions-commit", "after-live-commit",
          "after-state-commit", "after-batch-1", "after-batch-2"]
max_users = 120 if short else 250
for r in range(1, rounds + 1):
    kind = first[r - 1] if r <= len(first) else rng.choices(kinds, weights)[0]
    commits = ",".join(f"{rng.randint(10, max_users)}x{rng.randint(1, 4)}"
                       for _ in range(rng.randint(1, 2 if short else 3)))
    # round kind commits(users x per_user,...) max-files fault-instant(permille of a run)
    # failpoint concurrent-runs max-files-of-the-takeover
    print(r, kind, commits, rng.randint(1, 2), rng.randint(0, 1000), rng.choice(points),
          rng.randint(2, 3), rng.randint(1, 2))
PY

# ---- runs ------------------------------------------------------------------------------------
common() { # sets CF: the flags of every sessionize run on base dir $1 (the reference: rewrite,
    # unsharded); the soak's runs are shard $SHARD with --shards
    CF=(--base-dir "$1" --late-events "$1/late_events" --gap "$GAP" --watermark-delay "$DELAY" --output json)
    if [ "$1" = "$BASE" ]; then
        CF+=(--live-mode "$LIVE_MODE")
        [ -n "$SHARDS" ] && CF+=(--shards "$SHARDS" --shard "$SHARD")
        [ -n "$KEY_BUCKETS" ] && CF+=(--key-buckets "$KEY_BUCKETS" --bucket-column bucket)
    fi
}
declare -A CODES=()      # exit code -> runs
declare -A FAULTS=()     # fault kind -> rounds
declare -A START=()      # pid -> start ms
UNEXPECTED=()            # "tag: exit N" for codes that no fault explains
RUN_N=0
UNIT_MS=300              # a run takes about UNIT_MS * (batches + 1): learnt from finished runs
UNPROCESSED=0            # commits appended since a run last finished its work
ROWS_LATE_REPORTED=0
ROWS_INVALID_REPORTED=0
# start_run TAG [ENV=VAL ...] -- FLAGS...: starts `sessionize` in the background on $BASE;
# sets PID and TAG.
start_run() {
    local name="$1"; shift
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    RUN_N=$((RUN_N + 1))
    TAG="$(printf 'r%02d-%03d-%s' "$round" "$RUN_N" "$name")"
    common "$BASE"
    env "${envs[@]}" "$SBIN" sessionize "${CF[@]}" "$@" \
        >"$LOGS/$TAG.out" 2>"$LOGS/$TAG.err" &
    PID=$!
    RUNNING[$PID]="$TAG"
    START[$PID]="$(now_ms)"
}
# finish_run PID TAG ALLOWED...: waits; sets CODE, BATCHES, ELAPSED; tallies the exit code and
# records it as unexpected unless it is 0, 75 or one of ALLOWED.
finish_run() {
    local pid="$1" tag="$2"; shift 2
    wait "$pid" 2>/dev/null # (no "Killed" notice from the shell)
    CODE=$?
    ELAPSED=$(( $(now_ms) - ${START[$pid]} ))
    unset "RUNNING[$pid]"
    CODES[$CODE]=$(( ${CODES[$CODE]:-0} + 1 ))
    BATCHES="-"
    if [ "$CODE" = 0 ]; then
        UNPROCESSED=0
        BATCHES="$(json_field "$LOGS/$tag.out" batches)"
        local late invalid
        late="$(json_field "$LOGS/$tag.out" rows_late)"
        invalid="$(json_field "$LOGS/$tag.out" rows_invalid)"
        [ "$late" != "-" ] && ROWS_LATE_REPORTED=$((ROWS_LATE_REPORTED + late))
        [ "$invalid" != "-" ] && ROWS_INVALID_REPORTED=$((ROWS_INVALID_REPORTED + invalid))
    fi
    local ok=0 a
    for a in 0 75 "$@"; do [ "$CODE" = "$a" ] && ok=1; done
    if [ "$ok" = 0 ]; then
        UNEXPECTED+=("$tag: exit $CODE")
        echo "    !! $tag exited $CODE: $(tail -n 3 "$LOGS/$tag.err" | tr '\n' ' ')"
    fi
}
learn_duration() { # a run that did all its work tells how long runs take now
    if [ "$CODE" = 0 ] && [ "$BATCHES" != "-" ] && [ "$BATCHES" -gt 0 ]; then
        UNIT_MS=$(( (UNIT_MS + ELAPSED / (BATCHES + 1)) / 2 ))
    fi
}
lock_holder() { # the pid holding the (shard's) checkpoint lock, from `status` ("pid N on host ..."), or "none"
    local cp=()
    [ -n "$SHARDS" ] && cp=(--checkpoint "$BASE/checkpoint/shard-$SHARD-of-$SHARDS")
    "$SBIN" status --base-dir "$BASE" "${cp[@]}" --output json 2>/dev/null | python3 -c 'import json, re, sys
try:
    m = re.match(r"pid (\d+) ", json.load(sys.stdin).get("lock") or "")
    print(m.group(1) if m else "none")
except Exception:
    print("none")'
}

# ---- the rounds --------------------------------------------------------------------------------
SOAK_START="$(now_ms)"
echo "soak: seed $SEED, $ROUNDS rounds, tables and logs in $DIR"
echo "soak: binary $BIN ($(stat -c '%s bytes, built %y' "$BIN" | cut -d. -f1)), $("$SBIN" --version 2>/dev/null)"
VERSIONS=0       # commits appended so far
ROWS_GENERATED=0
STALE_TOTAL=0    # runs frozen while holding the lock, then taken over by a run that committed
STALE_EXIT0=0    # ... that still exited 0 after waking (the fencing bug)
STALE_EXIT75=0
STALE_OTHER=0
KILL_MISSED=0    # the run had already finished when kill -9 came
CONC_DOUBLE=0    # concurrent groups where more than one run committed batches
LOCK_IGNORED=0   # runs without --break-lock that did not exit 75 while a frozen run held the lock
round=0
ROUNDS_DONE=0
while read -r round kind commits maxf permille fp nconc takeover_maxf; do
    FAULTS[$kind]=$(( ${FAULTS[$kind]:-0} + 1 ))
    # Append this round's commits.
    added=""
    for c in ${commits//,/ }; do
        UNPROCESSED=$((UNPROCESSED + 1))
        users="${c%x*}"; per="${c#*x}"
        at="$(date -u -d "@$((T0 + VERSIONS * STEP))" +%Y-%m-%dT%H:%M:%SZ)"
        out="$("$SBIN" generate-rows --base-dir "$BASE" --users "$users" --per-user "$per" \
            --seed "$(( SEED * 100000 + VERSIONS ))" --at "$at" "${GEN_FLAGS[@]}" 2>&1)" || {
            echo "soak: generate-rows failed: $out" >&2; exit 1; }
        n="$(sed -n 's/.*appended \([0-9]*\) rows.* as version \([0-9]*\).*/\1/p' <<<"$out")"
        v="$(sed -n 's/.* as version \([0-9]*\).*/\1/p' <<<"$out")"
        ROWS_GENERATED=$((ROWS_GENERATED + n))
        VERSIONS=$((VERSIONS + 1))
        added+="v$v:${n} "
    done
    # The fault instant: a fraction (0-1) of how long this run should take.
    delay=$(( UNIT_MS * ((UNPROCESSED + maxf - 1) / maxf + 1) * permille / 1000 ))
    line="round $round: +${added% } rows; $kind:"
    if [ -n "$SHARDS" ]; then
        # The other shards run cleanly; the fault hurts this round's shard.
        clean=""
        for ((SHARD = 0; SHARD < SHARDS; SHARD++)); do
            [ "$SHARD" = $(( round % SHARDS )) ] && continue
            start_run "shard$SHARD" -- --max-files-per-batch "$maxf"
            finish_run "$PID" "$TAG"
            clean+=" $SHARD:$CODE"
        done
        SHARD=$(( round % SHARDS ))
        line="round $round: +${added% } rows; shards run cleanly (shard:exit)$clean; shard $SHARD $kind:"
    fi
    case "$kind" in
    none)
        start_run plain -- --max-files-per-batch "$maxf"
        finish_run "$PID" "$TAG"
        learn_duration
        line+=" exit $CODE, $BATCHES batch(es) in $ELAPSED ms"
        ;;
    kill)
        start_run kill -- --max-files-per-batch "$maxf"
        sleep_ms "$delay"
        kill -9 "$PID" 2>/dev/null
        finish_run "$PID" "$TAG" 137
        if [ "$CODE" = 137 ]; then
            line+=" kill -9 at $delay ms"
        else
            KILL_MISSED=$((KILL_MISSED + 1)); learn_duration
            line+=" the run had finished (exit $CODE, $BATCHES batches) before kill -9 at $delay ms"
        fi
        ;;
    failpoint)
        start_run "fp-$fp" "SESSIONIZER_FAILPOINT=$fp" -- --max-files-per-batch "$maxf"
        finish_run "$PID" "$TAG" 101
        line+=" SESSIONIZER_FAILPOINT=$fp: exit $CODE"
        [ "$CODE" = 0 ] && line+=" (point not reached, $BATCHES batch(es))"
        ;;
    concurrent)
        pids=(); tags=()
        for ((i = 1; i <= nconc; i++)); do
            start_run "conc$i" -- --max-files-per-batch "$maxf"
            pids+=("$PID"); tags+=("$TAG")
        done
        worked=0; summary=""
        for ((i = 0; i < nconc; i++)); do
            finish_run "${pids[$i]}" "${tags[$i]}"
            summary+=" $CODE"
            [ "$CODE" = 0 ] && [ "$BATCHES" != "-" ] && [ "$BATCHES" -gt 0 ] && worked=$((worked + 1))
            [ "$CODE" = 0 ] && summary+="(${BATCHES}b)"
        done
        line+=" $nconc runs at once, exits$summary"
        if [ "$worked" -gt 1 ]; then
            CONC_DOUBLE=$((CONC_DOUBLE + 1))
            line+="  <- $worked runs committed batches"
        fi
        ;;
    stop)
        start_run stale -- --max-files-per-batch "$maxf"
        a_pid="$PID"; a_tag="$TAG"
        sleep_ms "$delay"
        kill -STOP "$a_pid" 2>/dev/null
        holder="$(lock_holder)"
        blocked=""
        if [ "$holder" = "$a_pid" ]; then
            # Without --break-lock, a frozen holder's lock must be respected: exit 75.
            start_run blocked -- --max-files-per-batch "$takeover_maxf"
            finish_run "$PID" "$TAG"
            blocked=" a run without --break-lock exit $CODE;"
            if [ "$CODE" != 75 ]; then
                LOCK_IGNORED=$((LOCK_IGNORED + 1)); blocked+=" <- SHOULD BE 75;"
            fi
        fi
        start_run takeover -- --max-files-per-batch "$takeover_maxf" --break-lock
        finish_run "$PID" "$TAG"
        b_code="$CODE"; b_batches="$BATCHES"
        learn_duration
        kill -CONT "$a_pid" 2>/dev/null
        finish_run "$a_pid" "$a_tag"
        line+=" SIGSTOP at $delay ms (lock held by $([ "$holder" = "$a_pid" ] && echo it || echo "$([ "$holder" = none ] && echo nobody || echo "pid $holder"), not by it"));"
        line+="$blocked --break-lock run exit $b_code ($b_batches batches); first run woke, exit $CODE"
        if [ "$holder" = "$a_pid" ] && [ "$b_code" = 0 ] && [ "$b_batches" != "-" ] && [ "$b_batches" -gt 0 ]; then
            STALE_TOTAL=$((STALE_TOTAL + 1))
            case "$CODE" in
                0) STALE_EXIT0=$((STALE_EXIT0 + 1)); line+="  <- STALE RUN EXITED 0 (should be 75)" ;;
                75) STALE_EXIT75=$((STALE_EXIT75 + 1)); line+=" (stale, fenced)" ;;
                *) STALE_OTHER=$((STALE_OTHER + 1)); line+="  <- stale run exited $CODE" ;;
            esac
        fi
        ;;
    esac
    echo "$line"
    ROUNDS_DONE=$((ROUNDS_DONE + 1))
done <"$DIR/plan.txt"
if [ "$ROUNDS_DONE" != "$ROUNDS" ]; then
    echo "soak: only $ROUNDS_DONE of $ROUNDS rounds ran (a bug of this script?)" >&2
fi

# ---- the end: a clean run and a flush, and the reference -------------------------------------
round=99
FINAL_OK=1
for final in "" --flush; do
    for ((SHARD = 0; SHARD < ${SHARDS:-1}; SHARD++)); do
        # shellcheck disable=SC2086
        start_run "final${final:+-flush}" -- --max-files-per-batch 2 $final
        finish_run "$PID" "$TAG"
        echo "final ${final:+--flush }run${SHARDS:+ of shard $SHARD}: exit $CODE, $BATCHES batch(es), $(json_field "$LOGS/$TAG.out" sessions_closed) sessions closed"
        [ "$CODE" = 0 ] || FINAL_OK=0
    done
done
SOAK_MS=$(( $(now_ms) - SOAK_START ))

mkdir -p "$REF"
cp -r "$BASE/events" "$REF/events"
REF_OK=1
common "$REF"
for extra in "" --flush; do
    # shellcheck disable=SC2086
    "$SBIN" sessionize "${CF[@]}" $extra >"$LOGS/ref$extra.out" 2>"$LOGS/ref$extra.err" || {
        REF_OK=0; echo "soak: the reference run${extra:+ with $extra} failed:" >&2; cat "$LOGS/ref$extra.err" >&2; }
done
echo "reference: one run over all $VERSIONS commits ($(json_field "$LOGS/ref.out" batches) batch(es), $(json_field "$LOGS/ref.out" rows_late) late), then --flush"

# ---- checks ----------------------------------------------------------------------------------
q() { # q BASE SQL: JSON lines
    "$SBIN" query --base-dir "$1" --late-events "$1/late_events" --format json "$2" 2>>"$LOGS/query.err"
}
scalar() { # scalar BASE SQL (one row, one column named v): the value, 0 when null
    q "$1" "$2" | python3 -c 'import json, sys
line = sys.stdin.readline()
print(json.loads(line).get("v") or 0 if line.strip() else "?")'
}
PASSED=0
CHECKS=5
report() { # report OK NAME FIGURES
    if [ "$1" = 1 ]; then PASSED=$((PASSED + 1)); echo "PASS $2: $3"; else echo "FAIL $2: $3"; fi
}

n_sessions="$(scalar "$BASE" "SELECT count(*) AS v FROM sessions")"
n_ids="$(scalar "$BASE" "SELECT count(DISTINCT session_id) AS v FROM sessions")"
n_dup_ids="$(scalar "$BASE" "SELECT count(*) AS v FROM (SELECT session_id FROM sessions GROUP BY session_id HAVING count(*) > 1)")"
report "$([ "$n_sessions" = "$n_ids" ] && [ "$n_dup_ids" = 0 ] && echo 1)" "1 no duplicate session_id" \
    "$n_sessions session rows, $n_ids distinct ids, $n_dup_ids ids more than once"

n_events="$(scalar "$BASE" "SELECT count(*) AS v FROM events")"
n_counted="$(scalar "$BASE" "SELECT sum(event_count) AS v FROM sessions")"
n_late="$(scalar "$BASE" "SELECT count(*) AS v FROM late_events WHERE reason = 'late'")"
n_invalid="$(scalar "$BASE" "SELECT count(*) AS v FROM late_events WHERE reason <> 'late'")"
expected="?"
case "$n_events$n_late$n_invalid" in *[!0-9]*|"") ;; *) expected=$(( n_events - n_late - n_invalid )) ;; esac
ok2=0
if [ "$n_events" = "$ROWS_GENERATED" ] && [ "$n_late" = 0 ] && [ "$n_invalid" = 0 ] &&
   [ "$n_counted" = "$expected" ]; then ok2=1; fi
report "$ok2" "2 every event in exactly one session" \
    "sum(event_count) $n_counted, events $n_events (generated $ROWS_GENERATED) - late $n_late - invalid $n_invalid = $expected (runs reported $ROWS_LATE_REPORTED late, $ROWS_INVALID_REPORTED invalid)"

compare() { # compare TABLE: rows of the soak vs the reference, as a multiset
    q "$BASE" "SELECT * FROM $1" >"$DIR/$1.soak.jsonl"
    q "$REF" "SELECT * FROM $1" >"$DIR/$1.ref.jsonl"
    python3 - "$DIR/$1.soak.jsonl" "$DIR/$1.ref.jsonl" "$DIR/$1.diff.txt" <<'PY'
import collections, json, sys
def rows(path):
    # A sharded live table also has its partition column, which the reference has not.
    def row(line):
        r = json.loads(line)
        r.pop("shard", None)
        return json.dumps(r, sort_keys=True)
    return collections.Counter(row(l) for l in open(path) if l.strip())
soak, ref = rows(sys.argv[1]), rows(sys.argv[2])
only_soak, only_ref = soak - ref, ref - soak
with open(sys.argv[3], "w") as f:
    for r, n in sorted(only_soak.items()):
        f.write(f"soak only (x{n}): {r}\n")
    for r, n in sorted(only_ref.items()):
        f.write(f"ref only (x{n}): {r}\n")
print(sum(soak.values()), sum(ref.values()), sum(only_soak.values()), sum(only_ref.values()))
PY
}
read -r s_rows s_ref s_only s_ref_only < <(compare sessions)
read -r l_rows l_ref l_only l_ref_only < <(compare live_sessions)
ok3=0
if [ "$REF_OK" = 1 ] && [ "${s_rows:-x}" = "${s_ref:-y}" ] && [ "${s_only:-1}" = 0 ] && [ "${s_ref_only:-1}" = 0 ] &&
   [ "${l_rows:-x}" = "${l_ref:-y}" ] && [ "${l_only:-1}" = 0 ] && [ "${l_ref_only:-1}" = 0 ] && [ "${s_rows:-0}" -gt 0 ]; then ok3=1; fi
report "$ok3" "3 same tables as an uninterrupted run" \
    "sessions $s_rows rows vs reference $s_ref ($s_only only in soak, $s_ref_only only in reference); live $l_rows vs $l_ref ($l_only / $l_ref_only)$([ "$ok3" = 1 ] || echo "; differing rows in $DIR/sessions.diff.txt and live_sessions.diff.txt")"

report "$([ "$STALE_EXIT0" = 0 ] && [ "$STALE_OTHER" = 0 ] && echo 1)" "4 stale runs fenced (exit 75)" \
    "$STALE_TOTAL runs frozen holding the lock and taken over by a run that committed: $STALE_EXIT75 exited 75, $STALE_EXIT0 exited 0, $STALE_OTHER otherwise"

report "$([ "${#UNEXPECTED[@]}" = 0 ] && [ "$CONC_DOUBLE" = 0 ] && [ "$LOCK_IGNORED" = 0 ] && [ "$FINAL_OK" = 1 ] && [ "$ROUNDS_DONE" = "$ROUNDS" ] && echo 1)" "5 exit codes" \
    "$ROUNDS_DONE of $ROUNDS rounds ran, ${#UNEXPECTED[@]} unexpected exit(s)${UNEXPECTED[*]:+ (${UNEXPECTED[*]})}, $CONC_DOUBLE concurrent group(s) with two working runs, $LOCK_IGNORED run(s) ignoring a frozen run's lock, final runs $([ "$FINAL_OK" = 1 ] && echo ok || echo failed)"

# ---- summary ---------------------------------------------------------------------------------
faults=""; for k in kill stop concurrent failpoint none; do faults+=" $k=${FAULTS[$k]:-0}"; done
codes=""; for c in $(printf '%s\n' "${!CODES[@]}" | sort -n); do codes+=" $c=${CODES[$c]}"; done
TOTAL_MS=$(( $(now_ms) - SOAK_START ))
verdict=PASS; [ "$PASSED" = "$CHECKS" ] || verdict=FAIL
echo "soak: $verdict seed $SEED, $ROUNDS rounds${SHARDS:+, $SHARDS shards}${KEY_BUCKETS:+ by $KEY_BUCKETS key buckets}, $VERSIONS commits, $ROWS_GENERATED events;" \
     "faults:$faults (kill -9 after the run ended: $KILL_MISSED);" \
     "$RUN_N runs by exit code:$codes; stale runs exited 0 after takeover: $STALE_EXIT0 of $STALE_TOTAL;" \
     "checks passed $PASSED/$CHECKS; $(( SOAK_MS / 1000 )) s of rounds, $(( TOTAL_MS / 1000 )) s in all"
if [ "$verdict" = PASS ] && [ "$KEEP" = 0 ]; then
    rm -rf "$DIR"
else
    echo "soak: tables, plan and logs kept in $DIR"
fi
[ "$verdict" = PASS ]
