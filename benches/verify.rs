//! The verify path (extract → SHA-256 → lookup → decide → counters) and ring
//! builds, at several ring sizes. Run with `cargo bench --bench verify`.
//!
//! Figures to compare are in the same run: `sha256` alone is the floor the
//! verify path cannot beat without SHA instructions.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use keyward::decide::{decide, digest, extract};
use keyward::keyfile::{KeyFile, KeySpec, KeyState, RateLimitSpec};
use keyward::ring::{KeyRing, RingSource, UsageRegistry};
use keyward::stats::CheckStats;

fn secret(i: usize) -> String {
    format!("bench-secret-{i:012}-abcdefghijklmnopqrstuvwxyz")
}

fn file(n: usize) -> KeyFile {
    file_with_limit(n, None)
}

fn file_with_limit(n: usize, rate_limit: Option<RateLimitSpec>) -> KeyFile {
    let keys = (0..n)
        .map(|i| KeySpec {
            id: format!("key-{i}"),
            client: format!("client-{}", i % 1000),
            digest: digest(&secret(i)),
            scopes: vec!["read".into(), "trade".into()],
            state: KeyState::Active,
            not_before: None,
            expires_at: Some("2099-01-01T00:00:00Z".parse().unwrap()),
            deprecated_at: None,
            description: None,
            rate_limit,
            line: i + 1,
        })
        .collect();
    KeyFile {
        keys,
        routes: Vec::new(),
    }
}

fn source() -> RingSource {
    RingSource {
        generation: 1,
        sha256: [0; 32],
        loaded_at: Timestamp::now(),
    }
}

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    let present = secret(7);
    g.bench_function("sha256_only", |b| b.iter(|| digest(black_box(&present))));
    for n in [1_000usize, 100_000] {
        let usage = UsageRegistry::default();
        let ring = KeyRing::build(&file(n), source(), &usage, None);
        let stats = CheckStats::default();
        let now = Timestamp::now();
        let hit = secret(n / 2);
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, key| {
            b.iter(|| {
                let cred = extract(Some(black_box(key)), None).unwrap();
                let d = decide(&ring, &cred, now, "read");
                stats.record(&d, 0);
                d.is_allowed()
            })
        });
        let miss = "bench-secret-not-in-the-ring-abcdefghijklmnopq".to_owned();
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, key| {
            b.iter(|| {
                let cred = extract(Some(black_box(key)), None).unwrap();
                let d = decide(&ring, &cred, now, "read");
                stats.record(&d, 0);
                d.is_allowed()
            })
        });
    }
    // The same hit with a rate limit configured (one CAS more); a limit so
    // high the benchmark never exhausts it.
    let limit = RateLimitSpec {
        requests: u64::MAX / 4,
        per: std::time::Duration::from_secs(1),
        burst: u64::MAX / 4,
    };
    let n = 100_000;
    let usage = UsageRegistry::default();
    let ring = KeyRing::build(&file_with_limit(n, Some(limit)), source(), &usage, None);
    let stats = CheckStats::default();
    let hit = secret(n / 2);
    let now = Timestamp::now();
    g.bench_with_input(BenchmarkId::new("hit_rate_limited", n), &hit, |b, key| {
        b.iter(|| {
            let cred = extract(Some(black_box(key)), None).unwrap();
            let d = decide(&ring, &cred, now, "read");
            stats.record(&d, 0);
            d.is_allowed()
        })
    });
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_build");
    g.sample_size(10);
    let n = 100_000usize;
    let f = file(n);
    let usage = UsageRegistry::default();
    g.bench_with_input(BenchmarkId::from_parameter(n), &f, |b, f| {
        b.iter(|| KeyRing::build(f, source(), &usage, None))
    });
    g.finish();
}

criterion_group!(benches, verify, build);
criterion_main!(benches);
