//! `bench-floor`: the transport floor for ext_authz benchmarks.
//!
//! A bare hyper 1.x HTTP/2 server that answers every POST with the same
//! pre-encoded gRPC OK CheckResponse and never decodes the request: it drains
//! the body and replies. Whatever an ext_authz server costs above this is the
//! cost of gRPC framework, protobuf decoding and the decision itself. It
//! prints the address it listens on (so `--listen 127.0.0.1:0` works) on stdout.

use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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
}

async fn answer(req: Request<Incoming>, ok: Bytes) -> Result<Response<Reply>, hyper::Error> {
    if req.method() != Method::POST {
        let mut resp = Response::new(Reply::empty());
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(resp);
    }
    // Drain the request without looking at it.
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    let mut resp = Response::new(Reply::ok(ok));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let ok = keyward::wire::frame_message(
        &CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }
        .encode_to_vec(),
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let ok = ok.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(req, ok.clone()));
            // The same HTTP/2 settings as keyward's listener, so the two
            // differ only in what they do per request.
            let _ = keyward::grpc::http2()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
