//! `bench-minimal-authz`: the ext_authz server a user would write in a few
//! minutes with tonic, as a benchmark reference for keyward.
//!
//! It compares the `x-api-key` header with one static token (`--token`) and
//! answers OK, or a 401 denial. Nothing is tuned: default tonic server
//! settings, the default multi-threaded tokio runtime. It prints the address
//! it listens on (so `--listen 127.0.0.1:0` works) on stdout.

use clap::Parser;
use keyward::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use keyward::pb::envoy::r#type::v3::HttpStatus;
use keyward::pb::google::rpc;
use tonic::{Request, Response, Status};

/// Minimal tonic ext_authz server: one static API key.
#[derive(Debug, Parser)]
#[command(name = "bench-minimal-authz")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: std::net::SocketAddr,
    /// The one API key that is allowed.
    #[arg(long)]
    token: String,
}

struct StaticToken {
    token: String,
}

#[tonic::async_trait]
impl Authorization for StaticToken {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let key = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|h| h.headers.get("x-api-key"));
        let response = if key == Some(&self.token) {
            CheckResponse {
                status: Some(rpc::Status {
                    code: 0,
                    message: String::new(),
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
                dynamic_metadata: None,
            }
        } else {
            CheckResponse {
                status: Some(rpc::Status {
                    code: tonic::Code::Unauthenticated as i32,
                    message: "unauthorized".to_owned(),
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 401 }),
                    headers: Vec::new(),
                    body: "unauthorized".to_owned(),
                })),
                dynamic_metadata: None,
            }
        };
        Ok(Response::new(response))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // What `Server::serve(addr)` does (it sets TCP_NODELAY by default), on a
    // listener bound first so its address can be printed.
    let incoming =
        tonic::transport::server::TcpIncoming::bind(args.listen)?.with_nodelay(Some(true));
    println!("{}", incoming.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(StaticToken { token: args.token }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
