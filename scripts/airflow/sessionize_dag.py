"""Airflow DAG: run `sessionizer sessionize` every few minutes.

Works on Airflow 3.x (task SDK imports, no deprecation warnings) and on Airflow 2.10 (the
2.x imports are the fallback). `scripts/airflow/try-dag.sh --airflow 3|2` installs a pinned
Airflow in a virtualenv and runs this DAG under `airflow dags test` against generated tables.

Settings, read inside the task when it runs (Airflow Variables; never at parse time):

    sessionizer_bin        path of the binary                       (default: sessionizer on PATH)
    sessionizer_config     --config TOML file; empty: no --config   (default: /etc/sessionizer/sessionizer.toml)
    sessionizer_env        --env section of that file               (default: prod)
    sessionizer_args       extra flags for `sessionize`, shell-quoted, e.g. "-v" (default: none)

Settings the scheduler needs when it parses this file come from the environment of the
scheduler / DAG processor, under the names Airflow uses for a Variable set by environment
(reading the metadata database at parse time is what Airflow's best practices forbid; a
Variable set only in the database is not seen here):

    AIRFLOW_VAR_SESSIONIZER_EVERY_MIN        schedule, in minutes                     (default: 10)
    AIRFLOW_VAR_SESSIONIZER_TIMEOUT_MIN      execution_timeout of a run, in minutes   (default: 30)
    AIRFLOW_VAR_SESSIONIZER_RETRIES          retries of the task                      (default: 5)
    AIRFLOW_VAR_SESSIONIZER_RETRY_DELAY_MIN  first retry delay, doubled each retry,   (default: 1)
                                             at most 10 minutes

A run killed by the timeout keeps the batches it committed and the next run carries on, so
the timeout only needs to be longer than a normal tick; raise it (or run the first backfill
by hand) if single batches take longer than that.

Exit codes of sessionizer (README, "Exit codes") and what the task does with them:

    0   success, also when there was nothing new          -> task succeeds, summary to XCom
    75  another run holds the checkpoint (EX_TEMPFAIL)    -> retried (up to RETRIES times)
    1   any other failure (I/O, a transient object-store  -> retried, but only for the first
        error, a source commit that removes data, a          FAILURE_RETRIES (3) retries;
        corrupt checkpoint ...)                              after that it fails for good
    2   usage or configuration error, or a refused run    -> fails at once, no retry
    101 a test failpoint fired, or a panic (a bug)        -> fails at once, no retry
    killed by a signal, or any other code                 -> treated like exit 1

A missing or wrong binary (FileNotFoundError, PermissionError, "exec format error"), or a
binary that exits 0 without printing a JSON summary, fails at once: no retry fixes it.

Why exit 1 retries: every run is exactly-once (README, "Guarantees"), so a retry only does
what the previous run left undone and can never write a session twice. Exit 1 covers the
transient failures (a dropped connection, an object-store 503, a stalled read that gave up)
that a retry a minute later fixes, so it is retried with exponential back-off (at least 1,
2 and 4 minutes; Airflow adds up to as much again).
It also covers the permanent ones (a source commit that removes data, a corrupt checkpoint):
for those the retries cost a few minutes and change nothing, and the task then fails loudly
with the tool's error. Exit 2 is never retried: a bad flag, a missing column, a checkpoint
made for other settings, or a checkpoint disagreeing with its outputs is not fixed by waiting
and needs a person. Exit 75 is the normal outcome of an overlapping tick and always retries.

A hung run (say, a read from S3 that never returns) is stopped by `execution_timeout`, so
one stuck run cannot hold sessionization up forever with max_active_runs=1. The binary runs
in its own process group; when Airflow times the task out, or stops it with SIGTERM or
SIGINT, the whole group is terminated (SIGTERM, then SIGKILL after a grace period). Killing a
run at any instant is safe: the next run takes over the dead run's lock and replays the
unfinished batch exactly once. A timed-out run is retried (up to RETRIES times).

The binary's JSON log lines (stderr, `--log-format json`) are re-logged to the task log as
they arrive, each at its own level (ERROR, WARN, INFO, DEBUG; TRACE as DEBUG). The run
summary (stdout, one JSON object) is returned, so it lands in XCom under `return_value` and
downstream tasks can read `sessions_closed`, `watermark` and so on.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections import deque
from datetime import datetime, timedelta, timezone

try:  # Airflow 3: the task SDK
    from airflow.sdk import DAG, Variable, task

    AIRFLOW_3 = True
except ImportError:  # Airflow 2.x
    from airflow import DAG
    from airflow.decorators import task
    from airflow.models import Variable

    AIRFLOW_3 = False
try:  # newer Airflow 3 (3.3 has them here; 3.0 does not)
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.x and 3.0
    from airflow.exceptions import AirflowException, AirflowFailException

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75
EXIT_FAILPOINT = 101


def _env_number(name: str, default: float) -> float:
    """A parse-time setting from the environment (a bad value is an import error, shown in the UI)."""
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


EVERY_MINUTES = _env_number("AIRFLOW_VAR_SESSIONIZER_EVERY_MIN", 10)
TIMEOUT_MINUTES = _env_number("AIRFLOW_VAR_SESSIONIZER_TIMEOUT_MIN", 30)
RETRIES = int(_env_number("AIRFLOW_VAR_SESSIONIZER_RETRIES", 5))
RETRY_DELAY_MINUTES = _env_number("AIRFLOW_VAR_SESSIONIZER_RETRY_DELAY_MIN", 1)
# With more than one shard, one mapped task per shard (dynamic task mapping) runs
# `sessionize --shards N --shard I`, each retried on its own, and a downstream task gathers
# their summaries. Every shard has its own checkpoint, so the shards never wait for one another.
SHARDS = int(_env_number("AIRFLOW_VAR_SESSIONIZER_SHARDS", 1))
# Exit 1 (and a death by signal, or an unknown exit code) is retried only while the try
# number is at most this: with 3, the first three retries. Exit 75 and a timeout may use all
# RETRIES.
FAILURE_RETRIES = 3
# How long the binary's process group gets between SIGTERM and SIGKILL when the task is
# stopped. sessionizer has no SIGTERM handler and dies at once; keep this below Airflow 3's
# escalation delay (5 s between its own signals).
KILL_GRACE_SECONDS = 3

# Errors from starting the binary that no retry fixes: it is missing, not executable, or
# not a program for this machine.
_BAD_BINARY = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.ENOEXEC,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
}


def _exponential_backoff():
    """The retry_exponential_backoff argument: a multiplier where Airflow takes one (3.3 and
    later, where True would mean 1, no back-off at all), else True (2.x and 3.0, a bool)."""
    if not AIRFLOW_3:
        return True
    try:
        from airflow.sdk import BaseOperator

        param = inspect.signature(BaseOperator.__init__).parameters["retry_exponential_backoff"]
    except (ImportError, KeyError, TypeError, ValueError):
        return True
    return 2.0 if "bool" not in str(param.annotation) else True


# tracing levels of the JSON log lines -> logging levels (Airflow has no TRACE)
_LEVELS = {
    "ERROR": logging.ERROR,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "TRACE": logging.DEBUG,
}
_DROPPED_FIELDS = ("timestamp", "span", "spans")

log = logging.getLogger("airflow.task.sessionizer")


def read_settings() -> dict:
    """The Airflow Variables, read when the task runs (not when the file is parsed)."""
    return {
        "bin": Variable.get("sessionizer_bin", "sessionizer"),
        "config": Variable.get("sessionizer_config", "/etc/sessionizer/sessionizer.toml"),
        "env": Variable.get("sessionizer_env", "prod"),
        "args": Variable.get("sessionizer_args", ""),
    }


def build_command(settings: dict) -> list[str]:
    cmd = [
        settings["bin"],
        "sessionize",
        "--output",
        "json",
        "--log-format",
        "json",
    ]
    if settings["config"]:
        cmd += ["--config", settings["config"]]
        if settings["env"]:
            cmd += ["--env", settings["env"]]
    cmd += shlex.split(settings["args"] or "")
    return cmd


def _format_field(value) -> str:
    if isinstance(value, str):
        return (
            value
            if value and not any(c.isspace() or c in '"=' for c in value)
            else json.dumps(value)
        )
    return json.dumps(value, separators=(",", ":"))


def relog(line: str) -> str | None:
    """Log one stderr line of the binary at its own level; returns the text logged."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        # Not a JSON log line: a usage error from the flag parser, a panic, a plain
        # "sessionizer: error: ..." line.
        lower = line.lstrip().lower()
        if lower.startswith(("error", "sessionizer: error", "fatal")) or "panicked" in lower:
            level = logging.ERROR
        elif lower.startswith(("warn", "sessionizer: warn")):
            level = logging.WARNING
        else:
            level = logging.INFO
        log.log(level, "%s", line)
        return line
    level = _LEVELS.get(str(record.pop("level", "INFO")).upper(), logging.INFO)
    message = str(record.pop("message", ""))
    target = record.pop("target", None)
    for key in _DROPPED_FIELDS:
        record.pop(key, None)
    text = " ".join([message] + [f"{k}={_format_field(v)}" for k, v in record.items()]).strip()
    if target:
        text = f"{target}: {text}"
    log.log(level, "%s", text)
    return text


def stop_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """Terminate the binary's process group (SIGTERM, then SIGKILL), if it still runs."""
    if proc.poll() is not None:
        return
    log.warning("stopping sessionizer (pid %s) and its process group", proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_sessionizer(shard=None, **context):
    settings = read_settings()
    cmd = build_command(settings)
    if shard is not None:
        cmd += ["--shards", str(SHARDS), "--shard", str(shard)]
    ti = context.get("ti")
    try_number = getattr(ti, "try_number", None) or 1
    log.info("try %s: %s", try_number, shlex.join(cmd))
    try:
        # Its own process group (session), so that stopping the task stops all of it.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
    except OSError as e:
        if e.errno in _BAD_BINARY:
            raise AirflowFailException(
                f"cannot run sessionizer binary {cmd[0]!r}: {e}; set the Airflow Variable "
                "sessionizer_bin to its path (not retried)"
            ) from e
        raise  # e.g. EAGAIN or ENOMEM while forking: retried

    # stdout carries one JSON object; drain it on a thread so neither pipe can fill up.
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()

    previous = None
    handler_installed = False

    def on_sigterm(signum, frame):
        # Airflow sends SIGTERM to a task it kills (marked failed or cleared by hand, a lost
        # heartbeat, a worker shutting down). Stop the binary first, then let Airflow's own
        # handler run (on Airflow 2 it raises; on Airflow 3 it only calls on_kill()).
        stop_group(proc)
        if callable(previous):
            previous(signum, frame)  # Airflow 2: calls on_kill() and raises
        raise AirflowException("sessionizer task received SIGTERM; the run was stopped")

    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_sigterm)
        handler_installed = True

    tail: deque[str] = deque(maxlen=20)
    try:
        for line in proc.stderr:  # as the lines come: live logs
            text = relog(line)
            if text:
                tail.append(text)
        returncode = proc.wait()
    finally:
        # Reached on success, and on AirflowTaskTimeout, SIGINT or SIGTERM raised above.
        if handler_installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        stop_group(proc)
        reader.join(timeout=10)
        proc.stderr.close()

    stdout = "".join(out)
    detail = "\n".join(tail)[-2000:]
    if returncode == EXIT_OK:
        lines = [line for line in stdout.splitlines() if line.strip()]
        try:
            summary = json.loads(lines[-1])
        except (IndexError, ValueError) as e:
            raise AirflowFailException(
                f"{cmd[0]!r} exited 0 but printed no JSON summary on stdout "
                f"({stdout[-500:]!r}); is sessionizer_bin really sessionizer? (not retried)"
            ) from e
        return summary  # pushed to XCom as return_value
    if returncode == EXIT_LOCKED:
        # Another run is still going: an ordinary exception makes Airflow retry later.
        raise AirflowException("sessionizer: checkpoint held by another run (exit 75); will retry")
    if returncode in (EXIT_USAGE, EXIT_FAILPOINT):
        # Usage and configuration errors, refused runs and bugs are not fixed by waiting.
        raise AirflowFailException(
            f"sessionizer failed with exit {returncode} (not retried):\n{detail}"
        )
    if returncode < 0:
        try:
            what = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"was killed by signal {-returncode}"
    else:
        what = f"failed with exit {returncode}"
    if try_number > FAILURE_RETRIES:
        raise AirflowFailException(
            f"sessionizer {what} on try {try_number}, after {FAILURE_RETRIES} retries; "
            f"giving up:\n{detail}"
        )
    # Possibly transient (I/O, object store): the run is exactly-once, so a retry is safe.
    raise AirflowException(f"sessionizer {what} on try {try_number}; will retry:\n{detail}")


def gather_summaries(summaries):
    """The shards' run summaries added up (one XCom per mapped task), for one look per tick."""
    summaries = [s for s in summaries if isinstance(s, dict)]
    counts = (
        "rows_read",
        "rows_late",
        "rows_invalid",
        "sessions_closed",
        "sessions_pending",
        "live_rows_upserted",
    )
    total = {k: sum(int(s.get(k) or 0) for s in summaries) for k in counts}
    total["shards"] = len(summaries)
    total["batches"] = sum(int(s.get("batches") or 0) for s in summaries)
    total["slowest_shard_ms"] = max((int(s.get("elapsed_ms") or 0) for s in summaries), default=0)
    total["watermarks"] = sorted({str(s.get("watermark")) for s in summaries})
    log.info("the shards' summaries together: %s", json.dumps(total))
    return total


with DAG(
    dag_id="sessionizer",
    description="Incremental, exactly-once sessionization of the click-stream Delta table",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    schedule=timedelta(minutes=EVERY_MINUTES),
    catchup=False,
    max_active_runs=1,
    tags=["sessionizer", "delta"],
    doc_md=__doc__,
) as dag:
    sessionize = task(
        task_id="sessionize",
        retries=RETRIES,
        retry_delay=timedelta(minutes=RETRY_DELAY_MINUTES),
        retry_exponential_backoff=_exponential_backoff(),  # doubles the delay each retry
        max_retry_delay=timedelta(minutes=10),
        execution_timeout=timedelta(minutes=TIMEOUT_MINUTES),
    )(run_sessionizer)
    if SHARDS > 1:
        task(task_id="gather_summaries")(gather_summaries)(
            sessionize.expand(shard=list(range(SHARDS)))
        )
    else:
        sessionize()
