//! Protobuf for the Check hot path, by hand.
//!
//! [`CheckView::decode`] reads only the CheckRequest fields keyward uses,
//! borrowing them from the request bytes: no `HashMap` of every header, no
//! `String`s, no allocation at all unless a client sends its own
//! `x-keyward-*` headers. Everything else is skipped by wire type. It follows
//! protobuf's merge rules, so it reads exactly what prost would: the last
//! value of a scalar wins, repeated occurrences of a message merge, and the
//! last entry of a map key wins.
//!
//! [`OkResponse::to_frame`] and [`DeniedResponse::to_frame`] write a CheckResponse straight into the gRPC frame that goes
//! on the wire. Field sizes are computed first, so each byte is written once.
//!
//! The generated prost types in [`crate::pb`] stay the reference: the tests
//! here decode what the encoder writes with prost and compare, and encode
//! requests with prost and compare what the view reads.

use bytes::{BufMut as _, BytesMut};

use crate::decide::{API_KEY_HEADER, AUTHORIZATION_HEADER};

/// `x-forwarded-for`, read for the lockout's client address.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";
/// Prefix of every header keyward owns; client-sent ones are stripped.
pub const OWN_PREFIX: &[u8] = b"x-keyward-";
/// The per-route `context_extensions` key naming required scopes.
pub const REQUIRED_SCOPES: &[u8] = b"required_scopes";

/// A CheckRequest that is not valid protobuf (or not the shape the
/// ext_authz API defines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed CheckRequest: {0}")]
pub struct DecodeError(&'static str);

/// The downstream address Envoy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// An IP socket address (`address` only; the port is not used).
    Socket(&'a [u8]),
    /// A Unix socket path.
    Pipe(&'a [u8]),
}

/// What keyward reads from a CheckRequest, borrowed from its bytes. Its
/// `Debug` form leaves the credentials out (see [`CheckView`]'s impl).
#[derive(Default, Clone, PartialEq, Eq)]
pub struct CheckView<'a> {
    /// `attributes.source.address`.
    pub source: Option<Source<'a>>,
    /// `attributes.request.http.method`.
    pub method: &'a [u8],
    /// `attributes.request.http.path`.
    pub path: &'a [u8],
    /// `attributes.context_extensions["required_scopes"]`.
    pub required_scopes: Option<&'a [u8]>,
    api_key: Headers<'a>,
    authorization: Headers<'a>,
    forwarded_for: Headers<'a>,
    /// Names of client-sent `x-keyward-*` headers, in request order (may
    /// repeat). Allocates only when a client sends one.
    pub own_headers: Vec<&'a [u8]>,
}

/// One header as found in the two encodings Envoy uses: the `headers` map
/// (the last entry of a name wins) and the raw `header_map` list (the first
/// entry wins). The map is preferred, as before raw encoding existed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Headers<'a> {
    map: Option<&'a [u8]>,
    raw: Option<&'a [u8]>,
}

impl<'a> Headers<'a> {
    fn get(self) -> Option<&'a [u8]> {
        self.map.or(self.raw)
    }
}

/// A header that may hold a secret, as `Debug` shows it: its length only.
struct Redacted(Option<usize>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "<{n} bytes, redacted>"),
            None => f.write_str("None"),
        }
    }
}

impl std::fmt::Debug for CheckView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        f.debug_struct("CheckView")
            .field("source", &self.source)
            .field("method", &text(self.method))
            .field("path", &text(self.path))
            .field("required_scopes", &self.required_scopes.map(text))
            .field("api_key", &Redacted(self.api_key().map(<[u8]>::len)))
            .field(
                "authorization",
                &Redacted(self.authorization().map(<[u8]>::len)),
            )
            .field("forwarded_for", &self.forwarded_for().map(text))
            .field(
                "own_headers",
                &self.own_headers.iter().map(|h| text(h)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<'a> CheckView<'a> {
    /// The `x-api-key` header.
    pub fn api_key(&self) -> Option<&'a [u8]> {
        self.api_key.get()
    }

    /// The `authorization` header.
    pub fn authorization(&self) -> Option<&'a [u8]> {
        self.authorization.get()
    }

    /// The `x-forwarded-for` header.
    pub fn forwarded_for(&self) -> Option<&'a [u8]> {
        self.forwarded_for.get()
    }

    /// Reads a serialized CheckRequest.
    pub fn decode(buf: &'a [u8]) -> Result<CheckView<'a>, DecodeError> {
        let mut view = CheckView::default();
        let mut r = Reader(buf);
        while let Some((field, wire)) = r.tag()? {
            match field {
                1 => view.attributes(r.message(wire)?)?,
                _ => r.skip(wire)?,
            }
        }
        Ok(view)
    }

    /// `AttributeContext`.
    fn attributes(&mut self, buf: &'a [u8]) -> Result<(), DecodeError> {
        let mut r = Reader(buf);
        while let Some((field, wire)) = r.tag()? {
            match field {
                // source: Peer { address = 1 }
                1 => {
                    let mut peer = Reader(r.message(wire)?);
                    while let Some((field, wire)) = peer.tag()? {
                        match field {
                            1 => self.address(peer.message(wire)?)?,
                            _ => peer.skip(wire)?,
                        }
                    }
                }
                // request: Request { http = 2 }
                4 => {
                    let mut req = Reader(r.message(wire)?);
                    while let Some((field, wire)) = req.tag()? {
                        match field {
                            2 => self.http(req.message(wire)?)?,
                            _ => req.skip(wire)?,
                        }
                    }
                }
                // context_extensions: map<string, string>
                10 => {
                    let (key, value) = map_entry(r.message(wire)?)?;
                    if key == REQUIRED_SCOPES {
                        self.required_scopes = Some(value);
                    }
                }
                _ => r.skip(wire)?,
            }
        }
        Ok(())
    }

    /// `config.core.v3.Address`: a oneof of `socket_address = 1` and `pipe = 2`.
    fn address(&mut self, buf: &'a [u8]) -> Result<(), DecodeError> {
        let mut r = Reader(buf);
        while let Some((field, wire)) = r.tag()? {
            match field {
                1 => {
                    // Merging into the socket address kept so far, as prost does.
                    let mut address = match self.source {
                        Some(Source::Socket(a)) => a,
                        _ => &[],
                    };
                    let mut s = Reader(r.message(wire)?);
                    while let Some((field, wire)) = s.tag()? {
                        match field {
                            2 => address = s.bytes(wire)?,
                            _ => s.skip(wire)?,
                        }
                    }
                    self.source = Some(Source::Socket(address));
                }
                2 => {
                    let mut path = match self.source {
                        Some(Source::Pipe(p)) => p,
                        _ => &[],
                    };
                    let mut p = Reader(r.message(wire)?);
                    while let Some((field, wire)) = p.tag()? {
                        match field {
                            1 => path = p.bytes(wire)?,
                            _ => p.skip(wire)?,
                        }
                    }
                    self.source = Some(Source::Pipe(path));
                }
                _ => r.skip(wire)?,
            }
        }
        Ok(())
    }

    /// `AttributeContext.HttpRequest`.
    fn http(&mut self, buf: &'a [u8]) -> Result<(), DecodeError> {
        let mut r = Reader(buf);
        while let Some((field, wire)) = r.tag()? {
            match field {
                2 => self.method = r.bytes(wire)?,
                3 => {
                    let mut entry = r.message(wire)?;
                    loop {
                        let (name, value) = map_entry(entry)?;
                        self.header(name, value, false);
                        // The map's entries come one after another: take
                        // the next one here, a branch that is nearly always
                        // predicted, rather than through the field dispatch.
                        match r.0 {
                            [HEADERS_ENTRY_TAG, rest @ ..] => {
                                r.0 = rest;
                                entry = r.message(LEN)?;
                            }
                            _ => break,
                        }
                    }
                }
                4 => self.path = r.bytes(wire)?,
                // header_map: HeaderMap { repeated HeaderValue headers = 1 }
                13 => {
                    let mut map = Reader(r.message(wire)?);
                    while let Some((field, wire)) = map.tag()? {
                        match field {
                            1 => {
                                let (name, value) = header_value(map.message(wire)?)?;
                                self.header(name, value, true);
                            }
                            _ => map.skip(wire)?,
                        }
                    }
                }
                _ => r.skip(wire)?,
            }
        }
        Ok(())
    }

    // Inlined into the decoder's loops: called, it cost about 75
    // instructions a request more (`scripts/bench-instructions.sh`).
    #[inline(always)]
    fn header(&mut self, name: &'a [u8], value: &'a [u8], raw: bool) {
        // By length first: most names are none of ours and are told apart
        // by it alone.
        let slot = match name.len() {
            9 if API_KEY_NAME.matches(name) => &mut self.api_key,
            13 if AUTHORIZATION_NAME.matches(name) => &mut self.authorization,
            15 if FORWARDED_FOR_NAME.matches(name) => &mut self.forwarded_for,
            _ => {
                // The loose test costs what the exact one did; only the
                // rare names it lets through are looked at again.
                if OWN_PREFIX_LOOSE.is_prefix_of(name)
                    && (OWN_PREFIX_NAME.is_prefix_of(name) || underscored_own(name))
                {
                    self.own_headers.push(name);
                }
                return;
            }
        };
        if raw {
            slot.raw.get_or_insert(value);
        } else {
            slot.map = Some(value);
        }
    }
}

/// Whether `name` is [`OWN_PREFIX`] with underscores for some of its
/// dashes (`x_keyward_client`). Envoy passes such names on by default, and
/// upstreams behind CGI, WSGI or Rack fold `_` and `-` into the same
/// variable, so a client could set an identity header that way.
#[cold]
#[inline(never)]
fn underscored_own(name: &[u8]) -> bool {
    name.len() >= OWN_PREFIX.len()
        && name
            .iter()
            .zip(OWN_PREFIX)
            .all(|(&n, &o)| n.to_ascii_lowercase() == o || (o == b'-' && n == b'_'))
}

const API_KEY_NAME: Folded = Folded::new(API_KEY_HEADER.as_bytes());
const AUTHORIZATION_NAME: Folded = Folded::new(AUTHORIZATION_HEADER.as_bytes());
const FORWARDED_FOR_NAME: Folded = Folded::new(FORWARDED_FOR_HEADER.as_bytes());
const OWN_PREFIX_NAME: Folded = Folded::new(OWN_PREFIX);
const OWN_PREFIX_LOOSE: Folded = Folded::loose(OWN_PREFIX);

/// A header name of 8 to 16 bytes, matched ignoring ASCII case a word at a
/// time: the first and the last eight bytes (overlapping when shorter than
/// 16), each OR-ed with 0x20 where the name has a letter, which turns an
/// upper-case letter into its lower case and leaves the other bytes to
/// match exactly. The same answer as `eq_ignore_ascii_case`, in a handful
/// of instructions instead of a loop over the bytes.
#[derive(Debug, Clone, Copy)]
struct Folded {
    len: usize,
    head: u64,
    tail: u64,
    head_letters: u64,
    tail_letters: u64,
}

impl Folded {
    /// `name` must be 8 to 16 bytes, with no upper-case letter.
    const fn new(name: &[u8]) -> Folded {
        Folded::folding(name, false)
    }

    /// [`Folded::new`], where each `-` of `name` also matches `_` (and the
    /// other bytes that OR-ed with 0x72 make 0x7F: `/ = ? M O ] m o }`,
    /// DEL and a few control bytes), a filter that every name it lets
    /// through is then checked against exactly.
    const fn loose(name: &[u8]) -> Folded {
        Folded::folding(name, true)
    }

    const fn folding(name: &[u8], dashes: bool) -> Folded {
        assert!(
            name.len() >= 8 && name.len() <= 16,
            "a name of 8 to 16 bytes"
        );
        let (mut head, mut tail, mut head_letters, mut tail_letters) = (0u64, 0u64, 0u64, 0u64);
        let mut i = 0;
        while i < 8 {
            let (h, t) = (name[i], name[name.len() - 8 + i]);
            assert!(
                !h.is_ascii_uppercase() && !t.is_ascii_uppercase(),
                "a lower-case name"
            );
            head |= (h as u64) << (8 * i);
            tail |= (t as u64) << (8 * i);
            if h.is_ascii_lowercase() {
                head_letters |= 0x20 << (8 * i);
            }
            if t.is_ascii_lowercase() {
                tail_letters |= 0x20 << (8 * i);
            }
            // '-' (0x2d) and '_' (0x5f) OR-ed with 0x72 both make 0x7f.
            if dashes && h == b'-' {
                head_letters |= 0x72 << (8 * i);
                head |= 0x7f << (8 * i);
            }
            if dashes && t == b'-' {
                tail_letters |= 0x72 << (8 * i);
                tail |= 0x7f << (8 * i);
            }
            i += 1;
        }
        Folded {
            len: name.len(),
            head,
            tail,
            head_letters,
            tail_letters,
        }
    }

    /// `name` is this name, in any case.
    #[inline(always)]
    fn matches(&self, name: &[u8]) -> bool {
        name.len() == self.len && self.is_prefix_of(name)
    }

    /// `name` starts with this name, in any case.
    #[inline(always)]
    fn is_prefix_of(&self, name: &[u8]) -> bool {
        let (Some(head), Some(tail)) = (
            name.first_chunk::<8>(),
            name.get(..self.len).and_then(<[u8]>::last_chunk::<8>),
        ) else {
            return false;
        };
        (u64::from_le_bytes(*head) | self.head_letters) == self.head
            && (u64::from_le_bytes(*tail) | self.tail_letters) == self.tail
    }
}

/// A `map<string, string>` entry: (key = 1, value = 2), either may be absent.
#[inline]
fn map_entry(buf: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    // What every encoder writes for a short header: key, then value, each
    // with a one-byte length. Anything else takes the general path.
    if let [0x0a, key_len, rest @ ..] = buf
        && let Some((key, rest)) = rest.split_at_checked(usize::from(*key_len))
        && let [0x12, value_len, value @ ..] = rest
        && *key_len < 0x80
        && *value_len < 0x80
        && usize::from(*value_len) == value.len()
    {
        return Ok((key, value));
    }
    map_entry_general(buf)
}

#[inline(never)]
fn map_entry_general(buf: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
    let mut r = Reader(buf);
    while let Some((field, wire)) = r.tag()? {
        match field {
            1 => key = r.bytes(wire)?,
            2 => value = r.bytes(wire)?,
            _ => r.skip(wire)?,
        }
    }
    Ok((key, value))
}

/// `config.core.v3.HeaderValue`: the key, and `raw_value` when set, else `value`.
fn header_value(buf: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let (mut key, mut value, mut raw): (&[u8], &[u8], &[u8]) = (&[], &[], &[]);
    let mut r = Reader(buf);
    while let Some((field, wire)) = r.tag()? {
        match field {
            1 => key = r.bytes(wire)?,
            2 => value = r.bytes(wire)?,
            3 => raw = r.bytes(wire)?,
            _ => r.skip(wire)?,
        }
    }
    Ok((key, if raw.is_empty() { value } else { raw }))
}

/// The tag of an entry of `HttpRequest.headers` (field 3, length-delimited).
const HEADERS_ENTRY_TAG: u8 = 3 << 3 | LEN;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A cursor over protobuf bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A varint. Almost every tag and length in a CheckRequest fits in one
    /// byte and the lengths of its three outer messages in two, so those
    /// cases are inline and the general loop is out of line.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        match self.0 {
            [b, rest @ ..] if *b < 0x80 => {
                self.0 = rest;
                Ok(u64::from(*b))
            }
            [low, high, rest @ ..] if *high < 0x80 => {
                self.0 = rest;
                Ok(u64::from(low & 0x7f) | u64::from(*high) << 7)
            }
            _ => self.varint_long(),
        }
    }

    #[inline(always)]
    fn varint_long(&mut self) -> Result<u64, DecodeError> {
        let (value, len) = varint_long(self.0)?;
        self.0 = &self.0[len..];
        Ok(value)
    }

    /// The next (field number, wire type), or `None` at the end.
    #[inline(always)]
    fn tag(&mut self) -> Result<Option<(u32, u8)>, DecodeError> {
        let tag = match self.0 {
            [] => return Ok(None),
            // Field numbers 1 to 15: one byte.
            [b, rest @ ..] if *b < 0x80 => {
                self.0 = rest;
                u64::from(*b)
            }
            _ => self.varint_long()?,
        };
        let field = u32::try_from(tag >> 3).map_err(|_| DecodeError("field number too large"))?;
        if field == 0 {
            return Err(DecodeError("field number 0"));
        }
        Ok(Some((field, (tag & 7) as u8)))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError("length runs past the end"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    /// A length-delimited field of a known field number.
    #[inline(always)]
    fn bytes(&mut self, wire: u8) -> Result<&'a [u8], DecodeError> {
        if wire != LEN {
            return Err(DecodeError("wrong wire type for a string or message field"));
        }
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| DecodeError("length too large"))?)
    }

    #[inline]
    fn message(&mut self, wire: u8) -> Result<&'a [u8], DecodeError> {
        self.bytes(wire)
    }

    /// Skips a field keyward does not read.
    #[inline(always)]
    fn skip(&mut self, wire: u8) -> Result<(), DecodeError> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => self.bytes(LEN).map(drop),
            FIXED32 => self.take(4).map(drop),
            // Groups are proto2-only and absent from the ext_authz API.
            _ => Err(DecodeError("unsupported wire type")),
        }
    }
}

/// A varint of any length at the start of `buf`, and its length in bytes.
///
/// Out of line, and given the bytes rather than the [`Reader`]: a reader
/// whose address went to a function that is not inlined would have to live
/// in memory, and every field read would load and store it.
#[inline(never)]
fn varint_long(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b > 1 {
                return Err(DecodeError("varint overflows 64 bits"));
            }
            return Ok((value, i + 1));
        }
    }
    Err(DecodeError("truncated or overlong varint"))
}

/// Bytes of a varint.
#[inline]
const fn varint_len(v: u64) -> usize {
    // 1 byte per started group of 7 bits, at least 1.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a length-delimited field of `len` payload bytes (field < 16).
#[inline]
const fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// `config.core.v3.HeaderValueOption::append_action` OVERWRITE_IF_EXISTS_OR_ADD.
const OVERWRITE_IF_EXISTS_OR_ADD: u64 = 2;

/// Bytes of a `HeaderValue { key, value }`.
#[inline]
fn header_value_len(key: &[u8], value: &[u8]) -> usize {
    field_len(key.len()) + field_len(value.len())
}

/// Bytes of a `HeaderValueOption { header, append_action: overwrite }`,
/// with `keep_empty_value: true` when the value is empty.
#[inline]
fn header_option_len(key: &[u8], value: &[u8]) -> usize {
    field_len(header_value_len(key, value)) + 2 + if value.is_empty() { 2 } else { 0 }
}

/// Bytes of a `Struct.FieldsEntry { key, Value { string_value } }`.
#[inline]
fn struct_entry_len(key: &[u8], value: &[u8]) -> usize {
    field_len(key.len()) + field_len(field_len(value.len()))
}

/// Writes protobuf into a buffer that already holds the gRPC frame prefix.
struct Encoder<'b>(&'b mut BytesMut);

impl Encoder<'_> {
    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.put_u8(v as u8);
    }

    #[inline]
    fn tag(&mut self, field: u8, wire: u8) {
        self.0.put_u8((field << 3) | wire);
    }

    /// Starts a length-delimited field whose payload is `len` bytes.
    #[inline]
    fn open(&mut self, field: u8, len: usize) {
        self.tag(field, LEN);
        self.varint(len as u64);
    }

    #[inline]
    fn bytes(&mut self, field: u8, data: &[u8]) {
        self.open(field, data.len());
        self.0.put_slice(data);
    }

    #[inline]
    fn uint(&mut self, field: u8, v: u64) {
        self.tag(field, VARINT);
        self.varint(v);
    }

    /// A `HeaderValueOption` that overwrites `key` with `value`, as `field`.
    #[inline]
    fn header_option(&mut self, field: u8, key: &[u8], value: &[u8]) {
        self.open(field, header_option_len(key, value));
        self.open(1, header_value_len(key, value));
        self.bytes(1, key);
        self.bytes(2, value);
        self.uint(3, OVERWRITE_IF_EXISTS_OR_ADD);
        if value.is_empty() {
            // An empty value (a key without scopes) must still overwrite
            // what the client sent: say so rather than rely on Envoy
            // applying empty values by default.
            self.uint(4, 1);
        }
    }

    #[inline]
    fn struct_entry(&mut self, key: &[u8], value: &[u8]) {
        self.open(1, struct_entry_len(key, value));
        self.bytes(1, key);
        self.open(2, field_len(value.len()));
        self.bytes(3, value);
    }
}

/// A header to set: name and value.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// An allowed CheckResponse, as fields.
#[derive(Debug, Default)]
pub struct OkResponse<'a> {
    /// `ok_response.headers`: set on the request that goes upstream.
    pub headers: &'a [Header<'a>],
    /// `ok_response.headers_to_remove`.
    pub remove: &'a [&'a [u8]],
    /// `ok_response.response_headers_to_add`: set on the client's response.
    pub response_headers: &'a [Header<'a>],
    /// `dynamic_metadata` string fields.
    pub metadata: &'a [Header<'a>],
}

impl OkResponse<'_> {
    fn ok_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .chain(self.response_headers)
            .map(|(k, v)| field_len(header_option_len(k, v)))
            .sum();
        let remove: usize = self.remove.iter().map(|n| field_len(n.len())).sum();
        headers + remove
    }

    fn metadata_len(&self) -> usize {
        self.metadata
            .iter()
            .map(|(k, v)| field_len(struct_entry_len(k, v)))
            .sum()
    }

    /// The CheckResponse as a gRPC frame. Nested sizes are computed once.
    pub fn to_frame(&self) -> bytes::Bytes {
        let ok_len = self.ok_len();
        let metadata_len = self.metadata_len();
        let mut len = field_len(0) + field_len(ok_len);
        if !self.metadata.is_empty() {
            len += field_len(metadata_len);
        }
        frame(len, |e| self.encode(e, ok_len, metadata_len))
    }

    fn encode(&self, e: &mut Encoder<'_>, ok_len: usize, metadata_len: usize) {
        // status: google.rpc.Status {} (code OK, no message)
        e.open(1, 0);
        e.open(3, ok_len);
        for (k, v) in self.headers {
            e.header_option(2, k, v);
        }
        for name in self.remove {
            e.bytes(5, name);
        }
        for (k, v) in self.response_headers {
            e.header_option(6, k, v);
        }
        if !self.metadata.is_empty() {
            e.open(4, metadata_len);
            for (k, v) in self.metadata {
                e.struct_entry(k, v);
            }
        }
    }
}

/// A denied CheckResponse, as fields.
#[derive(Debug)]
pub struct DeniedResponse<'a> {
    /// `status.code` (a `google.rpc.Code`, not OK).
    pub grpc_code: u32,
    /// `status.message`.
    pub message: &'a [u8],
    /// `denied_response.status.code`: the HTTP status for the client.
    pub http_status: u16,
    /// `denied_response.headers`.
    pub headers: &'a [Header<'a>],
    /// `denied_response.body`.
    pub body: &'a [u8],
}

impl DeniedResponse<'_> {
    fn status_len(&self) -> usize {
        1 + varint_len(u64::from(self.grpc_code)) + field_len(self.message.len())
    }

    fn denied_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| field_len(header_option_len(k, v)))
            .sum();
        field_len(1 + varint_len(u64::from(self.http_status)))
            + headers
            + field_len(self.body.len())
    }

    /// The CheckResponse as a gRPC frame. Nested sizes are computed once.
    pub fn to_frame(&self) -> bytes::Bytes {
        let status_len = self.status_len();
        let denied_len = self.denied_len();
        let len = field_len(status_len) + field_len(denied_len);
        frame(len, |e| self.encode(e, status_len, denied_len))
    }

    fn encode(&self, e: &mut Encoder<'_>, status_len: usize, denied_len: usize) {
        e.open(1, status_len);
        e.uint(1, u64::from(self.grpc_code));
        e.bytes(2, self.message);
        e.open(2, denied_len);
        e.open(1, 1 + varint_len(u64::from(self.http_status)));
        e.uint(1, u64::from(self.http_status));
        for (k, v) in self.headers {
            e.header_option(2, k, v);
        }
        e.bytes(3, self.body);
    }
}

/// Length of the gRPC message prefix: a compression flag and a big-endian u32 length.
pub const FRAME_PREFIX: usize = 5;

/// Encodes `len` bytes of message with `write` into a new gRPC frame.
#[inline]
fn frame(len: usize, write: impl FnOnce(&mut Encoder<'_>)) -> bytes::Bytes {
    let mut buf = BytesMut::with_capacity(FRAME_PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    write(&mut Encoder(&mut buf));
    debug_assert_eq!(buf.len(), FRAME_PREFIX + len, "encoded length mismatch");
    buf.freeze()
}

/// `message` as one uncompressed gRPC frame, as [`unframe`] reads it.
pub fn frame_message(message: &[u8]) -> bytes::Bytes {
    frame(message.len(), |e| e.0.put_slice(message))
}

/// [`unframe`]'s error for one whole message whose compressed flag is set.
pub const COMPRESSED: DecodeError = DecodeError("compressed messages are not accepted");

/// The message length a gRPC frame prefix declares.
#[inline]
fn prefix_len(prefix: &[u8; FRAME_PREFIX]) -> usize {
    u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize
}

/// The message length the gRPC frame prefix at the start of `body`
/// declares; `None` while fewer than the prefix's five bytes have come.
pub fn declared_len(body: &[u8]) -> Option<usize> {
    body.first_chunk::<FRAME_PREFIX>().map(prefix_len)
}

/// The message of a unary gRPC request body: one uncompressed frame. A
/// well-formed frame whose compressed flag is set is [`COMPRESSED`]; any
/// other shape is another error.
pub fn unframe(body: &[u8]) -> Result<&[u8], DecodeError> {
    let Some((prefix, rest)) = body.split_first_chunk::<FRAME_PREFIX>() else {
        return Err(DecodeError("the request body is not a gRPC message"));
    };
    if rest.len() != prefix_len(prefix) {
        return Err(DecodeError(
            "the request body is not exactly one gRPC message",
        ));
    }
    match prefix[0] {
        0 => Ok(rest),
        1 => Err(COMPRESSED),
        _ => Err(DecodeError("the compressed flag is neither 0 nor 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::envoy::config::core::v3::{self as core, address::Address as AddressKind};
    use crate::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use crate::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
    use proptest::prelude::*;
    use prost::Message as _;

    fn request(headers: &[(&str, &str)], raw: &[(&str, &[u8])], scopes: Option<&str>) -> Vec<u8> {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(core::Address {
                        address: Some(AddressKind::SocketAddress(core::SocketAddress {
                            address: "10.0.0.7".into(),
                            port_specifier: None,
                        })),
                    }),
                    principal: String::new(),
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/v1/orders".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                        header_map: (!raw.is_empty()).then(|| core::HeaderMap {
                            headers: raw
                                .iter()
                                .map(|(k, v)| core::HeaderValue {
                                    key: (*k).into(),
                                    value: String::new(),
                                    raw_value: v.to_vec(),
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }),
                }),
                context_extensions: scopes
                    .map(|s| [("required_scopes".to_owned(), s.to_owned())].into())
                    .unwrap_or_default(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn reads_what_keyward_needs() {
        let bytes = request(
            &[
                ("x-api-key", "k1"),
                ("authorization", "Bearer b"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-keyward-debug", "1"),
                ("x_keyward_client", "admin"),
                ("x_keyward-scopes", "admin"),
                ("x-keyward_key-id", "admin-key"),
                ("x_other", "1"),
                ("user-agent", "curl"),
            ],
            &[],
            Some("read trade"),
        );
        let v = CheckView::decode(&bytes).unwrap();
        assert_eq!(v.api_key(), Some(&b"k1"[..]));
        assert_eq!(v.authorization(), Some(&b"Bearer b"[..]));
        assert_eq!(v.forwarded_for(), Some(&b"1.2.3.4"[..]));
        let mut own = v.own_headers.clone();
        own.sort();
        assert_eq!(
            own,
            vec![
                &b"x-keyward-debug"[..],
                b"x-keyward_key-id",
                b"x_keyward-scopes",
                b"x_keyward_client",
            ]
        );
        assert_eq!(v.required_scopes, Some(&b"read trade"[..]));
        assert_eq!(v.method, b"GET");
        assert_eq!(v.path, b"/v1/orders");
        assert_eq!(v.source, Some(Source::Socket(b"10.0.0.7")));
        // Debug output names the credentials' lengths, never their bytes.
        let shown = format!("{v:?}");
        assert!(shown.contains("api_key: <2 bytes, redacted>"), "{shown}");
        assert!(
            shown.contains("authorization: <8 bytes, redacted>"),
            "{shown}"
        );
        assert!(
            !shown.contains("k1") && !shown.contains("Bearer"),
            "{shown}"
        );
        assert!(shown.contains("/v1/orders"), "{shown}");
    }

    #[test]
    fn raw_header_maps_are_read_and_the_plain_map_wins() {
        let bytes = request(
            &[],
            &[("X-Api-Key", b"raw"), ("x-api-key", b"second")],
            None,
        );
        let v = CheckView::decode(&bytes).unwrap();
        assert_eq!(v.api_key(), Some(&b"raw"[..]));
        let bytes = request(&[("x-api-key", "plain")], &[("x-api-key", b"raw")], None);
        assert_eq!(
            CheckView::decode(&bytes).unwrap().api_key(),
            Some(&b"plain"[..])
        );
    }

    #[test]
    fn merges_repeated_messages_like_prost() {
        // Two `attributes` fields: protobuf merges them.
        let mut bytes = request(&[("x-api-key", "first")], &[], Some("a"));
        bytes.extend(request(&[("authorization", "Bearer x")], &[], None));
        let merged = CheckRequest::decode(&bytes[..]).unwrap();
        let attrs = merged.attributes.unwrap();
        let http = attrs.request.unwrap().http.unwrap();
        assert_eq!(http.headers.len(), 2);
        let v = CheckView::decode(&bytes).unwrap();
        assert_eq!(v.api_key(), Some(&b"first"[..]));
        assert_eq!(v.authorization(), Some(&b"Bearer x"[..]));
        assert_eq!(v.required_scopes, Some(&b"a"[..]));
    }

    #[test]
    fn the_captured_envoy_request_decodes() {
        let bytes = include_bytes!("../tests/data/envoy-1.40-check-request.bin");
        let reference = CheckRequest::decode(&bytes[..]).unwrap();
        let v = CheckView::decode(bytes).unwrap();
        let http = reference.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(v.method, http.method.as_bytes());
        assert_eq!(v.path, http.path.as_bytes());
        assert_eq!(
            v.api_key(),
            http.headers.get("x-api-key").map(|s| s.as_bytes())
        );
    }

    #[test]
    fn truncation_and_garbage_are_errors_not_panics() {
        let bytes = request(&[("x-api-key", "k1")], &[], Some("read"));
        for cut in 0..bytes.len() {
            let _ = CheckView::decode(&bytes[..cut]);
        }
        assert!(CheckView::decode(&[0x0a, 0x05, 0x01]).is_err());
        assert!(CheckView::decode(&[0x00]).is_err());
        assert!(CheckView::decode(&[0xff; 11]).is_err());
        assert!(CheckView::decode(&[0x08]).is_err());
    }

    #[test]
    fn map_entries_with_long_or_odd_lengths_take_the_general_path() {
        // A value length written as the two-byte varint 0x82 0x00 (= 2):
        // the byte after the tag happens to equal the rest's length (130).
        let mut entry = vec![0x0a, 1, b'k', 0x12, 0x82, 0x00, b'v', b'w', 0x1a, 125];
        entry.extend_from_slice(&[b'x'; 125]);
        assert_eq!(entry.len() - 5, 0x82);
        assert_eq!(map_entry(&entry), Ok((&b"k"[..], &b"vw"[..])));
        // A long value, a value before its key, and a missing key.
        let long = [b'a'; 300];
        let mut entry = vec![0x0a, 1, b'k', 0x12, 0xac, 0x02];
        entry.extend_from_slice(&long);
        assert_eq!(map_entry(&entry), Ok((&b"k"[..], &long[..])));
        assert_eq!(
            map_entry(&[0x12, 1, b'v', 0x0a, 1, b'k']),
            Ok((&b"k"[..], &b"v"[..]))
        );
        assert_eq!(map_entry(&[0x12, 1, b'v']), Ok((&b""[..], &b"v"[..])));
        assert!(map_entry(&[0x0a, 5, b'k']).is_err());
    }

    #[test]
    fn framed_messages_unframe_to_themselves() {
        for message in [&b""[..], b"\x0a\x00", &[7u8; 300][..]] {
            let framed = frame_message(message);
            let len = u32::try_from(message.len()).unwrap().to_be_bytes();
            assert_eq!(framed[..FRAME_PREFIX], [0, len[0], len[1], len[2], len[3]]);
            assert_eq!(unframe(&framed), Ok(message));
            // The compressed flag set: refused as compressed, but only a
            // whole frame; another flag, or a cut frame, is malformed.
            let mut flagged = framed.to_vec();
            flagged[0] = 1;
            assert_eq!(unframe(&flagged), Err(COMPRESSED));
            assert!(unframe(&flagged[..flagged.len() - 1]).is_err_and(|e| e != COMPRESSED));
            flagged[0] = 2;
            assert!(unframe(&flagged).is_err_and(|e| e != COMPRESSED));
        }
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = BytesMut::new();
            Encoder(&mut buf).varint(v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(Reader(&buf).varint().unwrap(), v);
        }
    }

    fn decode_response(framed: &[u8]) -> CheckResponse {
        CheckResponse::decode(unframe(framed).unwrap()).unwrap()
    }

    #[test]
    fn the_declared_length_needs_the_whole_prefix() {
        assert_eq!(declared_len(&[0, 0, 0, 1, 2, 9]), Some(258));
        assert_eq!(declared_len(&[0, 0, 0, 1, 2]), Some(258));
        assert_eq!(declared_len(&[0, 0, 0, 1]), None);
    }

    #[test]
    fn ok_responses_decode_with_prost() {
        let long = "v".repeat(300);
        let ok = OkResponse {
            headers: &[
                (b"x-keyward-client", b"acme"),
                (b"x-keyward-key-id", long.as_bytes()),
                (b"x-keyward-scopes", b""),
            ],
            remove: &[b"x-api-key", b"x-keyward-debug"],
            response_headers: &[(b"deprecation", b"@1700000000")],
            metadata: &[(b"client", b"acme"), (b"key_id", b"k1")],
        };
        let resp = decode_response(&ok.to_frame());
        assert_eq!(resp.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(r)) = resp.http_response else {
            panic!("not ok")
        };
        let h: Vec<_> = r
            .headers
            .iter()
            .map(|o| {
                assert_eq!(o.append_action, 2);
                let h = o.header.as_ref().unwrap();
                // Only an empty value says it must be kept.
                assert_eq!(o.keep_empty_value, h.value.is_empty(), "{}", h.key);
                (h.key.as_str(), h.value.as_str())
            })
            .collect();
        assert_eq!(
            h,
            [
                ("x-keyward-client", "acme"),
                ("x-keyward-key-id", long.as_str()),
                ("x-keyward-scopes", ""),
            ]
        );
        assert_eq!(r.headers_to_remove, ["x-api-key", "x-keyward-debug"]);
        assert_eq!(
            r.response_headers_to_add[0].header.as_ref().unwrap().value,
            "@1700000000"
        );
        let fields = resp.dynamic_metadata.unwrap().fields;
        assert_eq!(fields.len(), 2);
        assert!(matches!(
            &fields["key_id"].kind,
            Some(prost_types::value::Kind::StringValue(s)) if s == "k1"
        ));
    }

    #[test]
    fn denied_responses_decode_with_prost() {
        let d = DeniedResponse {
            grpc_code: 16,
            message: b"unknown_key",
            http_status: 401,
            headers: &[(b"content-type", b"application/json")],
            body: br#"{"error":"unknown_key"}"#,
        };
        let resp = decode_response(&d.to_frame());
        let status = resp.status.unwrap();
        assert_eq!((status.code, status.message.as_str()), (16, "unknown_key"));
        let Some(HttpResponse::DeniedResponse(r)) = resp.http_response else {
            panic!("not denied")
        };
        assert_eq!(r.status.unwrap().code, 401);
        assert_eq!(r.body, r#"{"error":"unknown_key"}"#);
        assert_eq!(r.headers[0].header.as_ref().unwrap().key, "content-type");
    }

    #[test]
    fn frames_are_checked() {
        assert_eq!(unframe(&[0, 0, 0, 0, 2, 8, 1]).unwrap(), &[8, 1]);
        assert!(unframe(&[0, 0, 0, 0, 3, 8, 1]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 2, 8, 1]).is_err());
        assert!(unframe(&[0, 0]).is_err());
    }

    /// Each folded name, with the name it was made from.
    const FOLDED: [(Folded, &[u8]); 4] = [
        (API_KEY_NAME, API_KEY_HEADER.as_bytes()),
        (AUTHORIZATION_NAME, AUTHORIZATION_HEADER.as_bytes()),
        (FORWARDED_FOR_NAME, FORWARDED_FOR_HEADER.as_bytes()),
        (OWN_PREFIX_NAME, OWN_PREFIX),
    ];

    /// The loose test lets through every name of keyward's prefix, dashes
    /// written as dashes or underscores, in any case, and with the exact
    /// test after it takes those and nothing else.
    #[test]
    fn own_names_with_underscores_are_found_and_nothing_else() {
        let reference = |name: &[u8]| {
            name.len() >= OWN_PREFIX.len()
                && name
                    .iter()
                    .zip(OWN_PREFIX)
                    .all(|(&n, &o)| n.eq_ignore_ascii_case(&o) || (o == b'-' && n == b'_'))
        };
        let mut names = Vec::new();
        for first in [b'-', b'_'] {
            for second in [b'-', b'_'] {
                let mut name = OWN_PREFIX.to_vec();
                (name[1], name[9]) = (first, second);
                names.push([&name[..], b"client"].concat());
                names.push(name.to_ascii_uppercase());
                for i in 0..name.len() {
                    for b in 0..=u8::MAX {
                        let mut changed = name.clone();
                        changed[i] = b;
                        names.push([&changed[..], b"x"].concat());
                    }
                }
            }
        }
        names.push(b"x_keyward".to_vec());
        for name in names {
            let found = OWN_PREFIX_LOOSE.is_prefix_of(&name)
                && (OWN_PREFIX_NAME.is_prefix_of(&name) || underscored_own(&name));
            assert_eq!(
                found,
                reference(&name),
                "{:?}",
                String::from_utf8_lossy(&name)
            );
            if reference(&name) {
                assert!(OWN_PREFIX_LOOSE.is_prefix_of(&name));
            }
        }
    }

    #[test]
    fn folded_names_agree_with_eq_ignore_ascii_case_at_every_byte() {
        for (folded, plain) in FOLDED {
            let mut names = vec![plain.to_vec(), plain.to_ascii_uppercase()];
            for i in 0..plain.len() {
                for b in 0..=u8::MAX {
                    let mut name = plain.to_vec();
                    name[i] = b;
                    names.push(name);
                }
            }
            names.extend((0..plain.len()).map(|n| plain[..n].to_vec()));
            names.extend((0..=u8::MAX).map(|b| [plain, &[b]].concat()));
            for name in names {
                assert_eq!(
                    folded.matches(&name),
                    name.eq_ignore_ascii_case(plain),
                    "{name:?}"
                );
                assert_eq!(
                    folded.is_prefix_of(&name),
                    name.len() >= plain.len() && name[..plain.len()].eq_ignore_ascii_case(plain),
                    "{name:?}"
                );
            }
        }
    }

    /// Names near ours: the same letters in other cases, one byte off, a
    /// byte that differs from a letter only in bit 0x20, any byte at all.
    fn near(name: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(any::<bool>(), name.len()),
            proptest::option::of((0..name.len(), any::<u8>())),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
        )
            .prop_map(move |(upper, change, extra)| {
                let mut v: Vec<u8> = name
                    .iter()
                    .zip(upper)
                    .map(|(&b, u)| if u { b.to_ascii_uppercase() } else { b })
                    .collect();
                if let Some((i, b)) = change {
                    v[i] = b;
                }
                if let Some(extra) = extra {
                    v.extend(extra);
                }
                v
            })
    }

    proptest! {
        #[test]
        fn folded_names_match_as_eq_ignore_ascii_case_does(
            which in 0..FOLDED.len(),
            name in prop_oneof![
                near(API_KEY_HEADER.as_bytes()),
                near(AUTHORIZATION_HEADER.as_bytes()),
                near(FORWARDED_FOR_HEADER.as_bytes()),
                near(OWN_PREFIX),
                proptest::collection::vec(any::<u8>(), 0..20),
            ],
        ) {
            let (folded, plain) = FOLDED[which];
            prop_assert_eq!(folded.matches(&name), name.eq_ignore_ascii_case(plain));
            prop_assert_eq!(
                folded.is_prefix_of(&name),
                name.len() >= plain.len() && name[..plain.len()].eq_ignore_ascii_case(plain)
            );
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = CheckView::decode(&bytes);
        }

        #[test]
        fn agrees_with_prost(
            headers in proptest::collection::vec(("[a-z-]{1,12}", "[ -~]{0,20}"), 0..8),
            key in proptest::option::of("[!-~]{0,40}"),
            scopes in proptest::option::of("[a-z ,]{0,20}"),
        ) {
            let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            if let Some(k) = &key {
                all.push(("x-api-key", k));
            }
            let bytes = request(&all, &[], scopes.as_deref());
            let reference = CheckRequest::decode(&bytes[..]).unwrap();
            let attrs = reference.attributes.unwrap();
            let http = attrs.request.unwrap().http.unwrap();
            let v = CheckView::decode(&bytes).unwrap();
            prop_assert_eq!(v.api_key(), http.headers.get("x-api-key").map(|s| s.as_bytes()));
            prop_assert_eq!(v.required_scopes, attrs.context_extensions.get("required_scopes").map(|s| s.as_bytes()));
        }
    }
}
