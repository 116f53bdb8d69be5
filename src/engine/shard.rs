//! Machine shards (`sessionize --shards N --shard I`): which worker folds which keys.
//!
//! Two functions assign a key to a shard, and a checkpoint records which one it was made with:
//! the default mixes our own key hash; `--key-buckets B` uses the key bucket a writer can
//! compute itself, Spark's `pmod(xxhash64(key columns), B)`, so that an events table partitioned
//! (or clustered) by that bucket lets a shard skip the files of other shards' keys.

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Int8Type, Int16Type, Int32Type, Int64Type};
use arrow::error::ArrowError;
use twox_hash::XxHash64;

use super::{MACHINE_SALT, bucket_ids};

/// How a key is assigned to one of N machine shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFn {
    /// `mix(h, 2) mod N` over the engine's own key hash (see [`in_shard`]).
    Mix,
    /// `pmod(xxhash64(key columns), B) mod N`, with Spark's `xxhash64`: the shard of a key
    /// follows from its bucket, which the events' writer can compute and partition by.
    SparkBuckets(u32),
}

/// Spark's seed of `xxhash64`.
const SPARK_SEED: u64 = 42;

impl ShardFn {
    /// How a checkpoint records the function (`""` for [`ShardFn::Mix`], what checkpoints
    /// made before there was a choice hold).
    pub fn recorded(&self) -> String {
        match self {
            ShardFn::Mix => String::new(),
            ShardFn::SparkBuckets(b) => format!("pmod(xxhash64(key), {b})"),
        }
    }

    /// The function a checkpoint recorded, if this release knows it.
    pub fn from_recorded(s: &str) -> Option<Self> {
        if s.is_empty() {
            return Some(ShardFn::Mix);
        }
        s.strip_prefix("pmod(xxhash64(key), ")?
            .strip_suffix(')')?
            .parse()
            .ok()
            .filter(|&b| b > 0)
            .map(ShardFn::SparkBuckets)
    }

    /// Whether `--key-buckets` can hash a key column of this type as Spark does: Delta's
    /// integer types and strings.
    pub fn hashes(dt: &DataType) -> bool {
        matches!(
            dt,
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
        ) || super::is_string_type(dt)
    }
}

/// Which rows of `batch` belong to machine shard `index` of `count` (`sessionize --shards`).
///
/// The shard of a key is stable on every platform and release. With [`ShardFn::Mix`] it is
/// `mix(h, 2) mod count`, where `h` is the key itself for one BIGINT key column and otherwise
/// the XXH3-64 hash of the key values in the engine's own encoding (type tag, then
/// little-endian integers or length-prefixed UTF-8, see [`super::session_id`]), and
/// `mix(h, s) = ((h xor s·0xD6E8FEB86659FD93)·0x9E3779B97F4A7C15) >> 32` (wrapping 64-bit
/// arithmetic); rows with a null key column belong to shard 0, so that each invalid row is
/// counted once. With [`ShardFn::SparkBuckets`] it is `bucket mod count` (see
/// [`spark_buckets`]), null keys included: a null key hashes as Spark hashes it.
pub fn in_shard(
    batch: &RecordBatch,
    keys: &[String],
    index: u32,
    count: u32,
    f: ShardFn,
) -> Result<BooleanArray, ArrowError> {
    Ok(shard_of(batch, keys, count, f)?
        .into_iter()
        .map(|s| Some(s == index))
        .collect())
}

/// The machine shard (of `count`) of every row of `batch`, as [`in_shard`] defines it.
pub fn shard_of(
    batch: &RecordBatch,
    keys: &[String],
    count: u32,
    f: ShardFn,
) -> Result<Vec<u32>, ArrowError> {
    match f {
        ShardFn::SparkBuckets(b) => Ok(spark_buckets(&key_columns(batch, keys), b)?
            .into_iter()
            .map(|bucket| (bucket % count.max(1) as i64) as u32)
            .collect()),
        ShardFn::Mix => {
            let mut ids = bucket_ids(batch, keys, count as usize, MACHINE_SALT);
            for c in key_columns(batch, keys) {
                if let Some(nulls) = c.logical_nulls() {
                    for (r, valid) in nulls.iter().enumerate() {
                        if !valid {
                            ids[r] = 0;
                        }
                    }
                }
            }
            Ok(ids)
        }
    }
}

fn key_columns(batch: &RecordBatch, keys: &[String]) -> Vec<ArrayRef> {
    keys.iter()
        .map(|k| batch.column_by_name(k).expect("key column").clone())
        .collect()
}

/// Spark's `pmod(xxhash64(k1, k2, …), buckets)` of every row: XXH64 with seed 42, chained
/// over the key columns in order (each column's hash seeds the next), a null value leaving
/// the hash as it was; TINYINT, SMALLINT and INT values hashed as 4 little-endian bytes, BIGINT
/// as 8, strings as their UTF-8 bytes. `pmod` keeps the bucket in `0..buckets`.
pub fn spark_buckets(cols: &[ArrayRef], buckets: u32) -> Result<Vec<i64>, ArrowError> {
    let b = i64::from(buckets.max(1));
    Ok(spark_xxhash64(cols)?
        .into_iter()
        .map(|h| h.rem_euclid(b))
        .collect())
}

/// Spark's `xxhash64(k1, k2, …)` of every row (see [`spark_buckets`]).
fn spark_xxhash64(cols: &[ArrayRef]) -> Result<Vec<i64>, ArrowError> {
    let n = cols.first().map_or(0, |c| c.len());
    let mut h = vec![SPARK_SEED; n];
    for c in cols {
        let valid = |r: usize| c.is_valid(r);
        macro_rules! ints {
            ($t:ty, $bytes:expr) => {{
                let v = c.as_primitive::<$t>().values();
                for (r, h) in h.iter_mut().enumerate() {
                    if valid(r) {
                        *h = XxHash64::oneshot(*h, &$bytes(v[r]));
                    }
                }
            }};
        }
        match c.data_type() {
            DataType::Int8 => ints!(Int8Type, |x: i8| (x as i32).to_le_bytes()),
            DataType::Int16 => ints!(Int16Type, |x: i16| (x as i32).to_le_bytes()),
            DataType::Int32 => ints!(Int32Type, |x: i32| x.to_le_bytes()),
            DataType::Int64 => ints!(Int64Type, |x: i64| x.to_le_bytes()),
            DataType::Utf8 => strings(&mut h, c.as_string::<i32>().iter()),
            DataType::LargeUtf8 => strings(&mut h, c.as_string::<i64>().iter()),
            DataType::Utf8View => strings(&mut h, c.as_string_view().iter()),
            dt => {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "a key column of type {dt} has no Spark xxhash64 bucket; --key-buckets \
                     needs integer or string key columns"
                )));
            }
        }
    }
    Ok(h.into_iter().map(|h| h as i64).collect())
}

fn strings<'a>(h: &mut [u64], values: impl Iterator<Item = Option<&'a str>>) {
    for (h, v) in h.iter_mut().zip(values) {
        if let Some(s) = v {
            *h = XxHash64::oneshot(*h, s.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{
        Int8Array, Int16Array, Int32Array, Int64Array, LargeStringArray, StringArray,
        StringViewArray,
    };

    use super::*;

    /// One line of `testdata/spark-xxhash64.csv`: key types, key values (`\N` for null),
    /// then what Spark 3.5 computed (`scripts/spark-bucket-vectors.py`).
    struct Vector {
        types: Vec<String>,
        values: Vec<Option<String>>,
        xxhash64: i64,
        pmod64: i64,
        pmod7: i64,
    }

    /// Splits a CSV line, honouring double-quoted fields (the vectors hold commas).
    fn fields(line: &str) -> Vec<String> {
        let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
        for ch in line.chars() {
            match ch {
                '"' => quoted = !quoted,
                ',' if !quoted => out.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        out.push(cur);
        out
    }

    fn vectors() -> Vec<Vector> {
        include_str!("../../testdata/spark-xxhash64.csv")
            .lines()
            .skip(1)
            .map(|line| {
                let f = fields(line);
                let values = if f[1].is_empty() {
                    vec![Some(String::new())]
                } else {
                    f[1].split('|')
                        .map(|v| (v != "\\N").then(|| v.to_string()))
                        .collect()
                };
                Vector {
                    types: f[0].split('|').map(String::from).collect(),
                    values,
                    xxhash64: f[2].parse().unwrap(),
                    pmod64: f[3].parse().unwrap(),
                    pmod7: f[4].parse().unwrap(),
                }
            })
            .collect()
    }

    /// One row's key as Arrow columns, strings in the given encoding.
    fn column(t: &str, v: &Option<String>, strings: &DataType) -> ArrayRef {
        let int = |v: &Option<String>| v.as_ref().map(|s| s.parse::<i64>().unwrap());
        match t {
            "bigint" => Arc::new(Int64Array::from(vec![int(v)])),
            "int" => Arc::new(Int32Array::from(vec![int(v).map(|x| x as i32)])),
            "smallint" => Arc::new(Int16Array::from(vec![int(v).map(|x| x as i16)])),
            "tinyint" => Arc::new(Int8Array::from(vec![int(v).map(|x| x as i8)])),
            "string" => match strings {
                DataType::LargeUtf8 => Arc::new(LargeStringArray::from(vec![v.as_deref()])),
                DataType::Utf8View => Arc::new(StringViewArray::from(vec![v.as_deref()])),
                _ => Arc::new(StringArray::from(vec![v.as_deref()])),
            },
            other => panic!("unknown type {other} in the vectors"),
        }
    }

    #[test]
    fn buckets_are_what_spark_computes() {
        let vectors = vectors();
        assert!(vectors.len() > 30, "the vectors file was not read");
        for strings in [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View] {
            for v in &vectors {
                let cols: Vec<ArrayRef> = v
                    .types
                    .iter()
                    .zip(&v.values)
                    .map(|(t, x)| column(t, x, &strings))
                    .collect();
                let what = format!("{:?} {:?} as {strings}", v.types, v.values);
                assert_eq!(spark_xxhash64(&cols).unwrap(), vec![v.xxhash64], "{what}");
                assert_eq!(spark_buckets(&cols, 64).unwrap(), vec![v.pmod64], "{what}");
                assert_eq!(spark_buckets(&cols, 7).unwrap(), vec![v.pmod7], "{what}");
            }
        }
    }

    #[test]
    fn the_shard_of_a_key_is_its_bucket_mod_the_shard_count() {
        let keys = Int64Array::from_iter_values(0..1000);
        let batch = RecordBatch::try_from_iter([("k", Arc::new(keys) as ArrayRef)]).unwrap();
        let k = vec!["k".to_string()];
        let buckets = spark_buckets(&[batch.column(0).clone()], 16).unwrap();
        let shards = shard_of(&batch, &k, 4, ShardFn::SparkBuckets(16)).unwrap();
        for (b, s) in buckets.iter().zip(&shards) {
            assert_eq!(*b % 4, i64::from(*s));
        }
        // Every shard gets some of a thousand keys.
        for i in 0..4 {
            let mine = in_shard(&batch, &k, i, 4, ShardFn::SparkBuckets(16)).unwrap();
            assert!(mine.true_count() > 150, "shard {i}: {}", mine.true_count());
        }
    }

    #[test]
    fn the_recorded_function_reads_back() {
        for f in [
            ShardFn::Mix,
            ShardFn::SparkBuckets(1),
            ShardFn::SparkBuckets(64),
        ] {
            assert_eq!(ShardFn::from_recorded(&f.recorded()), Some(f));
        }
        assert_eq!(ShardFn::from_recorded("pmod(xxhash64(key), 0)"), None);
        assert_eq!(ShardFn::from_recorded("murmur3"), None);
    }

    #[test]
    fn a_key_type_spark_cannot_hash_is_an_error() {
        let c: ArrayRef = Arc::new(arrow::array::UInt64Array::from(vec![1u64]));
        assert!(spark_buckets(&[c], 8).is_err());
    }
}
