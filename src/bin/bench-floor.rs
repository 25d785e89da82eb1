//! `bench-floor`: the transport floor for ext_authz benchmarks.
//!
//! A bare hyper 1.x HTTP/2 server that answers every POST with the same
//! pre-encoded gRPC OK CheckResponse and never decodes the request: it drains
//! the body and replies. Whatever an ext_authz server costs above this is the
//! cost of gRPC framework, protobuf decoding and the decision itself. It
//! prints the address it listens on (so `--listen 127.0.0.1:0` works) on stdout.
//!
//! With `--keyward-keys FILE --keyward-key SECRET` it answers instead with
//! the very response keyward gives an allowed check of that key (its
//! headers to set and remove, its dynamic metadata), computed once at start
//! by keyward's own service from the CheckRequest Envoy 1.40 sends. Behind
//! Envoy, that separates what Envoy spends on keyward's richer answer from
//! what keyward spends on deciding.

use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use keyward::grpc::Reply;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{CheckResponse, OkHttpResponse};
use keyward::pb::google::rpc;
use prost::Message;

/// Bare HTTP/2 server answering every POST with a fixed gRPC OK CheckResponse.
#[derive(Debug, Parser)]
#[command(name = "bench-floor")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50053")]
    listen: std::net::SocketAddr,
    /// A keyward key file: answer as keyward does for `--keyward-key`.
    #[arg(long, requires = "keyward_key")]
    keyward_keys: Option<std::path::PathBuf>,
    /// The secret of a key in `--keyward-keys` whose allowed answer to send.
    #[arg(long, requires = "keyward_keys")]
    keyward_key: Option<String>,
}

/// The gRPC frame keyward answers an Envoy 1.40 CheckRequest carrying
/// `secret` with, from a ring of the keys in `path`; an error unless that
/// answer allows the request.
fn keyward_answer(
    path: &std::path::Path,
    secret: &str,
) -> Result<Bytes, Box<dyn std::error::Error>> {
    use keyward::ring::{KeyRing, RingSource, UsageRegistry};
    use keyward::service::Shared;
    use std::sync::Arc;

    let (file, bytes) = keyward::keyfile::load(path, keyward::keyfile::ParseOptions::default())?;
    let usage = UsageRegistry::default();
    let source = RingSource {
        generation: 1,
        sha256: keyward::keyfile::file_digest(&bytes),
        loaded_at: jiff::Timestamp::now(),
    };
    let ring = KeyRing::build(&file, source, &usage, None);
    let svc =
        keyward::service::AuthzService::new(Arc::new(Shared::new(ring, usage, Default::default())));
    let request = keyward::bench_support::envoy_check_request(secret);
    let frame = svc.check_message(&request, jiff::Timestamp::now())?;
    let response = CheckResponse::decode(keyward::wire::unframe(&frame)?)?;
    let allowed = response.status.as_ref().is_some_and(|s| s.code == 0)
        && matches!(response.http_response, Some(HttpResponse::OkResponse(_)));
    if !allowed {
        return Err(format!("keyward does not allow that key: {response:?}").into());
    }
    Ok(frame)
}

async fn answer(req: Request<Incoming>, ok: Bytes) -> Result<Response<Reply>, hyper::Error> {
    if req.method() != Method::POST {
        let mut resp = Response::new(Reply::empty());
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(resp);
    }
    // Drain the request without looking at it, and stop as soon as h2 says
    // the stream is closed, as keyward does (rather than polling once more
    // for the end of the data and then for trailers).
    let mut body = req.into_body();
    while !body.is_end_stream() {
        match body.frame().await {
            Some(frame) => drop(frame?),
            None => break,
        }
    }
    let mut resp = Response::new(Reply::ok(ok));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

/// A bare OK CheckResponse, framed.
fn bare_ok() -> Bytes {
    keyward::wire::frame_message(
        &CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }
        .encode_to_vec(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let ok = match (&args.keyward_keys, &args.keyward_key) {
        (Some(keys), Some(key)) => keyward_answer(keys, key)?,
        _ => bare_ok(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let ok = ok.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, ok.clone()));
            // The same HTTP/2 settings and connection handling as keyward's
            // listener, so the two differ only in what they do per request.
            let (streams, conn) = keyward::grpc::serve_connection(stream, svc);
            let _ = streams.drive(conn).await;
        });
    }
}
