//! The connection between the two nodes' data planes: mutual TLS 1.3 with
//! the peer's pinned certificate (the same identity as the peer link), on
//! its own TCP connection, so disk traffic outlives the API daemon and
//! never queues behind the state stream. The dialer is the primary of
//! every disk on the connection: each node dials for the disks it owns
//! and accepts for the disks it holds replicas of.

use super::replica_side::{ConnId, Secondaries};
use super::replicate::Replicated;
use crate::cluster::disk_frame::{split, DiskMsg, DiskRef, RejectReason, DISK_WIRE_VERSION, MAX_DISK_FRAME};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

/// ALPN of the data-plane connection (never accepted by the peer link's
/// listener, nor the other way round).
pub const ALPN: &[u8] = b"novacron-disk/1";
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(100);
/// A disk whose Attach the peer refused (no record of it yet) tries again.
const REATTACH: Duration = Duration::from_secs(1);

/// What a node needs to reach and authenticate its peer's data plane.
#[derive(Clone)]
pub struct PeerTls {
    pub node_id: Uuid,
    pub peer_id: Uuid,
    pub addresses: Vec<SocketAddr>,
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
    /// Sync data limit, bytes/s (0: unpaced).
    pub sync_rate: u64,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<DiskMsg> {
    loop {
        match split(buf, MAX_DISK_FRAME) {
            Ok(Some((msg, used))) => {
                buf.drain(..used);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
        }
        let mut chunk = [0u8; 64 << 10];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes queued frames, flushing TLS whenever the queue is empty (a frame
/// must never sit in rustls's buffer waiting for the next one).
async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<DiskMsg>,
) -> std::io::Result<()> {
    while let Some(msg) = rx.recv().await {
        w.write_all(&msg.encode()).await?;
        while let Ok(msg) = rx.try_recv() {
            w.write_all(&msg.encode()).await?;
        }
        w.flush().await?;
    }
    Ok(())
}

/// Dials the peer for the primary disks `disks` forever (until `stop`).
pub async fn run_primary(
    tls: PeerTls,
    disks: Vec<Arc<Replicated>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if disks.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let why = tokio::select! {
            r = connect_and_serve(&tls, &disks) => r.err().map_or_else(|| "closed".to_string(), |e| e.to_string()),
            _ = stop.changed() => "stopping".to_string(),
        };
        for d in &disks {
            d.disconnected(&why);
        }
        if *stop.borrow() {
            return;
        }
        tracing::debug!(reason = %why, "data-plane connection to the peer down; redialing");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

async fn dial(tls: &PeerTls) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut last = std::io::Error::other("the peer has no address");
    for addr in &tls.addresses {
        let tcp = match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last = e;
                continue;
            }
            Err(_) => {
                last = std::io::ErrorKind::TimedOut.into();
                continue;
            }
        };
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        match tokio::time::timeout(
            DIAL_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls.client.clone()).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::ErrorKind::TimedOut.into(),
        }
    }
    Err(last)
}

async fn connect_and_serve(tls: &PeerTls, disks: &[Arc<Replicated>]) -> std::io::Result<()> {
    let stream = dial(tls).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    w.write_all(&DiskMsg::Hello { wire: DISK_WIRE_VERSION as u32, node_id: tls.node_id }.encode()).await?;
    w.flush().await?;
    let mut buf = Vec::new();
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut r, &mut buf)).await {
        Ok(Ok(DiskMsg::HelloOk { node_id })) if node_id == tls.peer_id => {}
        Ok(Ok(DiskMsg::Refused { reason })) => {
            return Err(std::io::Error::other(format!("refused: {reason}")))
        }
        Ok(Ok(other)) => {
            return Err(std::io::Error::other(format!("unexpected {} in the handshake", other.kind())))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    tracing::info!(peer = %tls.peer_id, "data-plane connection to the peer up");
    let (tx, rx) = mpsc::unbounded_channel();
    let by_ref: HashMap<DiskRef, Arc<Replicated>> =
        disks.iter().map(|d| (d.disk.clone(), d.clone())).collect();
    for d in disks {
        let _ = tx.send(d.connect(tx.clone(), tls.peer_id));
    }
    // Disks whose Attach the peer refused for now, and when to try again.
    let reattach: std::sync::Mutex<Vec<(Arc<Replicated>, tokio::time::Instant)>> = Default::default();
    let mut writing = tokio::spawn(writer(w, rx));
    let pump_kick = Arc::new(tokio::sync::Notify::new());
    let reading = async {
        loop {
            let msg = read_frame(&mut r, &mut buf).await?;
            match msg {
                DiskMsg::Attached { disk, state, generation } => {
                    let d = by_ref
                        .get(&disk)
                        .ok_or_else(|| std::io::Error::other("Attached for an unknown disk"))?;
                    let d2 = d.clone();
                    if tokio::task::spawn_blocking(move || d2.attached(state, generation))
                        .await
                        .map_err(std::io::Error::other)??
                    {
                        pump_kick.notify_one();
                    }
                }
                DiskMsg::Diverged { disk, ranges } => {
                    let d = by_ref
                        .get(&disk)
                        .ok_or_else(|| std::io::Error::other("Diverged for an unknown disk"))?;
                    d.diverged(&ranges);
                }
                DiskMsg::Ack { disk, seq, durable } => {
                    if let Some(d) = by_ref.get(&disk) {
                        // The state machine's lock only, held briefly: a
                        // waiting guest request is released without a
                        // thread hop. The end of a sync also changes the
                        // metadata (fdatasync): that part goes off the
                        // runtime.
                        let change = d.ack_state(seq, durable);
                        if !change.is_empty() {
                            let d = d.clone();
                            tokio::task::spawn_blocking(move || d.apply_meta(change))
                                .await
                                .map_err(std::io::Error::other)??;
                        }
                        pump_kick.notify_one();
                    }
                }
                // An Attach refused because the peer has no record of the
                // disk yet, or of its new size (it arrives by the peer
                // link): that disk waits; the others on this connection go
                // on (closing it would outdate all of them).
                DiskMsg::Rejected {
                    disk: Some(disk),
                    seq: None,
                    reason: RejectReason::UnknownDisk | RejectReason::OutOfRange,
                    message,
                } if by_ref.contains_key(&disk) => {
                    let d = by_ref[&disk].clone();
                    tracing::info!(disk = %d.name, reason = %message, "the peer holds no replica of this disk yet; attaching again shortly");
                    let d2 = d.clone();
                    tokio::task::spawn_blocking(move || d2.disconnected(&message))
                        .await
                        .map_err(std::io::Error::other)?;
                    reattach.lock().unwrap().push((d, tokio::time::Instant::now() + REATTACH));
                }
                DiskMsg::Rejected { disk, seq, reason, message } => {
                    let name = disk.map_or("-".into(), |d| format!("{}/{}", d.vm, d.device));
                    return Err(std::io::Error::other(format!(
                        "the peer rejected a frame of {name} (seq {seq:?}): {reason:?}: {message}"
                    )));
                }
                other => {
                    return Err(std::io::Error::other(format!("unexpected {} from the peer", other.kind())))
                }
            }
        }
    };
    // The sync of every disk that needs one, a window at a time.
    let pumping = async {
        let mut pacer = crate::cluster::disk_repl::Pacer::new(tls.sync_rate);
        loop {
            let mut sent_any = false;
            for d in disks {
                let d = d.clone();
                if let Some(n) =
                    tokio::task::spawn_blocking(move || d.pump()).await.map_err(std::io::Error::other)??
                {
                    sent_any |= n > 0;
                    let wait = pacer.sent(std::time::Instant::now(), n);
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            if !sent_any {
                tokio::select! {
                    _ = pump_kick.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    };
    let ticking = async {
        let mut t = tokio::time::interval(TICK);
        loop {
            t.tick().await;
            let now = tokio::time::Instant::now();
            let due: Vec<Arc<Replicated>> = {
                let mut r = reattach.lock().unwrap();
                let (due, later) = std::mem::take(&mut *r).into_iter().partition(|e| e.1 <= now);
                *r = later;
                due.into_iter().map(|e| e.0).collect()
            };
            for d in due {
                let _ = tx.send(d.connect(tx.clone(), tls.peer_id));
            }
            for d in disks {
                let d2 = d.clone();
                if let Some(fault) =
                    tokio::task::spawn_blocking(move || d2.tick()).await.map_err(std::io::Error::other)??
                {
                    return Err::<(), _>(std::io::Error::other(format!("{}: {fault:?}", d.name)));
                }
            }
        }
    };
    let result = tokio::select! {
        r = reading => r,
        r = pumping => r,
        r = ticking => r,
        r = &mut writing => r.map_err(std::io::Error::other)?,
    };
    writing.abort();
    result
}

/// Accepts the peer's data plane on `listeners` and applies its frames to the
/// replicas in `secondaries`.
pub async fn run_secondary(
    tls: PeerTls,
    listeners: Vec<tokio::net::TcpListener>,
    secondaries: Arc<Secondaries>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    for l in listeners {
        let tx = tx.clone();
        // Ends with the server, so the port is free for the next one.
        let mut stop_accept = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = stop_accept.changed() => return,
                };
                match accepted {
                    Ok((s, from)) => {
                        if tx.send((s, from)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "data-plane accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    loop {
        let (tcp, from) = tokio::select! {
            c = rx.recv() => match c { Some(c) => c, None => return Ok(()) },
            _ = stop.changed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tls, secondaries) = (acceptor.clone(), tls.clone(), secondaries.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(from = %from, error = %e, "data-plane TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            if let Err(e) = serve_secondary(stream, &tls, &secondaries).await {
                tracing::info!(from = %from, reason = %e, "data-plane connection from the peer closed");
            }
        });
    }
}

async fn serve_secondary<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    tls: &PeerTls,
    secondaries: &Arc<Secondaries>,
) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut buf = Vec::new();
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut r, &mut buf)).await {
        Ok(Ok(DiskMsg::Hello { wire, node_id }))
            if wire == DISK_WIRE_VERSION as u32 && node_id == tls.peer_id => {}
        Ok(Ok(DiskMsg::Hello { wire, node_id })) => {
            let reason = if wire != DISK_WIRE_VERSION as u32 {
                format!("disk wire version {wire} is not {DISK_WIRE_VERSION}")
            } else {
                format!("node {node_id} is not the paired node {}", tls.peer_id)
            };
            w.write_all(&DiskMsg::Refused { reason: reason.clone() }.encode()).await?;
            w.flush().await?;
            return Err(std::io::Error::other(reason));
        }
        Ok(Ok(other)) => return Err(std::io::Error::other(format!("{} before Hello", other.kind()))),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    w.write_all(&DiskMsg::HelloOk { node_id: tls.node_id }.encode()).await?;
    w.flush().await?;
    let (conn, close) = secondaries.connected();
    let result = serve_frames(r, w, buf, conn, close, secondaries, tls.peer_id).await;
    secondaries.disconnected(conn);
    result
}

async fn serve_frames<R, W>(
    mut r: R,
    w: W,
    mut buf: Vec<u8>,
    conn: ConnId,
    close: Arc<tokio::sync::Notify>,
    secondaries: &Arc<Secondaries>,
    peer_id: Uuid,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writing = tokio::spawn(writer(w, rx));
    // The replicas attached on this connection, for the log of its end.
    let mut attached: Vec<DiskRef> = Vec::new();
    let reading = async {
        loop {
            let msg = read_frame(&mut r, &mut buf).await?;
            // More frames already buffered: acknowledge once after them.
            let batch_end = !matches!(split(&buf, MAX_DISK_FRAME), Ok(Some(_)));
            let event = replica_event(&msg);
            let answers = if matches!(msg, DiskMsg::Data { .. }) {
                // A buffered write (no fdatasync outside a resync's undo
                // log): applied here, as two thread hops per frame cost a
                // sync-mode write more than the write itself.
                secondaries.handle(conn, msg, batch_end)
            } else {
                let s = secondaries.clone();
                tokio::task::spawn_blocking(move || s.handle(conn, msg, batch_end))
                    .await
                    .map_err(std::io::Error::other)?
            };
            if let Some((disk, what)) = event {
                let refused = answers.iter().any(|a| matches!(a, DiskMsg::Rejected { .. }));
                if !refused {
                    log_replica_event(&disk, peer_id, what);
                    if what == ReplicaEvent::Attached && !attached.contains(&disk) {
                        attached.push(disk);
                    }
                }
            }
            for a in answers {
                let _ = tx.send(a);
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    };
    let result = tokio::select! {
        r = reading => r,
        r = &mut writing => r.map_err(std::io::Error::other)?,
        _ = close.notified() => Err(std::io::Error::other("a newer connection of the peer took its disks over")),
    };
    writing.abort();
    for disk in &attached {
        let why = result.as_ref().err().map_or_else(|| "closed".to_string(), |e| e.to_string());
        tracing::warn!(
            VM_ID = %disk.vm, PEER_ID = %peer_id, DEVICE = %disk.device, reason = %why,
            "the replica's link to the primary is lost"
        );
    }
    result
}

/// What the journal records of a frame applied to a replica held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplicaEvent {
    Attached,
    SyncBegins { full: bool, bytes: u64 },
    SyncEnds,
}

fn replica_event(msg: &DiskMsg) -> Option<(DiskRef, ReplicaEvent)> {
    use crate::cluster::disk_frame::SyncKind;
    match msg {
        DiskMsg::Attach { disk, .. } => Some((disk.clone(), ReplicaEvent::Attached)),
        DiskMsg::SyncBegin { disk, kind, total_bytes } => Some((
            disk.clone(),
            ReplicaEvent::SyncBegins { full: *kind == SyncKind::Full, bytes: *total_bytes },
        )),
        DiskMsg::SyncEnd { disk, .. } => Some((disk.clone(), ReplicaEvent::SyncEnds)),
        _ => None,
    }
}

fn log_replica_event(disk: &DiskRef, peer: Uuid, what: ReplicaEvent) {
    let (vm, dev) = (disk.vm, &disk.device);
    match what {
        ReplicaEvent::Attached => {
            tracing::info!(VM_ID = %vm, PEER_ID = %peer, DEVICE = %dev, "the replica's link to the primary is up")
        }
        ReplicaEvent::SyncBegins { full: true, bytes } => tracing::info!(
            VM_ID = %vm, PEER_ID = %peer, DEVICE = %dev, SYNC = "full", BYTES = bytes,
            "full sync from the primary begins: the replica is inconsistent until it ends"
        ),
        ReplicaEvent::SyncBegins { full: false, bytes } => tracing::info!(
            VM_ID = %vm, PEER_ID = %peer, DEVICE = %dev, SYNC = "delta", BYTES = bytes,
            "resync (delta) from the primary begins"
        ),
        ReplicaEvent::SyncEnds => tracing::info!(
            VM_ID = %vm, PEER_ID = %peer, DEVICE = %dev,
            "sync from the primary done: the replica is up to date"
        ),
    }
}
