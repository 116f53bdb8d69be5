"""Airflow DAG: run `sessionizer sessionize` every few minutes.

Copy this file into your DAGs folder and set the Airflow Variables (or edit the defaults):

    sessionizer_bin        path of the binary           (default: sessionizer on PATH)
    sessionizer_config     --config TOML file           (default: /etc/sessionizer/sessionizer.toml)
    sessionizer_env        --env section of that file   (default: prod)
    sessionizer_every_min  schedule, in minutes         (default: 10)

Exit codes of sessionizer (README, "Exit codes"):

    0   success, also when there was nothing new          -> task succeeds
    75  another run holds the checkpoint (EX_TEMPFAIL)    -> retried after a short delay
    2   usage or configuration error                      -> fails at once, no retry
    1   any other failure (I/O, a corrupt checkpoint ...) -> fails at once, no retry
    101 a test failpoint fired (never in production)      -> fails at once

A retry is always safe: every run is exactly-once, so a retried run only does what the
previous one left undone. The run summary (one JSON object) is pushed to XCom under
`return_value`, so downstream tasks can read `sessions_closed`, `watermark` and so on.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta

from airflow import DAG
from airflow.exceptions import AirflowException, AirflowFailException
from airflow.models import Variable
from airflow.operators.python import PythonOperator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75
EXIT_FAILPOINT = 101

EVERY_MINUTES = int(Variable.get("sessionizer_every_min", default_var="10"))


def run_sessionizer(**context):
    cmd = [
        Variable.get("sessionizer_bin", default_var="sessionizer"),
        "sessionize",
        "--config",
        Variable.get("sessionizer_config", default_var="/etc/sessionizer/sessionizer.toml"),
        "--env",
        Variable.get("sessionizer_env", default_var="prod"),
        "--output",
        "json",
        "--log-format",
        "json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    # Logs are JSON lines on stderr; pass them through to the task log.
    for line in proc.stderr.splitlines():
        print(line)
    if proc.returncode == EXIT_LOCKED:
        # Another run is still going: an ordinary exception makes Airflow retry later.
        raise AirflowException("sessionizer: checkpoint locked by another run (exit 75); will retry")
    if proc.returncode != EXIT_OK:
        # Usage errors and failures are not fixed by waiting: fail without retries, loudly.
        raise AirflowFailException(
            f"sessionizer failed with exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"sessionizer summary: {summary}")
    return summary  # pushed to XCom as return_value


with DAG(
    dag_id="sessionizer",
    description="Incremental, exactly-once sessionization of the click-stream Delta table",
    start_date=datetime(2026, 1, 1),
    schedule=timedelta(minutes=EVERY_MINUTES),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 5,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    tags=["sessionizer", "delta"],
) as dag:
    PythonOperator(task_id="sessionize", python_callable=run_sessionizer)
