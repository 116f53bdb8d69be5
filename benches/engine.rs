//! Micro-benchmark of the pure engine: one step over in-memory normalized batches, no I/O.
//! `cargo bench --bench engine`.

use std::sync::Arc;

use arrow::array::{BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sessionizer::engine::{Engine, EventSpec, SessionRules};

const MIN: i64 = 60_000_000;

fn spec() -> EventSpec {
    let schema = sessionizer::commands::generate_rows::demo_schema();
    let page = ["page".to_string()];
    EventSpec::resolve(&schema, &["user_id".into()], "visit_time", &page, &[]).unwrap()
}

/// `n` events of `n / 11` users over ten hours, from a fixed linear congruential sequence.
fn events(spec: &EventSpec, n: usize) -> RecordBatch {
    let mut x: u64 = 42;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 16
    };
    let users = (n / 11).max(1) as u64;
    let mut user = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    for _ in 0..n {
        user.push((next() % users) as i64 + 1);
        time.push((next() % (600 * MIN as u64)) as i64);
    }
    let pages: Vec<String> = (1..=50).map(|p| format!("page_{p}.html")).collect();
    RecordBatch::try_new(
        spec.normalized_schema(),
        vec![
            Arc::new(Int64Array::from(user)),
            Arc::new(Int64Array::from(time)),
            Arc::new(Int64Array::from_value(1, n)),
            Arc::new(Int32Array::from_value(0, n)),
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(BooleanArray::from(vec![false; n])),
            Arc::new(BooleanArray::from(vec![false; n])),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| pages[i % 50].as_str()),
            )),
        ],
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let spec = spec();
    let engine = Engine::new(
        spec.clone(),
        SessionRules {
            gap_us: 30 * MIN,
            delay_us: 15 * MIN,
            max_duration_us: None,
            pair_timeout_us: 0,
        },
    );
    let n = 1_000_000;
    let batch = events(&spec, n);
    let empty = RecordBatch::new_empty(spec.normalized_schema());
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.bench_function("step 1M events", |b| {
        b.iter(|| {
            engine
                .step(&empty, std::slice::from_ref(&batch), None, false)
                .unwrap()
        })
    });
    group.bench_function("step 1M events + flush", |b| {
        b.iter(|| {
            engine
                .step(&empty, std::slice::from_ref(&batch), None, true)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
