//! The API client used by the CLI (and by the integration tests): the
//! local Unix socket, or HTTPS with the server certificate pinned by its
//! SHA-256 fingerprint or checked against a CA file.

use crate::core::Action;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("invalid URL {0:?}: use https://HOST:PORT")]
    Url(String),
    #[error("remote use needs --fingerprint (SHA-256 of the server certificate) or --ca")]
    NoTrust,
    #[error("invalid --fingerprint {0:?}: give the certificate's SHA-256 as 32 hex bytes (AB:CD:...), as `novacron status` prints it")]
    Fingerprint(String),
    #[error("{0}")]
    Tls(String),
    #[error("request failed: {0}")]
    Http(String),
}

#[derive(Debug, Clone)]
pub enum Target {
    Socket(PathBuf),
    Https { host: String, port: u16, tls: Arc<rustls::ClientConfig> },
}

#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    /// Sent on either target: the socket needs it from users other than
    /// root and the daemon's own (members of the socket's group).
    token: Option<String>,
}

/// A TLS 1.3 client config that trusts exactly the certificate with SHA-256
/// `fingerprint`, offering the `alpn` protocols.
pub fn pinned_tls_config(
    fingerprint: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    crate::tls::pinned_client_config(Some(fingerprint), false, alpn)
        .map_err(|e| ClientError::Tls(e.to_string()))
}

impl Client {
    pub fn socket(path: impl Into<PathBuf>) -> Client {
        Client { target: Target::Socket(path.into()), token: None }
    }

    /// The same client, sending `token` with every request.
    pub fn with_token(self, token: Option<String>) -> Client {
        Client { token, ..self }
    }

    /// An HTTPS client for `url` (`https://host:port`).
    pub fn https(
        url: &str,
        token: Option<String>,
        fingerprint: Option<&str>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client, ClientError> {
        let rest = url.strip_prefix("https://").ok_or_else(|| ClientError::Url(url.into()))?;
        let hostport = rest.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse().map_err(|_| ClientError::Url(url.into()))?,
            ),
            _ => (hostport.to_string(), crate::config::DEFAULT_PORT),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut tls = match (fingerprint, ca) {
            (Some(fp), _) => {
                let fp =
                    crate::tls::parse_fingerprint(fp).ok_or_else(|| ClientError::Fingerprint(fp.into()))?;
                let tls = pinned_tls_config(&fp, &[b"http/1.1"])?;
                return Ok(Client { target: Target::Https { host, port, tls }, token });
            }
            (None, Some(ca)) => {
                let pem =
                    std::fs::read(ca).map_err(|e| ClientError::Tls(format!("{}: {e}", ca.display())))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut &pem[..]) {
                    roots
                        .add(cert.map_err(|e| ClientError::Tls(e.to_string()))?)
                        .map_err(|e| ClientError::Tls(e.to_string()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, None) => return Err(ClientError::NoTrust),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Client { target: Target::Https { host, port, tls: Arc::new(tls) }, token })
    }

    pub fn describe(&self) -> String {
        match &self.target {
            Target::Socket(p) => p.display().to_string(),
            Target::Https { host, port, .. } => format!("https://{host}:{port}"),
        }
    }

    /// Sends `action`'s request: its method and path from the action table,
    /// `params` filled into the path, then `query` ("" or "?k=v&...").
    /// Returns status and body; `body` is sent as JSON.
    pub async fn call(
        &self,
        action: Action,
        params: &[&str],
        query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = self.builder(action, params, query);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        self.finish(req, body).await
    }

    /// A raw request to any path, for tests that send what the action
    /// table would not; commands use [`Client::call`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let ct = body.as_ref().map(|_| "application/json");
        self.request_with(method, path, body, ct).await
    }

    /// Like [`Client::request`] with an explicit content type (or none).
    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut req = self.raw_builder(method, path);
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        self.finish(req, body).await
    }

    async fn finish(
        &self,
        req: hyper::http::request::Builder,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self.send(req, false).await?;
        collect(resp).await
    }

    /// A request builder for `action` (see [`Client::call`]) with the Host
    /// and Authorization headers set.
    pub fn builder(&self, action: Action, params: &[&str], query: &str) -> hyper::http::request::Builder {
        let method =
            Method::from_bytes(action.method().as_bytes()).expect("the action table's methods are valid");
        self.raw_builder(method, &(action.path(params) + query))
    }

    fn raw_builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let host = match &self.target {
            Target::Socket(_) => "localhost".to_string(),
            Target::Https { host, port, .. } => format!("{host}:{port}"),
        };
        req.header(hyper::header::HOST, host)
    }

    /// Sends a request with any body (e.g. a streamed upload) on a new
    /// connection and returns the response as soon as its head arrives, so
    /// long-lived bodies (SSE) can be read as they come. With `upgrades`, the
    /// connection can be taken over after a 101 (`hyper::upgrade::on`).
    pub async fn send<B>(&self, req: Request<B>, upgrades: bool) -> Result<Response<Incoming>, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| ClientError::Http(e.to_string()))?;
        if upgrades {
            tokio::spawn(conn.with_upgrades());
        } else {
            tokio::spawn(conn);
        }
        sender.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        match &self.target {
            Target::Socket(path) => {
                let stream =
                    tokio::net::UnixStream::connect(path).await.map_err(|e| ClientError::Connect {
                        target: path.display().to_string(),
                        // Most often a new user's dev daemon, whose socket is
                        // in its data dir rather than under /run.
                        reason: format!(
                            "{e}; is the daemon running? `novacron serve --dev` has its socket at \
                         novacron-dev/novacron.sock where it was started: point NOVACRON_SOCKET \
                         or --socket at it"
                        ),
                    })?;
                Ok(Box::new(stream))
            }
            Target::Https { host, port, tls, .. } => {
                let target = format!("{host}:{port}");
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| ClientError::Connect { target: target.clone(), reason: e.to_string() })?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(host.clone()).map_err(|e| ClientError::Tls(e.to_string()))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError::Connect { target, reason: e.to_string() })?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// A connection to the daemon: the Unix socket or a TLS stream.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Reads a whole response body.
pub async fn collect(resp: Response<Incoming>) -> Result<(StatusCode, Bytes), ClientError> {
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| ClientError::Http(e.to_string()))?.to_bytes();
    Ok((status, body))
}
