//! API key secrets: generation and the checksum that makes them recognisable.
//!
//! Format: `kw_` + 43 base62 characters drawn from the OS CSPRNG (256 bits) +
//! 6 base62 characters of the CRC-32 of the random part. The prefix lets secret
//! scanners find leaked keys; the checksum lets them (and keyward) reject typos
//! and look-alikes without a lookup. Base62 keeps the secret URL- and
//! shell-safe and selectable with a double click.

/// The prefix every keyward-issued secret starts with.
pub const PREFIX: &str = "kw_";
/// Length of the random part, in base62 characters (43 × log2 62 ≥ 256 bits).
pub const RANDOM_LEN: usize = 43;
/// Length of the checksum suffix.
pub const CHECKSUM_LEN: usize = 6;
/// Total length of a keyward secret.
pub const SECRET_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;

pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Generates a new secret from the OS CSPRNG.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(SECRET_LEN);
    out.push_str(PREFIX);
    let mut pool = [0u8; 64];
    let mut drawn = 0;
    while drawn < RANDOM_LEN {
        getrandom::fill(&mut pool)?;
        for &b in &pool {
            // Rejection sampling: 248 = 4 × 62, so `b % 62` is uniform below it.
            if b < 248 && drawn < RANDOM_LEN {
                out.push(ALPHABET[usize::from(b % 62)] as char);
                drawn += 1;
            }
        }
    }
    let sum = checksum(&out[PREFIX.len()..]);
    out.push_str(&sum);
    Ok(out)
}

/// The base62 CRC-32 of `random`, fixed width.
pub(crate) fn checksum(random: &str) -> String {
    let mut n = crc32fast::hash(random.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// Whether a secret that claims our format is well-formed: right length,
/// base62 body, matching checksum. Allocation-free.
pub fn checksum_ok(secret: &str) -> bool {
    secret
        .as_bytes()
        .strip_prefix(PREFIX.as_bytes())
        .is_some_and(body_ok)
}

/// Whether a presented secret may be a key at all: one with the exact shape
/// of a keyward secret ([`PREFIX`], then [`RANDOM_LEN`] + [`CHECKSUM_LEN`]
/// base62 characters) must pass its checksum (one that fails is a typo or
/// a guess). Anything else may be a key issued elsewhere, even one that
/// happens to start with `kw_`, and is looked up as it is.
#[inline]
pub fn plausible(secret: &[u8]) -> bool {
    match secret.strip_prefix(PREFIX.as_bytes()) {
        Some(rest) if is_shaped(rest) => sum_matches(rest),
        _ => true,
    }
}

/// Whether what follows [`PREFIX`] is a base62 body of the right length
/// ending in the checksum of its random part.
fn body_ok(rest: &[u8]) -> bool {
    is_shaped(rest) && sum_matches(rest)
}

/// Whether `rest` has the length and alphabet of what follows [`PREFIX`].
fn is_shaped(rest: &[u8]) -> bool {
    rest.len() == RANDOM_LEN + CHECKSUM_LEN && all_alphanumeric(rest)
}

/// Whether a shaped body ends in the checksum of its random part.
fn sum_matches(rest: &[u8]) -> bool {
    let (random, sum) = rest.split_at(RANDOM_LEN);
    let mut n = crc32fast::hash(random);
    for &d in sum.iter().rev() {
        if d != ALPHABET[(n % 62) as usize] {
            return false;
        }
        n /= 62;
    }
    true
}

/// Whether every byte is an ASCII letter or digit. Every byte is looked at,
/// without an early exit, so the loop is vectorised: an early-exit `all`
/// takes two branches per byte, a third of the cost of checking a key.
#[inline]
fn all_alphanumeric(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, &b| {
        let upper = b & !0x20; // folds a-z onto A-Z (and nothing else onto it)
        ok & ((b.wrapping_sub(b'0') < 10) | (upper.wrapping_sub(b'A') < 26))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_distinct_well_formed_and_pass_their_checksum() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let s = generate().unwrap();
            assert_eq!(s.len(), SECRET_LEN);
            assert!(s.starts_with(PREFIX));
            assert!(checksum_ok(&s), "{s}");
            assert!(crate::decide::is_well_formed(&s));
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn every_single_character_change_fails_the_checksum() {
        let s = generate().unwrap();
        for i in PREFIX.len()..s.len() {
            for &c in ALPHABET.iter() {
                if s.as_bytes()[i] == c {
                    continue;
                }
                let mut b = s.clone().into_bytes();
                b[i] = c;
                let changed = String::from_utf8(b).unwrap();
                assert!(!checksum_ok(&changed), "{changed} passed");
            }
        }
    }

    #[test]
    fn alphanumeric_means_ascii_letters_and_digits() {
        for b in 0..=255u8 {
            assert_eq!(
                all_alphanumeric(&[b'a', b, b'0']),
                b.is_ascii_alphanumeric(),
                "byte {b:#04x}"
            );
        }
        assert!(all_alphanumeric(b""));
    }

    #[test]
    fn other_shapes_fail() {
        assert!(!checksum_ok("kw_short"));
        assert!(plausible(b"kw_short"), "not our shape: looked up as it is");
        assert!(
            plausible(b"kw_live_abc123"),
            "issued elsewhere, with our prefix"
        );
        assert!(plausible(b"ghp_0000"), "not ours: looked up as it is");
        assert!(!checksum_ok("ghp_0000"));
        let s = generate().unwrap();
        assert!(!checksum_ok(&s[..s.len() - 1]));
        assert!(!checksum_ok(&format!("{s}0")));
        assert!(
            plausible(format!("{s}0").as_bytes()),
            "one character too long"
        );
        // Our shape with a wrong checksum: a typo or a guess.
        let last = if s.ends_with('0') { "1" } else { "0" };
        let typo = format!("{}{last}", &s[..s.len() - 1]);
        assert!(!plausible(typo.as_bytes()));
        assert!(plausible(s.as_bytes()));
    }

    #[test]
    fn characters_are_spread_over_the_alphabet() {
        let mut counts = [0u32; 62];
        for _ in 0..500 {
            let s = generate().unwrap();
            for b in s[PREFIX.len()..PREFIX.len() + RANDOM_LEN].bytes() {
                counts[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1;
            }
        }
        // 21,500 draws: each symbol expects ~347; a biased generator falls far outside.
        assert!(
            counts.iter().all(|&c| (250..450).contains(&c)),
            "{counts:?}"
        );
    }
}
