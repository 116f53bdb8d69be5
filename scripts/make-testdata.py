#!/usr/bin/env python3
"""Write the fixture Delta tables under testdata/ (see testdata/README.md).

    python3 scripts/make-testdata.py            # (re)write every fixture under testdata/
    python3 scripts/make-testdata.py --check    # ... then read each one back with python deltalake
    python3 scripts/make-testdata.py --out DIR  # write somewhere else

Each fixture is a small Delta table in a shape that Spark, Databricks or other writers produce
and that no Python library writes for us: column mapping by name and by id (with a renamed and
a dropped column), deletion vectors, a classic checkpoint with a log compaction file, a v2
checkpoint with a sidecar, timestamp_ntz, a date-partitioned table and an epoch-milliseconds
time column with poison values. The `_delta_log` JSON, the checkpoint Parquet and the
deletion-vector bitmaps are written by hand below, following the Delta protocol (PROTOCOL.md);
only the Parquet encoding is left to pyarrow.

Everything is fixed: ids (uuid5 of fixed names), timestamps, file names, row order. Re-running
gives byte-identical JSON with the same pyarrow version (the `size` fields in the log are the
Parquet file sizes, which may change with another pyarrow version). Each fixture also gets an
`expected_sessions.csv`, computed here by a plain 30-minute-gap sessionization of the rows a
reader must see, and testdata/README.md is generated from the same definitions.

The script needs pyarrow (and deltalake for --check) at the pinned versions below. When the
running interpreter lacks them it creates a virtualenv (MAKE_TESTDATA_VENV, default
/tmp/sessionizer-testdata-venv), installs them from PyPI and re-executes itself there. Without
the bootstrap: `pip install pyarrow==26.0.1 deltalake==1.6.6`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

PYARROW_VERSION = "26.0.1"
DELTALAKE_VERSION = "1.6.6"
DEFAULT_VENV = "/tmp/sessionizer-testdata-venv"
REEXEC_MARK = "MAKE_TESTDATA_REEXEC"

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent

# --------------------------------------------------------------------------------------------
# Bootstrap: run inside a virtualenv with the pinned packages.
# --------------------------------------------------------------------------------------------


def _have(module: str, version: str) -> bool:
    try:
        mod = __import__(module)
    except ImportError:
        return False
    return getattr(mod, "__version__", None) == version


def ensure_packages(need_deltalake: bool) -> None:
    wanted = {"pyarrow": PYARROW_VERSION}
    if need_deltalake:
        wanted["deltalake"] = DELTALAKE_VERSION
    if all(_have(m, v) for m, v in wanted.items()):
        return
    if os.environ.get(REEXEC_MARK):
        sys.exit(
            "make-testdata: still missing "
            + ", ".join(f"{m}=={v}" for m, v in wanted.items())
            + f" after installing them into {sys.prefix}"
        )
    venv = Path(os.environ.get("MAKE_TESTDATA_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"make-testdata: creating virtualenv {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{m}=={v}" for m, v in wanted.items()]
    probe = "; ".join(f"import {m}; assert {m}.__version__ == {v!r}" for m, v in wanted.items())
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        print(f"make-testdata: pip install {' '.join(pins)} into {venv}", file=sys.stderr)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
            check=True,
        )
    env = dict(os.environ, **{REEXEC_MARK: "1"})
    os.execve(str(python), [str(python), str(SCRIPT), *sys.argv[1:]], env)


# --------------------------------------------------------------------------------------------
# Small helpers: times, ids, JSON, Z85, deletion vectors.
# --------------------------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UUID_NS = uuid.UUID("5e551017-2e00-4d17-9a7a-7e57da7a0001")  # fixed namespace for every id here
GAP_MICROS = 30 * 60 * 1_000_000  # sessionizer's default --gap
I64_MAX = 2**63 - 1


def micros(text: str) -> int:
    """'2026-02-15T10:00:00Z' (optionally with .ffffff) -> microseconds since the epoch."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def millis(text: str) -> int:
    us = micros(text)
    assert us % 1000 == 0, text
    return us // 1000


def dt_of(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def rfc3339(us: int) -> str:
    """UTC, 'Z', fractional seconds only when there are any (then all six digits)."""
    d = dt_of(us)
    base = d.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{d.microsecond:06d}Z" if d.microsecond else f"{base}Z"


def stats_timestamp(us: int, ntz: bool) -> str:
    """Statistics timestamps as Spark writes them: truncated down to milliseconds."""
    d = dt_of(us - us % 1000)
    text = d.strftime("%Y-%m-%dT%H:%M:%S") + f".{d.microsecond // 1000:03d}"
    return text if ntz else text + "Z"


def fixed_uuid(*parts: str) -> str:
    return str(uuid.uuid5(UUID_NS, "/".join(parts)))


def utf8(text: str) -> bytes:
    return text.encode("utf-8")


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


Z85_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def z85_encode(data: bytes) -> str:
    """Z85 (ZeroMQ RFC 32). Unaligned input is zero-padded to 4 bytes, as Delta does."""
    data = data + b"\0" * (-len(data) % 4)
    out = []
    for i in range(0, len(data), 4):
        value = int.from_bytes(data[i : i + 4], "big")
        chunk = []
        for _ in range(5):
            value, digit = divmod(value, 85)
            chunk.append(Z85_ALPHABET[digit])
        out.extend(reversed(chunk))
    return "".join(out)


def z85_decode(text: str) -> bytes:
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for ch in text[i : i + 5]:
            value = value * 85 + Z85_ALPHABET.index(ch)
        out += value.to_bytes(4, "big")
    return bytes(out)


DV_MAGIC = 1681511377  # Delta "Deletion Vector Format": portable RoaringTreemap follows
ROARING_SERIAL_COOKIE_NO_RUNCONTAINER = 12346


def roaring32_portable(values: list[int]) -> bytes:
    """A 32-bit RoaringBitmap in the portable format (RoaringFormatSpec), array containers only."""
    containers: dict[int, list[int]] = {}
    for v in sorted(set(values)):
        assert 0 <= v < 2**32
        containers.setdefault(v >> 16, []).append(v & 0xFFFF)
    for lows in containers.values():
        assert len(lows) <= 4096, "only array containers are written here"
    keys = sorted(containers)
    out = bytearray(struct.pack("<II", ROARING_SERIAL_COOKIE_NO_RUNCONTAINER, len(keys)))
    for k in keys:
        out += struct.pack("<HH", k, len(containers[k]) - 1)
    offset = len(out) + 4 * len(keys)  # the offset header is always there with this cookie
    for k in keys:
        out += struct.pack("<I", offset)
        offset += 2 * len(containers[k])
    for k in keys:
        out += struct.pack(f"<{len(containers[k])}H", *containers[k])
    return bytes(out)


def deletion_vector_bytes(row_indexes: list[int]) -> bytes:
    """magic (LE u32) + RoaringTreemap portable serialization (LE u64 bucket count, then per
    bucket the high 32 bits as LE u32 and a 32-bit portable RoaringBitmap)."""
    buckets: dict[int, list[int]] = {}
    for r in sorted(set(row_indexes)):
        assert 0 <= r < 2**63
        buckets.setdefault(r >> 32, []).append(r & 0xFFFFFFFF)
    out = bytearray(struct.pack("<I", DV_MAGIC))
    out += struct.pack("<Q", len(buckets))
    for high in sorted(buckets):
        out += struct.pack("<I", high)
        out += roaring32_portable(buckets[high])
    return bytes(out)


def parse_deletion_vector(data: bytes) -> list[int]:
    """The inverse of deletion_vector_bytes, written independently, used by --check."""
    (magic,) = struct.unpack_from("<I", data, 0)
    assert magic == DV_MAGIC, magic
    (n,) = struct.unpack_from("<Q", data, 4)
    pos, rows = 12, []
    for _ in range(n):
        (high,) = struct.unpack_from("<I", data, pos)
        cookie, size = struct.unpack_from("<II", data, pos + 4)
        assert cookie == ROARING_SERIAL_COOKIE_NO_RUNCONTAINER
        header = [struct.unpack_from("<HH", data, pos + 12 + 4 * i) for i in range(size)]
        offsets = [struct.unpack_from("<I", data, pos + 12 + 4 * size + 4 * i)[0] for i in range(size)]
        end = 0
        for (key, card_minus_1), off in zip(header, offsets):
            lows = struct.unpack_from(f"<{card_minus_1 + 1}H", data, pos + 4 + off)
            rows += [(high << 32) | (key << 16) | low for low in lows]
            end = off + 2 * (card_minus_1 + 1)
        pos += 4 + end
    return rows


def deletion_vector_file(bitmap: bytes) -> tuple[bytes, int]:
    """Deletion Vector File Storage Format, one DV: version byte 1, then big-endian size, the
    DV (magic + bitmap) and a big-endian CRC-32 of it. Returns (file bytes, offset of the DV)."""
    body = struct.pack(">I", len(bitmap)) + bitmap + struct.pack(">I", zlib.crc32(bitmap))
    return b"\x01" + body, 1


# --------------------------------------------------------------------------------------------
# Table definitions.
# --------------------------------------------------------------------------------------------


@dataclass
class Col:
    name: str  # logical name
    type: str  # Delta type: long, string, timestamp, timestamp_ntz
    physical: str | None = None  # column mapping physical name
    id: int | None = None  # column mapping id (also the Parquet field_id)

    def schema_field(self) -> dict:
        meta = {}
        if self.id is not None:
            meta = {"delta.columnMapping.id": self.id, "delta.columnMapping.physicalName": self.physical}
        return {"name": self.name, "type": self.type, "nullable": True, "metadata": meta}

    @property
    def file_name(self) -> str:
        return self.physical or self.name


@dataclass
class Row:
    user_id: int
    time: int  # microseconds since the epoch; for epoch-ms tables the raw BIGINT value
    page: str | None
    extra: dict = field(default_factory=dict)  # other logical columns (referrer, date)
    note: str = ""
    visible: bool = True  # False: deleted by a deletion vector in the latest snapshot
    valid: bool = True  # False: the event-time guard must reject it (epoch-ms poison)
    sessionized: bool = True  # what `sessionize --flush` (with the README's flags) folds


def schema_string(cols: list[Col]) -> str:
    return dumps({"type": "struct", "fields": [c.schema_field() for c in cols]})


class Table:
    """Writes one fixture table: data files, commits, checkpoints, and the rows it holds."""

    def __init__(self, out: Path, name: str, created: str):
        self.name = name
        self.dir = out / name
        self.log = self.dir / "_delta_log"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.log.mkdir(parents=True)
        self.id = fixed_uuid(name, "table")
        self.created = millis(created)
        self.version = 0
        self.rows: list[tuple[int, str, int, Row]] = []  # (version, file, row index, row)
        self.log_files: list[str] = []
        self.doc: dict = {}

    # -- data files ---------------------------------------------------------------------------

    def data_file(self, tag: str, partition: str = "") -> str:
        part = f"part-00000-{fixed_uuid(self.name, 'file', tag)}-c000.snappy.parquet"
        return f"{partition}/{part}" if partition else part

    def write_parquet(self, rel: str, cols: list[Col], rows: list[Row], names: list[str] | None = None,
                      field_ids: bool = False) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow_type = {
            "long": pa.int64(),
            "string": pa.string(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "timestamp_ntz": pa.timestamp("us"),
        }
        arrays, fields = [], []
        for i, c in enumerate(cols):
            values = [value_of(r, c.name) for r in rows]
            meta = {b"PARQUET:field_id": str(c.id).encode()} if field_ids else None
            name = names[i] if names else c.file_name
            fields.append(pa.field(name, arrow_type[c.type], nullable=True, metadata=meta))
            arrays.append(pa.array(values, type=arrow_type[c.type]))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # No embedded Arrow schema: readers must go by the Parquet schema, as with Spark files.
        pq.write_table(table, path, compression="snappy", store_schema=False)
        return path.stat().st_size

    # -- log ----------------------------------------------------------------------------------

    def commit(self, actions: list[dict]) -> int:
        version = self.version
        name = f"{version:020d}.json"
        (self.log / name).write_bytes(utf8("".join(dumps(a) + "\n" for a in actions)))
        self.log_files.append(name)
        self.version += 1
        return version

    def write_log_file(self, name: str, content: bytes | str) -> None:
        path = self.log / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_bytes(utf8(content))
        else:
            path.write_bytes(content)
        self.log_files.append(name)

    def metadata(self, cols: list[Col], configuration: dict, partition_columns=()) -> dict:
        return {
            "metaData": {
                "id": self.id,
                "format": {"provider": "parquet", "options": {}},
                "schemaString": schema_string(cols),
                "partitionColumns": list(partition_columns),
                "configuration": configuration,
                "createdTime": self.created,
            }
        }

    def add(self, rel: str, size: int, cols: list[Col], rows: list[Row], ts: int, version: int,
            partition_values: dict | None = None, data_change: bool = True, dv: dict | None = None,
            tight_bounds: bool | None = None) -> dict:
        """An add action; also records the rows it holds (for the README and the checks)."""
        if data_change:
            for i, r in enumerate(rows):
                self.rows.append((version, rel, i, r))
        action = {
            "path": rel,
            "partitionValues": partition_values or {},
            "size": size,
            "modificationTime": ts,
            "dataChange": data_change,
            "stats": file_stats(cols, rows, tight_bounds),
        }
        if dv is not None:
            action["deletionVector"] = dv
        return {"add": action}


def value_of(row: Row, column: str):
    if column == "user_id":
        return row.user_id
    if column == "visit_time":
        return row.time
    if column in ("page", "url"):
        return row.page
    return row.extra.get(column)


def file_stats(cols: list[Col], rows: list[Row], tight_bounds: bool | None) -> str:
    """Per-file statistics as a JSON string, keyed by physical names (logical ones without
    column mapping); timestamps truncated to milliseconds as Spark does."""
    mins, maxs, nulls = {}, {}, {}
    for c in cols:
        values = [value_of(r, c.name) for r in rows]
        present = [v for v in values if v is not None]
        nulls[c.file_name] = len(values) - len(present)
        if not present:
            continue
        lo, hi = min(present), max(present)
        if c.type in ("timestamp", "timestamp_ntz"):
            lo, hi = (stats_timestamp(v, c.type == "timestamp_ntz") for v in (lo, hi))
        mins[c.file_name], maxs[c.file_name] = lo, hi
    stats = {"numRecords": len(rows), "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    if tight_bounds is not None:
        stats["tightBounds"] = tight_bounds
    return dumps(stats)


ENGINE = "sessionizer-testdata (scripts/make-testdata.py)"


def commit_info(ts: int, operation: str, parameters: dict, read_version: int | None = None,
                blind_append: bool = True, metrics: dict | None = None, **more) -> dict:
    info = {"timestamp": ts, "operation": operation, "operationParameters": parameters}
    if read_version is not None:
        info["readVersion"] = read_version
    info["isolationLevel"] = "Serializable"
    info["isBlindAppend"] = blind_append
    if metrics:
        info["operationMetrics"] = {k: str(v) for k, v in metrics.items()}
    info.update(more)
    info["engineInfo"] = ENGINE
    return {"commitInfo": info}


def append_info(ts: int, rows: int, files: int = 1, read_version: int | None = None,
                mode: str = "Append", partition_by: str = "[]") -> dict:
    return commit_info(ts, "WRITE", {"mode": mode, "partitionBy": partition_by}, read_version,
                       metrics={"numFiles": files, "numOutputRows": rows})


PROTOCOL_1_2 = {"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}}


def protocol_features(*features: str) -> dict:
    return {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7,
                         "readerFeatures": list(features), "writerFeatures": list(features)}}


def R(user: int, time: str, page: str | None, **kw) -> Row:
    extra = {k: v for k, v in kw.items() if k not in ("note", "visible", "valid", "sessionized")}
    rest = {k: v for k, v in kw.items() if k in ("note", "visible", "valid", "sessionized")}
    return Row(user, micros(time), page, extra, **rest)


BASE_COLS = [Col("user_id", "long"), Col("visit_time", "timestamp"), Col("page", "string")]


# --------------------------------------------------------------------------------------------
# The fixtures.
# --------------------------------------------------------------------------------------------


def column_mapping(out: Path, mode: str) -> Table:
    """Column mapping by name or id: create with url/referrer, rename url -> page, drop
    referrer, append. Parquet columns carry physical names and field ids (as Spark writes)."""
    name = f"column_mapping_{mode}"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    phys = {c: f"col-{fixed_uuid(name, 'column', c)}" for c in ("user_id", "visit_time", "url", "referrer")}
    user = Col("user_id", "long", phys["user_id"], 1)
    time = Col("visit_time", "timestamp", phys["visit_time"], 2)
    url = Col("url", "string", phys["url"], 3)
    referrer = Col("referrer", "string", phys["referrer"], 4)
    page = Col("page", "string", phys["url"], 3)  # renamed: same id, same physical name
    conf = {"delta.columnMapping.mode": mode, "delta.columnMapping.maxColumnId": "4"}
    proto = {"protocol": {"minReaderVersion": 2, "minWriterVersion": 5}}

    v0_cols = [user, time, url, referrer]
    v0_rows = [
        R(1, "2026-02-15T10:00:00Z", "home.html", referrer="news.example"),
        R(2, "2026-02-15T10:05:00Z", "home.html", referrer=None),
        R(1, "2026-02-15T10:20:00Z", "search.html", referrer="home.html"),
    ]
    f0 = t.data_file("v0")
    ts0 = millis("2026-02-15T10:21:00Z")
    size0 = t.write_parquet(f0, v0_cols, v0_rows, field_ids=True)
    t.commit([
        commit_info(ts0, "CREATE TABLE AS SELECT",
                    {"partitionBy": "[]", "properties": dumps(conf)}, blind_append=True,
                    metrics={"numFiles": 1, "numOutputRows": 3}),
        proto,
        t.metadata(v0_cols, conf),
        t.add(f0, size0, v0_cols, v0_rows, ts0, 0),
    ])

    v1_cols = [user, time, page, referrer]
    ts1 = millis("2026-02-15T10:22:00Z")
    t.commit([
        commit_info(ts1, "RENAME COLUMN", {"oldColumnPath": "url", "newColumnPath": "page"},
                    read_version=0, blind_append=False),
        t.metadata(v1_cols, conf),
    ])

    v2_cols = [user, time, page]
    ts2 = millis("2026-02-15T10:23:00Z")
    t.commit([
        commit_info(ts2, "DROP COLUMNS", {"columns": dumps(["referrer"])}, read_version=1,
                    blind_append=False),
        t.metadata(v2_cols, conf),
    ])

    v3_rows = [
        R(1, "2026-02-15T10:50:00Z", "item.html", note="30m after 10:20: same session"),
        R(3, "2026-02-15T10:10:00Z", "home.html"),
        R(2, "2026-02-15T10:36:00Z", "cart.html", note="31m after 10:05: new session"),
    ]
    f3 = t.data_file("v3")
    ts3 = millis("2026-02-15T10:51:00Z")
    size3 = t.write_parquet(f3, v2_cols, v3_rows, field_ids=True)
    t.commit([append_info(ts3, 3, read_version=2), t.add(f3, size3, v2_cols, v3_rows, ts3, 3)])

    t.doc = {
        "protocol": "reader 2 / writer 5 (column mapping without table features)",
        "configuration": conf,
        "shape": (
            f"Column mapping in `{mode}` mode, as Spark writes it after `ALTER TABLE ... RENAME "
            "COLUMN` and `DROP COLUMN`. Every schema field carries `delta.columnMapping.id` and "
            "`delta.columnMapping.physicalName = col-<uuid>`; the Parquet files name their "
            "columns by the physical names and carry the ids as Parquet field ids. Version 0 "
            "creates the table with `url` and `referrer`; version 1 renames `url` to `page` "
            "(same id 3, same physical name); version 2 drops `referrer` (its physical column "
            "stays in the version-0 file and must be ignored); version 3 appends rows with the "
            "final schema. Statistics are keyed by physical names."
        ),
        "schema": "user_id long, visit_time timestamp, page string (was `url`); dropped: referrer string",
        "deltalake": (
            "`QueryBuilder` (the Rust/DataFusion scan) reads the 6 rows with the final "
            "schema; `to_pyarrow_table()` returns 6 rows of nulls (that path ignores column "
            "mapping)."
        ),
        "known": {"to_pyarrow_table": "its pyarrow-dataset read path ignores column mapping: all nulls"},
    }
    return t


def column_mapping_id_by_field_id(out: Path) -> Table:
    """id mode where the Parquet column names are not the physical names: only field ids match."""
    name = "column_mapping_id_by_field_id"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = [
        Col("user_id", "long", f"col-{fixed_uuid(name, 'column', 'user_id')}", 1),
        Col("visit_time", "timestamp", f"col-{fixed_uuid(name, 'column', 'visit_time')}", 2),
        Col("page", "string", f"col-{fixed_uuid(name, 'column', 'page')}", 3),
    ]
    conf = {"delta.columnMapping.mode": "id", "delta.columnMapping.maxColumnId": "3"}
    rows = [
        R(1, "2026-02-15T10:00:00Z", "home.html"),
        R(2, "2026-02-15T10:05:00Z", "home.html"),
        R(1, "2026-02-15T10:30:00Z", "search.html", note="exactly 30m: same session"),
    ]
    f0 = t.data_file("v0")
    ts0 = millis("2026-02-15T10:31:00Z")
    size0 = t.write_parquet(f0, cols, rows, names=["uid", "ts", "url"], field_ids=True)
    t.commit([
        commit_info(ts0, "CONVERT", {"numFiles": 1, "partitionedBy": "[]", "collectStats": True},
                    blind_append=False, metrics={"numConvertedFiles": 1}),
        {"protocol": {"minReaderVersion": 2, "minWriterVersion": 5}},
        t.metadata(cols, conf),
        t.add(f0, size0, cols, rows, ts0, 0),
    ])
    t.doc = {
        "protocol": "reader 2 / writer 5 (column mapping without table features)",
        "configuration": conf,
        "shape": (
            "Column mapping in `id` mode where the data file names its columns `uid`, `ts`, "
            "`url` (neither the logical nor the physical names), as in a table converted from "
            "Iceberg whose files predate a rename. Only the Parquet field ids (1, 2, 3) match "
            "`delta.columnMapping.id`; a reader that resolves id-mode columns by name reads "
            "nulls. One commit (operation `CONVERT`)."
        ),
        "schema": "user_id long, visit_time timestamp, page string (files: uid, ts, url by field id)",
        "deltalake": (
            "Both read paths return 3 rows of nulls: delta-rs resolves id-mode columns by "
            "physical name, not by Parquet field id as the protocol requires."
        ),
        "known": {"to_pyarrow_table": "its pyarrow-dataset read path ignores column mapping: all nulls",
                  "QueryBuilder": "delta-rs resolves id mode by physical name, not field id"},
    }
    return t


def deletion_vectors(out: Path) -> Table:
    """A file added, then a DELETE that re-adds it with an on-disk deletion vector."""
    name = "deletion_vectors"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = BASE_COLS
    conf = {"delta.enableDeletionVectors": "true"}
    proto = protocol_features("deletionVectors")
    rows = [
        R(1, "2026-02-15T10:00:00Z", "home.html"),
        R(1, "2026-02-15T10:25:00Z", "spam.html", visible=False,
          note="the DELETE of version 1 marks it; it bridges 10:00 and 10:50"),
        R(1, "2026-02-15T10:50:00Z", "item.html"),
        R(2, "2026-02-15T10:05:00Z", "home.html"),
        R(2, "2026-02-15T10:35:00Z", "cart.html", note="exactly 30m: same session"),
        R(3, "2026-02-15T10:10:00Z", "home.html"),
    ]
    f0 = t.data_file("v0")
    ts0 = millis("2026-02-15T10:51:00Z")
    size0 = t.write_parquet(f0, cols, rows)
    t.commit([
        commit_info(ts0, "CREATE TABLE AS SELECT", {"partitionBy": "[]", "properties": dumps(conf)},
                    metrics={"numFiles": 1, "numOutputRows": 6}),
        proto,
        t.metadata(cols, conf),
        t.add(f0, size0, cols, rows, ts0, 0),
    ])

    bitmap = deletion_vector_bytes([1])
    dv_uuid = uuid.UUID(fixed_uuid(name, "deletion-vector", "v1"))
    dv_bytes, offset = deletion_vector_file(bitmap)
    (t.dir / f"deletion_vector_{dv_uuid}.bin").write_bytes(dv_bytes)
    dv = {
        "storageType": "u",
        "pathOrInlineDv": z85_encode(dv_uuid.bytes),
        "offset": offset,
        "sizeInBytes": len(bitmap),
        "cardinality": 1,
    }
    ts1 = millis("2026-02-15T11:00:00Z")
    stats0 = file_stats(cols, rows, None)
    t.commit([
        commit_info(ts1, "DELETE", {"predicate": dumps(["(page = 'spam.html')"])}, read_version=0,
                    blind_append=False,
                    metrics={"numDeletionVectorsAdded": 1, "numDeletionVectorsRemoved": 0,
                             "numDeletedRows": 1, "numAddedFiles": 0, "numRemovedFiles": 0}),
        {"remove": {"path": f0, "deletionTimestamp": ts1, "dataChange": True,
                    "extendedFileMetadata": True, "partitionValues": {}, "size": size0,
                    "stats": stats0}},
        {"add": {"path": f0, "partitionValues": {}, "size": size0, "modificationTime": ts0,
                 "dataChange": True, "stats": file_stats(cols, rows, False), "deletionVector": dv}},
    ])
    t.doc = {
        "protocol": "reader 3 / writer 7, readerFeatures = writerFeatures = [deletionVectors]",
        "configuration": conf,
        "shape": (
            "Version 0 adds one file of 6 rows. Version 1 is a `DELETE` (dataChange true) that "
            "removes that file and re-adds the same path with a deletion vector marking row 1 "
            "deleted, as Spark/Databricks do with deletion vectors on. The DV is stored on disk "
            "(`storageType` `u`: the path is the Z85-encoded UUID, no prefix) in "
            f"`deletion_vector_{dv_uuid}.bin` at the table root, in the protocol's file format "
            "(version byte 1, big-endian size, magic 1681511377 + portable RoaringTreemap, "
            "big-endian CRC-32 of magic + bitmap), at offset 1. The bitmap bytes are "
            "CRoaring's portable 64-bit serialization (checked against pyroaring 1.2.0 when "
            "this was written) after the magic."
        ),
        "schema": "user_id long, visit_time timestamp, page string",
        "run": (
            "Version 1 removes data, so by SPEC a plain `sessionize` must stop at version 1 "
            "with an error naming it. `expected_sessions.csv` is the result of "
            "`sessionize --flush --on-change-commit skip`: the DELETE commit is skipped, so all "
            "6 rows of version 0 count (user 1: one session 10:00-10:50 of 3 events). A snapshot "
            "reader of version 1 sees 5 rows (row 1 deleted), where user 1 has two sessions "
            "(10:00 and 10:50)."
        ),
        "deltalake": (
            "`QueryBuilder` reads 5 rows (the DV applied); `to_pyarrow_table()` refuses: "
            "reader feature `deletionVectors` not supported on that path."
        ),
        "dv": {"row_indexes": [1], "bytes": bitmap.hex(), "descriptor": dv},
    }
    return t


def deletion_vectors_added(out: Path) -> Table:
    """A plain append whose add already carries an (inline) deletion vector."""
    name = "deletion_vectors_added"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = BASE_COLS
    conf = {"delta.enableDeletionVectors": "true"}
    proto = protocol_features("deletionVectors")
    rows0 = [
        R(1, "2026-02-15T10:00:00Z", "home.html"),
        R(2, "2026-02-15T10:05:00Z", "home.html"),
        R(3, "2026-02-15T10:10:00Z", "home.html"),
    ]
    f0 = t.data_file("v0")
    ts0 = millis("2026-02-15T10:11:00Z")
    size0 = t.write_parquet(f0, cols, rows0)
    t.commit([
        commit_info(ts0, "CREATE TABLE AS SELECT", {"partitionBy": "[]", "properties": dumps(conf)},
                    metrics={"numFiles": 1, "numOutputRows": 3}),
        proto,
        t.metadata(cols, conf),
        t.add(f0, size0, cols, rows0, ts0, 0),
    ])
    rows1 = [
        R(1, "2026-02-15T10:30:00Z", "search.html", note="exactly 30m: same session"),
        R(2, "2026-02-15T10:30:00Z", "promo.html", visible=False, sessionized=False,
          note="it would bridge 10:05 and 11:00"),
        R(2, "2026-02-15T11:00:00Z", "cart.html"),
        R(3, "2026-02-15T10:40:00Z", "item.html", note="exactly 30m: same session"),
    ]
    bitmap = deletion_vector_bytes([1])
    dv = {
        "storageType": "i",
        "pathOrInlineDv": z85_encode(bitmap),
        "sizeInBytes": len(bitmap),
        "cardinality": 1,
    }
    f1 = t.data_file("v1")
    ts1 = millis("2026-02-15T11:01:00Z")
    size1 = t.write_parquet(f1, cols, rows1)
    t.commit([
        append_info(ts1, 3, read_version=0),
        t.add(f1, size1, cols, rows1, ts1, 1, dv=dv, tight_bounds=False),
    ])
    t.doc = {
        "protocol": "reader 3 / writer 7, readerFeatures = writerFeatures = [deletionVectors]",
        "configuration": conf,
        "shape": (
            "Version 0 adds a plain file of 3 rows. Version 1 is a blind append (`WRITE`, "
            "mode Append) whose `add` already carries a deletion vector, as writers that copy "
            "files with their DVs do: 4 physical rows, row 1 deleted. The DV is inline "
            f"(`storageType` `i`): {len(bitmap)} bytes (magic 1681511377 + portable "
            "RoaringTreemap), Z85-encoded after zero-padding to a multiple of 4 bytes as Delta "
            "does; `sizeInBytes` is the unpadded length. The add's stats say numRecords 4 and "
            "tightBounds false."
        ),
        "schema": "user_id long, visit_time timestamp, page string",
        "run": (
            "A reader that honours the DV sees 6 rows; user 2 then has two one-event sessions. "
            "A reader that ignores it sees 7 rows and one session of user 2 (10:05-11:00, 3 "
            "events). By the issue, the tool either honours it or refuses the table with exit 2 "
            "naming `deletionVectors`."
        ),
        "deltalake": (
            "`QueryBuilder` reads 6 rows (the inline DV applied, padding and all); "
            "`to_pyarrow_table()` refuses: reader feature `deletionVectors`."
        ),
        "dv": {"row_indexes": [1], "bytes": bitmap.hex(), "descriptor": dv},
    }
    return t


def checkpoint_schema():
    """The classic (V1 spec) checkpoint schema, with the fields Spark writes."""
    import pyarrow as pa

    smap = pa.map_(pa.string(), pa.string())
    dv = pa.struct([("storageType", pa.string()), ("pathOrInlineDv", pa.string()),
                    ("offset", pa.int32()), ("sizeInBytes", pa.int32()),
                    ("cardinality", pa.int64())])
    return pa.schema([
        ("txn", pa.struct([("appId", pa.string()), ("version", pa.int64()),
                           ("lastUpdated", pa.int64())])),
        ("add", pa.struct([("path", pa.string()), ("partitionValues", smap), ("size", pa.int64()),
                           ("modificationTime", pa.int64()), ("dataChange", pa.bool_()),
                           ("stats", pa.string()), ("tags", smap), ("deletionVector", dv),
                           ("baseRowId", pa.int64()), ("defaultRowCommitVersion", pa.int64()),
                           ("clusteringProvider", pa.string())])),
        ("remove", pa.struct([("path", pa.string()), ("deletionTimestamp", pa.int64()),
                              ("dataChange", pa.bool_()), ("extendedFileMetadata", pa.bool_()),
                              ("partitionValues", smap), ("size", pa.int64()),
                              ("deletionVector", dv), ("baseRowId", pa.int64()),
                              ("defaultRowCommitVersion", pa.int64())])),
        ("metaData", pa.struct([("id", pa.string()), ("name", pa.string()),
                                ("description", pa.string()),
                                ("format", pa.struct([("provider", pa.string()),
                                                      ("options", smap)])),
                                ("schemaString", pa.string()),
                                ("partitionColumns", pa.list_(pa.string())),
                                ("configuration", smap), ("createdTime", pa.int64())])),
        ("protocol", pa.struct([("minReaderVersion", pa.int32()), ("minWriterVersion", pa.int32()),
                                ("readerFeatures", pa.list_(pa.string())),
                                ("writerFeatures", pa.list_(pa.string()))])),
    ])


def to_arrow_action(action: dict) -> dict:
    """A JSON action as a checkpoint row: maps as lists of pairs, one column set."""
    (kind, body), = action.items()
    body = dict(body)
    for key in ("partitionValues", "tags", "configuration"):
        if key in body and body[key] is not None:
            body[key] = sorted(body[key].items())
    if kind == "metaData":
        body["format"] = {"provider": body["format"]["provider"],
                          "options": sorted(body["format"]["options"].items())}
    return {kind: body}


def write_checkpoint_parquet(path: Path, actions: list[dict], schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for a in actions:
        row = {name: None for name in schema.names}
        row.update(to_arrow_action(a))
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 49 leaf columns for a handful of rows: without column statistics and dictionaries the
    # footer, and so the file, is about half the size.
    pq.write_table(table, path, compression="snappy", store_schema=False, write_statistics=False,
                   use_dictionary=False)
    return path.stat().st_size


def reconcile(actions: list[dict]) -> list[dict]:
    """Action reconciliation for a checkpoint or a log compaction file (no DVs here):
    latest protocol/metaData, latest txn per appId, live adds, remove tombstones."""
    protocol = metadata = None
    txns: dict[str, dict] = {}
    files: dict[str, dict] = {}
    for a in actions:
        (kind, body), = a.items()
        if kind == "protocol":
            protocol = a
        elif kind == "metaData":
            metadata = a
        elif kind == "txn":
            txns[body["appId"]] = a
        elif kind in ("add", "remove"):
            files[body["path"]] = a
    out = [x for x in (protocol, metadata) if x]
    out += [txns[k] for k in sorted(txns)]
    out += [files[p] for p in sorted(files) if "add" in files[p]]
    out += [files[p] for p in sorted(files) if "remove" in files[p]]
    return out


def checkpointed(out: Path) -> Table:
    """A streaming-appended table with an OPTIMIZE, a classic checkpoint at version 10,
    `_last_checkpoint`, two commits after it and a log compaction file for them."""
    name = "checkpointed"
    t = Table(out, name, "2026-02-15T09:59:00Z")
    cols = BASE_COLS
    conf = {"delta.checkpointInterval": "10"}
    app_id = fixed_uuid(name, "streaming-query")
    all_actions: list[dict] = []
    after_checkpoint: list[list[dict]] = []

    def commit(actions: list[dict]) -> None:
        v = t.commit(actions)
        all_actions.extend(a for a in actions if "commitInfo" not in a)
        if v > 10:
            after_checkpoint.append([a for a in actions if "commitInfo" not in a])

    ts0 = millis("2026-02-15T09:59:00Z")
    commit([commit_info(ts0, "CREATE TABLE", {"isManaged": "false", "description": None,
                                              "partitionBy": "[]", "properties": dumps(conf)}),
            PROTOCOL_1_2, t.metadata(cols, conf)])

    # (version, user, time, page); version 6 is an OPTIMIZE of the files of versions 1-5.
    events = {
        1: (1, "2026-02-15T10:00:00Z", "home.html", ""),
        2: (2, "2026-02-15T10:03:00Z", "home.html", ""),
        3: (1, "2026-02-15T10:12:00Z", "search.html", ""),
        4: (3, "2026-02-15T10:15:00Z", "home.html", ""),
        5: (1, "2026-02-15T10:30:00Z", "item.html", ""),
        7: (2, "2026-02-15T10:33:00Z", "cart.html", "exactly 30m after 10:03: same session"),
        8: (3, "2026-02-15T10:50:00Z", "item.html", "35m after 10:15: new session"),
        9: (1, "2026-02-15T11:00:00Z", "cart.html", "exactly 30m after 10:30: same session"),
        10: (1, "2026-02-15T11:40:00Z", "home.html", "40m after 11:00: new session"),
        11: (2, "2026-02-15T11:45:00Z", "home.html", "written after the checkpoint"),
        12: (1, "2026-02-15T12:05:00Z", "search.html", "written after the checkpoint"),
    }
    batch = 0
    small_files = []
    for version in range(1, 13):
        if version == 6:
            ts = millis("2026-02-15T10:31:00Z")
            rows = [R(u, tm, p) for (u, tm, p, _) in (events[v] for v in range(1, 6))]
            f = t.data_file("optimize-v6")
            size = t.write_parquet(f, cols, rows)
            actions = [commit_info(ts, "OPTIMIZE", {"predicate": "[]", "zOrderBy": "[]"},
                                   read_version=5, blind_append=False,
                                   metrics={"numRemovedFiles": 5, "numAddedFiles": 1}),
                       t.add(f, size, cols, rows, ts, version, data_change=False)]
            for (rel, rsize) in small_files:
                actions.append({"remove": {"path": rel, "deletionTimestamp": ts, "dataChange": False,
                                           "extendedFileMetadata": True, "partitionValues": {},
                                           "size": rsize}})
            commit(actions)
            continue
        user, tm, page, note = events[version]
        row = R(user, tm, page, note=note)
        ts = millis(tm) + 60_000
        f = t.data_file(f"v{version}")
        size = t.write_parquet(f, cols, [row])
        if version <= 5:
            small_files.append((f, size))
        commit([
            commit_info(ts, "STREAMING UPDATE",
                        {"outputMode": "Append", "queryId": app_id, "epochId": str(batch)},
                        read_version=version - 1, metrics={"numOutputRows": 1, "numAddedFiles": 1}),
            {"txn": {"appId": app_id, "version": batch, "lastUpdated": ts}},
            t.add(f, size, cols, [row], ts, version),
        ])
        batch += 1
        if version == 10:
            state = reconcile(all_actions)
            for a in state:  # checkpoints carry adds with dataChange false
                if "add" in a:
                    a["add"] = dict(a["add"], dataChange=False)
            cp = f"{10:020d}.checkpoint.parquet"
            size_cp = write_checkpoint_parquet(t.log / cp, state, checkpoint_schema())
            t.log_files.append(cp)
            last = {"version": 10, "size": len(state), "sizeInBytes": size_cp,
                    "numOfAddFiles": sum("add" in a for a in state)}
            t.write_log_file("_last_checkpoint", dumps(last) + "\n")

    compacted = reconcile([a for actions in after_checkpoint for a in actions])
    t.write_log_file(f"{11:020d}.{12:020d}.compacted.json",
                     "".join(dumps(a) + "\n" for a in compacted))
    t.doc = {
        "protocol": "reader 1 / writer 2",
        "configuration": conf,
        "shape": (
            "A table a Structured Streaming job appends to: version 0 `CREATE TABLE`, then one "
            "`STREAMING UPDATE` commit per micro-batch (one file of one row, plus a `txn` action "
            "with the query id and batch id). Version 6 is an `OPTIMIZE` (dataChange false) "
            "that removes the files of versions 1-5 and adds one file with their 5 rows. "
            "`00000000000000000010.checkpoint.parquet` is a classic single-file V1 checkpoint of "
            "version 10 (columns txn, add, remove, metaData, protocol; one action per row; adds "
            "with dataChange false and the JSON `stats` string; the 5 removes as tombstones; "
            "the latest txn), and `_last_checkpoint` points at it. Versions 11 and 12 append "
            "after the checkpoint, and `00000000000000000011.00000000000000000012.compacted.json` "
            "is a log compaction file holding their reconciled actions (2 adds and the latest "
            "txn, no commitInfo). All JSON commits 0-12 are kept, so a test that wants to prove "
            "the reader starts from the checkpoint can delete 0-9 (or 0-10) from a copy."
        ),
        "schema": "user_id long, visit_time timestamp, page string",
        "run": (
            "An incremental read from version 0 folds the adds of versions 1-5 and 7-12 (11 "
            "rows) and skips the OPTIMIZE of version 6 (no data change); a snapshot read sees "
            "the same 11 rows through the compacted file."
        ),
        "deltalake": (
            "Both read paths read the 11 rows. From a copy without commits 0-10 it still reads "
            "them (and fails once the checkpoint is broken, so the checkpoint is what it "
            "reads); it does not use the log compaction file (the protocol makes that optional), "
            "so that file is checked by no reader here."
        ),
    }
    return t


def v2_checkpoint(out: Path) -> Table:
    """A UUID-named V2 checkpoint in JSON with one Parquet sidecar holding the file actions."""
    name = "v2_checkpoint"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = BASE_COLS
    conf = {"delta.checkpointPolicy": "v2"}
    proto = protocol_features("v2Checkpoint")
    rows_by_version = {
        0: [R(1, "2026-02-15T10:00:00Z", "home.html"), R(2, "2026-02-15T10:05:00Z", "home.html")],
        1: [R(1, "2026-02-15T10:30:00Z", "search.html", note="exactly 30m: same session")],
        2: [R(3, "2026-02-15T10:10:00Z", "home.html"),
            R(2, "2026-02-15T10:40:00Z", "cart.html", note="35m after 10:05: new session")],
        3: [R(3, "2026-02-15T10:45:00Z", "item.html", note="written after the checkpoint")],
    }
    file_actions = []
    for version, rows in rows_by_version.items():
        ts = max(r.time for r in rows) // 1000 + 60_000
        f = t.data_file(f"v{version}")
        size = t.write_parquet(f, cols, rows)
        add = t.add(f, size, cols, rows, ts, version)
        if version == 0:
            t.commit([commit_info(ts, "CREATE TABLE AS SELECT",
                                  {"partitionBy": "[]", "properties": dumps(conf)},
                                  metrics={"numFiles": 1, "numOutputRows": len(rows)}),
                      proto, t.metadata(cols, conf), add])
        else:
            t.commit([append_info(ts, len(rows), read_version=version - 1), add])
        if version <= 2:
            file_actions.append(add)
        if version == 2:
            import pyarrow as pa

            schema = checkpoint_schema()
            sidecar_schema = pa.schema([schema.field("add"), schema.field("remove")])
            adds = [{"add": dict(a["add"], dataChange=False)} for a in file_actions]
            sidecar = f"{fixed_uuid(name, 'sidecar', 'v2')}.parquet"
            sc_size = write_checkpoint_parquet(t.log / "_sidecars" / sidecar, adds, sidecar_schema)
            t.log_files.append(f"_sidecars/{sidecar}")
            cp_actions = [
                {"checkpointMetadata": {"version": 2, "tags": {}}},
                proto,
                t.metadata(cols, conf),
                {"sidecar": {"path": sidecar, "sizeInBytes": sc_size,
                             "modificationTime": ts, "tags": {}}},
            ]
            cp = f"{2:020d}.checkpoint.{fixed_uuid(name, 'checkpoint', 'v2')}.json"
            text = "".join(dumps(a) + "\n" for a in cp_actions)
            t.write_log_file(cp, text)
            last = {"version": 2, "size": len(cp_actions) + len(adds),
                    "sizeInBytes": len(text.encode()), "numOfAddFiles": len(adds)}
            t.write_log_file("_last_checkpoint", dumps(last) + "\n")
    t.doc = {
        "protocol": "reader 3 / writer 7, readerFeatures = writerFeatures = [v2Checkpoint]",
        "configuration": conf,
        "shape": (
            "Versions 0-3 each add one file. Version 2 has a UUID-named V2-spec checkpoint in "
            "JSON (`00000000000000000002.checkpoint.<uuid>.json`: checkpointMetadata, protocol, "
            "metaData and one `sidecar` action) whose 3 add actions live in "
            "`_delta_log/_sidecars/<uuid>.parquet`; `_last_checkpoint` names version 2. No "
            "classic checkpoint is written for older clients."
        ),
        "deltalake": (
            "`QueryBuilder` reads the 6 rows, also from a copy without commits 0-2 (and fails "
            "once the sidecar is broken); `to_pyarrow_table()` refuses: reader feature "
            "`v2Checkpoint`."
        ),
        "schema": "user_id long, visit_time timestamp, page string",
    }
    return t


def timestamp_ntz(out: Path) -> Table:
    name = "timestamp_ntz"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = [Col("user_id", "long"), Col("visit_time", "timestamp_ntz"), Col("page", "string")]
    proto = protocol_features("timestampNtz")
    rows0 = [
        R(1, "2026-02-15T10:00:00Z", "home.html"),
        R(2, "2026-02-15T10:05:00Z", "home.html"),
        R(3, "2026-02-15T10:10:00Z", "home.html"),
        R(1, "2026-02-15T10:30:00Z", "search.html", note="exactly 30m: same session"),
    ]
    rows1 = [
        R(2, "2026-02-15T10:35:00.000001Z", "search.html",
          note="30m and 1 microsecond after 10:05: new session"),
        R(3, "2026-02-15T10:40:00Z", "item.html", note="exactly 30m: same session"),
    ]
    f0, f1 = t.data_file("v0"), t.data_file("v1")
    ts0, ts1 = millis("2026-02-15T10:31:00Z"), millis("2026-02-15T10:41:00Z")
    size0 = t.write_parquet(f0, cols, rows0)
    t.commit([commit_info(ts0, "CREATE TABLE AS SELECT", {"partitionBy": "[]", "properties": "{}"},
                          metrics={"numFiles": 1, "numOutputRows": 4}),
              proto, t.metadata(cols, {}), t.add(f0, size0, cols, rows0, ts0, 0)])
    size1 = t.write_parquet(f1, cols, rows1)
    t.commit([append_info(ts1, 2, read_version=0), t.add(f1, size1, cols, rows1, ts1, 1)])
    t.doc = {
        "protocol": "reader 3 / writer 7, readerFeatures = writerFeatures = [timestampNtz]",
        "configuration": {},
        "shape": (
            "`visit_time` is `timestamp_ntz`; the Parquet column is INT64 "
            "TIMESTAMP(MICROS, isAdjustedToUTC=false). Statistics are written without a zone "
            "(`2026-02-15T10:00:00.000`), truncated to milliseconds. The wall-clock values are "
            "those of the UTC times listed below; the expected sessions read them as UTC. One "
            "pair of events is 30 minutes and 1 microsecond apart."
        ),
        "schema": "user_id long, visit_time timestamp_ntz, page string",
        "deltalake": "Both read paths read the 6 rows, `visit_time` as timestamp[us] without zone.",
    }
    return t


def partitioned_by_date(out: Path) -> Table:
    name = "partitioned_by_date"
    t = Table(out, name, "2026-02-15T23:30:00Z")
    cols = BASE_COLS + [Col("date", "string")]
    data_cols = BASE_COLS
    parts = '["date"]'
    files = [
        (0, "2026-02-15", [R(1, "2026-02-15T23:40:00Z", "home.html", date="2026-02-15"),
                           R(2, "2026-02-15T23:45:00Z", "home.html", date="2026-02-15")]),
        (0, "2026-02-16", [R(1, "2026-02-16T00:05:00Z", "search.html", date="2026-02-16",
                             note="25m after 23:40, across the partition boundary: same session")]),
        (1, "2026-02-16", [R(2, "2026-02-16T00:20:00Z", "cart.html", date="2026-02-16",
                             note="35m after 23:45: new session"),
                           R(3, "2026-02-16T00:30:00Z", "home.html", date="2026-02-16")]),
    ]
    adds = {0: [], 1: []}
    ts = {0: millis("2026-02-16T00:06:00Z"), 1: millis("2026-02-16T00:31:00Z")}
    for version, date, rows in files:
        rel = t.data_file(f"v{version}-{date}", partition=f"date={date}")
        size = t.write_parquet(rel, data_cols, rows)
        adds[version].append(t.add(rel, size, data_cols, rows, ts[version], version,
                                   partition_values={"date": date}))
    t.commit([commit_info(ts[0], "WRITE", {"mode": "ErrorIfExists", "partitionBy": parts},
                          metrics={"numFiles": 2, "numOutputRows": 3}),
              PROTOCOL_1_2, t.metadata(cols, {}, partition_columns=["date"]), *adds[0]])
    t.commit([append_info(ts[1], 2, read_version=0, partition_by=parts), *adds[1]])
    t.doc = {
        "protocol": "reader 1 / writer 2",
        "configuration": {},
        "shape": (
            "Partitioned by the string column `date` (`partitionColumns: [\"date\"]`). Data "
            "files sit in Hive-style folders `date=2026-02-15/` and `date=2026-02-16/` and do "
            "not contain the `date` column; its value is only in each add's `partitionValues`. "
            "Statistics cover the data columns only. User 1's session crosses midnight, i.e. "
            "two partitions."
        ),
        "schema": "user_id long, visit_time timestamp, page string, date string (partition column)",
        "deltalake": "Both read paths read the 5 rows, `date` filled from the partition values.",
    }
    return t


def epoch_millis_poison(out: Path) -> Table:
    name = "epoch_millis_poison"
    t = Table(out, name, "2026-02-15T10:00:30Z")
    cols = [Col("user_id", "long"), Col("visit_time", "long"), Col("page", "string")]

    def M(user, time, page, **kw):
        row = R(user, time, page, **kw)
        row.time //= 1000  # epoch milliseconds
        return row

    rows = {
        0: [M(1, "2026-02-15T10:00:00Z", "home.html"), M(2, "2026-02-15T10:05:00Z", "home.html"),
            M(1, "2026-02-15T10:15:00Z", "search.html")],
        1: [M(3, "2026-02-15T10:20:00Z", "home.html"),
            Row(2, 1_771_149_600_000_000, "bad_clock.html", valid=False, sessionized=False,
                note="microseconds written as milliseconds: year 58095, reason future"),
            Row(3, I64_MAX, "overflow.html", valid=False, sessionized=False,
                note="i64::MAX milliseconds: overflows as microseconds, reason bad_time"),
            M(1, "2026-02-15T10:40:00Z", "item.html")],
        2: [M(2, "2026-02-15T10:50:00Z", "cart.html", note="45m after 10:05: new session"),
            M(3, "2026-02-15T10:50:00Z", "item.html", note="exactly 30m after 10:20: same session")],
    }
    ts = {0: millis("2026-02-15T10:16:00Z"), 1: millis("2026-02-15T10:41:00Z"),
          2: millis("2026-02-15T10:51:00Z")}
    for version in (0, 1, 2):
        f = t.data_file(f"v{version}")
        size = t.write_parquet(f, cols, rows[version])
        add = t.add(f, size, cols, rows[version], ts[version], version)
        if version == 0:
            t.commit([commit_info(ts[0], "CREATE TABLE AS SELECT",
                                  {"partitionBy": "[]", "properties": "{}"},
                                  metrics={"numFiles": 1, "numOutputRows": 3}),
                      PROTOCOL_1_2, t.metadata(cols, {}), add])
        else:
            t.commit([append_info(ts[version], len(rows[version]), read_version=version - 1), add])
    t.doc = {
        "protocol": "reader 1 / writer 2",
        "configuration": {},
        "shape": (
            "`visit_time` is a BIGINT of epoch milliseconds (SPEC: an integer time column is "
            "read as epoch milliseconds; the default `--time-column visit_time` applies). "
            "Version 1 holds two poison rows: "
            "1771149600000000 (10:00:00Z in microseconds, written by mistake into the "
            "milliseconds column: year 58095) and 9223372036854775807 (i64::MAX, which "
            "overflows when turned into microseconds). Each commit's `commitInfo.timestamp` "
            "is one minute after its last real event (10:16, 10:41, 10:51), so the event-time "
            "guard (`--max-event-skew`, default 1d) can judge the rows by it."
        ),
        "schema": "user_id long, visit_time long (epoch ms), page string",
        "run": (
            "Both poison rows are invalid (`rows_invalid = 2`: `future` and `bad_time`), never "
            "move the watermark and are in no session; `expected_sessions.csv` holds the "
            "sessions of the 7 other rows. In one run per version, version 2's rows must not "
            "be late (the watermark after version 1 is 10:40 - 15m = 10:25)."
        ),
        "deltalake": "Both read paths read all 9 rows as BIGINT, poison values included.",
    }
    return t


FIXTURES = [
    ("column_mapping_name", lambda out: column_mapping(out, "name")),
    ("column_mapping_id", lambda out: column_mapping(out, "id")),
    ("column_mapping_id_by_field_id", column_mapping_id_by_field_id),
    ("deletion_vectors", deletion_vectors),
    ("deletion_vectors_added", deletion_vectors_added),
    ("checkpointed", checkpointed),
    ("v2_checkpoint", v2_checkpoint),
    ("timestamp_ntz", timestamp_ntz),
    ("partitioned_by_date", partitioned_by_date),
    ("epoch_millis_poison", epoch_millis_poison),
]


# --------------------------------------------------------------------------------------------
# Expected sessions: a plain gap sessionization, written independently of the tool.
# --------------------------------------------------------------------------------------------


def event_micros(t: Table, row: Row) -> int:
    return row.time * 1000 if t.name == "epoch_millis_poison" else row.time


def sessionize(t: Table) -> list[tuple[int, int, int, int]]:
    """(user_id, start, end, count): events of one user at most 30 minutes apart (exactly 30
    minutes stays together) form one session."""
    by_user: dict[int, list[int]] = {}
    for _, _, _, row in t.rows:
        if row.sessionized and row.valid:
            by_user.setdefault(row.user_id, []).append(event_micros(t, row))
    sessions = []
    for user in sorted(by_user):
        times = sorted(by_user[user])
        start = prev = times[0]
        count = 1
        for tm in times[1:]:
            if tm - prev > GAP_MICROS:
                sessions.append((user, start, prev, count))
                start, count = tm, 0
            prev = tm
            count += 1
        sessions.append((user, start, prev, count))
    return sessions


def write_expected(t: Table) -> list[tuple[int, int, int, int]]:
    sessions = sessionize(t)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["user_id", "start_time", "end_time", "event_count"])
    for user, start, end, count in sessions:
        w.writerow([user, rfc3339(start), rfc3339(end), count])
    (t.dir / "expected_sessions.csv").write_bytes(utf8(buf.getvalue()))
    return sessions


# --------------------------------------------------------------------------------------------
# README.
# --------------------------------------------------------------------------------------------

README_HEAD = """\
# testdata: fixture Delta tables

Small Delta tables in the shapes that Spark, Databricks and other writers produce, for the
tests to read. They are generated, and committed, by `scripts/make-testdata.py`:

```sh
python3 scripts/make-testdata.py          # rewrites every folder below and this README
python3 scripts/make-testdata.py --check  # also reads each table back with python deltalake
```

No Python library writes these shapes, so the script writes the `_delta_log` JSON, the
checkpoint Parquet files and the deletion-vector bitmaps by hand, following the Delta protocol
(PROTOCOL.md: actions, column mapping, deletion vector descriptor and format, checkpoint schema,
log compaction, V2 checkpoints). pyarrow {pyarrow} only encodes the Parquet files (snappy, no
embedded Arrow schema, Parquet field ids where column mapping needs them). Every id, timestamp
and file name is fixed, so a re-run rewrites identical JSON; only the Parquet bytes, and with
them the `size` fields in the log, can change with another pyarrow version.

All event times are 2026-02-15/16 UTC. Every commit has a `commitInfo` with a fixed
`timestamp` (milliseconds) a minute or so after its events, and an `operation`; every `add` has
`stats` (numRecords, minValues, maxValues, nullCount), keyed by physical column names under
column mapping.

`expected_sessions.csv` in each folder is what `sessionizer sessionize --flush` with the
default rules (`--gap 30m`; events exactly 30 minutes apart stay together) must close, computed
by the script's own simple sessionization of the rows a reader must see. Columns
`user_id,start_time,end_time,event_count`, times RFC 3339 UTC with `Z` (fractional seconds only
where there are any), sorted by user and start. Where a fixture needs other flags, its section
says so.

| fixture | protocol | features / shape | sessions |
| --- | --- | --- | --- |
"""


def readme(tables: list[Table], results: dict[str, list]) -> str:
    import pyarrow

    out = [README_HEAD.replace("{pyarrow}", pyarrow.__version__)]
    for t in tables:
        out.append(f"| [`{t.name}`](#{t.name}) | {t.doc['protocol']} | {t.doc['schema']} | "
                   f"{len(results[t.name])} |\n")
    for t in tables:
        d = t.doc
        out.append(f"\n## {t.name}\n\n{d['shape']}\n\n")
        out.append(f"- Protocol: {d['protocol']}.\n")
        conf = ", ".join(f"`{k} = {v}`" for k, v in d["configuration"].items()) or "none"
        out.append(f"- Table properties: {conf}.\n")
        out.append(f"- Schema: {d['schema']}.\n")
        out.append("- Log: " + ", ".join(f"`{f}`" for f in sorted(t.log_files)) + ".\n")
        if "dv" in d:
            dv = d["dv"]
            out.append(f"- Deletion vector: rows {dv['row_indexes']} of its file; bitmap bytes "
                       f"(magic + RoaringTreemap) `{dv['bytes']}`; descriptor "
                       f"`{dumps(dv['descriptor'])}`.\n")
        out.append("\nRows (version, file, row index in the file):\n\n")
        out.append("| version | file | row | user_id | visit_time | page | note |\n")
        out.append("| --- | --- | --- | --- | --- | --- | --- |\n")
        for version, rel, i, row in t.rows:
            cut = rel.find("part-00000-") + len("part-00000-") + 8
            short = rel[:cut] + "…"
            if t.name == "epoch_millis_poison":
                shown = f"{row.time}" + (f" ({rfc3339(row.time * 1000)})" if row.valid else "")
            else:
                shown = rfc3339(row.time)
            flags = []
            if not row.visible:
                flags.append("deleted by DV")
            if not row.valid:
                flags.append("invalid")
            note = "; ".join(flags + ([row.note] if row.note else []))
            page = row.page if row.page is not None else "null"
            out.append(f"| {version} | `{short}` | {i} | {row.user_id} | {shown} | {page} | "
                       f"{note} |\n")
        if d.get("run"):
            out.append(f"\n{d['run']}\n")
        if d.get("deltalake"):
            out.append(f"\npython deltalake {DELTALAKE_VERSION} (`--check`): {d['deltalake']}\n")
        out.append("\nExpected sessions (`expected_sessions.csv`):\n\n")
        out.append("| user_id | start_time | end_time | event_count |\n| --- | --- | --- | --- |\n")
        for user, start, end, count in results[t.name]:
            out.append(f"| {user} | {rfc3339(start)} | {rfc3339(end)} | {count} |\n")
    out.append(README_TAIL)
    return "".join(out)


README_TAIL = """
## Not covered

Shapes these fixtures do not have, should a test need them: INT96 timestamps (Spark's default
Parquet timestamp type), `stats_parsed` / `partitionValues_parsed` in checkpoints, multi-part
checkpoints, a classic checkpoint beside a V2 one, deletion vectors with a random path prefix or
an absolute (`p`) path (an absolute path cannot be committed portably), deletion vectors inside
a checkpoint, in-commit timestamps, and a log compaction file that any reader here is known to
read (python deltalake ignores it).
"""


# --------------------------------------------------------------------------------------------
# --check: read every fixture back with python deltalake and compare with the rows written.
# --------------------------------------------------------------------------------------------


def check(tables: list[Table]) -> int:
    """Read each fixture with both read paths of python deltalake and compare with the rows
    written (the visible ones); decode the deletion vectors; read the checkpointed table from
    its checkpoint alone. Returns the number of fixtures a reader got wrong without refusing."""
    import tempfile

    import deltalake
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, QueryBuilder

    def rows_of(table) -> list[tuple]:
        got = []
        for rec in table.to_pylist():
            tm = rec.get("visit_time")
            if isinstance(tm, datetime):
                tm = tm.replace(tzinfo=timezone.utc) if tm.tzinfo is None else tm
                delta = tm - EPOCH
                tm = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            got.append((rec.get("user_id"), tm, rec.get("page")))
        return sorted(got, key=lambda x: tuple((v is None, v) for v in x))

    readers = {
        "to_pyarrow_table": lambda path: DeltaTable(path).to_pyarrow_table(),
        "QueryBuilder": lambda path: pa.table(
            QueryBuilder().register("t", DeltaTable(path)).execute("select * from t")),
    }
    wrong = 0
    print(f"\ncheck with deltalake {deltalake.__version__}:")
    for t in tables:
        # times as written: microseconds, or the raw BIGINT of the epoch-milliseconds table
        want = sorted((r.user_id, r.time, r.page) for _, _, _, r in t.rows if r.visible)
        print(f"  {t.name}: expecting {len(want)} rows")
        for label, read in readers.items():
            try:
                table = read(str(t.dir))
            except Exception as e:  # noqa: BLE001 - report whatever the reader says
                print(f"    {label}: refused: {type(e).__name__}: {str(e).splitlines()[0][:240]}")
                continue
            got = rows_of(table)
            ok = got == want
            known = t.doc.get("known", {}).get(label)
            wrong += not ok and not known
            verdict = "rows as written" if ok else f"known: {known}" if known else "ROWS DIFFER"
            print(f"    {label}: {table.num_rows} rows, columns {table.column_names}: {verdict}")
            if not ok and not known:
                print(f"      got {got}")
        if "dv" in t.doc:
            dv = t.doc["dv"]["descriptor"]
            if dv["storageType"] == "i":
                raw = z85_decode(dv["pathOrInlineDv"])[: dv["sizeInBytes"]]
            else:
                u = uuid.UUID(bytes=z85_decode(dv["pathOrInlineDv"][-20:]))
                data = (t.dir / f"deletion_vector_{u}.bin").read_bytes()
                size = struct.unpack_from(">I", data, dv["offset"])[0]
                raw = data[dv["offset"] + 4 : dv["offset"] + 4 + size]
                crc = struct.unpack_from(">I", data, dv["offset"] + 4 + size)[0]
                assert data[0] == 1 and size == dv["sizeInBytes"] and crc == zlib.crc32(raw)
            print(f"    deletion vector ({dv['storageType']}) decodes to rows "
                  f"{parse_deletion_vector(raw)}")

    # Read the checkpointed tables from their checkpoints alone: delete the commits the
    # checkpoint covers from a copy, read, then break the checkpoint and see the read fail.
    read = readers["QueryBuilder"]
    for t in tables:
        if t.name == "checkpointed":
            actions = pq.read_table(t.log / f"{10:020d}.checkpoint.parquet").to_pylist()
            kinds = [next(k for k, v in a.items() if v is not None) for a in actions]
            held = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
            print(f"  checkpointed: the checkpoint holds {held}; version 10 reads "
                  f"{DeltaTable(str(t.dir), version=10).to_pyarrow_table().num_rows} rows")
            upto, breakable = 10, f"{10:020d}.checkpoint.parquet"
        elif t.name == "v2_checkpoint":
            upto = 2
            breakable = next(f for f in t.log_files if f.startswith("_sidecars/"))
            print("  v2_checkpoint:")
        else:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / t.name
            shutil.copytree(t.dir, copy)
            for v in range(upto + 1):
                (copy / "_delta_log" / f"{v:020d}.json").unlink()
            dt = DeltaTable(str(copy))
            n = read(str(copy)).num_rows
            ok = n == sum(r.visible for _, _, _, r in t.rows)
            wrong += not ok
            print(f"    QueryBuilder with commits 0-{upto} deleted: version {dt.version()}, {n} rows"
                  f"{'' if ok else ' (WRONG)'}")
            compacted = copy / "_delta_log" / f"{11:020d}.{12:020d}.compacted.json"
            if compacted.exists():
                compacted.write_bytes(utf8("{not json\n"))
                try:
                    n = read(str(copy)).num_rows
                    print(f"    ... with the log compaction file broken: still {n} rows (this "
                          "reader does not use log compaction files)")
                except Exception as e:  # noqa: BLE001
                    print(f"    ... with the log compaction file broken: fails "
                          f"({type(e).__name__}), so it is read")
            (copy / "_delta_log" / breakable).write_bytes(b"not parquet")
            try:
                read(str(copy))
                print(f"    ... with {breakable} broken too: still read?!")
                wrong += 1
            except Exception as e:  # noqa: BLE001
                print(f"    ... with {breakable} broken too: fails ({type(e).__name__}), so "
                      "the checkpoint is what was read")
    print(f"check: {wrong} unexpected result(s)")
    return wrong


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "testdata",
                        help="where to write the fixtures (default: testdata/ of the repository)")
    parser.add_argument("--check", action="store_true",
                        help="read every fixture back with python deltalake afterwards")
    parser.add_argument("--only", action="append", default=[],
                        help="write only this fixture (repeatable); the README is not rewritten")
    args = parser.parse_args()
    ensure_packages(need_deltalake=args.check)

    args.out.mkdir(parents=True, exist_ok=True)
    tables, results = [], {}
    for name, build in FIXTURES:
        if args.only and name not in args.only:
            continue
        t = build(args.out)
        results[name] = write_expected(t)
        tables.append(t)
        size = sum(p.stat().st_size for p in t.dir.rglob("*") if p.is_file())
        print(f"{name}: {t.version} commits, {len(t.rows)} rows, {len(results[name])} sessions, "
              f"{size} bytes")
    if not args.only:
        (args.out / "README.md").write_bytes(utf8(readme(tables, results)))
    if args.check:
        sys.exit(1 if check(tables) else 0)


if __name__ == "__main__":
    main()
