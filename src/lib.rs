//! keyward: an Envoy external-authorization sidecar that verifies API keys
//! against an in-memory key ring and makes key rotation a non-event.
//!
//! # Layout
//!
//! - [`keyfile`]: the key file format; parsing and validation with
//!   `file:line:column` diagnostics.
//! - [`ring`]: the immutable [`ring::KeyRing`] indexed by SHA-256 digest, the
//!   per-key usage registry that outlives rings, and the [`ring::RingHandle`]
//!   through which a new ring is published with one atomic store.
//! - [`decide`]: credential extraction and the pure decision function.
//! - [`verified`]: the per-thread memo that lets a key seen again skip SHA-256.
//! - [`limit`]: per-key rate limits (GCRA in one atomic word per key).
//! - [`lockout`]: brute-force lockout per source address.
//! - [`secret`]: the format of keyward-issued secrets (prefix + checksum).
//! - [`service`]: the Check logic from request bytes to response bytes; the one
//!   place a decision becomes a CheckResponse.
//! - [`wire`]: the hand-written protobuf of the hot path: a borrowing
//!   CheckRequest reader and a CheckResponse writer.
//! - [`grpc`]: the HTTP/2 listener (hyper) that answers Check directly and
//!   hands `grpc.health.v1` to tonic.
//! - [`conn`]: one HTTP/2 connection, its streams run in the connection's
//!   task so that the answers to one read leave in one write.
//! - [`reload`]: hot reload: watch, debounce, read, validate, publish or keep.
//! - [`stats`]: decision counters.
//! - [`metrics`]: Prometheus exposition, read from the atomics at scrape time.
//! - [`admin`]: the admin HTTP listener.
//! - [`server`]: loads the first ring and runs the listeners until shutdown.
//! - [`keys`]: `keyward keys …`, the key lifecycle commands.
//! - [`edit`]: safe edits of the key file (lock, validate, history, atomic replace).
//! - [`status`]: `keyward status`, per-key usage and retirement verdicts.
//! - [`tls`]: TLS and mutual TLS on the gRPC listener, hot-reloaded.
//! - [`cli`]: the `keyward` command line.
//! - [`pb`]: generated protobuf code for the ext_authz API.
//! - [`bench_support`]: synthetic key files for benchmarks and load tests.

pub mod admin;
pub mod bench_support;
pub mod cli;
pub mod clock;
pub mod conn;
pub mod decide;
pub mod edit;
pub mod grpc;
pub mod keyfile;
pub mod keys;
pub mod limit;
pub mod lockout;
pub mod metrics;
pub mod pages;
pub mod pb;
pub mod priority;
pub mod reload;
pub mod ring;
pub mod secret;
pub mod server;
pub mod service;
pub mod stats;
pub mod status;
pub mod tls;
pub mod verified;
pub mod wire;
