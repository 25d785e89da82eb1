//! Integration tests: the real server on port 0, and end to end through a real Envoy.

mod abuse;
mod deploy;
mod deployment;
mod envoy_e2e;
mod grpc;
mod hardening;
mod keys_cli;
mod loadgen;
mod observability;
mod reload;
mod util;
mod wire;
