//! The reader's cost against a bare `stat` of the same file, measured in the same run, plus
//! a reload after a change and one atomic write with fsync.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pat_rotator::reader::Reader;
use pat_rotator::store::Store;
use pat_rotator::Token;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("databrickscfg");
    std::fs::write(
        &cfg,
        "[other]\nhost = https://x\ntoken = keep\n\n[DEFAULT]\nhost = https://h\ntoken = dapi-0\n",
    )
    .expect("seed file");
    let store = Store::open(&cfg, "DEFAULT").expect("store");
    let reader = Reader::new(&cfg, "DEFAULT").expect("reader");
    let wait = Duration::from_secs(5);

    let mut g = c.benchmark_group("reader");
    g.bench_function("bare_stat (baseline)", |b| {
        b.iter(|| black_box(std::fs::metadata(&cfg).expect("stat")))
    });
    g.bench_function("cached_token", |b| {
        b.iter(|| black_box(reader.token().expect("read")))
    });

    // Replaces the token once, as a rotation does: read, compare-and-swap, fsync, rename.
    let mut n = 0u64;
    let mut replace = || {
        let current = store.read().expect("read").token;
        n += 1;
        store
            .swap(
                current.as_ref(),
                &Token::new(format!("dapi-{n}")),
                None,
                wait,
                None,
                &chrono::Utc::now,
            )
            .expect("swap")
    };
    g.bench_function("atomic_write_with_fsync", |b| b.iter(&mut replace));
    g.bench_function("reload_after_change", |b| {
        b.iter_batched(
            || {
                replace();
            },
            |_| black_box(reader.token().expect("read")),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
