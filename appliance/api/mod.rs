//! API subsystem: HTTPS (TLS 1.3, HTTP/1.1 and h2) and the local Unix
//! socket. It parses requests into commands, authenticates callers, and
//! turns replies and errors into JSON. State lives behind the core.

mod error;
#[cfg(test)]
mod openapi_test;
mod ratelimit;
pub mod routes;
mod stream;
pub mod tls;

pub use error::ApiError;

use crate::core::{Caller, Command, Core, Reply};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use routes::{Edge, Route};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

/// Largest JSON request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Oversized bodies up to this size are read (and dropped) before the 413.
const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The OpenAPI document, kept in `docs/` and served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Where a connection came from.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(SocketAddr),
    /// Local socket; the kernel vouches for the uid (SO_PEERCRED).
    Unix {
        uid: u32,
    },
}

pub struct Api {
    core: Arc<Core>,
    limiter: ratelimit::RateLimiter,
    /// Failed authentications per client address.
    auth_failures: ratelimit::RateLimiter,
    /// Serialized VM list for the core's list generation.
    list_json: Mutex<Option<(u64, Bytes)>>,
    next_request: AtomicU64,
    header_timeout: Duration,
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Resp {
    let body = serde_json::to_vec(value).expect("API types serialize");
    bytes_response(status, Bytes::from(body), "application/json")
}

fn bytes_response(status: StatusCode, body: Bytes, content_type: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(e: &ApiError) -> Resp {
    let status = e.status();
    if status.is_server_error() {
        tracing::error!(error = %e, code = e.code(), "request failed");
    }
    let mut resp = json_response(status, &e.body());
    for (name, value) in e.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

fn method_label(m: &hyper::Method) -> &'static str {
    match *m {
        hyper::Method::GET => "GET",
        hyper::Method::POST => "POST",
        hyper::Method::PUT => "PUT",
        hyper::Method::PATCH => "PATCH",
        hyper::Method::DELETE => "DELETE",
        hyper::Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

impl Api {
    pub fn new(core: Arc<Core>) -> Arc<Api> {
        let cfg = &core.cfg.api;
        Arc::new(Api {
            limiter: ratelimit::RateLimiter::new(cfg.rate_limit_per_sec as f64, cfg.rate_limit_burst),
            auth_failures: ratelimit::RateLimiter::new(
                if cfg.auth_failure_burst > 0 { ratelimit::AUTH_FAILURES_PER_SEC } else { 0.0 },
                cfg.auth_failure_burst,
            ),
            header_timeout: Duration::from_secs(cfg.header_timeout_secs.max(1)),
            core,
            list_json: Mutex::new(None),
            next_request: AtomicU64::new(1),
        })
    }

    /// Applies new per-token rate limits (configuration reload).
    pub fn set_rate_limits(&self, per_sec: u32, burst: u32) {
        self.limiter.set_limits(per_sec, burst);
    }

    async fn handle(self: Arc<Self>, peer: Peer, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let started = Instant::now();
        let method = method_label(req.method());
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (template, mut resp) = match self.dispatch(peer, req).await {
            Ok(ok) => ok,
            Err((template, e)) => (template, error_response(&e)),
        };
        let status = resp.status().as_u16();
        self.core.metrics.observe_request(template, method, status, started.elapsed());
        tracing::debug!(REQUEST_ID = request_id, route = template, method, status, "request");
        resp.headers_mut().insert("x-request-id", HeaderValue::from(request_id));
        Ok(resp)
    }

    /// Resolves the caller of a request that needs authentication. A client
    /// address whose failures exceed their budget is answered 429 instead
    /// of 401; a valid token always passes, so one client stuck with a
    /// revoked token cannot lock out others behind the same address.
    fn caller(&self, peer: Peer, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        let client = match peer {
            // Root, or the daemon's own user (which owns the database anyway).
            Peer::Unix { uid } if uid == 0 || uid == nix::unistd::geteuid().as_raw() => {
                return Ok(Core::local_admin(uid));
            }
            Peer::Unix { uid } => format!("uid:{uid}"),
            Peer::Tcp(addr) => addr.ip().to_string(),
        };
        let token = req.headers().get(hyper::header::AUTHORIZATION).and_then(|h| bearer(h.to_str().ok()?));
        if let Some(caller) = token.and_then(|t| self.core.authenticate(t)) {
            return Ok(caller);
        }
        self.core.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        if let Err(wait) = self.auth_failures.take(&client) {
            self.core.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::AuthRateLimited { retry_after: ratelimit::retry_after(wait) });
        }
        Err(ApiError::Unauthorized)
    }

    async fn dispatch(
        &self,
        peer: Peer,
        req: Request<Incoming>,
    ) -> Result<(&'static str, Resp), (&'static str, ApiError)> {
        let matched =
            routes::route(req.method(), req.uri().path(), req.uri().query()).map_err(|e| ("unmatched", e))?;
        let template = matched.template;
        let fail = |e: ApiError| (template, e);
        if let Route::Edge(Edge::OpenApi) = matched.route {
            return Ok((
                template,
                bytes_response(StatusCode::OK, Bytes::from_static(OPENAPI.as_bytes()), "application/json"),
            ));
        }
        let caller = match matched.action.required_role() {
            None => Caller::anonymous(),
            Some(_) => {
                let caller = self.caller(peer, &req).map_err(fail)?;
                if let Some(id) = &caller.token_id {
                    if let Err(wait) = self.limiter.take(id) {
                        self.core.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                        return Err(fail(ApiError::RateLimited {
                            retry_after: ratelimit::retry_after(wait),
                        }));
                    }
                }
                // Checked before the body is read, so a weak token learns
                // nothing about what its body would have done.
                self.core.authorize(&caller, matched.action).await.map_err(|e| fail(ApiError::Core(e)))?;
                caller
            }
        };
        let exec = |cmd| async { self.core.execute(&caller, cmd).await.map_err(|e| fail(ApiError::Core(e))) };
        match matched.route {
            Route::Edge(Edge::UploadImage(name)) => {
                let (body, length, checksum) = stream::upload_body(req).map_err(fail)?;
                let reply = exec(Command::UploadImage { name, checksum, length, body }).await?;
                return Ok((template, self.render(reply)));
            }
            Route::Edge(Edge::UploadUpdate { tries }) => {
                let (body, length, checksum) = stream::upload_body(req).map_err(fail)?;
                let cmd = Command::ApplyUpdate { checksum, length, tries, body };
                return Ok((template, self.render(exec(cmd).await?)));
            }
            Route::Edge(Edge::Console(vm)) => {
                let mut req = req;
                let accept = stream::websocket_key(&req).map_err(fail)?;
                let on_upgrade = hyper::upgrade::on(&mut req);
                return match exec(Command::Console(vm)).await? {
                    Reply::Console(session) => {
                        Ok((template, stream::websocket_console(on_upgrade, accept, session)))
                    }
                    other => Ok((template, self.render(other))),
                };
            }
            Route::Edge(Edge::Events) => {
                let after = last_event_id(&req).map_err(fail)?;
                return Ok((template, self.render(exec(Command::Events { after }).await?)));
            }
            _ => {}
        }
        let body = if matched.needs_body() { read_json_body(req).await.map_err(fail)? } else { Bytes::new() };
        let cmd = matched.into_command(&body).map_err(fail)?;
        let reply = exec(cmd).await?;
        Ok((template, self.render(reply)))
    }

    fn render(&self, reply: Reply) -> Resp {
        match reply {
            Reply::Health(h) => json_response(StatusCode::OK, &h),
            Reply::HealthReport(r) => json_response(StatusCode::OK, &r),
            Reply::Ready => json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})),
            Reply::Host(h) => json_response(StatusCode::OK, &h),
            Reply::Metrics(text) => {
                bytes_response(StatusCode::OK, Bytes::from(text), "text/plain; version=0.0.4")
            }
            Reply::Vms { generation, vms } => {
                let mut cache = self.list_json.lock().unwrap();
                let body = match cache.as_ref() {
                    Some((g, b)) if *g == generation => b.clone(),
                    _ => {
                        let b = Bytes::from(
                            serde_json::to_vec(&serde_json::json!({ "vms": &*vms }))
                                .expect("VM list serializes"),
                        );
                        *cache = Some((generation, b.clone()));
                        b
                    }
                };
                bytes_response(StatusCode::OK, body, "application/json")
            }
            Reply::Vm(vm) => json_response(StatusCode::OK, &vm),
            Reply::Created(vm) => json_response(StatusCode::CREATED, &vm),
            Reply::Accepted(vm) => json_response(StatusCode::ACCEPTED, &vm),
            Reply::Deleted => {
                let mut r = Response::new(Full::new(Bytes::new()).boxed());
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            }
            Reply::Tokens(t) => json_response(StatusCode::OK, &t),
            Reply::TokenCreated(t) => json_response(StatusCode::CREATED, &t),
            Reply::Audit(a) => json_response(StatusCode::OK, &a),
            Reply::Snapshots(l) => json_response(StatusCode::OK, &l),
            Reply::SnapshotCreated(sn) => json_response(StatusCode::CREATED, &sn),
            Reply::Images(l) => json_response(StatusCode::OK, &l),
            Reply::Image(i) => json_response(StatusCode::OK, &i),
            Reply::ImageCreated(i) => json_response(StatusCode::CREATED, &i),
            Reply::Networks(l) => json_response(StatusCode::OK, &l),
            Reply::NetworkCreated(n) => json_response(StatusCode::CREATED, &n),
            Reply::ConsoleLog(b) => bytes_response(StatusCode::OK, b, "text/plain; charset=utf-8"),
            Reply::Events(feed) => stream::sse(feed),
            Reply::Update(v) => json_response(StatusCode::OK, &v),
            Reply::UpdateAccepted(v) => json_response(StatusCode::ACCEPTED, &v),
            // Consoles are answered in dispatch, where the upgrade is.
            Reply::Console(_) => error_response(&ApiError::NoRoute("console".into())),
        }
    }
}

/// The credentials of an `Authorization: Bearer` header; the scheme is
/// case-insensitive (RFC 9110, section 11.1).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Where an event stream resumes: `Last-Event-ID` (what browsers send on
/// reconnect) or `?after=`.
fn last_event_id(req: &Request<Incoming>) -> Result<u64, ApiError> {
    let from_query = req.uri().query().and_then(|q| q.split('&').find_map(|p| p.strip_prefix("after=")));
    let raw = match req.headers().get("last-event-id") {
        Some(v) => v.to_str().ok(),
        None => from_query,
    };
    match raw {
        None => Ok(0),
        Some(v) => v.trim().parse().map_err(|_| ApiError::InvalidQuery {
            name: "Last-Event-ID".into(),
            message: "must be an event sequence number".into(),
        }),
    }
}

async fn read_json_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let ct = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(len) = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if len > MAX_BODY as u64 {
            // Read and drop a bounded amount first: a client still sending
            // when the answer comes often reports a broken pipe instead of
            // the 413. Anything bigger is cut off.
            if len <= DRAIN_LIMIT {
                let mut body = req.into_body();
                while let Some(Ok(_)) = body.frame().await {}
            }
            return Err(ApiError::TooLarge(MAX_BODY));
        }
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::TooLarge(MAX_BODY))
        }
        Err(e) => Err(ApiError::Body(e.to_string())),
    }
}

/// The running listeners.
pub struct Server {
    pub tcp: Vec<SocketAddr>,
    pub socket: PathBuf,
}

/// Serves one connection. The protocol comes from ALPN (h2 only when the
/// client negotiated it), never from sniffing the first bytes: a client that
/// connects and sends nothing must still run into the header timeout.
async fn serve_conn<IO>(api: Arc<Api>, peer: Peer, io: IO, h2: bool) -> Result<(), hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = api.header_timeout;
    let svc = hyper::service::service_fn(move |req| api.clone().handle(peer, req));
    if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(128)
            // hyper's 64 KiB default windows throttle image uploads over h2
            // to a fraction of HTTP/1.1; let the window follow the link.
            .adaptive_window(true)
            .max_frame_size(256 * 1024)
            // Dead peers are detected by pings; the connection limit bounds
            // live but idle ones.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(io), svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await
    }
}

/// Binds every listener and serves until `shutdown` turns true.
pub async fn serve(
    api: Arc<Api>,
    tls: Arc<rustls::ServerConfig>,
    listen: &[SocketAddr],
    socket: &Path,
    shutdown: watch::Receiver<bool>,
) -> Result<Server, ApiError> {
    let limit = Arc::new(Semaphore::new(api.core.cfg.api.max_connections));
    let mut bound = Vec::new();
    for addr in listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen { addr: addr.to_string(), source })?;
        bound.push(l.local_addr().map_err(|source| ApiError::Listen { addr: addr.to_string(), source })?);
        tokio::spawn(accept_tcp(l, api.clone(), tls.clone(), limit.clone(), shutdown.clone()));
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| ApiError::Listen { addr: socket.display().to_string(), source })?;
    }
    let _ = std::fs::remove_file(socket);
    let ul = UnixListener::bind(socket)
        .map_err(|source| ApiError::Listen { addr: socket.display().to_string(), source })?;
    // Group members may connect; only root (or the daemon's user) gets admin
    // without a token.
    let _ = std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o660));
    tokio::spawn(accept_unix(ul, api.clone(), limit, shutdown));
    Ok(Server { tcp: bound, socket: socket.into() })
}

async fn accept_tcp(
    l: TcpListener,
    api: Arc<Api>,
    tls: Arc<rustls::ServerConfig>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            api.core.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if let Err(e) = serve_conn(api, Peer::Tcp(addr), tls, h2).await {
                tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn accept_unix(
    l: UnixListener,
    api: Arc<Api>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            api.core.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(cred) = stream.peer_cred() else { continue };
        let peer = Peer::Unix { uid: cred.uid() };
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_conn(api, peer, stream, false).await;
        });
    }
}
