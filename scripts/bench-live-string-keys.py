#!/usr/bin/env python3
"""The live-table tick with string keys (bench.sh --live-keys uses generate-rows' integer ids).

    python3 scripts/bench-live-string-keys.py KEYS [rewrite|deletion-vectors] [--bin PATH]

Writes an events table with python deltalake (pip install deltalake pyarrow numpy): KEYS
string keys of 27 characters with two events each, runs the backlog and a closing tick,
then three ticks of 10,000 events over random keys, and prints each tick's wall time and
live upsert time. Timing belongs here, never in `cargo test`.
"""
import argparse, json, os, shutil, subprocess, tempfile, time

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

p = argparse.ArgumentParser()
p.add_argument("keys", type=int)
p.add_argument("mode", nargs="?", default="deletion-vectors")
p.add_argument("--bin", default=os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/sessionizer-target")),
    "release", "sessionizer"))
a = p.parse_args()
base = tempfile.mkdtemp(prefix="sessionizer-strkeys.")
events = f"{base}/events"
t0 = np.datetime64("2026-02-15T00:00:00", "us")
rng = np.random.default_rng(1)


def append(ids, times):
    n = len(ids)
    write_deltalake(events, pa.table({
        "user": pa.array([f"user-{i:012x}-{(i * 2654435761) % (1 << 32):08x}" for i in ids]),
        "visit_time": pa.array(np.asarray(times), pa.timestamp("us", tz="UTC")),
        "page": pa.array([f"p{i % 50}" for i in range(n)]),
    }), mode="append")


def run():
    out = subprocess.run([a.bin, "sessionize", "--base-dir", base, "--key", "user",
                          "--live-mode", a.mode, "--output", "json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


try:
    ids = np.concatenate([np.arange(a.keys), np.arange(a.keys)])
    append(ids, t0 + rng.integers(0, 600_000_000, len(ids)).astype("timedelta64[us]"))
    run()
    append([a.keys + 1], [t0 + np.timedelta64(71, "m")])
    run()
    for t in range(3):
        start = t0 + np.timedelta64(2 * 3600 + t * 36000, "s")
        append(rng.integers(0, a.keys, 10_000),
               start + rng.integers(0, 36_000_000_000, 10_000).astype("timedelta64[us]"))
        began = time.time()
        s = run()
        print(f"{a.keys:,} string keys, {a.mode}, tick {t + 1}: wall {time.time() - began:.2f} s, "
              f"live upsert {s['phases']['merge_live']} ms")
finally:
    shutil.rmtree(base, ignore_errors=True)
