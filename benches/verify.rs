//! The hot path and ring builds. Run with `cargo bench --bench verify`.
//!
//! * `verify/*`: extract → (memo or SHA-256) → lookup → decide → counters, at
//!   1k, 100k and 1M keys. `hit`/`miss` present the same key again and again,
//!   as a client does (the per-thread memo answers); `hit_first`/`miss_first`
//!   cycle through 64k distinct keys, so nearly every lookup is a first sight
//!   and pays for SHA-256. `hit_first` takes the ring's first 64k keys in
//!   file order, so their slots are read one after another, which the CPU
//!   prefetches; `hit_spread` (100k and 1M keys) takes 64k keys spread over
//!   the whole ring in an order unrelated to the file's, as first sights in
//!   real traffic come. `sha256_only` is that SHA-256 alone.
//! * `verify_publishing/*`: `hit` and `hit_first` while another thread builds
//!   and publishes new rings of the same keys back to back (a reload storm:
//!   every publication also invalidates the memo).
//! * `check/*`: the whole check in-process, from the bytes of a CheckRequest
//!   as Envoy 1.40 sends it (482 bytes, captured) to the framed CheckResponse.
//! * `ring_build/*`: building a ring from a parsed file.
//! * `load/*`: what a reload does before it publishes: parsing a synthetic
//!   key file's text (about 155 bytes a key, like `bench-keyfile` writes)
//!   into its compact form and building the ring from that.
//! * `audit_diff/*`: what a reload does after it publishes: the audit
//!   record's diff of the old and new rings, for an unchanged file and for
//!   one whose first tenth of keys were renamed.
//!
//! Compare figures within one run: the machine's speed drifts between runs.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jiff::Timestamp;
use keyward::decide::{decide, digest, extract};
use keyward::keyfile::{
    KeyFile, KeySpec, KeyState, ParseOptions, RateLimitSpec, parse_fast_compact,
};
use keyward::reload::Diff;
use keyward::ring::{KeyRing, RingHandle, RingSource, UsageRegistry};
use keyward::service::{AuthzService, Shared};
use keyward::stats::CheckStats;

/// The server's allocator: a large ring's tables sit in huge pages there.
#[global_allocator]
static ALLOC: keyward::pages::LargePages = keyward::pages::LargePages;

fn secret(i: usize) -> String {
    format!("bench-secret-{i:012}-abcdefghijklmnopqrstuvwxyz")
}

fn file(n: usize, rate_limit: Option<RateLimitSpec>) -> KeyFile {
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

/// Distinct keys cycled through by the `*_first` benchmarks: many more than
/// a thread's memo holds.
const DISTINCT: usize = 1 << 16;

/// [`DISTINCT`] indexes of keys spread evenly over a ring of `n` keys
/// (`n` at least [`DISTINCT`]), in a scrambled order: multiplying by an odd
/// number permutes `0..DISTINCT`, a power of two.
fn spread(n: usize) -> impl Iterator<Item = usize> {
    (0..DISTINCT).map(move |i| (i * 40_503 % DISTINCT) * n / DISTINCT)
}

fn verify_one(ring: &KeyRing, stats: &CheckStats, key: &str, now: Timestamp) -> bool {
    let cred = extract(Some(black_box(key)), None).unwrap();
    let d = decide(ring, &cred, now, "read");
    stats.record(&d, 0);
    d.is_allowed()
}

fn verify(c: &mut Criterion) {
    // `BENCH_SMALL_PAGES=1` measures the rings without huge pages.
    keyward::pages::set_advising(std::env::var_os("BENCH_SMALL_PAGES").is_none());
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    let present = secret(7);
    g.bench_function("sha256_only", |b| b.iter(|| digest(black_box(&present))));
    for n in [1_000usize, 100_000, 1_000_000] {
        let usage = UsageRegistry::default();
        let ring = KeyRing::build(&file(n, None), source(), &usage, None);
        let stats = CheckStats::default();
        let now = Timestamp::now();
        let hit = secret(n / 2);
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            b.iter(|| verify_one(&ring, &stats, &hit, now))
        });
        let miss = "bench-secret-not-in-the-ring-abcdefghijklmnopq".to_owned();
        g.bench_function(BenchmarkId::new("miss", n), |b| {
            b.iter(|| verify_one(&ring, &stats, &miss, now))
        });
        let hits: Vec<String> = (0..DISTINCT).map(|i| secret(i % n)).collect();
        let misses: Vec<String> = (0..DISTINCT)
            .map(|i| format!("bench-miss-{i:012}"))
            .collect();
        let spread: Vec<String> = spread(n).map(secret).collect();
        let mut runs = vec![("hit_first", &hits), ("miss_first", &misses)];
        if n >= DISTINCT {
            runs.push(("hit_spread", &spread));
        }
        for (name, keys) in runs {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    i = (i + 1) & (DISTINCT - 1);
                    verify_one(&ring, &stats, &keys[i], now)
                })
            });
        }
    }
    // The same hit with a rate limit configured (one CAS more); a limit so
    // high the benchmark never exhausts it.
    let limit = RateLimitSpec {
        requests: u64::MAX / 4,
        per: std::time::Duration::from_secs(1),
        burst: u64::MAX / 4,
    };
    let n = 100_000;
    let ring = KeyRing::build(
        &file(n, Some(limit)),
        source(),
        &UsageRegistry::default(),
        None,
    );
    let stats = CheckStats::default();
    let hit = secret(n / 2);
    let now = Timestamp::now();
    g.bench_function(BenchmarkId::new("hit_rate_limited", n), |b| {
        b.iter(|| verify_one(&ring, &stats, &hit, now))
    });
    g.finish();
}

/// The verify path while another thread builds and publishes rings non-stop.
fn verify_publishing(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify_publishing");
    g.throughput(Throughput::Elements(1));
    let n = 100_000;
    let usage = UsageRegistry::default();
    let f = file(n, None);
    let handle = RingHandle::new(KeyRing::build(&f, source(), &usage, None));
    let stop = AtomicBool::new(false);
    let stats = CheckStats::default();
    let now = Timestamp::now();
    let hit = secret(n / 2);
    let hits: Vec<String> = (0..DISTINCT).map(|i| secret(i % n)).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                handle.publish(KeyRing::build(&f, source(), &usage, None));
            }
        });
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            b.iter(|| verify_one(&handle.load(), &stats, &hit, now))
        });
        let mut i = 0;
        g.bench_function(BenchmarkId::new("hit_first", n), |b| {
            b.iter(|| {
                i = (i + 1) & (DISTINCT - 1);
                verify_one(&handle.load(), &stats, &hits[i], now)
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("check");
    g.throughput(Throughput::Elements(1));
    let n = 100_000;
    let usage = UsageRegistry::default();
    let ring = KeyRing::build(&file(n, None), source(), &usage, None);
    // Lockout off, so that `unknown_key` measures the lookup, not a lockout.
    let lockout_off = keyward::lockout::LockoutConfig {
        threshold: 0,
        ..Default::default()
    };
    let svc = AuthzService::new(Arc::new(Shared::new(ring, usage, lockout_off)));
    let now = Timestamp::now();
    let allowed = keyward::bench_support::envoy_check_request(&secret(n / 2));
    let unknown = keyward::bench_support::envoy_check_request(
        "bench-secret-not-in-the-ring-abcdefghijklmnopq",
    );
    for (name, req) in [("allowed", &allowed), ("unknown_key", &unknown)] {
        g.bench_function(BenchmarkId::new(name, req.len()), |b| {
            b.iter(|| svc.check_message(black_box(req), now).unwrap())
        });
    }
    // Many clients at once: requests carrying `active` distinct keys in
    // turn, as from that many clients whose traffic interleaves. Each
    // thread's memo and cache of encoded responses must hold them all, or
    // every check pays a SHA-256 and an encode.
    for active in [100usize, 1_000, 4_000] {
        // Distinct keys from all over the ring, in no particular order.
        let mut picked = std::collections::BTreeSet::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let reqs: Vec<Vec<u8>> = std::iter::from_fn(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Some(x as usize % n)
        })
        .filter(|i| picked.insert(*i))
        .take(active)
        .map(|i| keyward::bench_support::envoy_check_request(&secret(i)))
        .collect();
        let mut i = 0;
        g.bench_function(BenchmarkId::new("allowed_rotating", active), |b| {
            b.iter(|| {
                i = if i + 1 == active { 0 } else { i + 1 };
                svc.check_message(black_box(&reqs[i]), now).unwrap()
            })
        });
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_build");
    g.sample_size(10);
    for n in [100_000usize, 1_000_000] {
        let f = file(n, None);
        let usage = UsageRegistry::default();
        g.bench_with_input(BenchmarkId::from_parameter(n), &f, |b, f| {
            b.iter(|| KeyRing::build(f, source(), &usage, None))
        });
        // A reload's build when every key has denial counters (each was
        // denied once): they are linked from the ring it replaces.
        let used = UsageRegistry::default();
        let serving = RingHandle::new(KeyRing::build(&f, source(), &used, None));
        let previous = serving.load_full();
        for key in previous.keys() {
            let _ = key.usage();
        }
        g.bench_with_input(BenchmarkId::new("every_key_used", n), &f, |b, f| {
            b.iter(|| KeyRing::build(f, source(), &used, Some(&previous)))
        });
    }
    g.finish();
}

fn load(c: &mut Criterion) {
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    for n in [100_000usize, 1_000_000] {
        let text = keyward::bench_support::synthetic_key_file(n);
        let usage = UsageRegistry::default();
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse", n), &text, |b, text| {
            b.iter(|| parse_fast_compact(text, ParseOptions::default()).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("parse_and_build", n), &text, |b, text| {
            b.iter(|| {
                let file = parse_fast_compact(text, ParseOptions::default()).unwrap();
                KeyRing::build(&file, source(), &usage, None)
            })
        });
    }
    g.finish();
}

fn audit_diff(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_diff");
    g.sample_size(10);
    for n in [100_000usize, 1_000_000] {
        let text = keyward::bench_support::synthetic_key_file(n);
        // The first tenth of the keys get new ids: added and removed keys.
        let cut = text
            .match_indices("[[keys]]")
            .nth(n / 10)
            .map_or(text.len(), |(at, _)| at);
        let renamed = text[..cut].replace("-20261127-", "-20261128-") + &text[cut..];
        let usage = UsageRegistry::default();
        let ring = |t: &str| {
            let file = parse_fast_compact(t, ParseOptions::default()).unwrap();
            KeyRing::build(&file, source(), &usage, None)
        };
        let (old, same, new) = (ring(&text), ring(&text), ring(&renamed));
        g.bench_function(BenchmarkId::new("unchanged", n), |b| {
            b.iter(|| Diff::between(&old, &same))
        });
        g.bench_function(BenchmarkId::new("tenth_renamed", n), |b| {
            b.iter(|| Diff::between(&old, &new))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    verify,
    verify_publishing,
    check,
    build,
    load,
    audit_diff
);
criterion_main!(benches);
