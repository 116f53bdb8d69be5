"""Writes testdata/spark-xxhash64.csv: Spark's own `xxhash64` and `pmod(xxhash64(..), B)` of
key values of every key type sessionizer accepts, so that a unit test can check that
`--key-buckets` computes the bucket exactly as a Spark writer does.

Run with pyspark installed (and Java): python scripts/spark-bucket-vectors.py
"""

import csv
import sys

from pyspark.sql import SparkSession

spark = (
    SparkSession.builder.master("local[1]")
    .config("spark.ui.enabled", "false")
    .config("spark.sql.ansi.enabled", "true")
    .getOrCreate()
)

# (key type(s), SQL literals of one key). Each row is hashed as Spark would hash the key
# columns of an events table: xxhash64(k1[, k2]).
cases = []
for t, values in [
    ("bigint", ["0", "1", "-1", "42", "9223372036854775807", "-9223372036854775808", "123456789012"]),
    ("int", ["0", "1", "-1", "2147483647", "-2147483648", "31337"]),
    ("smallint", ["0", "7", "-7", "32767"]),
    ("tinyint", ["0", "5", "-128"]),
    ("string", ["''", "'a'", "'hello'", "'user-00042'", "'Ünïcødé ✓'",
                "'a string that is longer than thirty-two bytes, to reach the 32-byte stripes'"]),
]:
    for v in values:
        cases.append(([t], [v]))
    cases.append(([t], ["NULL"]))
cases += [
    (["string", "bigint"], ["'eu'", "42"]),
    (["string", "bigint"], ["'us-east'", "-1"]),
    (["bigint", "string"], ["7", "NULL"]),
    (["int", "int"], ["NULL", "NULL"]),
    (["string", "int"], ["'tenant-9'", "123"]),
]

out = csv.writer(sys.stdout, lineterminator="\n")
out.writerow(["types", "values", "xxhash64", "pmod64", "pmod7"])
for types, values in cases:
    cols = ", ".join(f"CAST({v} AS {t})" for t, v in zip(types, values))
    h, b64, b7 = spark.sql(
        f"SELECT xxhash64({cols}), pmod(xxhash64({cols}), 64), pmod(xxhash64({cols}), 7)"
    ).collect()[0]
    shown = [v.strip("'") if v != "NULL" else "\\N" for v in values]
    out.writerow(["|".join(types), "|".join(shown), h, b64, b7])
