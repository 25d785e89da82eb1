//! The verify path allocates nothing: extract → SHA-256 → lookup → decide →
//! counters, measured with a counting global allocator.

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

#[test]
fn the_verify_path_does_not_allocate() {
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
    let file = parse_str(&text, ParseOptions::default()).unwrap();
    let source = RingSource {
        generation: 1,
        sha256: [0; 32],
        loaded_at: Timestamp::now(),
    };
    let ring = KeyRing::build(&file, source, &UsageRegistry::default(), None);
    let stats = CheckStats::default();
    let hits: Vec<String> = (0..1000).map(secret).collect();
    let bearer: Vec<String> = hits.iter().map(|s| format!("Bearer {s}")).collect();
    let now = Timestamp::now();

    COUNTING.store(true, Ordering::SeqCst);
    let mut allowed = 0;
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
    COUNTING.store(false, Ordering::SeqCst);
    assert!(allowed > 0);
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        0,
        "the verify path allocated"
    );
}
