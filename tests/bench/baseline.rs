//! The benchmark's limit: the least an HTTPS server built from our crates can
//! do for `GET /v1/vms`. hyper + rustls with the daemon's own TLS setup
//! (`novacron::api::tls::identity`: TLS 1.3 only, ring, ALPN h2 and
//! http/1.1), the same Cargo.lock, and a fixed body served from memory: no
//! routing, no authentication, no rate limit, no metrics, no logging.
//! `tests/bench/run.sh` loads it with the same oha runs as the daemon.
//!
//!   cargo build --release --example baseline
//!   target/release/examples/baseline 127.0.0.7:8443 body.json CERT_DIR

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::PathBuf;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(body), Some(cert_dir)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: baseline ADDR BODY_FILE CERT_DIR".into());
    };
    let addr: SocketAddr = addr.parse()?;
    let body = Bytes::from(std::fs::read(&body)?);
    let cert_dir = PathBuf::from(cert_dir);
    std::fs::create_dir_all(&cert_dir)?;
    let identity = novacron::api::tls::identity(None, &cert_dir, &[addr])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.config);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("baseline: https://{addr}/ serves {} bytes", body.len());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (acceptor, body) = (acceptor.clone(), body.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let svc = hyper::service::service_fn(move |_req| {
                let mut resp = hyper::Response::new(Full::new(body.clone()));
                resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let io = TokioIo::new(tls);
            let _ = if h2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await
            } else {
                hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(io, svc).await
            };
        });
    }
}
