//! Brute-force lockout: too many failed checks (unknown or malformed keys)
//! from one source within a window lock that source out for a cool-down,
//! denied with `too_many_failures` before any digest work.
//!
//! A source is an IPv4 address, or an IPv6 /64 network ([`source_of`]): one
//! host usually holds a whole /64, and could otherwise take a fresh address
//! for every hundred guesses.
//!
//! Two structures, so the success path stays lock-free:
//!
//! * the set of **locked** sources is an immutable map behind an `ArcSwap`,
//!   replaced (by one writer at a time) when a lockout starts or is lifted.
//!   It is a persistent hash map: the next version shares all but a few
//!   nodes with the current one, so starting a lockout costs the same with
//!   a hundred thousand sources locked as with one (a copied map made each
//!   one cost the whole map, a way to tie up a serving thread for
//!   milliseconds). A flag says whether the map is empty: while it is, a
//!   check reads that one flag and nothing more;
//! * the **failure counters** live in a `DashMap`, touched only by checks that
//!   already failed. It is bounded: when full, expired windows are swept and,
//!   if still full, the oldest tenth is evicted.
//!
//! The window slides: each source counts its failures in [`SPANS`] spans
//! of an eighth of the window each, and the count is what its spans hold,
//! the current one included. That covers the whole window and at most an
//! eighth more, so no stretch of one window ever holds `threshold` failures
//! from a source that is not locked out. (Windows that restart, as a
//! fixed window does, let nearly twice the threshold through across the
//! moment one ends and the next begins.)
//!
//! Times are the wall clock's, like every other time a check is decided
//! at. When it steps back, a counting window that seems to start in the
//! future starts again, and a lockout never has more than its duration
//! left.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;

/// Lockout settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutConfig {
    /// Failures within `window` that trigger a lockout (0 turns lockout off).
    pub threshold: u32,
    /// The counting window.
    pub window: Duration,
    /// How long a lockout lasts.
    pub duration: Duration,
    /// Most sources tracked at once (failure counters and lockouts each).
    pub max_sources: usize,
    /// The IPv6 prefix length a source is counted by (64: a host's /64;
    /// 128: each address).
    pub ipv6_prefix: u8,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        LockoutConfig {
            threshold: 100,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            max_sources: 100_000,
            ipv6_prefix: 64,
        }
    }
}

/// Spans a source's failures are counted in: eight make a window, and the
/// ninth is the one under way.
const SPANS: usize = 9;

/// A source's failures in the spans that cover its window, the newest in
/// `counts[newest % SPANS]`.
#[derive(Debug, Clone, Copy)]
struct Tracker {
    /// Number of the newest span (time / span length).
    newest: u64,
    counts: [u32; SPANS],
}

impl Tracker {
    fn new(span: u64) -> Tracker {
        Tracker {
            newest: span,
            counts: [0; SPANS],
        }
    }

    /// Counts one failure in span `span`; the failures in the window.
    fn count(&mut self, span: u64) -> u32 {
        if span > self.newest {
            // Spans that ended a window ago or more are forgotten.
            let gone = (span - self.newest).min(SPANS as u64);
            for s in span + 1 - gone..=span {
                self.counts[(s % SPANS as u64) as usize] = 0;
            }
            self.newest = span;
        }
        // A failure a moment older than the newest (decided on another
        // thread) counts as the newest's: remembered a little longer.
        let slot = &mut self.counts[(self.newest % SPANS as u64) as usize];
        *slot = slot.saturating_add(1);
        self.counts.iter().fold(0u32, |n, &c| n.saturating_add(c))
    }

    /// Whether every failure counted has left the window at span `span`.
    fn ended(&self, span: u64) -> bool {
        span.saturating_sub(self.newest) >= SPANS as u64
    }
}

/// One active lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// The source ([`source_of`]): an IPv4 address, or the first address of
    /// an IPv6 /64.
    pub source: IpAddr,
    /// Unix nanoseconds at which it ends.
    pub until_ns: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The source a client address counts for: an IPv4 address (also when
/// written as IPv4-mapped IPv6) as it is, an IPv6 address as its network
/// of `ipv6_prefix` bits (64 by default: a host's /64).
pub fn source_of(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
    }
}

/// How a source is shown: `192.0.2.7`, `2001:db8:1:2::/64`.
pub fn label(source: IpAddr, ipv6_prefix: u8) -> String {
    match source {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) if ipv6_prefix >= 128 => v6.to_string(),
        IpAddr::V6(v6) => format!("{v6}/{ipv6_prefix}"),
    }
}

/// The locked sources and when each lockout ends (Unix nanoseconds).
type LockedMap =
    imbl::GenericHashMap<IpAddr, u64, ahash::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

/// Lockout state for the whole process.
#[derive(Debug)]
pub struct Lockout {
    config: LockoutConfig,
    failures: DashMap<IpAddr, Tracker, ahash::RandomState>,
    locked: ArcSwap<LockedMap>,
    /// Whether `locked` is non-empty: set before a non-empty map is
    /// published, cleared after an empty one is.
    any: AtomicBool,
    /// Serialises replacements of `locked`, so `any` follows the map last
    /// published.
    writer: Mutex<()>,
    total: AtomicU64,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout::new(LockoutConfig::default())
    }
}

impl Lockout {
    /// Lockout with `config`.
    pub fn new(config: LockoutConfig) -> Lockout {
        Lockout {
            config,
            failures: DashMap::with_hasher(ahash::RandomState::new()),
            locked: ArcSwap::from_pointee(LockedMap::with_hasher(ahash::RandomState::new())),
            any: AtomicBool::new(false),
            writer: Mutex::new(()),
            total: AtomicU64::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LockoutConfig {
        &self.config
    }

    /// Whether lockout is on.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.config.threshold > 0
    }

    /// Whether any lockout may be in force: one relaxed load of a flag, no
    /// lock, no `ArcSwap` guard. A check racing the start of a lockout may
    /// miss it, as it would if it had come a moment earlier.
    #[inline]
    pub fn any_locked(&self) -> bool {
        self.enabled() && self.any.load(Ordering::Relaxed)
    }

    /// Publishes the map `next` makes of the current one (`None`: no
    /// change). Rare (a lockout starts or is lifted), so writers take a
    /// lock; checks never do.
    fn replace(&self, next: impl FnOnce(&LockedMap) -> Option<LockedMap>) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(next) = next(&self.locked.load()) else {
            return;
        };
        let any = !next.is_empty();
        if any {
            self.any.store(true, Ordering::Relaxed);
        }
        self.locked.store(Arc::new(next));
        if !any {
            self.any.store(false, Ordering::Relaxed);
        }
    }

    /// Seconds left on the lockout of `ip`'s source, if it is locked out at
    /// `now_ns`.
    #[inline]
    pub fn locked_for(&self, ip: IpAddr, now_ns: u64) -> Option<u64> {
        let source = source_of(ip, self.config.ipv6_prefix);
        let locked = self.locked.load();
        let until = *locked.get(&source)?;
        if until <= now_ns {
            return None;
        }
        let mut left = until - now_ns;
        let duration = ns(self.config.duration);
        if left > duration.saturating_add(crate::clock::STEP_NS) {
            // The clock stepped back: end the lockout a duration from now.
            left = duration;
            self.shorten(source, now_ns.saturating_add(duration));
        }
        Some(left.min(duration).div_ceil(1_000_000_000).max(1))
    }

    #[cold]
    fn shorten(&self, source: IpAddr, until: u64) {
        self.replace(|current| {
            let end = *current.get(&source)?;
            (end > until).then(|| current.update(source, until))
        });
    }

    /// Counts a failed check from `ip`'s source; returns true if it started
    /// a lockout.
    pub fn record_failure(&self, ip: IpAddr, now_ns: u64) -> bool {
        if !self.enabled() {
            return false;
        }
        let source = source_of(ip, self.config.ipv6_prefix);
        if !self.failures.contains_key(&source) && self.failures.len() >= self.config.max_sources {
            self.make_room(now_ns);
        }
        let span_ns = self.span_ns();
        let span = now_ns / span_ns;
        let reached = {
            let mut t = self
                .failures
                .entry(source)
                .or_insert_with(|| Tracker::new(span));
            // Failures counted well in the future were counted before the
            // clock stepped back: the count starts again. (A moment ahead
            // is a check decided a moment earlier on another thread.)
            if t.newest.saturating_mul(span_ns) > now_ns.saturating_add(crate::clock::STEP_NS) {
                *t = Tracker::new(span);
            }
            t.count(span) >= self.config.threshold
        };
        if !reached {
            return false;
        }
        self.failures.remove(&source);
        let until = now_ns.saturating_add(ns(self.config.duration));
        let max = self.config.max_sources;
        self.replace(|current| {
            let mut next = current.clone();
            if !next.contains_key(&source) && next.len() >= max {
                // Full: a sweep of the ended lockouts, and if that frees
                // nothing, the tenth that end soonest make room (a pass
                // over the map per tenth of it, not per lockout).
                next.retain(|_, u| *u > now_ns);
                if next.len() >= max {
                    let mut ends: Vec<(u64, IpAddr)> = next.iter().map(|(s, u)| (*u, *s)).collect();
                    ends.sort_unstable();
                    for (_, s) in ends.into_iter().take((max / 10).max(1)) {
                        next.remove(&s);
                    }
                }
            }
            next.insert(source, until);
            Some(next)
        });
        self.total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            target: "keyward::audit",
            %source,
            failures = self.config.threshold,
            window = ?self.config.window,
            duration = ?self.config.duration,
            "source locked out after repeated failed checks"
        );
        true
    }

    /// The length of a counting span: an eighth of the window, rounded up.
    fn span_ns(&self) -> u64 {
        ns(self.config.window).div_ceil(SPANS as u64 - 1).max(1)
    }

    fn make_room(&self, now_ns: u64) {
        let span = now_ns / self.span_ns();
        self.failures.retain(|_, t| !t.ended(span));
        if self.failures.len() < self.config.max_sources {
            return;
        }
        let mut ages: Vec<(u64, IpAddr)> = self
            .failures
            .iter()
            .map(|e| (e.value().newest, *e.key()))
            .collect();
        ages.sort_unstable();
        let evict = (ages.len() / 10).max(1);
        for (_, ip) in ages.into_iter().take(evict) {
            self.failures.remove(&ip);
        }
    }

    /// Lifts the lockout of `ip`'s source (and forgets its failures); the
    /// source, if it was locked.
    pub fn lift(&self, ip: IpAddr) -> Option<IpAddr> {
        let source = source_of(ip, self.config.ipv6_prefix);
        self.failures.remove(&source);
        let mut was = false;
        self.replace(|current| {
            was = current.contains_key(&source);
            was.then(|| current.without(&source))
        });
        if was {
            tracing::info!(target: "keyward::audit", %source, "lockout lifted by an operator");
        }
        was.then_some(source)
    }

    /// Lockouts in force at `now_ns`, soonest to end first. Drops the
    /// lockouts that ended from the map (each scrape of the metrics asks),
    /// so that checks skip it again once none is left.
    pub fn active(&self, now_ns: u64) -> Vec<Locked> {
        let locked = self.locked.load_full();
        let mut v: Vec<Locked> = locked
            .iter()
            .filter(|(_, u)| **u > now_ns)
            .map(|(s, u)| Locked {
                source: *s,
                until_ns: *u,
            })
            .collect();
        if v.len() < locked.len() {
            self.replace(|current| {
                let mut next = current.clone();
                next.retain(|_, u| *u > now_ns);
                (next.len() < current.len()).then_some(next)
            });
        }
        v.sort_by_key(|l| l.until_ns);
        v
    }

    /// Lockouts started since the process began.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Sources with failure counters.
    pub fn tracked(&self) -> usize {
        self.failures.len()
    }
}

/// The client address of a check: the `hops`-th `x-forwarded-for` entry from
/// the right when `hops > 0` and the header has that many entries (each
/// trusted proxy appends the address it saw), else the peer address Envoy
/// reports. An entry may carry a port (`203.0.113.9:4711`,
/// `[2001:db8::1]:443`), as some proxies write it. Allocation-free.
pub fn client_address(peer: Option<&str>, xff: Option<&str>, hops: usize) -> Option<IpAddr> {
    if hops > 0
        && let Some(entry) = xff.and_then(|x| x.rsplit(',').nth(hops - 1))
    {
        let entry = entry.trim();
        return entry
            .parse()
            .ok()
            .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()));
    }
    peer?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn lockout(threshold: u32, max: usize) -> Lockout {
        Lockout::new(LockoutConfig {
            threshold,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            max_sources: max,
            ipv6_prefix: 64,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn locks_at_the_threshold_and_expires() {
        let l = lockout(3, 100);
        let a = ip("192.0.2.1");
        let t = 1_000 * S;
        assert!(!l.any_locked());
        assert!(!l.record_failure(a, t));
        assert!(!l.record_failure(a, t + S));
        assert_eq!(l.locked_for(a, t + S), None);
        assert!(l.record_failure(a, t + 2 * S));
        assert!(l.any_locked());
        assert_eq!(l.locked_for(a, t + 2 * S), Some(300));
        assert_eq!(
            l.locked_for(ip("192.0.2.2"), t + 2 * S),
            None,
            "other sources untouched"
        );
        assert_eq!(l.locked_for(a, t + 2 * S + 300 * S), None, "expired");
        assert_eq!(l.total(), 1);
        assert_eq!(l.active(t + 3 * S).len(), 1);
        assert!(l.active(t + 400 * S).is_empty());
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let l = lockout(3, 100);
        let a = ip("2001:db8::1");
        assert!(!l.record_failure(a, 0));
        assert!(!l.record_failure(a, 10 * S));
        assert!(!l.record_failure(a, 70 * S), "window restarted");
        assert!(!l.record_failure(a, 80 * S));
        assert!(l.record_failure(a, 90 * S));
    }

    /// A fixed window that restarts let a source fail `threshold - 1`
    /// times at the end of one window and again at the start of the next.
    #[test]
    fn the_window_slides() {
        let l = lockout(100, 100);
        let a = ip("192.0.2.20");
        let t = 6_000 * S;
        assert!(!l.record_failure(a, t));
        for _ in 0..98 {
            assert!(!l.record_failure(a, t + 59_900_000_000));
        }
        // 99 in the last minute; the next failure, right after the first
        // one's minute ended, is the hundredth within a minute.
        assert!(l.record_failure(a, t + 60 * S));

        // Evenly spread, 86 a minute (96 in a window and an eighth) never
        // add up to a hundred.
        let b = ip("192.0.2.21");
        for i in 0..1_000u64 {
            assert!(!l.record_failure(b, t + i * 700_000_000), "failure {i}");
        }
        // Whatever the rhythm, no stretch of one window holds a hundred
        // failures of a source that is not locked out; this one, about a
        // hundred a minute on average, gets locked out in the end.
        let c = ip("192.0.2.22");
        let mut times = Vec::new();
        let (mut now, mut seed) = (t, 7u64);
        let mut locked = false;
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            now += (seed >> 33) % 1_200_000_000;
            times.push(now);
            if l.record_failure(c, now) {
                locked = true;
                break;
            }
            let in_window = times
                .iter()
                .rev()
                .take_while(|&&x| x + 60 * S > now)
                .count();
            assert!(in_window < 100, "{in_window} failures within a minute");
        }
        assert!(locked);
    }

    #[test]
    fn operators_can_lift_a_lockout() {
        let l = lockout(1, 100);
        let a = ip("198.51.100.7");
        assert!(l.record_failure(a, S));
        assert!(l.any_locked());
        assert_eq!(l.lift(a), Some(a));
        assert_eq!(l.locked_for(a, 2 * S), None);
        assert!(
            !l.any_locked(),
            "no lockout left: checks skip the map again"
        );
        assert_eq!(l.lift(a), None);
    }

    #[test]
    fn the_any_locked_flag_follows_the_map_while_writers_race() {
        // Every writer locks a source out and lifts it again, so the map
        // keeps going from empty to not and back while the others write: a
        // writer that cleared the flag after another had published a
        // non-empty map would leave a locked source unenforced.
        let l = lockout(1, 10_000);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let l = &l;
                s.spawn(move || {
                    for i in 0..500u32 {
                        let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + t * 1000 + i));
                        assert!(l.record_failure(a, S));
                        assert!(l.any_locked(), "{a} is locked out, the flag must say so");
                        assert!(l.lift(a).is_some());
                    }
                });
            }
        });
        assert!(!l.any_locked());
        assert!(l.active(2 * S).is_empty());
        // And one lockout left standing shows.
        assert!(l.record_failure(ip("192.0.2.77"), S));
        assert!(l.any_locked());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let l = lockout(3, 100);
        // Three addresses of one /64: one source.
        assert!(!l.record_failure(ip("2001:db8:1:2::1"), S));
        assert!(!l.record_failure(ip("2001:db8:1:2:aaaa::7"), S));
        assert!(l.record_failure(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), S));
        assert!(l.locked_for(ip("2001:db8:1:2::99"), S).is_some());
        assert!(
            l.locked_for(ip("2001:db8:1:3::1"), S).is_none(),
            "the next /64"
        );
        let active = l.active(S);
        assert_eq!(label(active[0].source, 64), "2001:db8:1:2::/64");
        // IPv4, also written IPv4-mapped, is one address.
        assert_eq!(source_of(ip("::ffff:192.0.2.1"), 64), ip("192.0.2.1"));
        assert_eq!(label(ip("192.0.2.1"), 64), "192.0.2.1");
        // Other prefix lengths.
        assert_eq!(source_of(ip("2001:db8:1:2::7"), 128), ip("2001:db8:1:2::7"));
        assert_eq!(label(ip("2001:db8:1:2::7"), 128), "2001:db8:1:2::7");
        assert_eq!(source_of(ip("2001:db8:1:2::7"), 48), ip("2001:db8:1::"));
        assert_eq!(source_of(ip("2001:db8:1:2::7"), 0), ip("::"));
        assert_eq!(
            l.lift(ip("2001:db8:1:2::5")),
            Some(ip("2001:db8:1:2::")),
            "any address of it lifts it"
        );
        assert!(!l.any_locked());
    }

    #[test]
    fn a_clock_stepping_back_neither_extends_a_lockout_nor_a_window() {
        let l = lockout(3, 100);
        let a = ip("192.0.2.10");
        let t = 10_000 * S;
        assert!(!l.record_failure(a, t));
        assert!(!l.record_failure(a, t + S));
        // Back an hour: the window starts again rather than lasting an hour
        // more.
        let back = t - 3_600 * S;
        assert!(!l.record_failure(a, back), "a new window");
        assert!(!l.record_failure(a, back + S));
        assert!(l.record_failure(a, back + 2 * S));
        // Locked until back + 2 s + 300 s. Another hour back: still 300 s
        // left, not 3,900, and the lockout ends 300 s from then.
        let again = back - 3_600 * S;
        assert_eq!(l.locked_for(a, again), Some(300));
        assert_eq!(l.locked_for(a, again + 300 * S), None);
    }

    #[test]
    fn a_full_map_of_lockouts_makes_room_for_new_ones() {
        let l = lockout(1, 100);
        for i in 0..1_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.record_failure(a, S + u64::from(i)));
            assert!(
                l.locked_for(a, S + u64::from(i)).is_some(),
                "the newest is locked"
            );
        }
        assert!(l.active(S).len() <= 100);
        // All ended: the scrape drops them, and checks skip the map again.
        assert!(l.active(S + 1_000 * S).is_empty());
        assert!(!l.any_locked());
    }

    #[test]
    fn zero_threshold_turns_lockout_off() {
        let l = lockout(0, 100);
        for i in 0..1000 {
            assert!(!l.record_failure(ip("192.0.2.9"), i));
        }
        assert!(!l.any_locked());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn tracking_stays_bounded_under_a_flood_of_sources() {
        let l = lockout(5, 1000);
        for i in 0..50_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.record_failure(addr, u64::from(i));
        }
        assert!(l.tracked() <= 1000, "{}", l.tracked());
    }

    #[test]
    fn client_addresses() {
        assert_eq!(
            client_address(Some("10.0.0.5"), None, 0),
            Some(ip("10.0.0.5"))
        );
        let xff = Some("203.0.113.9, 198.51.100.1 ,10.0.0.2");
        assert_eq!(
            client_address(Some("10.0.0.5"), xff, 0),
            Some(ip("10.0.0.5")),
            "XFF ignored"
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), xff, 1),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), xff, 2),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), xff, 3),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), xff, 4),
            Some(ip("10.0.0.5")),
            "too few entries"
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), Some("203.0.113.9:4711"), 1),
            Some(ip("203.0.113.9")),
            "with a port"
        );
        assert_eq!(
            client_address(Some("10.0.0.5"), Some("[2001:db8::1]:443, 10.0.0.2"), 2),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(client_address(Some("/run/envoy.sock"), None, 0), None);
        assert_eq!(client_address(None, Some("garbage"), 1), None);
    }
}
