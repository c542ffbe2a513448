//! The tokio driver of the peer link: TCP + mutual TLS 1.3 against the
//! pinned peer certificate, frame I/O, timers. All decisions are the
//! [`Link`] state machine's; this file only carries out its outputs.
//!
//! Queues are bounded everywhere. Per connection the writer takes control
//! frames (handshake, heartbeats, acks; a full control queue means the peer
//! stopped reading, and the connection is closed) before data frames (a
//! full data queue makes [`DataSender::send`] wait: the sender stops
//! producing instead of buffering). Received data is handed over through a
//! bounded queue that the replication window keeps from filling; a peer
//! that overfills it is cut off, so the reader never stops reading
//! heartbeats.
//!
//! The bulk connection (image files) has the same queues, its own: its
//! data waits on its own TCP connection, never in front of a heartbeat.

use super::frame::{self, Message, HEADER};
use super::link::{ConnId, Input, Link, LinkConfig, LinkStatus, Output};
use super::{ClusterError, PeerTarget};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsStream;
use uuid::Uuid;

/// ALPN of the peer link: a client of another protocol (or of another
/// major version of this one) fails in the TLS handshake.
pub const ALPN: &[u8] = b"novacron-peer/1";

/// Control frames queued per connection (each a few dozen bytes).
const CONTROL_QUEUE: usize = 64;
/// Data frames queued per connection (each up to `MAX_BATCH_BYTES`).
const DATA_QUEUE: usize = 4;
/// Received data messages waiting for the replication layer.
pub const INCOMING_QUEUE: usize = 32;
/// Received bulk messages waiting for the image copy (its window keeps
/// an honest peer far below this).
pub const BULK_QUEUE: usize = 16;
/// TLS handshakes in progress on the listeners at once; more are dropped.
const HANDSHAKES: usize = 16;

/// This node on the link: its id and the API certificate and key, which are
/// its identity (the peer pinned that certificate's fingerprint).
pub struct LocalNode {
    pub node_id: Uuid,
    pub name: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub link: LinkConfig,
    /// Addresses the link listens on (the accepting side needs them; the
    /// dialing side listens too, and refuses, so either can be restarted
    /// with roles unchanged).
    pub listen: Vec<SocketAddr>,
    pub max_frame: usize,
}

impl Clone for LocalNode {
    fn clone(&self) -> LocalNode {
        LocalNode {
            node_id: self.node_id,
            name: self.name.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TransportConfig {
    pub fn from_config(cfg: &crate::config::ClusterConfig) -> TransportConfig {
        TransportConfig {
            link: LinkConfig {
                heartbeat: Duration::from_millis(cfg.heartbeat_ms),
                miss_limit: cfg.heartbeat_misses,
                ..LinkConfig::default()
            },
            listen: cfg.listen.clone(),
            max_frame: frame::MAX_FRAME,
        }
    }
}

/// The link's state as `GET /v1/peer` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransportStatus {
    #[serde(flatten)]
    pub link: LinkStatus,
    /// Connections to the listener refused in TLS (not the pinned peer,
    /// not TLS 1.3, not the link's protocol) since the start.
    pub refused_connections: u64,
    pub last_refusal: Option<String>,
}

/// What a link receives, by connection: the control connection's data
/// (state replication) and the bulk connection's (image copy).
pub struct Inbox {
    pub control: mpsc::Receiver<Message>,
    pub bulk: mpsc::Receiver<Message>,
}

/// Sends data on the connection the link is up on. Cloned by the
/// replication layer; fails with [`ClusterError::LinkDown`] once that
/// connection is gone (wait for the next [`PeerLink::data`] value).
#[derive(Clone)]
pub struct DataSender {
    pub conn: ConnId,
    data: mpsc::Sender<Vec<u8>>,
    control: mpsc::Sender<Vec<u8>>,
}

impl DataSender {
    /// Queues a data frame (changes, snapshot chunks), waiting while the
    /// connection's data queue is full.
    pub async fn send(&self, msg: &Message) -> Result<(), ClusterError> {
        self.data.send(msg.encode()).await.map_err(|_| ClusterError::LinkDown)
    }

    /// Queues a small frame (an ack) ahead of data. Acks are cumulative, so
    /// one that does not fit is dropped and the next one covers it.
    pub fn send_control(&self, msg: &Message) -> Result<(), ClusterError> {
        match self.control.try_send(msg.encode()) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ClusterError::LinkDown),
        }
    }
}

/// A running link to the peer.
pub struct PeerLink {
    status: watch::Receiver<(TransportStatus, Instant)>,
    up: watch::Receiver<Option<DataSender>>,
    bulk: watch::Receiver<Option<DataSender>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The addresses actually bound (a port 0 in the config is resolved).
    pub local_addrs: Vec<SocketAddr>,
}

impl PeerLink {
    /// Binds the listeners and starts the driver. Returns the link and the
    /// queues of data messages received from the peer.
    pub async fn start(
        local: LocalNode,
        peer: PeerTarget,
        cfg: TransportConfig,
        seed: u64,
    ) -> Result<(PeerLink, Inbox), ClusterError> {
        let tls = |e: rustls::Error| ClusterError::Tls(e.to_string());
        let server = crate::tls::mutual_server_config(
            &peer.fingerprint,
            local.chain.clone(),
            local.key.clone_key(),
            ALPN,
        )
        .map_err(tls)?;
        let client =
            crate::tls::mutual_client_config(&peer.fingerprint, local.chain, local.key, ALPN).map_err(tls)?;
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            listeners.push(TcpListener::bind(addr).await?);
        }
        let local_addrs = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let (events_tx, events) = mpsc::channel(64);
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
        let mut tasks = Vec::new();
        for listener in listeners {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tasks.push(tokio::spawn(accept_loop(
                listener,
                acceptor,
                cfg.link.handshake_timeout,
                handshakes.clone(),
                events_tx.clone(),
            )));
        }
        let now = Instant::now();
        let link = Link::new(cfg.link.clone(), local.node_id, &local.name, peer.clone(), seed, now);
        let initial = TransportStatus { link: link.status(now), refused_connections: 0, last_refusal: None };
        let (status_tx, status) = watch::channel((initial, now));
        let (up_tx, up) = watch::channel(None);
        let (bulk_tx, bulk) = watch::channel(None);
        let (incoming_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let (bulk_incoming_tx, bulk_incoming) = mpsc::channel(BULK_QUEUE);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let driver = Driver {
            link,
            peer_id: peer.node_id,
            connector: tokio_rustls::TlsConnector::from(client),
            cfg,
            conns: HashMap::new(),
            events_tx,
            status_tx,
            up_tx,
            bulk_tx,
            incoming_tx,
            bulk_incoming_tx,
            refused: 0,
            last_refusal: None,
            last_refusal_log: None,
            next_accepted: 1 << 40,
            pending: VecDeque::new(),
        };
        let task = tokio::spawn(driver.run(events, shutdown_rx, tasks));
        let link = PeerLink { status, up, bulk, shutdown: Some(shutdown_tx), task: Some(task), local_addrs };
        Ok((link, Inbox { control: incoming, bulk: bulk_incoming }))
    }

    /// The current status (heartbeat age as of now).
    pub fn status(&self) -> TransportStatus {
        status_now(&self.status)
    }

    /// A handle for the rest of the daemon (status, data out, data in),
    /// taking over the queues of received data `start` returned.
    pub fn handle(&self, peer_id: Uuid, inbox: Inbox) -> LinkHandle {
        LinkHandle {
            peer_id,
            status: self.status.clone(),
            up: self.up.clone(),
            bulk: self.bulk.clone(),
            incoming: Arc::new(tokio::sync::Mutex::new(inbox.control)),
            bulk_incoming: Arc::new(tokio::sync::Mutex::new(inbox.bulk)),
        }
    }

    /// Changes whenever the link comes up (`Some`, the sender for data on
    /// that connection) or goes down (`None`).
    pub fn data(&self) -> watch::Receiver<Option<DataSender>> {
        self.up.clone()
    }

    /// The same for the bulk connection.
    pub fn bulk(&self) -> watch::Receiver<Option<DataSender>> {
        self.bulk.clone()
    }

    /// Closes the connections (the peer sees the close at once rather than
    /// after missed heartbeats) and stops the listeners.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn status_now(rx: &watch::Receiver<(TransportStatus, Instant)>) -> TransportStatus {
    let (mut st, at) = rx.borrow().clone();
    let since = at.elapsed().as_millis() as u64;
    for age in [st.link.last_heartbeat_age_ms.as_mut(), st.link.bulk_down_ms.as_mut()].into_iter().flatten() {
        *age += since;
    }
    st
}

/// What the daemon hands the rest of the node for one running link (one
/// peer, from start to stop): cheap to clone. The replication driver uses
/// [`LinkHandle::data`] to send and [`LinkHandle::incoming`] to receive;
/// see docs/design/peer-link.md, "In the daemon".
#[derive(Clone)]
pub struct LinkHandle {
    /// The peer this link is pinned to.
    pub peer_id: Uuid,
    status: watch::Receiver<(TransportStatus, Instant)>,
    up: watch::Receiver<Option<DataSender>>,
    bulk: watch::Receiver<Option<DataSender>>,
    incoming: Arc<tokio::sync::Mutex<mpsc::Receiver<Message>>>,
    bulk_incoming: Arc<tokio::sync::Mutex<mpsc::Receiver<Message>>>,
}

impl LinkHandle {
    /// The current status (heartbeat age as of now).
    pub fn status(&self) -> TransportStatus {
        status_now(&self.status)
    }

    /// `Some(sender)` while the link is up (a new sender each time it comes
    /// up: one per connection), `None` while it is down.
    pub fn data(&self) -> watch::Receiver<Option<DataSender>> {
        self.up.clone()
    }

    /// The data messages received from the peer (changes, acks, snapshot
    /// chunks), in order, across reconnections. One consumer at a time:
    /// the guard is the queue, held for as long as the consumer runs.
    /// Ends (`recv` gives `None`) when the link stops.
    pub async fn incoming(&self) -> tokio::sync::OwnedMutexGuard<mpsc::Receiver<Message>> {
        self.incoming.clone().lock_owned().await
    }

    /// `Some(sender)` while the bulk connection is up (image files go
    /// there), `None` while it is down.
    pub fn bulk(&self) -> watch::Receiver<Option<DataSender>> {
        self.bulk.clone()
    }

    /// The messages received over the bulk connection, as [`Self::incoming`].
    pub async fn bulk_incoming(&self) -> tokio::sync::OwnedMutexGuard<mpsc::Receiver<Message>> {
        self.bulk_incoming.clone().lock_owned().await
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

enum Event {
    Dialed { conn: ConnId, result: Result<TlsStream<TcpStream>, String> },
    Incoming { stream: TlsStream<TcpStream>, remote: SocketAddr },
    Refused { remote: SocketAddr, error: String },
    Frame { conn: ConnId, msg: Message },
    Closed { conn: ConnId, error: String },
    BadFrame { conn: ConnId, error: String },
}

struct Conn {
    /// The peer's end of the TCP connection.
    remote: Option<SocketAddr>,
    control: mpsc::Sender<Vec<u8>>,
    data: mpsc::Sender<Vec<u8>>,
    close: Option<oneshot::Sender<()>>,
    reader: JoinHandle<()>,
}

struct Driver {
    link: Link,
    peer_id: Uuid,
    connector: tokio_rustls::TlsConnector,
    cfg: TransportConfig,
    conns: HashMap<ConnId, Conn>,
    events_tx: mpsc::Sender<Event>,
    status_tx: watch::Sender<(TransportStatus, Instant)>,
    up_tx: watch::Sender<Option<DataSender>>,
    bulk_tx: watch::Sender<Option<DataSender>>,
    incoming_tx: mpsc::Sender<Message>,
    bulk_incoming_tx: mpsc::Sender<Message>,
    refused: u64,
    last_refusal: Option<String>,
    last_refusal_log: Option<Instant>,
    /// Ids of accepted connections, far from the link's own dialed ids.
    next_accepted: ConnId,
    /// Inputs the driver itself produced while carrying out outputs.
    pending: VecDeque<Input>,
}

impl Driver {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut shutdown: oneshot::Receiver<()>,
        listeners: Vec<JoinHandle<()>>,
    ) {
        loop {
            let deadline =
                self.link.next_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = &mut shutdown => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.into()) => self.step(Input::Tick),
            }
            let now = Instant::now();
            let mut link = self.link.status(now);
            // The acceptor does not choose the address: it is where the
            // peer's connection came from.
            if link.address.is_none() {
                link.address = self.link.up_conn().and_then(|c| self.conns.get(&c)).and_then(|c| c.remote);
            }
            let status = TransportStatus {
                link,
                refused_connections: self.refused,
                last_refusal: self.last_refusal.clone(),
            };
            self.status_tx.send_replace((status, now));
        }
        for task in listeners {
            task.abort();
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in ids {
            self.close(conn);
        }
        // Give the writers a moment to send their close_notify.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    fn step(&mut self, input: Input) {
        self.pending.push_back(input);
        while let Some(input) = self.pending.pop_front() {
            for out in self.link.handle(Instant::now(), input) {
                self.output(out);
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Dialed { conn, result: Ok(stream) } => {
                self.attach(conn, stream);
                self.step(Input::Connected { conn });
            }
            Event::Dialed { conn, result: Err(error) } => self.step(Input::ConnectFailed { conn, error }),
            Event::Incoming { stream, remote } => {
                let conn = self.next_accepted;
                self.next_accepted += 1;
                tracing::debug!(PEER_ID = %self.peer_id, %remote, conn, "peer connection accepted");
                self.attach(conn, stream);
                self.step(Input::Accepted { conn });
            }
            Event::Refused { remote, error } => {
                self.refused += 1;
                let message = format!("{remote}: {error}");
                // A flood of bad connections logs once a second at most.
                if self.last_refusal_log.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                    self.last_refusal_log = Some(Instant::now());
                    tracing::warn!(PEER_ID = %self.peer_id, %remote, refused = self.refused, "refused a peer-link connection: {error}");
                }
                self.last_refusal = Some(message);
            }
            Event::Frame { conn, msg } => self.step(Input::Frame { conn, msg }),
            Event::Closed { conn, error } => {
                self.close(conn);
                self.step(Input::Closed { conn, error });
            }
            Event::BadFrame { conn, error } => {
                self.close(conn);
                self.step(Input::BadFrame { conn, error });
            }
        }
    }

    fn output(&mut self, out: Output) {
        match out {
            Output::Connect { conn, addr } => {
                let connector = self.connector.clone();
                let events = self.events_tx.clone();
                let limit = self.cfg.link.connect_timeout;
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(limit, dial(connector, addr)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no connection within {limit:?}")),
                    };
                    let _ = events.send(Event::Dialed { conn, result }).await;
                });
            }
            Output::Send { conn, msg } => {
                let Some(c) = self.conns.get(&conn) else { return };
                let sent = if is_data(&msg) {
                    c.data.try_send(msg.encode())
                } else {
                    c.control.try_send(msg.encode())
                };
                if sent.is_err() {
                    self.close(conn);
                    self.pending.push_back(Input::Closed {
                        conn,
                        error: "the peer does not read: queue full".into(),
                    });
                }
            }
            Output::Close { conn, reason } => {
                tracing::debug!(PEER_ID = %self.peer_id, conn, "closing a peer connection: {reason}");
                self.close(conn);
            }
            Output::Up { conn, addr, peer_name } => {
                let Some(sender) = self.sender(conn) else { return };
                let c = &self.conns[&conn];
                let address = addr.or(c.remote).map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(PEER_ID = %self.peer_id, PEER_NAME = %peer_name, LINK_STATE = "up", %address, "peer link up");
                self.up_tx.send_replace(Some(sender));
            }
            Output::Down { reason } => {
                tracing::warn!(PEER_ID = %self.peer_id, LINK_STATE = "down", %reason, "peer link down: {reason}");
                self.up_tx.send_replace(None);
            }
            Output::BulkUp { conn } => {
                let Some(sender) = self.sender(conn) else { return };
                tracing::debug!(PEER_ID = %self.peer_id, conn, "bulk connection up");
                self.bulk_tx.send_replace(Some(sender));
            }
            Output::BulkDown { reason } => {
                tracing::info!(PEER_ID = %self.peer_id, %reason, "bulk connection down: {reason}");
                self.bulk_tx.send_replace(None);
            }
            Output::DeliverBulk { msg } => {
                let full = deliver(&self.bulk_incoming_tx, msg);
                self.overfilled(full.then(|| self.link.bulk_conn()).flatten());
            }
            Output::Failed { reason } => {
                tracing::warn!(PEER_ID = %self.peer_id, "peer link handshake failed: {reason}");
            }
            Output::Deliver { msg } => {
                let full = deliver(&self.incoming_tx, msg);
                self.overfilled(full.then(|| self.link.up_conn()).flatten());
            }
        }
    }

    /// `conn`'s peer sent more than its window allows: cut it off.
    fn overfilled(&mut self, conn: Option<ConnId>) {
        if let Some(conn) = conn {
            self.close(conn);
            self.pending
                .push_back(Input::Closed { conn, error: "the peer sent more than its window".into() });
        }
    }

    fn sender(&self, conn: ConnId) -> Option<DataSender> {
        let c = self.conns.get(&conn)?;
        Some(DataSender { conn, data: c.data.clone(), control: c.control.clone() })
    }

    /// Starts the reader and writer of a new connection.
    fn attach(&mut self, conn: ConnId, stream: TlsStream<TcpStream>) {
        let remote = stream.get_ref().0.peer_addr().ok();
        let (rd, wr) = tokio::io::split(stream);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        let (close, close_rx) = oneshot::channel();
        let events = self.events_tx.clone();
        tokio::spawn(write_frames(conn, wr, control_rx, data_rx, close_rx, events.clone()));
        let reader = tokio::spawn(read_frames(conn, rd, self.cfg.max_frame, events));
        self.conns.insert(conn, Conn { remote, control, data, close: Some(close), reader });
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(mut c) = self.conns.remove(&conn) {
            c.reader.abort();
            if let Some(close) = c.close.take() {
                let _ = close.send(());
            }
        }
    }
}

/// Hands a received message on; true when the queue is full. Nobody
/// consuming (no replication running) drops it.
fn deliver(queue: &mpsc::Sender<Message>, msg: Message) -> bool {
    matches!(queue.try_send(msg), Err(mpsc::error::TrySendError::Full(_)))
}

/// Data frames go behind control frames.
fn is_data(msg: &Message) -> bool {
    matches!(msg, Message::Changes { .. } | Message::SnapshotChunk { .. } | Message::ImageData { .. })
}

async fn dial(
    connector: tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    // The name is not checked (the certificate is pinned); the address is
    // what there is.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    Ok(TlsStream::Client(tls))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limit: Duration,
    handshakes: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: pause instead of spinning.
                tracing::warn!("peer-link accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            let _ = events.send(Event::Refused { remote, error: "too many handshakes at once".into() }).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let ev = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Event::Incoming { stream: TlsStream::Server(tls), remote },
                Ok(Err(e)) => Event::Refused { remote, error: format!("TLS: {e}") },
                Err(_) => Event::Refused { remote, error: "no TLS handshake in time".into() },
            };
            drop(permit);
            let _ = events.send(ev).await;
        });
    }
}

async fn read_frames(
    conn: ConnId,
    mut rd: tokio::io::ReadHalf<TlsStream<TcpStream>>,
    limit: usize,
    events: mpsc::Sender<Event>,
) {
    let ended = loop {
        let mut header = [0u8; HEADER];
        if let Err(e) = rd.read_exact(&mut header).await {
            break Event::Closed { conn, error: read_error(e) };
        }
        // Checked before the body is allocated or read.
        let len = match frame::body_len(header, limit) {
            Ok(len) => len,
            Err(e) => break Event::BadFrame { conn, error: e.to_string() },
        };
        let mut body = vec![0; len];
        if let Err(e) = rd.read_exact(&mut body).await {
            break Event::Closed { conn, error: read_error(e) };
        }
        match Message::decode(&body) {
            Ok(msg) => {
                if events.send(Event::Frame { conn, msg }).await.is_err() {
                    return;
                }
            }
            Err(e) => break Event::BadFrame { conn, error: e.to_string() },
        }
    };
    let _ = events.send(ended).await;
}

fn read_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "closed by the peer".into()
    } else {
        e.to_string()
    }
}

async fn write_frames(
    conn: ConnId,
    mut wr: tokio::io::WriteHalf<TlsStream<TcpStream>>,
    mut control: mpsc::Receiver<Vec<u8>>,
    mut data: mpsc::Receiver<Vec<u8>>,
    mut close: oneshot::Receiver<()>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            Some(f) = control.recv() => f,
            _ = &mut close => break,
            Some(f) = data.recv() => f,
            else => break,
        };
        if let Err(e) = wr.write_all(&frame).await {
            let _ = events.send(Event::Closed { conn, error: e.to_string() }).await;
            return;
        }
        // write_all can end with TLS records still in rustls's buffer (the
        // socket was full for a moment); only a flush or the next write
        // sends them. A connection that goes quiet (the bulk one between
        // acks) would hold them forever.
        if control.is_empty() && data.is_empty() {
            if let Err(e) = wr.flush().await {
                let _ = events.send(Event::Closed { conn, error: e.to_string() }).await;
                return;
            }
        }
    }
    // Closing: what the link queued last (a Refused) goes out first, but a
    // peer that does not read gets only a moment.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(f) = control.try_recv() {
            if wr.write_all(&f).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    })
    .await;
}
