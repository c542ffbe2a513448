//! API subsystem: HTTPS (TLS 1.3, HTTP/1.1 and h2) and the local Unix
//! socket. It parses requests into commands, authenticates callers, and
//! turns replies and errors into JSON. State lives behind the core.

mod conn;
mod error;
#[cfg(test)]
mod openapi_test;
mod ratelimit;
pub mod routes;
mod stream;
pub mod tls;

pub use error::ApiError;

use crate::core::{Caller, Command, Core, Reply};
use crate::tasks::{Stage, Stop, Supervisor};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use routes::{Edge, Route};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};

/// Largest JSON request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Oversized bodies up to this size are read (and dropped) before the 413.
const DRAIN_LIMIT: u64 = 8 * 1024 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection closed for idleness may take to finish (an h2 peer
/// answers the GOAWAY's ping); then it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 receive window, per stream and per connection.
const H2_WINDOW: u32 = 2 << 20;
/// Longest error message. Messages quote what the client sent (a path, a
/// name, a JSON value), which can be as long as hyper lets a request be.
const MAX_MESSAGE: usize = 512;

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
    idle_timeout: Duration,
}

type RespBody = BoxBody<Bytes, Infallible>;
type Resp = Response<RespBody>;

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
    let mut body = e.body();
    bound_message(&mut body.error.message);
    let mut resp = json_response(status, &body);
    for (name, value) in e.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

fn bound_message(m: &mut String) {
    if m.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push_str("...");
    }
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
            idle_timeout: Duration::from_secs(cfg.idle_timeout_secs.max(1)),
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
        // The body travels apart from the head, so that whatever the route
        // leaves unread can be dealt with below.
        let (mut parts, body) = req.into_parts();
        // HEAD is GET without the body (RFC 9110 9.3.2); over HTTP/1.1 hyper
        // drops the body, over h2 we must.
        let head = parts.method == Method::HEAD;
        if head {
            parts.method = Method::GET;
        }
        let mut req = Request::from_parts(parts, ());
        let mut body = Some(body);
        let (template, mut resp) = match self.dispatch(peer, &mut req, &mut body).await {
            Ok(ok) => ok,
            Err((template, mut e)) => {
                if let ApiError::MethodNotAllowed { method, allow, .. } = &mut e {
                    // Every GET route takes HEAD too, here at the edge.
                    if head {
                        *method = "HEAD".into();
                    }
                    *allow = allow.replace("GET", "GET, HEAD");
                }
                (template, error_response(&e))
            }
        };
        if let Some(rest) = body {
            // An answer before the body was read (an early error, a body on
            // a route that takes none). Reading a small body first lets the
            // client see the answer: over h2 some clients (curl 7.88) report
            // the stream reset that follows an answer to an unfinished
            // request as an error. A body left unread ends an HTTP/1.1
            // connection, and the client is told so.
            if !self.discard(rest).await && req.version() < Version::HTTP_2 {
                resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
        }
        if head {
            let length = resp.body().size_hint().exact();
            let (mut parts, _) = resp.into_parts();
            if let Some(length) = length {
                parts.headers.entry(CONTENT_LENGTH).or_insert(HeaderValue::from(length));
            }
            resp = Response::from_parts(parts, http_body_util::Empty::new().boxed());
        }
        let status = resp.status().as_u16();
        self.core.metrics.observe_request(template, method, status, started.elapsed());
        tracing::debug!(REQUEST_ID = request_id, route = template, method, status, "request");
        // Also what tells our answers from hyper's own (conn::JsonHeadErrors).
        resp.headers_mut().insert("x-request-id", HeaderValue::from(request_id));
        Ok(resp)
    }

    /// Reads and drops what is left of a request body: at most [`MAX_BODY`]
    /// bytes within the header timeout. True when the body ended.
    async fn discard(&self, mut body: Incoming) -> bool {
        if body.is_end_stream() {
            return true;
        }
        if body.size_hint().lower() > MAX_BODY as u64 {
            return false;
        }
        let drain = async {
            let mut left = MAX_BODY;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return false };
                let n = frame.data_ref().map_or(0, |d| d.len());
                if n > left {
                    return false;
                }
                left -= n;
            }
            true
        };
        tokio::time::timeout(self.header_timeout, drain).await.unwrap_or(false)
    }

    /// Resolves the caller of a request that needs authentication. A client
    /// address whose failures exceed their budget is answered 429 instead
    /// of 401; a valid token always passes, so one client stuck with a
    /// revoked token cannot lock out others behind the same address.
    fn caller(&self, peer: Peer, req: &Request<()>) -> Result<Caller, ApiError> {
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

    /// Answers a request; `body` is taken by the routes that read it.
    async fn dispatch(
        &self,
        peer: Peer,
        req: &mut Request<()>,
        body: &mut Option<Incoming>,
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
                let caller = self.caller(peer, req).map_err(fail)?;
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
            Route::Edge(Edge::UploadImage(_)) | Route::Edge(Edge::UploadUpdate { .. }) => {
                let upload = stream::upload_body(req.headers(), body).map_err(fail)?;
                let (stream, length, checksum) = (upload.stream, upload.length, upload.checksum);
                let cmd = match matched.route {
                    Route::Edge(Edge::UploadImage(name)) => {
                        Command::UploadImage { name, checksum, length, body: stream }
                    }
                    Route::Edge(Edge::UploadUpdate { tries }) => {
                        Command::ApplyUpdate { checksum, length, tries, body: stream }
                    }
                    _ => unreachable!("matched above"),
                };
                return match exec(cmd).await {
                    Ok(reply) => Ok((template, self.render(reply))),
                    Err((template, e)) => match upload.rest.take() {
                        // Discarded like any early error's body.
                        stream::Rest::Unread(rest) => {
                            *body = Some(rest);
                            Err((template, e))
                        }
                        stream::Rest::Ended => Err((template, e)),
                        stream::Rest::Partial => {
                            let mut resp = error_response(&e);
                            if req.version() < Version::HTTP_2 {
                                resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                            }
                            Ok((template, resp))
                        }
                    },
                };
            }
            Route::Edge(Edge::Console(vm)) => {
                let accept = stream::websocket_key(req).map_err(fail)?;
                let on_upgrade = hyper::upgrade::on(&mut *req);
                return match exec(Command::Console(vm)).await? {
                    Reply::Console(session) => {
                        Ok((template, stream::websocket_console(on_upgrade, accept, session)))
                    }
                    other => Ok((template, self.render(other))),
                };
            }
            Route::Edge(Edge::Events) => {
                let after = last_event_id(req).map_err(fail)?;
                return Ok((template, self.render(exec(Command::Events { after }).await?)));
            }
            _ => {}
        }
        let json = if matched.needs_body() {
            read_json_body(req.headers(), body).await.map_err(fail)?
        } else {
            Bytes::new()
        };
        let cmd = matched.into_command(&json).map_err(fail)?;
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
            Reply::PeerInvitation(i) => json_response(StatusCode::CREATED, &i),
            Reply::Peer(v) => json_response(StatusCode::OK, &v),
            Reply::PeerHandshake(r) => json_response(StatusCode::OK, &r),
            Reply::PeerUnpaired(u) => json_response(StatusCode::OK, &u),
            Reply::Takeover(t) => json_response(StatusCode::OK, &t),
            Reply::VmMoved(m) => json_response(StatusCode::OK, &m),
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
fn last_event_id(req: &Request<()>) -> Result<u64, ApiError> {
    let parse = |name: &str, v: &str| {
        v.trim().parse().map_err(|_| ApiError::InvalidQuery {
            name: name.into(),
            message: "must be an event sequence number".into(),
        })
    };
    // Both are checked, so a bad `after` is refused even when the header wins.
    let from_query = req.uri().query().and_then(|q| q.split('&').find_map(|p| p.strip_prefix("after=")));
    let after = from_query.map(|v| parse("after", v)).transpose()?.unwrap_or(0);
    match req.headers().get("last-event-id") {
        Some(v) => parse("Last-Event-ID", v.to_str().unwrap_or("")),
        None => Ok(after),
    }
}

/// Reads a JSON body. A refused body, or the rest of one, stays in `body`
/// (see `Api::discard`).
async fn read_json_body(headers: &HeaderMap, body: &mut Option<Incoming>) -> Result<Bytes, ApiError> {
    let ct = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    if let Some(len) = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if len > MAX_BODY as u64 {
            // Read and drop a bounded amount first: a client still sending
            // when the answer comes often reports a broken pipe instead of
            // the 413. Anything bigger is cut off.
            if len <= DRAIN_LIMIT {
                if let Some(mut rest) = body.take() {
                    while let Some(Ok(_)) = rest.frame().await {}
                }
            }
            return Err(ApiError::TooLarge(MAX_BODY));
        }
    }
    let Some(mut incoming) = body.take() else { return Ok(Bytes::new()) };
    let mut json = Vec::new();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| ApiError::Body(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if json.len() + data.len() > MAX_BODY {
                *body = Some(incoming);
                return Err(ApiError::TooLarge(MAX_BODY));
            }
            json.extend_from_slice(data);
        }
    }
    Ok(Bytes::from(json))
}

/// The running listeners.
pub struct Server {
    pub tcp: Vec<SocketAddr>,
    pub socket: PathBuf,
}

/// Serves one connection until the client closes it or it stays idle (no
/// request in flight) for `api.idle_timeout_secs`. The protocol comes from
/// ALPN (h2 only when the client negotiated it), never from sniffing the
/// first bytes: a client that connects and sends nothing must still run
/// into the header timeout.
async fn serve_conn<IO>(api: Arc<Api>, peer: Peer, io: IO, h2: bool) -> Result<(), hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (header_timeout, idle_timeout) = (api.header_timeout, api.idle_timeout);
    let activity = conn::Activity::new();
    let requests = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let in_flight = requests.begin();
        let api = api.clone();
        async move {
            let resp = api.handle(peer, req).await?;
            Ok::<_, Infallible>(resp.map(|body| conn::Tracked { body, _in_flight: in_flight }))
        }
    });
    // Both connection types, run until idle, then shut down gracefully.
    macro_rules! until_idle {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => done,
                _ = activity.idle_for(idle_timeout) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                }
            }
        }};
    }
    if h2 {
        until_idle!(hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(128)
            // Uploads: the spec's 64 KiB window (where hyper's adaptive
            // window starts, and stays on a fast link) makes curl wait for a
            // WINDOW_UPDATE every few frames. One stream may run a full
            // window ahead of our reads; the connection's window bounds what
            // one client can make us buffer.
            .initial_stream_window_size(H2_WINDOW)
            .initial_connection_window_size(H2_WINDOW)
            .max_frame_size(256 * 1024)
            // Dead peers are detected by pings, idle ones by the idle timeout.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(io), svc))
    } else {
        until_idle!(hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(conn::JsonHeadErrors::new(io)), svc)
            .with_upgrades())
    }
}

/// Binds every listener and serves until the supervisor stops the API
/// stage. Each accept loop is a fatal task: it owns its bound listener, and
/// a daemon that no longer accepts is better restarted whole by systemd.
pub async fn serve(
    api: Arc<Api>,
    tls: Arc<rustls::ServerConfig>,
    listen: &[SocketAddr],
    socket: &Path,
    tasks: &Supervisor,
) -> Result<Server, ApiError> {
    let budget = conn::Budget::new(&api.core.cfg.api);
    let mut bound = Vec::new();
    for addr in listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Listen { addr: addr.to_string(), source })?;
        bound.push(l.local_addr().map_err(|source| ApiError::Listen { addr: addr.to_string(), source })?);
        let (api, tls, budget) = (api.clone(), tls.clone(), budget.clone());
        tasks.spawn_once(Stage::Api, "api.https", move |stop| accept_tcp(l, api, tls, budget, stop));
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
    let api = api.clone();
    tasks.spawn_once(Stage::Api, "api.socket", move |stop| accept_unix(ul, api, budget, stop));
    Ok(Server { tcp: bound, socket: socket.into() })
}

async fn accept_tcp(
    l: TcpListener,
    api: Arc<Api>,
    tls: Arc<rustls::ServerConfig>,
    budget: Arc<conn::Budget>,
    mut stop: Stop,
) -> std::result::Result<(), String> {
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
            _ = stop.wait() => return Ok(()),
        };
        let Some(slot) = budget.network(addr.ip()) else {
            api.core.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
    budget: Arc<conn::Budget>,
    mut stop: Stop,
) -> std::result::Result<(), String> {
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
            _ = stop.wait() => return Ok(()),
        };
        let Some(slot) = budget.local() else {
            api.core.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(cred) = stream.peer_cred() else { continue };
        let peer = Peer::Unix { uid: cred.uid() };
        let api = api.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = serve_conn(api, peer, stream, false).await;
        });
    }
}
