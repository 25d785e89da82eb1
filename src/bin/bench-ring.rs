//! `bench-ring`: memory and build time of the key ring at scale.
//!
//! Builds a synthetic key file of `N` keys in memory (about 1000 clients, a
//! handful of scope sets, 20% with an expiry, 5% deprecated, 1% with a
//! description, 1% rate-limited), builds a ring from it (timed), publishes it,
//! drops the file and gives freed memory back to the OS, then does the same
//! again as a reload would. After each step it prints the process's resident
//! set (VmRSS) and its peak (VmHWM) from `/proc/self/status`.
//!
//! Usage: `bench-ring [N]` (default 1000000).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use keyward::keyfile::{KeyFile, KeySpec, KeyState, RateLimitSpec};
use keyward::ring::{Digest, KeyRing, RingHandle, RingSource, UsageRegistry};

const SCOPE_SETS: &[&[&str]] = &[
    &["read"],
    &["read", "trade"],
    &["read", "write"],
    &["read", "trade", "admin"],
    &[],
    &["billing:read", "billing:write"],
];

fn digest(i: usize, generation: u64) -> Digest {
    let mut seed = [0u8; 16];
    seed[..8].copy_from_slice(&generation.to_le_bytes());
    seed[8..].copy_from_slice(&(i as u64).to_le_bytes());
    keyward::decide::digest_bytes(&seed)
}

/// A synthetic key file; `generation` changes the secrets of a few keys, as a
/// rotation would.
fn key_file(n: usize, generation: u64) -> KeyFile {
    let expiry: Timestamp = "2099-01-01T00:00:00Z".parse().unwrap_or(Timestamp::MAX);
    let deprecated_at: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap_or(Timestamp::MIN);
    let keys = (0..n)
        .map(|i| {
            let client = i % 1000;
            let rotated = i % 100 == 7;
            let state = if i % 20 == 3 {
                KeyState::Deprecated
            } else {
                KeyState::Active
            };
            KeySpec {
                id: format!("client-{client}-2026-11-27-{:06x}", i & 0xff_ffff),
                client: format!("client-{client}"),
                digest: digest(i, if rotated { generation } else { 0 }),
                scopes: SCOPE_SETS[i % SCOPE_SETS.len()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                state,
                not_before: None,
                expires_at: (i % 5 == 1 || state == KeyState::Deprecated).then_some(expiry),
                deprecated_at: (state == KeyState::Deprecated && i % 40 == 3)
                    .then_some(deprecated_at),
                description: (i % 100 == 11).then(|| format!("key number {i} for tests")),
                rate_limit: (i % 100 == 13).then_some(RateLimitSpec {
                    requests: 100,
                    per: Duration::from_secs(1),
                    burst: 100,
                }),
                line: i * 6 + 1,
            }
        })
        .collect();
    KeyFile {
        keys,
        routes: Vec::new(),
    }
}

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn report(step: &str) {
    println!(
        "{step:<34} VmRSS {:>8.1} MiB   VmHWM {:>8.1} MiB",
        status_kib("VmRSS:") as f64 / 1024.0,
        status_kib("VmHWM:") as f64 / 1024.0
    );
}

fn source(generation: u64) -> RingSource {
    RingSource {
        generation,
        sha256: [0; 32],
        loaded_at: Timestamp::now(),
    }
}

/// The server's allocator, so the figures are the server's.
#[global_allocator]
static ALLOC: keyward::pages::LargePages = keyward::pages::LargePages;

fn main() {
    keyward::ring::configure_allocator();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    println!("keys: {n}");
    report("start");

    let t = Instant::now();
    let file = key_file(n, 1);
    println!("file generated in {:?}", t.elapsed());
    report("file in memory");

    let usage = UsageRegistry::default();
    let t = Instant::now();
    let ring = KeyRing::build(&file, source(1), &usage, None);
    let built = t.elapsed();
    println!("ring built in {built:?} ({} keys)", ring.len());
    let handle = RingHandle::new(ring);
    report("ring built (file alive)");

    // Sanity and a rough lookup cost: every key once, by digest.
    let t = Instant::now();
    let ring = handle.load_full();
    let found = file
        .keys
        .iter()
        .filter(|k| ring.lookup(&k.digest).is_some())
        .count();
    let per = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    assert_eq!(found, n, "every key found by digest");
    println!("lookup by digest: {per:.1} ns/key (all keys, cold)");
    drop(ring);

    drop(file);
    keyward::ring::release_free_memory();
    report("file dropped, trimmed");

    let file = key_file(n, 2);
    let t = Instant::now();
    let current = handle.load_full();
    let ring = KeyRing::build(&file, source(2), &usage, Some(&current));
    let built = t.elapsed();
    println!("reload ring built in {built:?}");
    drop(current);
    handle.publish(ring);
    usage.retain_ring(&handle.load());
    report("reloaded (file alive)");
    drop(file);
    keyward::ring::release_free_memory();
    report("reloaded, file dropped, trimmed");
    println!("usage entries: {}", usage.len());

    // Every key allowed once: counted in the ring's own arrays.
    let ring = handle.load_full();
    for k in ring.keys() {
        k.record_use(1);
    }
    report("every key allowed once");
    // Every key also denied once, so every one has denial counters to link
    // into the next ring (and counts to fold), while a key never seen
    // before gets its counters every 200 µs on another thread, as checks
    // denying it would.
    for k in ring.keys() {
        let _ = k.usage();
    }
    report("every key also denied once");
    drop(ring);
    println!("usage entries, every key used: {}", usage.len());
    let file = key_file(n, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let newcomers = {
        let (usage, stop) = (usage.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut worst, mut count) = (Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let id = format!("newcomer-{count}");
                let t = Instant::now();
                let _ = usage.usage(&id);
                worst = worst.max(t.elapsed());
                count += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            (worst, count)
        })
    };
    let t = Instant::now();
    let current = handle.load_full();
    let ring = KeyRing::build(&file, source(3), &usage, Some(&current));
    let built = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (worst, count) = newcomers.join().unwrap_or_default();
    println!(
        "reload ring built, every key used, in {built:?}; a new key's first counters meanwhile waited at most {worst:?} ({count} keys)"
    );
    drop(current);
    // Publishing retires the replaced ring: its million counts are folded
    // into the new ring, and it is freed, on this thread.
    let t = Instant::now();
    handle.publish(ring);
    println!(
        "published and the replaced ring retired, every key used, in {:?}",
        t.elapsed()
    );
    report("reloaded, every key used (file alive)");
    drop(file);
    keyward::ring::release_free_memory();
    report("reloaded, every key used, trimmed");
}
