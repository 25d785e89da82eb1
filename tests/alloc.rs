//! The verify path allocates nothing: extract → SHA-256 → lookup → decide →
//! counters, measured with a counting global allocator. Allowing a key it
//! never saw allocates nothing either; the first denial of a key, or the
//! first use of a rate-limited one, links its denial counters and budget,
//! which may allocate, so the mixed test warms each key up first. The whole
//! check, from CheckRequest bytes to the framed CheckResponse, allocates
//! nothing either once a key's response is in the thread's cache of OK
//! responses; a response that cannot be cached (here: the client sent its own
//! `x-keyward-*` header) allocates its buffer and the lists of headers found
//! and to remove.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use jiff::Timestamp;
use keyward::decide::{decide, extract};
use keyward::keyfile::{ParseOptions, parse_str};
use keyward::ring::{KeyRing, RingSource, UsageRegistry};
use keyward::stats::CheckStats;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only counts calls made while counting is switched on.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Tests in this binary run one at a time: the counter is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations made by `f`.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

/// A ring of the keys in `text`, with a registry of its own.
fn ring_of(text: &str) -> KeyRing {
    let file = parse_str(text, ParseOptions::default()).unwrap();
    let source = RingSource {
        generation: 1,
        sha256: [0; 32],
        loaded_at: Timestamp::now(),
    };
    KeyRing::build(&file, source, &UsageRegistry::default(), None)
}

#[test]
fn the_verify_path_does_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secret = |i: u32| format!("alloc-test-secret-{i:08}");
    let mut text = String::new();
    for i in 0..1000u32 {
        let limit = if i % 2 == 0 {
            "rate_limit = { requests = 1000000, per = \"1s\" }\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "[[keys]]\nid = \"k{i}\"\nclient = \"c{}\"\nsha256 = \"{}\"\nscopes = [\"read\", \"trade\"]\n{limit}",
            i % 10,
            hex::encode(keyward::decide::digest(&secret(i)))
        ));
    }
    let ring = ring_of(&text);
    let stats = CheckStats::default();
    let hits: Vec<String> = (0..1000).map(secret).collect();
    let bearer: Vec<String> = hits.iter().map(|s| format!("Bearer {s}")).collect();
    let now = Timestamp::now();

    let mut allowed = 0;
    let mut run = || {
        for i in 0..1000 {
            for (api, auth) in [
                (Some(hits[i].as_str()), None),
                (None, Some(bearer[i].as_str())),
                (Some("nope-nope"), None),
            ] {
                let decision = match extract(api, auth) {
                    Ok(c) => decide(
                        &ring,
                        &c,
                        now,
                        if i % 3 == 0 {
                            "read trade"
                        } else {
                            "read,admin"
                        },
                    ),
                    Err(r) => keyward::decide::Decision::deny(r),
                };
                stats.record(&decision, 1);
                allowed += usize::from(decision.is_allowed());
            }
        }
    };
    // The first denial of a key, or first use of a rate-limited key, in a
    // ring links its counters (allocating them if the key never had any)
    // and the first sights fill this thread's memo: warm every key up
    // once, then count.
    run();
    let n = allocations(&mut run);
    assert!(allowed > 0);
    assert_eq!(n, 0, "the verify path allocated");
}

#[test]
fn allowing_keys_never_seen_before_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secret = |i: u32| format!("first-sight-secret-{i:08}");
    let text: String = (0..2000u32)
        .map(|i| {
            format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c{}\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
                i % 10,
                hex::encode(keyward::decide::digest(&secret(i)))
            )
        })
        .collect();
    let ring = ring_of(&text);
    let stats = CheckStats::default();
    let secrets: Vec<String> = (0..2000).map(secret).collect();
    let now = Timestamp::now();
    let mut allowed = 0;
    let mut allow = |keys: std::ops::Range<usize>| {
        for s in &secrets[keys] {
            let credential = extract(Some(s), None).unwrap();
            let decision = decide(&ring, &credential, now, "read");
            stats.record(&decision, 1);
            allowed += usize::from(decision.is_allowed());
        }
    };
    // This thread's first checks set up its memo and its stripe of the
    // statistics.
    allow(0..100);
    let n = allocations(|| allow(100..2000));
    assert_eq!(allowed, 2000);
    assert_eq!(n, 0, "a first sight allocated");
}

#[test]
fn a_whole_check_allocates_nothing_once_warm() {
    use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use keyward::service::{AuthzService, Shared};
    use prost::Message as _;

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = format!(
        "[[keys]]\nid = \"k1\"\nclient = \"acme\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n",
        hex::encode(keyward::decide::digest("alloc-secret"))
    );
    let file = parse_str(&text, ParseOptions::default()).unwrap();
    let usage = UsageRegistry::default();
    let source = RingSource {
        generation: 1,
        sha256: [0; 32],
        loaded_at: Timestamp::now(),
    };
    let ring = KeyRing::build(&file, source, &usage, None);
    let lockout_off = keyward::lockout::LockoutConfig {
        threshold: 0,
        ..Default::default()
    };
    let svc = AuthzService::new(std::sync::Arc::new(Shared::new(ring, usage, lockout_off)));
    let request = |key: Option<&str>, own: Option<&str>| {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/v1/orders".into(),
                        headers: key
                            .map(|k| ("x-api-key".to_owned(), k.to_owned()))
                            .into_iter()
                            .chain(own.map(|h| (h.to_owned(), "spoofed".to_owned())))
                            .chain([
                                ("user-agent".to_owned(), "client/1.0".to_owned()),
                                (":path".to_owned(), "/v1/orders".to_owned()),
                            ])
                            .collect(),
                        ..Default::default()
                    }),
                }),
                context_extensions: [("required_scopes".to_owned(), "read".to_owned())].into(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    };
    let now = Timestamp::now();
    let cases = [
        (request(Some("alloc-secret"), None), 0, "allowed"),
        (
            // The names found in the request, their lower-case copies, the
            // list of headers to remove, and the response buffer.
            request(Some("alloc-secret"), Some("x-keyward-role")),
            5,
            "allowed, with a client-sent x-keyward-* header",
        ),
        (request(Some("wrong-secret"), None), 0, "unknown_key"),
        (request(None, None), 0, "missing_key"),
    ];
    for (bytes, _, _) in &cases {
        // Warm up: the plain denials are encoded once per process, and a
        // key's OK response is cached on this thread.
        svc.check_message(bytes, now).unwrap();
    }
    for (bytes, expected, what) in &cases {
        let mut response = None;
        let n = allocations(|| response = Some(svc.check_message(bytes, now).unwrap()));
        drop(response);
        assert_eq!(n, *expected, "{what}: allocations");
    }
}
