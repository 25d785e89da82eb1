//! Bench support: realistic synthetic key files for benchmarks, load tests
//! and the `bench-keyfile` tool. Not used by the server.
//!
//! Entry `i` looks like what `keyward keys new` and `keys rotate` write: an
//! id in the generated `<client>-<yyyymmdd>-<hex>` form, a client shared by
//! 50 keys, the SHA-256 of [`synthetic_secret`]`(i)`, and for some keys scopes
//! (60 %), a state (6 %), date-times (16 %), a description (5 %) or a rate
//! limit (3 %). The average entry is about 155 bytes, so a million keys make
//! about 155 MB.

use std::fmt::Write as _;

use crate::secret;

/// The secret of synthetic key `i`: a well-formed keyward secret (prefix,
/// base62 body, valid checksum), distinct for every `i`.
pub fn synthetic_secret(i: usize) -> String {
    let mut out = String::with_capacity(secret::SECRET_LEN);
    out.push_str(secret::PREFIX);
    let mut state = (i as u64) ^ 0x6b65_7977_6172_6421;
    let mut body = String::with_capacity(secret::RANDOM_LEN);
    // The index in base62 first (distinct secrets), then a fixed-seed stream.
    let mut n = i as u64;
    for _ in 0..11 {
        body.push(char::from(secret::ALPHABET[(n % 62) as usize]));
        n /= 62;
    }
    while body.len() < secret::RANDOM_LEN {
        state = splitmix64(state);
        body.push(char::from(secret::ALPHABET[(state % 62) as usize]));
    }
    out.push_str(&body);
    out.push_str(&secret::checksum(&body));
    out
}

/// SplitMix64's increment between successive states.
pub(crate) const SPLITMIX64_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output for the state before `x` (that is, `x` advanced by
/// [`SPLITMIX64_GAMMA`], then mixed). Deterministic, not secure. Stepping
/// `x` by the gamma gives the textbook sequence; feeding each output back
/// as the next `x`, as [`synthetic_secret`] does, gives another fixed
/// stream.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(SPLITMIX64_GAMMA);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A valid key file with `n` keys (see the module documentation); every key
/// `i` verifies with [`synthetic_secret`]`(i)`.
pub fn synthetic_key_file(n: usize) -> String {
    let mut out = String::with_capacity(n * 160 + 256);
    out.push_str("# Synthetic key file for benchmarks (keyward bench support).\n");
    for i in 0..n {
        write_entry(&mut out, i);
    }
    out
}

/// The roll that picks synthetic key `i`'s optional fields.
fn roll(i: usize) -> u64 {
    splitmix64(i as u64) % 100
}

/// Whether synthetic key `i` is allowed on any route with no required
/// scopes, without limit: active, unexpired, valid now and not rate-limited.
/// Load generators present these.
pub fn synthetic_key_is_plain(i: usize) -> bool {
    let roll = roll(i);
    roll > 5 && roll % 33 != 1
}

fn write_entry(out: &mut String, i: usize) {
    let client = i / 50;
    let roll = roll(i);
    let digest = hex::encode(crate::decide::digest(&synthetic_secret(i)));
    if i > 0 {
        out.push('\n');
    }
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "[[keys]]\nid = \"c{client:04x}-20261127-{i:06x}\"\nclient = \"c{client:04x}\"\nsha256 = \"{digest}\"\n"
    );
    match roll % 20 {
        0..=8 => out.push_str("scopes = [\"read\"]\n"),
        9..=11 => out.push_str("scopes = [\"read\", \"trade\"]\n"),
        _ => {}
    }
    match roll {
        0..=3 => out.push_str(
            "state = \"deprecated\"\ndeprecated_at = 2026-11-20T09:30:00Z\nexpires_at = 2026-11-27T09:30:00Z\n",
        ),
        4..=5 => out.push_str("state = \"revoked\"\n"),
        6..=17 => out.push_str("expires_at = 2027-11-27T00:00:00Z\n"),
        _ => {}
    }
    if roll % 20 == 7 {
        let _ = writeln!(out, "description = \"tenant {client} batch importer\"");
    }
    if roll % 33 == 1 {
        out.push_str("rate_limit = { requests = 100, per = \"1s\", burst = 200 }\n");
    }
}

/// A CheckRequest as Envoy 1.40 sends it (captured in
/// `tests/data/envoy-1.40-check-request.bin`), carrying `key` in `x-api-key`,
/// encoded.
pub fn envoy_check_request(key: &str) -> Vec<u8> {
    use crate::pb::envoy::service::auth::v3::CheckRequest;
    use prost::Message as _;
    let captured: &[u8] = include_bytes!("../tests/data/envoy-1.40-check-request.bin");
    let mut req = CheckRequest::decode(captured).expect("the captured request decodes");
    req.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("the captured request has an HTTP request")
        .headers
        .insert("x-api-key".into(), key.into());
    req.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_fast, parse_str_full};

    #[test]
    fn synthetic_files_are_valid_and_take_the_fast_path() {
        let text = synthetic_key_file(2_000);
        let full = parse_str_full(&text, ParseOptions::default()).unwrap();
        let fast = parse_fast(&text, ParseOptions::default()).unwrap();
        assert_eq!(fast, full);
        assert_eq!(fast.keys.len(), 2_000);
        let per_key = text.len() / 2_000;
        assert!((145..=165).contains(&per_key), "{per_key} bytes per key");
    }

    #[test]
    fn synthetic_secrets_are_well_formed_and_match_their_keys() {
        let text = synthetic_key_file(100);
        let file = parse_fast(&text, ParseOptions::default()).unwrap();
        for (i, k) in file.keys.iter().enumerate() {
            let s = synthetic_secret(i);
            assert!(secret::checksum_ok(&s), "{s}");
            assert_eq!(k.digest, crate::decide::digest(&s));
        }
    }
}
