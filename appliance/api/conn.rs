//! Connections: how many the network and the local socket may hold, when an
//! idle one is closed, and a JSON body for the request heads hyper refuses
//! itself before a request reaches the router.

use super::ApiError;
use crate::config::ApiConfig;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Connection slots. The network shares `max_connections` with a cap per
/// client address; the local socket has a budget of its own, so no network
/// client can lock root out of the host.
pub struct Budget {
    network: Arc<Semaphore>,
    local: Arc<Semaphore>,
    per_address: usize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// A held slot; dropping it frees it.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    address: Option<(Arc<Budget>, IpAddr)>,
}

impl Budget {
    pub fn new(cfg: &ApiConfig) -> Arc<Budget> {
        Arc::new(Budget {
            network: Arc::new(Semaphore::new(cfg.max_connections)),
            local: Arc::new(Semaphore::new(cfg.local_connections)),
            per_address: cfg.max_connections_per_address,
            by_address: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a network client, or None when its address or the network
    /// as a whole has no slot left.
    pub fn network(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let key = client_key(ip);
        let mut by_address = self.by_address.lock().unwrap();
        let held = by_address.get(&key).copied().unwrap_or(0);
        if held >= self.per_address {
            return None;
        }
        let permit = self.network.clone().try_acquire_owned().ok()?;
        by_address.insert(key, held + 1);
        Some(Slot { _permit: permit, address: Some((self.clone(), key)) })
    }

    pub fn local(&self) -> Option<Slot> {
        let permit = self.local.clone().try_acquire_owned().ok()?;
        Some(Slot { _permit: permit, address: None })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((budget, key)) = &self.address {
            let mut by_address = budget.by_address.lock().unwrap();
            if let Some(n) = by_address.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    by_address.remove(key);
                }
            }
        }
    }
}

/// One client is one IPv4 address or one IPv6 /64 (what a single host or
/// site is usually given; it can pick any address inside it).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// Requests in flight on one connection, to tell when it went idle.
#[derive(Clone)]
pub struct Activity(Arc<watch::Sender<usize>>);

/// One request in flight, from the moment hyper hands it over until its
/// response body is sent or dropped.
pub struct InFlight(Arc<watch::Sender<usize>>);

impl Activity {
    pub fn new() -> Activity {
        Activity(Arc::new(watch::channel(0).0))
    }

    pub fn begin(&self) -> InFlight {
        self.0.send_modify(|n| *n += 1);
        InFlight(self.0.clone())
    }

    /// Returns once no request was in flight for `timeout` in a row.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            // Cannot fail: `self` holds the sender.
            let _ = rx.wait_for(|n| *n == 0).await;
            if tokio::time::timeout(timeout, rx.changed()).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its request counted as in flight until it is
/// sent or dropped. (It forwards the size hint, so Content-Length stays;
/// `BodyExt::map_frame` would turn every answer into a chunked one.)
pub struct Tracked {
    pub body: super::RespBody,
    pub _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Gives hyper's own HTTP/1.1 error answers (a request head it cannot parse:
/// a malformed `Content-Length`, request line or header; a target or head
/// too large) the JSON body every other error has. hyper writes those heads
/// itself, without a body, and then close the connection; there is no hook
/// for them, so they are recognised on the way out: every answer of ours
/// carries `x-request-id`, theirs never do.
pub struct JsonHeadErrors<IO> {
    io: IO,
    /// The replacement answer and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<IO> JsonHeadErrors<IO> {
    pub fn new(io: IO) -> Self {
        JsonHeadErrors { io, pending: None }
    }
}

/// Our JSON answer in place of hyper's bare one, if `head` is one of those.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    // (hyper's 414 and 431 for a target or head beyond its limits stay bare.)
    if !head.starts_with(b"HTTP/1.1 400 ") {
        return None;
    }
    let error = ApiError::MalformedHead;
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    if head[..end].to_ascii_lowercase().windows(15).any(|w| w == b"\r\nx-request-id:") {
        return None;
    }
    let status = error.status();
    let body = serde_json::to_vec(&error.body()).expect("errors serialize");
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl<IO: AsyncWrite + Unpin> JsonHeadErrors<IO> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((buf, done)) = &mut self.pending {
            if *done == buf.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &buf[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `head` over if it is one of hyper's bare error answers.
    fn take_over(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let out = replacement(head)?;
        self.pending = Some((out, 0));
        // Anything not written now goes out on the flush hyper does next.
        if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
            return Some(Poll::Ready(Err(e)));
        }
        Some(Poll::Ready(Ok(head.len())))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for JsonHeadErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for JsonHeadErrors<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        ready!(me.poll_pending(cx))?;
        if let Some(done) = me.take_over(cx, buf) {
            return done;
        }
        Pin::new(&mut me.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        ready!(me.poll_pending(cx))?;
        // hyper's error answer is a head alone, in one buffer.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some(done) = me.take_over(cx, first) {
                return done;
            }
        }
        Pin::new(&mut me.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_answers_are_replaced() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(replacement(hyper_400).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"), "{out}");
        assert!(out.ends_with(r#""code":"malformed_request","message":"the request head is malformed: its request line or a header (such as Content-Length) cannot be parsed"}}"#), "{out}");
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: 7\r\n\r\n{}";
        assert!(replacement(ours).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
    }

    #[test]
    fn clients_are_addresses_or_v6_prefixes() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn per_address_slots_come_back() {
        let cfg = ApiConfig { max_connections: 3, max_connections_per_address: 2, ..ApiConfig::default() };
        let b = Budget::new(&cfg);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = b.network(x).unwrap();
        let _s2 = b.network(x).unwrap();
        assert!(b.network(x).is_none(), "a third slot for one address");
        let _s3 = b.network(y).unwrap();
        assert!(b.network(y).is_none(), "over the network budget");
        drop(s1);
        assert!(b.network(x).is_some());
        assert!(b.local().is_some(), "the local budget is apart");
    }
}
