//! Session leases: the cost of one open + close with 0, 1,000 and 4,000 leases already open
//! (the cap is 4,096), measured in the same run. Flat figures mean 100,000 cycles cost 100,000
//! times one cycle, not a sort of every lease per open as before.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pat_rotator::sessions::Sessions;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_open_close");
    for held in [0usize, 1_000, 4_000] {
        let sessions = Sessions::new(Duration::from_secs(3600));
        for _ in 0..held {
            sessions.open().expect("below the cap");
        }
        g.bench_with_input(BenchmarkId::from_parameter(held), &held, |b, _| {
            b.iter(|| {
                let lease = sessions.open().expect("below the cap");
                sessions.close(&lease.id)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
