#!/usr/bin/env bash
# Run scripts/airflow/sessionize_dag.py under a real Apache Airflow, against tables made here.
#
#   scripts/airflow/try-dag.sh --airflow 3        # Airflow 3.x (default: 3.3.2)
#   scripts/airflow/try-dag.sh --airflow 2        # Airflow 2.10.5
#   scripts/airflow/try-dag.sh --airflow 3.0.6    # an exact version (3.0.6 is pinned here too)
#
# It makes (or reuses) a virtualenv under /tmp with a pinned Airflow, sets AIRFLOW_HOME to a
# temporary folder, runs `airflow db migrate`, generates small tables with
# `sessionizer generate-rows`, and runs `airflow dags test sessionizer` in these scenarios:
#
#   happy      the task succeeds, writes sessions, and its summary is in XCom
#   no-binary  sessionizer_bin names no file: the task fails at once (try 1, no retry)
#   not-exec   sessionizer_bin is a file that is not a program (exec format error): same
#   usage      exit 2 (a bad flag value): fails at once, no retry
#   timeout    a run that hangs (test failpoint) is stopped by execution_timeout and its
#              process is gone afterwards; its log lines arrived while it ran, at their level
#   sigterm    a hung run whose task gets SIGTERM: the binary is stopped with it
#   after-kill the next run takes the killed runs' lock over and succeeds
#   exit-75    another run holds the checkpoint: the task retries, and succeeds once it is free
#   exit-1     a binary that always exits 1: retried 3 times with back-off, then fails
#   sharded    AIRFLOW_VAR_SESSIONIZER_SHARDS=3: one mapped task per shard on fresh tables,
#              and gather_summaries adds their summaries up
#
# Each check prints PASS or FAIL; the script exits 1 if any failed. Airflow's output of each
# scenario goes to a log in the work folder, which is kept when a check failed (or --keep).
#
# Options:
#   --airflow MAJOR|VERSION  3 (default) or 2, or an exact version
#   --bin PATH               the sessionizer binary
#                            (default: ${CARGO_TARGET_DIR:-$HOME/.cache/sessionizer-target}/debug/sessionizer)
#   --venv DIR               the virtualenv (default: /tmp/sessionizer-try-dag/venv-airflow-<version>-py<X.Y>;
#                            reused when this script installed it with the same pins)
#   --fresh                  recreate the virtualenv even if it exists
#   --work DIR               work folder (default: a new one under /tmp)
#   --keep                   keep the work folder (it is removed when every check passed)
#   --python EXE             the Python to build the virtualenv from (default: python3.11, python3)
#
# Constraints: the official constraints file
#   https://raw.githubusercontent.com/apache/airflow/constraints-<version>/constraints-<py>.txt
# is used when it can be fetched. Where it cannot (a machine that reaches PyPI only), the
# packages that need it are pinned by hand below (hand_pins), and the script says so.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dag_file="$here/sessionize_dag.py"

airflow_arg=3
bin="${CARGO_TARGET_DIR:-$HOME/.cache/sessionizer-target}/debug/sessionizer"
venv=""
fresh=0
work=""
keep=0
python=""

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --airflow) airflow_arg="$2"; shift 2 ;;
        --airflow=*) airflow_arg="${1#*=}"; shift ;;
        --bin) bin="$2"; shift 2 ;;
        --bin=*) bin="${1#*=}"; shift ;;
        --venv) venv="$2"; shift 2 ;;
        --venv=*) venv="${1#*=}"; shift ;;
        --fresh) fresh=1; shift ;;
        --work) work="$2"; shift 2 ;;
        --work=*) work="${1#*=}"; shift ;;
        --keep) keep=1; shift ;;
        --python) python="$2"; shift 2 ;;
        --python=*) python="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "try-dag: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$airflow_arg" in
    3) version=3.3.2 ;;
    2) version=2.10.5 ;;
    [23].*) version="$airflow_arg" ;;
    *) echo "try-dag: --airflow takes 2, 3 or a 2.x/3.x version, not '$airflow_arg'" >&2; exit 2 ;;
esac
major=${version%%.*}

# Pins used when the constraints file is unreachable. Without them pip backtracks for many
# minutes on 2.10.5 (the newest providers need Airflow 2.11) and may end on a set that does not
# start. For 2.10.5 these are the provider versions of its release (February 2025); for
# 3.3.2 (which pins its core and task SDK exactly, its providers only from below) the
# providers pip chose on 2026-11-30. 3.0.6 also needs the FastAPI of its day: with today's
# FastAPI its in-process execution API answers 422 to the task runner and no task starts.
# The rest is what pip resolves under them (`pip check` is clean). Another version gets no
# hand pins (and may need some).
hand_pins() {
    case "$1" in
        3.3.2) echo apache-airflow-providers-common-compat==1.23.0 \
                    apache-airflow-providers-common-io==1.11.0 \
                    apache-airflow-providers-common-sql==2.4.0 \
                    apache-airflow-providers-smtp==3.2.0 \
                    apache-airflow-providers-standard==1.21.0 ;;
        3.0.6) echo apache-airflow-providers-common-compat==1.23.0 \
                    apache-airflow-providers-common-io==1.11.0 \
                    apache-airflow-providers-common-sql==2.4.0 \
                    apache-airflow-providers-smtp==3.2.0 \
                    apache-airflow-providers-standard==1.21.0 \
                    "fastapi[standard]==0.116.1" starlette==0.47.3 cadwyn==5.4.4 ;;
        2.10.5) echo apache-airflow-providers-common-compat==1.3.0 \
                     apache-airflow-providers-common-io==1.5.0 \
                     apache-airflow-providers-common-sql==1.21.0 \
                     apache-airflow-providers-fab==1.5.3 \
                     apache-airflow-providers-ftp==3.12.1 \
                     apache-airflow-providers-http==5.0.0 \
                     apache-airflow-providers-imap==3.8.1 \
                     apache-airflow-providers-smtp==1.9.0 \
                     apache-airflow-providers-sqlite==4.0.0 ;;
        *) echo "" ;;
    esac
}

# Background processes this script starts; ended (by pid) if it stops early.
holder=""
airflow_pid=""
cleanup() {
    for pid in $holder $airflow_pid; do kill "$pid" 2>/dev/null || true; done
    if [ -n "${work:-}" ]; then
        left=$(pgrep -f -- "--config $work/sessionizer.toml" || true)
        # shellcheck disable=SC2086
        [ -z "$left" ] || kill -9 $left 2>/dev/null || true
    fi
}
trap cleanup EXIT

failures=0
passes=0
pass() { passes=$((passes + 1)); echo "PASS: $*"; }
fail() { failures=$((failures + 1)); echo "FAIL: $*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
t_start=$(now)

# --- the binary --------------------------------------------------------------------------
if [ ! -x "$bin" ]; then
    echo "try-dag: no sessionizer binary at $bin: build it (cargo build) or pass --bin" >&2
    exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

# --- the virtualenv ----------------------------------------------------------------------
if [ -z "$python" ]; then
    for c in python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import venv' 2>/dev/null; then python=$c; break; fi
    done
fi
[ -n "$python" ] || { echo "try-dag: no python3 with venv found (--python)" >&2; exit 2; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ -n "$venv" ] || venv="/tmp/sessionizer-try-dag/venv-airflow-$version-py$pyver"

[ -n "$work" ] || { mkdir -p /tmp/sessionizer-try-dag; work=$(mktemp -d /tmp/sessionizer-try-dag/run.XXXXXX); }
mkdir -p "$work"
work=$(cd "$work" && pwd)

echo "try-dag: Airflow $version on Python $pyver ($python), binary $bin"
echo "try-dag: virtualenv $venv, work folder $work"

constraints_url="https://raw.githubusercontent.com/apache/airflow/constraints-$version/constraints-$pyver.txt"
install_log="$work/pip-install.log"
t_install=$(now)
want="apache-airflow==$version $(hand_pins "$version")"
if [ "$fresh" = 1 ] || [ ! -x "$venv/bin/airflow" ] || [ "$(cat "$venv/.try-dag-pins" 2>/dev/null)" != "$want" ]; then
    if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
        echo "try-dag: $venv is not a virtualenv; not removing it (--venv)" >&2
        exit 2
    fi
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >"$install_log" 2>&1
    if command -v curl >/dev/null 2>&1 \
        && curl -fsSL --max-time 20 -o "$work/constraints.txt" "$constraints_url" 2>>"$install_log"; then
        how="official constraints file $constraints_url"
        set -- "apache-airflow==$version" --constraint "$work/constraints.txt"
    else
        pins=$(hand_pins "$version")
        how="constraints file unreachable ($constraints_url); pinned by hand: apache-airflow==$version ${pins:-(no other pins needed)}"
        # shellcheck disable=SC2086
        set -- "apache-airflow==$version" $pins
    fi
    echo "try-dag: installing Airflow $version: $how"
    if ! "$venv/bin/pip" install --disable-pip-version-check "$@" >>"$install_log" 2>&1; then
        tail -30 "$install_log"
        fail "pip install of Airflow $version (log: $install_log)"
        exit 1
    fi
    "$venv/bin/pip" freeze >"$venv/.try-dag-freeze"
    echo "$how" >"$venv/.try-dag-install"
    echo "$want" >"$venv/.try-dag-pins"
    echo "try-dag: installed in $(since "$t_install") s"
else
    echo "try-dag: reusing the virtualenv ($(cat "$venv/.try-dag-install")); --fresh rebuilds it"
fi
got=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("apache-airflow"))')
if [ "$got" = "$version" ]; then pass "Airflow $got installed (Python $pyver)"; else fail "Airflow $got installed, wanted $version"; exit 1; fi

# --- Airflow home, DAG folder, settings ----------------------------------------------------
# Nothing from the caller's environment steers the binary or the DAG but what is set here.
for v in $(compgen -e | grep -E '^(SESSIONIZER_|AIRFLOW_VAR_SESSIONIZER_)' || true); do unset "$v"; done
export AIRFLOW_HOME="$work/airflow-home"
export AIRFLOW__CORE__DAGS_FOLDER="$work/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__LOGGING__LOGGING_LEVEL=INFO
if [ "$major" = 2 ]; then
    export AIRFLOW__CORE__EXECUTOR=SequentialExecutor
fi
mkdir -p "$AIRFLOW_HOME" "$AIRFLOW__CORE__DAGS_FOLDER"
cp "$dag_file" "$AIRFLOW__CORE__DAGS_FOLDER/sessionize_dag.py"
lake="$work/lake"
cat >"$work/sessionizer.toml" <<EOF
# made by try-dag.sh
[env.trydag]
base-dir = "$lake"
EOF
# The DAG's settings, as Airflow Variables set through the environment.
export AIRFLOW_VAR_SESSIONIZER_BIN="$bin"
export AIRFLOW_VAR_SESSIONIZER_CONFIG="$work/sessionizer.toml"
export AIRFLOW_VAR_SESSIONIZER_ENV=trydag
export AIRFLOW_VAR_SESSIONIZER_ARGS=""
airflow="$venv/bin/airflow"

t=$(now)
if "$airflow" db migrate >"$work/db-migrate.log" 2>&1; then
    pass "airflow db migrate ($(since "$t") s)"
else
    tail -20 "$work/db-migrate.log"; fail "airflow db migrate (log: $work/db-migrate.log)"; exit 1
fi

# --- the DAG parses, without deprecation warnings -------------------------------------------
# Every warning raised while the file is imported is recorded, of any category (Airflow 3's
# deprecated imports are FutureWarnings, which -W error::DeprecationWarning would not catch).
if "$venv/bin/python" - "$AIRFLOW__CORE__DAGS_FOLDER/sessionize_dag.py" >"$work/import.log" 2>&1 <<'PY'
import importlib.util, sys, warnings
import airflow  # sets up Airflow's logging, which takes warnings.showwarning over
path = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    spec = importlib.util.spec_from_file_location("sessionize_dag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
assert [t.task_id for t in module.dag.tasks] == ["sessionize"], module.dag.tasks
# A warning about the DAG's own code is attributed to the DAG file (that is what Airflow 3
# does for a deprecated import); warnings Airflow raises inside its own packages are shown.
for w in caught:
    mine = w.filename == path
    print(f"{'DAG' if mine else 'Airflow'}: {w.category.__name__}: {w.message} ({w.filename}:{w.lineno})")
sys.exit(1 if any(w.filename == path for w in caught) else 0)
PY
then
    pass "the DAG imports with no warning about its code (deprecations included; $(grep -c '^Airflow: ' "$work/import.log") from Airflow's own packages)"
else
    cat "$work/import.log"; fail "the DAG imports with no warning (log: $work/import.log)"
fi
"$airflow" dags list-import-errors >"$work/import-errors.log" 2>&1 || true
if grep -q "sessionize_dag.py" "$work/import-errors.log"; then
    cat "$work/import-errors.log"; fail "airflow dags list-import-errors names the DAG"
else
    pass "airflow dags list-import-errors: none"
fi
if grep "sessionize_dag\.py" "$work/import-errors.log" | grep -qiE "deprecat|Warning"; then
    grep "sessionize_dag\.py" "$work/import-errors.log" | grep -iE "deprecat|Warning" | head -5
    fail "Airflow warned about the DAG file while loading the DAG folder"
fi

# --- tables ----------------------------------------------------------------------------------
"$bin" generate-rows --base-dir "$lake" --users 20 --per-user 5 --at "2026-01-01 00:00:00" >/dev/null
"$bin" generate-rows --base-dir "$lake" --closing >/dev/null

# sqlite queries on Airflow's metadata database: the newest DAG run's task instance and XCom.
db_query() {
    "$venv/bin/python" - "$AIRFLOW_HOME/airflow.db" "$1" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
run_id = db.execute(
    "SELECT run_id FROM dag_run WHERE dag_id = 'sessionizer' ORDER BY id DESC LIMIT 1"
).fetchone()
if run_id is None:
    print(json.dumps({"error": "no dag run"}))
    sys.exit()
run_id = run_id[0]
what = sys.argv[2]
if what == "ti":
    row = db.execute(
        "SELECT state, try_number, max_tries FROM task_instance "
        "WHERE dag_id = 'sessionizer' AND task_id = 'sessionize' AND run_id = ?",
        (run_id,),
    ).fetchone()
    print(json.dumps({"run_id": run_id, "state": row and row[0], "try_number": row and row[1], "max_tries": row and row[2]}))
elif what == "mapped":
    rows = db.execute(
        "SELECT state, map_index FROM task_instance "
        "WHERE dag_id = 'sessionizer' AND task_id = 'sessionize' AND run_id = ?",
        (run_id,),
    ).fetchall()
    ok = sum(1 for state, index in rows if state == "success" and index >= 0)
    print(json.dumps({"run_id": run_id, "succeeded": ok, "instances": len(rows)}))
    sys.exit()
elif what in ("xcom", "gathered"):
    task_id = "gather_summaries" if what == "gathered" else "sessionize"
    row = db.execute(
        "SELECT value FROM xcom WHERE dag_id = 'sessionizer' AND task_id = ? "
        "AND run_id = ? AND key = 'return_value'",
        (task_id, run_id),
    ).fetchone()
    value = None
    if row is not None:
        value = row[0]
        if isinstance(value, (bytes, bytearray)):
            value = value.decode()
        value = json.loads(value)
        if isinstance(value, str):  # stored as a JSON string of JSON
            value = json.loads(value)
    print(json.dumps({"run_id": run_id, "value": value}))
PY
}
# field JSON KEY...: the value at that path, or nothing.
field() {
    "$venv/bin/python" -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2:]:
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)' "$@"
}
sessions_count() { { "$bin" query --base-dir "$lake" --format csv "SELECT count(*) FROM sessions" 2>/dev/null || true; } | tail -1; }

# dags_test NAME DATE: one `airflow dags test` run, output in $work/NAME.log; sets $took.
dags_test() {
    local name=$1 date=$2 t0
    t0=$(now)
    "$airflow" dags test sessionizer "$date" >"$work/$name.log" 2>&1 && rc=0 || rc=$?
    took=$(since "$t0")
    echo "try-dag: [$name] airflow dags test exited $rc after $took s (log: $work/$name.log)"
}

# expect_fail_at_once NAME WHAT GREP: the newest task instance failed on try 1, no retry.
expect_fail_at_once() {
    local name=$1 what=$2 needle=$3 ti state try
    ti=$(db_query ti)
    state=$(field "$ti" state); try=$(field "$ti" try_number)
    if [ "$state" = failed ] && [ "$try" = 1 ]; then
        pass "$name: $what fails at once (state failed, try 1, $took s)"
    else
        fail "$name: $what: wanted state failed on try 1, got $ti"
    fi
    if awk -v t="$took" 'BEGIN { exit !(t < 60) }'; then
        pass "$name: no retry delay was waited ($took s < 60 s)"
    else
        fail "$name: took $took s: a retry delay was waited"
    fi
    if grep -q -- "$needle" "$work/$name.log"; then
        pass "$name: the task log says why ($needle)"
    else
        fail "$name: the task log does not say '$needle'"
    fi
}

# 1. happy path
dags_test happy 2026-01-02T00:00:00+00:00
ti=$(db_query ti)
if [ "$(field "$ti" state)" = success ] && [ "$(field "$ti" try_number)" = 1 ]; then
    pass "happy: the task succeeded on try 1 ($took s)"
else
    tail -40 "$work/happy.log"; fail "happy: wanted state success on try 1, got $ti"
fi
xcom=$(db_query xcom)
closed=$(field "$xcom" value sessions_closed)
count=$(sessions_count)
if [ -n "$closed" ] && [ "$closed" -gt 0 ] 2>/dev/null; then
    pass "happy: XCom return_value holds the summary (sessions_closed=$closed, watermark=$(field "$xcom" value watermark))"
else
    fail "happy: no summary in XCom: $xcom"
fi
if [ -n "$count" ] && [ "$count" = "$closed" ]; then
    pass "happy: the sessions table has $count rows (query count(*)), as the summary says"
else
    fail "happy: sessions table count(*) = '${count}', summary says '${closed}'"
fi
# Airflow 3 logs a warning as "... category=X filename=<file>", Airflow 2 as "<file>:N: XWarning: ..."
if grep -E "sessionize_dag\.py" "$work/happy.log" | grep -qE "category=|[A-Za-z]Warning:"; then
    grep -E "sessionize_dag\.py" "$work/happy.log" | grep -E "category=|[A-Za-z]Warning:"
    fail "happy: Airflow warned about the DAG file while running it"
else
    pass "happy: no warning about the DAG file in the dags test output"
fi
if grep -q "sessionize finished" "$work/happy.log"; then
    pass "happy: the tool's log lines are in the task log"
else
    fail "happy: 'sessionize finished' is not in the task log"
fi

# 2. the binary does not exist
AIRFLOW_VAR_SESSIONIZER_BIN="$work/no-such-sessionizer" dags_test no-binary 2026-01-03T00:00:00+00:00
expect_fail_at_once no-binary "a missing binary" "cannot run sessionizer binary"

# 3. the binary is not a program (exec format error)
printf 'this is not a program\n' >"$work/not-a-program"
chmod +x "$work/not-a-program"
AIRFLOW_VAR_SESSIONIZER_BIN="$work/not-a-program" dags_test not-exec 2026-01-04T00:00:00+00:00
expect_fail_at_once not-exec "a file that is not a program" "Exec format error"

# 4. exit 2 (usage error)
AIRFLOW_VAR_SESSIONIZER_ARGS="--gap soon" dags_test usage 2026-01-05T00:00:00+00:00
expect_fail_at_once usage "exit 2 (--gap soon)" "exit 2"

# 5. a hung run: execution_timeout stops it, and its process group with it
"$bin" generate-rows --base-dir "$lake" --closing >/dev/null
AIRFLOW_VAR_SESSIONIZER_TIMEOUT_MIN=0.2 AIRFLOW_VAR_SESSIONIZER_RETRIES=0 \
    SESSIONIZER_FAILPOINT=pause-after-lock SESSIONIZER_PAUSE_MS=600000 \
    dags_test timeout 2026-01-06T00:00:00+00:00
ti=$(db_query ti)
if [ "$(field "$ti" state)" = failed ] && grep -qiE "timeout|timed out" "$work/timeout.log"; then
    pass "timeout: the hung run was stopped by execution_timeout (12 s; state failed, $took s in all)"
else
    tail -40 "$work/timeout.log"; fail "timeout: wanted a timed-out failed task, got $ti"
fi
sleep 1
left=$(pgrep -f -- "--config $work/sessionizer.toml" || true)
if [ -z "$left" ]; then
    pass "timeout: no sessionizer process is left running"
else
    fail "timeout: sessionizer still running after the task stopped: pid(s) $left"
    # shellcheck disable=SC2086
    kill -9 $left 2>/dev/null || true
fi
# The level as Airflow 2 ("WARNING - ") and Airflow 3 ("[warning  ] ") print it.
if grep -qE "(WARNING - |\[warning +\] )sessionizer::failpoint: paused at a test failpoint" "$work/timeout.log"; then
    pass "timeout: the run's WARN line reached the task log while it ran, at warning level"
else
    fail "timeout: no warning-level 'paused at a test failpoint' line in the task log before the kill"
fi

# 6. a hung run stopped with SIGTERM (as Airflow stops a task it kills): the binary goes too
AIRFLOW_VAR_SESSIONIZER_RETRIES=0 SESSIONIZER_FAILPOINT=pause-after-lock SESSIONIZER_PAUSE_MS=600000 \
    "$airflow" dags test sessionizer 2026-01-07T00:00:00+00:00 >"$work/sigterm.log" 2>&1 &
airflow_pid=$!
t0=$(now)
for _ in $(seq 1 240); do
    pgrep -f -- "--config $work/sessionizer.toml" >/dev/null && break
    sleep 0.5
done
sleep 1
child=$(pgrep -f -- "--config $work/sessionizer.toml" || true)
kill -TERM "$airflow_pid" 2>/dev/null || true
wait "$airflow_pid" && rc=0 || rc=$?
airflow_pid=""
took=$(since "$t0")
echo "try-dag: [sigterm] airflow dags test got SIGTERM, exited $rc after $took s (log: $work/sigterm.log)"
sleep 1
left=$(pgrep -f -- "--config $work/sessionizer.toml" || true)
if [ -n "$child" ] && [ -z "$left" ] && grep -q "stopping sessionizer" "$work/sigterm.log"; then
    pass "sigterm: the task stopped the binary (pid $child) and its group on SIGTERM"
else
    fail "sigterm: binary pid(s) before '${child}', after '${left}' (log: $work/sigterm.log)"
    # shellcheck disable=SC2086
    [ -z "$left" ] || kill -9 $left 2>/dev/null || true
fi

# 7. the next run takes over the killed runs' lock and finishes their work
before=$(sessions_count)
dags_test after-kill 2026-01-08T00:00:00+00:00
ti=$(db_query ti)
xcom=$(db_query xcom)
after=$(sessions_count)
if [ "$(field "$ti" state)" = success ] && [ -n "$(field "$xcom" value sessions_closed)" ]; then
    pass "after-kill: the next run succeeded (sessions $before -> $after, sessions_closed=$(field "$xcom" value sessions_closed))"
else
    tail -40 "$work/after-kill.log"; fail "after-kill: wanted success with a summary, got $ti $xcom"
fi
if [ -n "$after" ] && [ -n "$before" ] && [ "$after" -gt "$before" ]; then
    pass "after-kill: the events added before the killed run were sessionized once"
else
    fail "after-kill: sessions count $before -> $after"
fi

# 8. exit 75: another run holds the checkpoint. The task retries; once the holder is gone
# (killed here, as a crashed run would be), a retry takes its lock over and succeeds.
"$bin" generate-rows --base-dir "$lake" --closing >/dev/null
SESSIONIZER_FAILPOINT=pause-after-lock SESSIONIZER_PAUSE_MS=600000 \
    "$bin" sessionize --base-dir "$lake" --output json >"$work/holder.out" 2>"$work/holder.err" &
holder=$!
sleep 2
AIRFLOW_VAR_SESSIONIZER_RETRY_DELAY_MIN=0.05 \
    "$airflow" dags test sessionizer 2026-01-09T00:00:00+00:00 >"$work/exit-75.log" 2>&1 &
airflow_pid=$!
t0=$(now)
for _ in $(seq 1 240); do
    grep -q "exit 75" "$work/exit-75.log" && break
    kill -0 "$airflow_pid" 2>/dev/null || break
    sleep 0.5
done
kill -9 "$holder" 2>/dev/null || true
wait "$holder" 2>/dev/null || true
holder=""
wait "$airflow_pid" && rc=0 || rc=$?
airflow_pid=""
took=$(since "$t0")
echo "try-dag: [exit-75] airflow dags test exited $rc after $took s (log: $work/exit-75.log)"
ti=$(db_query ti)
xcom=$(db_query xcom)
if [ "$(field "$ti" state)" = success ] && [ "$(field "$ti" try_number)" -ge 2 ] 2>/dev/null \
    && grep -q "exit 75" "$work/exit-75.log" && [ -n "$(field "$xcom" value batches)" ]; then
    pass "exit-75: retried while the checkpoint was held, then succeeded on try $(field "$ti" try_number) ($took s)"
else
    tail -40 "$work/exit-75.log"; fail "exit-75: wanted exit 75, a retry and success, got $ti $xcom"
fi

# 9. exit 1: retried FAILURE_RETRIES (3) times with back-off, then failed for good
cat >"$work/fails-with-1" <<'SH'
#!/bin/sh
echo '{"level":"ERROR","message":"simulated transient I/O error","target":"try_dag"}' >&2
exit 1
SH
chmod +x "$work/fails-with-1"
AIRFLOW_VAR_SESSIONIZER_BIN="$work/fails-with-1" AIRFLOW_VAR_SESSIONIZER_RETRY_DELAY_MIN=0.02 \
    dags_test exit-1 2026-01-10T00:00:00+00:00
ti=$(db_query ti)
if [ "$(field "$ti" state)" = failed ] && [ "$(field "$ti" try_number)" = 4 ] \
    && grep -q "giving up" "$work/exit-1.log"; then
    pass "exit-1: retried 3 times, then failed for good on try 4 ($took s)"
else
    tail -40 "$work/exit-1.log"; fail "exit-1: wanted failed on try 4 ('giving up'), got $ti"
fi
if grep -qE "(ERROR - |\[error +\] )try_dag: simulated transient I/O error" "$work/exit-1.log"; then
    pass "exit-1: the tool's ERROR line is logged at error level"
else
    fail "exit-1: no error-level 'simulated transient I/O error' line in the task log"
fi

# 10. sharded: one mapped task per shard, their summaries gathered by a downstream task
lake2="$work/lake-sharded"
"$bin" generate-rows --base-dir "$lake2" --users 30 --per-user 5 --at "2026-01-01 00:00:00" >/dev/null
"$bin" generate-rows --base-dir "$lake2" --closing >/dev/null
AIRFLOW_VAR_SESSIONIZER_SHARDS=3 AIRFLOW_VAR_SESSIONIZER_ARGS="--base-dir $lake2" \
    dags_test sharded 2026-01-11T00:00:00+00:00
mapped=$(db_query mapped)
gathered=$(db_query gathered)
count=$({ "$bin" query --base-dir "$lake2" --format csv "SELECT count(*) FROM sessions" 2>/dev/null || true; } | tail -1)
if [ "$(field "$mapped" succeeded)" = 3 ] && [ "$(field "$gathered" value shards)" = 3 ] \
    && [ -n "$count" ] && [ "$(field "$gathered" value sessions_closed)" = "$count" ]; then
    pass "sharded: 3 mapped shard tasks succeeded; gather_summaries adds up to the $count sessions written ($took s)"
else
    tail -40 "$work/sharded.log"; fail "sharded: wanted 3 mapped successes and a gathered summary of $count sessions, got $mapped $gathered"
fi

echo "try-dag: Airflow $version: $passes passed, $failures failed in $(since "$t_start") s"
if [ "$failures" -eq 0 ] && [ "$keep" = 0 ]; then
    rm -rf "$work"
else
    echo "try-dag: logs kept in $work"
fi
[ "$failures" -eq 0 ]
