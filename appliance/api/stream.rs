//! The API's streaming edges: image upload bodies flowing into the core,
//! the serial console over a WebSocket, and the event feed as Server-Sent
//! Events.

use super::{ApiError, Resp};
use crate::core::events::Event;
use crate::core::{BodyStream, ConsoleSession, EventFeed};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, Role};

/// A response body fed from a channel (SSE).
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// An upload on its way into the core.
pub struct Upload {
    pub stream: BodyStream,
    pub length: Option<u64>,
    pub checksum: Option<String>,
    pub rest: BodyRest,
}

/// Tells what is left of the body once the core has answered.
pub struct BodyRest(Arc<UploadBody>);

/// The body until the core starts reading it, then whether it ended.
struct UploadBody {
    unread: Mutex<Option<Incoming>>,
    ended: AtomicBool,
}

/// What is left of an upload's body once the core has answered.
pub enum Rest {
    /// The core refused before reading any of it.
    Unread(Incoming),
    /// Read to its end.
    Ended,
    /// Read in part: not worth reading on.
    Partial,
}

impl BodyRest {
    pub fn take(&self) -> Rest {
        if let Some(body) = self.0.unread.lock().unwrap().take() {
            return Rest::Unread(body);
        }
        if self.0.ended.load(Ordering::Acquire) {
            Rest::Ended
        } else {
            Rest::Partial
        }
    }
}

/// Forwards an upload's body into a bounded channel for the core. The small
/// bound is what keeps memory flat: a slow disk slows the client down. The
/// body stays in `body` when the request is refused here.
pub fn upload_body(headers: &HeaderMap, body: &mut Option<Incoming>) -> Result<Upload, ApiError> {
    let ct = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/octet-stream") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let length = headers.get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    let checksum = match headers.get("x-checksum-sha256") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::InvalidBody("X-Checksum-Sha256 is not text".into()))?
                .to_string(),
        ),
        None => None,
    };
    let shared = Arc::new(UploadBody { unread: Mutex::new(body.take()), ended: AtomicBool::new(false) });
    let (tx, rx) = mpsc::channel(4);
    let go = Arc::new(tokio::sync::Notify::new());
    let (started, forwarder) = (go.clone(), shared.clone());
    tokio::spawn(async move {
        // Reads nothing when the core refuses the upload and drops its side
        // before asking for data; the body then stays for the API.
        tokio::select! {
            _ = started.notified() => {}
            _ = tx.closed() => return,
        }
        let Some(mut body) = forwarder.unread.lock().unwrap().take() else { return };
        // HTTP/2 delivers 16 KiB DATA frames: passing each on alone costs a
        // task wake-up here and a thread wake-up in the image writer per
        // frame, more than hashing it. Frames that are already waiting are
        // joined into one chunk of up to COALESCE; we never wait to fill it.
        let mut pending = Joined::default();
        loop {
            let frame = if pending.len == 0 {
                body.frame().await
            } else if pending.len >= COALESCE {
                None
            } else {
                body.frame().now_or_never().flatten()
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        pending.push(data); // (trailers are ignored)
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(format!("the connection broke: {e}"))).await;
                    return;
                }
                // Nothing more is ready now (or the body ended): pass on
                // what is joined, then wait again.
                None if pending.len > 0 => {
                    if tx.send(Ok(pending.take())).await.is_err() {
                        return;
                    }
                }
                None => break,
            }
        }
        forwarder.ended.store(true, Ordering::Release);
    });
    let chunks = Arc::new(tokio::sync::Mutex::new(rx));
    Ok(Upload { stream: BodyStream { chunks, go }, length, checksum, rest: BodyRest(shared) })
}

/// Upload chunks are joined up to this size (see the body forwarder).
const COALESCE: usize = 64 * 1024;

/// Body frames waiting to be passed on as one chunk; a single frame is
/// passed on as it is, without a copy.
#[derive(Default)]
struct Joined {
    parts: Vec<Bytes>,
    len: usize,
}

impl Joined {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.parts.push(data);
    }

    fn take(&mut self) -> Bytes {
        self.len = 0;
        if self.parts.len() == 1 {
            return self.parts.pop().expect("one part");
        }
        let mut out = bytes::BytesMut::with_capacity(self.parts.iter().map(Bytes::len).sum());
        for p in self.parts.drain(..) {
            out.extend_from_slice(&p);
        }
        out.freeze()
    }
}

/// Checks a WebSocket upgrade request; returns the accept key.
pub fn websocket_key(req: &Request<()>) -> Result<String, ApiError> {
    let h = req.headers();
    let is = |name, want: &str| {
        h.get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(want)))
    };
    if !is(UPGRADE, "websocket") || !is(CONNECTION, "upgrade") {
        return Err(ApiError::InvalidBody("the console is a WebSocket: send Upgrade: websocket".into()));
    }
    if h.get("sec-websocket-version").and_then(|v| v.to_str().ok()) != Some("13") {
        return Err(ApiError::InvalidBody("Sec-WebSocket-Version must be 13".into()));
    }
    let key = h
        .get("sec-websocket-key")
        .ok_or_else(|| ApiError::InvalidBody("Sec-WebSocket-Key is missing".into()))?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// Answers 101 and bridges the WebSocket and the console session: binary
/// or text messages from the client are typed into the console; console
/// output goes back as binary messages.
pub fn websocket_console(
    on_upgrade: hyper::upgrade::OnUpgrade,
    accept: String,
    session: ConsoleSession,
) -> Resp {
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "console upgrade failed");
                return;
            }
        };
        let ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                .await;
        let (mut sink, mut source) = ws.split();
        let ConsoleSession { mut output, input, ends } = session;
        let to_guest = async {
            while let Some(Ok(msg)) = source.next().await {
                let data = match msg {
                    Message::Binary(b) => b.to_vec(),
                    Message::Text(t) => t.as_bytes().to_vec(),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if input.send(data).await.is_err() {
                    break;
                }
            }
        };
        let to_client = async {
            while let Some(chunk) = output.recv().await {
                if sink.send(Message::Binary(chunk.into())).await.is_err() {
                    return;
                }
            }
            let _ = sink.send(Message::Close(None)).await;
        };
        // Either side ending ends the session, and so does revoking the
        // token it was opened with.
        let revoked = tokio::select! {
            _ = to_guest => false,
            _ = to_client => false,
            _ = ends.wait() => true,
        };
        if revoked {
            let close = CloseFrame { code: CloseCode::Policy, reason: "the token was revoked".into() };
            let _ = sink.send(Message::Close(Some(close))).await;
        }
    });
    let mut resp = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert("sec-websocket-accept", HeaderValue::from_str(&accept).expect("base64 is a valid header"));
    resp
}

fn sse_frame(ev: &Event) -> Bytes {
    let data = serde_json::to_string(ev).expect("events serialize");
    Bytes::from(format!("id: {}\nevent: {}\ndata: {data}\n\n", ev.seq, ev.kind))
}

/// Streams events as `text/event-stream`: the backlog first, then live
/// events, with a comment line every 15 s so proxies keep the stream open.
pub fn sse(feed: EventFeed) -> Resp {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let EventFeed { backlog, mut live, audit_detail, ends } = feed;
        let frame =
            |ev: &Event| if audit_detail { sse_frame(ev) } else { sse_frame(&ev.without_audit_detail()) };
        let ends = ends.wait();
        tokio::pin!(ends);
        let mut last = 0;
        for ev in &backlog {
            last = ev.seq;
            if tx.send(frame(ev)).await.is_err() {
                return;
            }
        }
        let mut ping = tokio::time::interval(Duration::from_secs(15));
        ping.tick().await;
        loop {
            tokio::select! {
                ev = live.recv() => match ev {
                    Ok(ev) if ev.seq <= last => continue,
                    Ok(ev) => {
                        last = ev.seq;
                        if tx.send(frame(&ev)).await.is_err() {
                            return;
                        }
                    }
                    // Too slow a reader: end the stream; it resumes from
                    // Last-Event-ID with the backlog.
                    Err(_) => return,
                },
                // The token was revoked: end the stream.
                _ = &mut ends => return,
                _ = ping.tick() => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut resp = Response::new(ChannelBody(rx).boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
