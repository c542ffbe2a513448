//! The peer link as a state machine without I/O (the shape of quinn-proto's
//! `Connection` and raft's `Step`/`Ready`): the driver feeds it [`Input`]s
//! with the current time and carries out the [`Output`]s it returns; it
//! asks [`Link::next_timeout`] when to call again with [`Input::Tick`].
//! Nothing here sleeps or touches a socket, so tests step it with a fake
//! clock and simulate whole networks in one thread.
//!
//! Roles: of the two nodes, the one with the smaller node id dials and the
//! other accepts, so there is exactly one control connection and no race
//! between two of them.
//!
//! ```text
//!  dialer:   idle -> connecting(addr i) -> handshaking -> up
//!                      | fail: addr i+1      | refused/timeout   | missed heartbeats,
//!                      v  (all tried)        v                   v closed
//!                    backoff (exponential, jittered) ------> connecting(preferred)
//!  acceptor: idle -> handshaking (on an accepted connection) -> up -> idle
//! ```
//!
//! While the control connection is up, the dialer also opens a bulk
//! connection to the same address ([`Channel::Bulk`]): image files (and
//! disk data later) go there, on their own TCP connection with its own
//! queues, so a long transfer never waits in front of a heartbeat. The bulk
//! connection lives inside the control one: it is closed when the control
//! link goes down and redialed (with its own backoff) while it stays up.
//! Liveness is the control connection's heartbeats alone.
//!
//! An accepted connection says which it is in its `Hello`; until then it
//! is pending and touches neither the link nor the bulk connection, so a
//! connection that never says hello cannot take the link down.

use super::frame::{Channel, Message};
use super::{PeerTarget, SeededRng};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A transport connection, numbered by whoever opened it (the link for
/// dialed ones, the driver for accepted ones: the two never mix, a node
/// only dials or only accepts). Inputs of any other connection than the
/// current one are stale and ignored.
pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Interval between heartbeats, both ways.
    pub heartbeat: Duration,
    /// The link is down after this many heartbeat intervals without a
    /// frame from the peer.
    pub miss_limit: u32,
    /// TCP connect plus TLS handshake to one address.
    pub connect_timeout: Duration,
    /// From connected to `HelloOk`.
    pub handshake_timeout: Duration,
    /// First reconnect delay; doubles per failed round up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The protocol this node speaks ([`super::frame::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// Open the bulk connection beside the control one (dialer).
    pub bulk: bool,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            heartbeat: Duration::from_millis(500),
            miss_limit: 4,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            protocol_version: super::frame::PROTOCOL_VERSION,
            bulk: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    /// The smaller node id dials.
    pub fn of(me: Uuid, peer: Uuid) -> Role {
        if me < peer {
            Role::Dialer
        } else {
            Role::Acceptor
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A dialed connection is established (TCP and TLS, the peer's
    /// certificate matched the pin).
    Connected {
        conn: ConnId,
    },
    ConnectFailed {
        conn: ConnId,
        error: String,
    },
    /// An authenticated connection came in (acceptor).
    Accepted {
        conn: ConnId,
    },
    Frame {
        conn: ConnId,
        msg: Message,
    },
    /// The connection ended: closed or reset (`error` says which).
    Closed {
        conn: ConnId,
        error: String,
    },
    /// The peer sent something that is not a frame of this protocol (too
    /// large, undecodable, another wire version); the driver stopped
    /// reading the connection.
    BadFrame {
        conn: ConnId,
        error: String,
    },
    /// Time passed; see [`Link::next_timeout`].
    Tick,
}

impl Input {
    /// The connection an input is about (none for `Accepted`, a new one).
    fn conn(&self) -> Option<ConnId> {
        match self {
            Input::Connected { conn }
            | Input::ConnectFailed { conn, .. }
            | Input::Frame { conn, .. }
            | Input::Closed { conn, .. }
            | Input::BadFrame { conn, .. } => Some(*conn),
            Input::Accepted { .. } | Input::Tick => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Dial `addr`; report back as `Connected`/`ConnectFailed` for `conn`.
    Connect {
        conn: ConnId,
        addr: SocketAddr,
    },
    Send {
        conn: ConnId,
        msg: Message,
    },
    /// Close the connection (after sending what is queued on it).
    Close {
        conn: ConnId,
        reason: String,
    },
    /// The link is up on `conn` (at `addr` when this node dialed).
    Up {
        conn: ConnId,
        addr: Option<SocketAddr>,
        peer_name: String,
    },
    Down {
        reason: String,
    },
    /// A handshake did not succeed: refused by either side, or timed out.
    Failed {
        reason: String,
    },
    /// A data message (changes, acks, snapshots) for the replication layer.
    Deliver {
        msg: Message,
    },
    /// The bulk connection is up on `conn` (its data goes there).
    BulkUp {
        conn: ConnId,
    },
    BulkDown {
        reason: String,
    },
    /// A message that came over the bulk connection (image copy).
    DeliverBulk {
        msg: Message,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Idle,
    Connecting,
    Handshaking,
    Up,
    Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting { conn: ConnId, addr: usize, deadline: Instant },
    Handshaking { conn: ConnId, addr: Option<usize>, deadline: Instant },
    Up { conn: ConnId, addr: Option<usize> },
    Backoff { until: Instant },
}

/// The bulk connection. The acceptor's is `Off` or `Up` (its handshake is
/// a pending connection's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Off,
    Connecting { conn: ConnId, deadline: Instant },
    Handshaking { conn: ConnId, deadline: Instant },
    Up { conn: ConnId },
    Backoff { until: Instant },
}

/// Accepted connections waiting for their `Hello`, at most this many (the
/// oldest is dropped).
const PENDING: usize = 4;

/// A snapshot of the link for `GET /v1/peer`, health and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkStatus {
    pub state: LinkState,
    pub role: Role,
    /// The peer address in use (dialer only).
    pub address: Option<SocketAddr>,
    /// Smoothed round-trip time of heartbeats (as TCP's SRTT, gain 1/8).
    pub rtt_ms: Option<f64>,
    /// Since the last heartbeat or heartbeat ack from the peer.
    pub last_heartbeat_age_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Times the link came up and went down since the daemon started.
    pub ups: u64,
    pub downs: u64,
    /// Handshakes that failed since the daemon started: refused by either
    /// side (another protocol, another node, a connection that said
    /// something else than hello) or timed out.
    pub handshake_failures: u64,
    /// The bulk connection's state (`idle` while the control link is down).
    pub bulk: LinkState,
    pub bulk_error: Option<String>,
    /// How long the bulk connection has not been up while the link is
    /// (None while both are up, or the link is down).
    pub bulk_down_ms: Option<u64>,
}

pub struct Link {
    cfg: LinkConfig,
    role: Role,
    node_id: Uuid,
    name: String,
    peer: PeerTarget,
    rng: SeededRng,
    state: State,
    /// Clock origin of heartbeat `sent_at` values.
    base: Instant,
    next_conn: ConnId,
    /// Failed connection rounds since the link was last up.
    attempt: u32,
    /// The address the link last came up on: tried first.
    preferred: usize,
    /// Addresses tried in this round.
    tried: usize,
    hb_seq: u64,
    next_heartbeat: Instant,
    last_heard: Instant,
    last_heartbeat: Option<Instant>,
    srtt: Option<Duration>,
    last_error: Option<String>,
    ups: u64,
    downs: u64,
    handshake_failures: u64,
    bulk: Bulk,
    /// Failed bulk attempts since it was last up.
    bulk_attempt: u32,
    bulk_error: Option<String>,
    /// Since when the bulk connection is not up (set when the link comes up
    /// and when the bulk connection fails, cleared when it is up).
    bulk_down_since: Option<Instant>,
    /// Accepted connections before their `Hello`, with their deadlines.
    pending: Vec<(ConnId, Instant)>,
}

impl Link {
    /// `seed` drives the backoff jitter (the driver passes OS randomness,
    /// tests a fixed value).
    pub fn new(
        cfg: LinkConfig,
        node_id: Uuid,
        name: &str,
        peer: PeerTarget,
        seed: u64,
        now: Instant,
    ) -> Link {
        let role = Role::of(node_id, peer.node_id);
        // A dialer starts at once: its first timeout is now.
        let state = match role {
            Role::Dialer => State::Backoff { until: now },
            Role::Acceptor => State::Idle,
        };
        Link {
            cfg,
            role,
            node_id,
            name: name.to_string(),
            peer,
            rng: SeededRng::new(seed),
            state,
            base: now,
            next_conn: 1,
            attempt: 0,
            preferred: 0,
            tried: 0,
            hb_seq: 0,
            next_heartbeat: now,
            last_heard: now,
            last_heartbeat: None,
            srtt: None,
            last_error: None,
            ups: 0,
            downs: 0,
            handshake_failures: 0,
            bulk: Bulk::Off,
            bulk_attempt: 0,
            bulk_error: None,
            bulk_down_since: None,
            pending: Vec::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The connection the link is up on: data goes there, nowhere else.
    pub fn up_conn(&self) -> Option<ConnId> {
        match self.state {
            State::Up { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// The bulk connection while it is up.
    pub fn bulk_conn(&self) -> Option<ConnId> {
        match self.bulk {
            Bulk::Up { conn } => Some(conn),
            _ => None,
        }
    }

    pub fn state(&self) -> LinkState {
        match self.state {
            // An acceptor with a connection that has not said hello yet.
            State::Idle if !self.pending.is_empty() => LinkState::Handshaking,
            State::Idle => LinkState::Idle,
            State::Connecting { .. } => LinkState::Connecting,
            State::Handshaking { .. } => LinkState::Handshaking,
            State::Up { .. } => LinkState::Up,
            State::Backoff { .. } => LinkState::Backoff,
        }
    }

    pub fn status(&self, now: Instant) -> LinkStatus {
        let addr = match self.state {
            State::Connecting { addr, .. } => Some(addr),
            State::Handshaking { addr, .. } | State::Up { addr, .. } => addr,
            _ => None,
        };
        LinkStatus {
            state: self.state(),
            role: self.role,
            address: addr.and_then(|i| self.peer.addresses.get(i).copied()),
            rtt_ms: self.srtt.map(|d| d.as_secs_f64() * 1000.0),
            last_heartbeat_age_ms: self
                .last_heartbeat
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            last_error: self.last_error.clone(),
            ups: self.ups,
            downs: self.downs,
            handshake_failures: self.handshake_failures,
            bulk: match self.bulk {
                Bulk::Off => LinkState::Idle,
                Bulk::Connecting { .. } => LinkState::Connecting,
                Bulk::Handshaking { .. } => LinkState::Handshaking,
                Bulk::Up { .. } => LinkState::Up,
                Bulk::Backoff { .. } => LinkState::Backoff,
            },
            bulk_error: self.bulk_error.clone(),
            bulk_down_ms: self
                .bulk_down_since
                .filter(|_| self.up_conn().is_some() && self.bulk_conn().is_none())
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
        }
    }

    /// When to call again with [`Input::Tick`] at the latest.
    pub fn next_timeout(&self) -> Option<Instant> {
        let control = match self.state {
            State::Idle => None,
            State::Connecting { deadline, .. } | State::Handshaking { deadline, .. } => Some(deadline),
            State::Up { .. } => Some(self.next_heartbeat.min(self.dead_at())),
            State::Backoff { until } => Some(until),
        };
        let bulk = match self.bulk {
            Bulk::Connecting { deadline, .. } | Bulk::Handshaking { deadline, .. } => Some(deadline),
            Bulk::Backoff { until } => Some(until),
            Bulk::Off | Bulk::Up { .. } => None,
        };
        let pending = self.pending.iter().map(|p| p.1).min();
        [control, bulk, pending].into_iter().flatten().min()
    }

    fn dead_at(&self) -> Instant {
        self.last_heard + self.cfg.heartbeat * self.cfg.miss_limit
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(conn) = input.conn() {
            if self.bulk_id() == Some(conn) {
                self.bulk_input(now, input, &mut out);
                return out;
            }
            if let Some(i) = self.pending.iter().position(|p| p.0 == conn) {
                self.pending.remove(i);
                self.pending_input(now, input, &mut out);
                return out;
            }
        }
        match input {
            Input::Tick => {
                self.tick(now, &mut out);
                self.tick_pending(now, &mut out);
                self.tick_bulk(now, &mut out);
            }
            Input::Connected { conn } => match self.state {
                State::Connecting { conn: c, addr, .. } if c == conn => {
                    out.push(Output::Send { conn, msg: self.hello(Channel::Control) });
                    self.state = State::Handshaking {
                        conn,
                        addr: Some(addr),
                        deadline: now + self.cfg.handshake_timeout,
                    };
                }
                // Established after its attempt timed out: not wanted any more.
                _ => out.push(Output::Close { conn, reason: "connected too late".into() }),
            },
            Input::ConnectFailed { conn, error } => {
                if let State::Connecting { conn: c, addr, .. } = self.state {
                    if c == conn {
                        self.last_error = Some(format!("{}: {error}", self.peer.addresses[addr]));
                        self.next_address(now, &mut out);
                    }
                }
            }
            Input::Accepted { conn } => self.accepted(now, conn, &mut out),
            Input::Frame { conn, msg } => {
                if self.current() == Some(conn) {
                    self.frame(now, conn, msg, &mut out);
                }
            }
            Input::Closed { conn, error } => {
                if self.current() == Some(conn) {
                    // Closed in the handshake is how a TLS 1.3 client learns
                    // that the server refused its certificate.
                    let failed = matches!(self.state, State::Handshaking { .. });
                    let reason = if failed {
                        format!("closed by the peer in the handshake ({error}): does it have this node's certificate pinned?")
                    } else {
                        format!("connection lost: {error}")
                    };
                    self.lost(now, conn, reason, failed, &mut out);
                }
            }
            Input::BadFrame { conn, error } => {
                if self.current() == Some(conn) {
                    let failed = matches!(self.state, State::Handshaking { .. });
                    self.lost(now, conn, format!("the peer sent a bad frame: {error}"), failed, &mut out);
                }
            }
        }
        out
    }

    fn current(&self) -> Option<ConnId> {
        match self.state {
            State::Connecting { conn, .. } | State::Handshaking { conn, .. } | State::Up { conn, .. } => {
                Some(conn)
            }
            State::Idle | State::Backoff { .. } => None,
        }
    }

    fn hello(&self, channel: Channel) -> Message {
        Message::Hello {
            protocol_version: self.cfg.protocol_version,
            node_id: self.node_id,
            name: self.name.clone(),
            channel,
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.state {
            State::Idle => {}
            State::Backoff { until } if now >= until => {
                self.tried = 0;
                self.connect(now, self.preferred, out);
            }
            State::Backoff { .. } => {}
            State::Connecting { conn, addr, deadline } if now >= deadline => {
                let error = format!(
                    "{}: no connection within {:?}",
                    self.peer.addresses[addr], self.cfg.connect_timeout
                );
                out.push(Output::Close { conn, reason: error.clone() });
                self.last_error = Some(error);
                self.next_address(now, out);
            }
            State::Connecting { .. } => {}
            State::Handshaking { conn, addr, deadline } if now >= deadline => {
                self.lost(now, conn, "no handshake answer in time".into(), true, out);
                // A path that connects but carries nothing: try the next one.
                if let (Some(addr), true) = (addr, self.tried < self.peer.addresses.len()) {
                    self.connect(now, addr + 1, out);
                }
            }
            State::Handshaking { .. } => {}
            State::Up { conn, .. } => {
                if now >= self.dead_at() {
                    let silent = now.saturating_duration_since(self.last_heard);
                    let path = match self.state {
                        State::Up { addr, .. } => addr,
                        _ => None,
                    };
                    self.lost(
                        now,
                        conn,
                        format!("nothing heard from the peer for {} ms", silent.as_millis()),
                        false,
                        out,
                    );
                    // The path went silent (a cable, a NIC; a peer that
                    // closes or resets is reachable, so that backs off): the
                    // redundant address at once, so the link is back within
                    // a connect of noticing.
                    if let (Some(a), true) = (path, self.peer.addresses.len() > 1) {
                        // Still the first round since the link was up.
                        (self.tried, self.attempt) = (1, 0);
                        self.connect(now, a + 1, out);
                    }
                    return;
                }
                if now >= self.next_heartbeat {
                    self.hb_seq += 1;
                    let sent_at = now.saturating_duration_since(self.base).as_micros() as u64;
                    out.push(Output::Send { conn, msg: Message::Heartbeat { seq: self.hb_seq, sent_at } });
                    // From now, not from the missed deadline: a stalled
                    // driver sends one heartbeat, not a burst.
                    self.next_heartbeat = now + self.cfg.heartbeat;
                }
            }
        }
    }

    fn connect(&mut self, now: Instant, addr: usize, out: &mut Vec<Output>) {
        if self.peer.addresses.is_empty() {
            self.last_error = Some("the peer has no address".into());
            self.state = State::Idle;
            return;
        }
        let addr = addr % self.peer.addresses.len();
        let conn = self.next_conn;
        self.next_conn += 1;
        self.tried += 1;
        self.state = State::Connecting { conn, addr, deadline: now + self.cfg.connect_timeout };
        out.push(Output::Connect { conn, addr: self.peer.addresses[addr] });
    }

    /// After a failed connection attempt: the next (redundant) address, or
    /// a backoff once every address was tried in this round.
    fn next_address(&mut self, now: Instant, out: &mut Vec<Output>) {
        let State::Connecting { addr, .. } = self.state else { return };
        if self.tried < self.peer.addresses.len() {
            self.connect(now, addr + 1, out);
        } else {
            self.backoff(now);
        }
    }

    fn backoff(&mut self, now: Instant) {
        let delay = self.jitter(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.state = State::Backoff { until: now + delay };
    }

    /// The delay after `attempt` failed rounds: exponential, capped, with
    /// "equal jitter" (half fixed, half random), so two nodes that failed
    /// together do not retry in lockstep, and the delay still grows.
    fn jitter(&mut self, attempt: u32) -> Duration {
        let exp = self.cfg.backoff_min.saturating_mul(1 << attempt.min(20));
        let max = exp.min(self.cfg.backoff_max).as_millis() as u64;
        Duration::from_millis(max / 2 + self.rng.below(max / 2 + 1))
    }

    fn accepted(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Output>) {
        if self.role != Role::Acceptor {
            out.push(Output::Close { conn, reason: "this node dials the peer; it does not accept".into() });
            return;
        }
        if self.pending.len() >= PENDING {
            let (old, _) = self.pending.remove(0);
            out.push(Output::Close {
                conn: old,
                reason: "too many connections waiting for their hello".into(),
            });
        }
        self.pending.push((conn, now + self.cfg.handshake_timeout));
    }

    /// An input on an accepted connection that has not said hello yet (it
    /// was taken off `pending`): its `Hello` makes it the control or the
    /// bulk connection; anything else ends it without touching either.
    fn pending_input(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Frame { conn, msg: Message::Hello { protocol_version, node_id, name, channel } } => {
                if let Err(reason) = self.check_peer(protocol_version, node_id) {
                    return self.refuse_pending(conn, reason, out);
                }
                let ok = Message::HelloOk {
                    protocol_version: self.cfg.protocol_version,
                    node_id: self.node_id,
                    name: self.name.clone(),
                };
                match channel {
                    Channel::Control => {
                        // A new connection from the pinned peer supersedes the
                        // old one (the peer restarted before this side noticed
                        // the old one was dead).
                        if let Some(old) = self.current() {
                            self.lost(now, old, "replaced by a new connection from the peer".into(), false, out);
                        }
                        out.push(Output::Send { conn, msg: ok });
                        self.up(now, conn, None, name, out);
                    }
                    Channel::Bulk if self.up_conn().is_none() => {
                        self.refuse_pending(conn, "no control link is up for this bulk connection".into(), out)
                    }
                    Channel::Bulk => {
                        self.drop_bulk("replaced by a new bulk connection from the peer", out);
                        out.push(Output::Send { conn, msg: ok });
                        self.bulk = Bulk::Up { conn };
                        self.bulk_error = None;
                        self.bulk_down_since = None;
                        out.push(Output::BulkUp { conn });
                    }
                }
            }
            Input::Frame { conn, msg } => {
                self.refuse_pending(conn, format!("unexpected {} during the handshake", msg.kind()), out)
            }
            Input::Closed { conn, error } => self.pending_failed(
                conn,
                format!("closed by the peer in the handshake ({error}): does it have this node's certificate pinned?"),
                out,
            ),
            Input::BadFrame { conn, error } => {
                self.pending_failed(conn, format!("the peer sent a bad frame: {error}"), out)
            }
            // Dialing results are never for an accepted connection.
            _ => {}
        }
    }

    fn refuse_pending(&mut self, conn: ConnId, reason: String, out: &mut Vec<Output>) {
        out.push(Output::Send { conn, msg: Message::Refused { reason: reason.clone() } });
        self.pending_failed(conn, reason, out);
    }

    fn pending_failed(&mut self, conn: ConnId, reason: String, out: &mut Vec<Output>) {
        out.push(Output::Close { conn, reason: reason.clone() });
        out.push(Output::Failed { reason: reason.clone() });
        self.handshake_failures += 1;
        self.last_error = Some(reason);
    }

    fn tick_pending(&mut self, now: Instant, out: &mut Vec<Output>) {
        let (late, kept): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| now >= p.1);
        self.pending = kept;
        for (conn, _) in late {
            self.pending_failed(conn, "no handshake in time".into(), out);
        }
    }

    /// The bulk connection's id, whatever its stage.
    fn bulk_id(&self) -> Option<ConnId> {
        match self.bulk {
            Bulk::Connecting { conn, .. } | Bulk::Handshaking { conn, .. } | Bulk::Up { conn } => Some(conn),
            Bulk::Off | Bulk::Backoff { .. } => None,
        }
    }

    /// Dials the bulk connection to the address the control link is up on.
    fn bulk_connect(&mut self, now: Instant, out: &mut Vec<Output>) {
        let State::Up { addr: Some(addr), .. } = self.state else {
            self.bulk = Bulk::Off;
            return;
        };
        let conn = self.next_conn;
        self.next_conn += 1;
        self.bulk = Bulk::Connecting { conn, deadline: now + self.cfg.connect_timeout };
        out.push(Output::Connect { conn, addr: self.peer.addresses[addr] });
    }

    fn bulk_input(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match (self.bulk, input) {
            (Bulk::Connecting { .. }, Input::Connected { conn }) => {
                out.push(Output::Send { conn, msg: self.hello(Channel::Bulk) });
                self.bulk = Bulk::Handshaking { conn, deadline: now + self.cfg.handshake_timeout };
            }
            (_, Input::ConnectFailed { conn, error }) => self.bulk_failed(now, conn, error, out),
            (
                Bulk::Handshaking { .. },
                Input::Frame { conn, msg: Message::HelloOk { protocol_version, node_id, .. } },
            ) => match self.check_peer(protocol_version, node_id) {
                Ok(()) => {
                    self.bulk = Bulk::Up { conn };
                    self.bulk_attempt = 0;
                    self.bulk_error = None;
                    self.bulk_down_since = None;
                    out.push(Output::BulkUp { conn });
                }
                Err(reason) => {
                    out.push(Output::Send { conn, msg: Message::Refused { reason: reason.clone() } });
                    self.bulk_failed(now, conn, reason, out);
                }
            },
            (_, Input::Frame { conn, msg: Message::Refused { reason } }) => {
                self.bulk_failed(now, conn, format!("the peer refused the bulk connection: {reason}"), out)
            }
            (
                Bulk::Up { .. },
                Input::Frame { msg: Message::Heartbeat { .. } | Message::HeartbeatAck { .. }, .. },
            ) => {}
            (
                Bulk::Up { .. },
                Input::Frame { conn, msg: Message::Hello { .. } | Message::HelloOk { .. } },
            ) => {
                let reason = "handshake message on an established bulk connection".to_string();
                out.push(Output::Send { conn, msg: Message::Refused { reason: reason.clone() } });
                self.bulk_failed(now, conn, reason, out);
            }
            (Bulk::Up { .. }, Input::Frame { msg, .. }) => out.push(Output::DeliverBulk { msg }),
            (_, Input::Frame { conn, msg }) => {
                let reason = format!("unexpected {} during the bulk handshake", msg.kind());
                out.push(Output::Send { conn, msg: Message::Refused { reason: reason.clone() } });
                self.bulk_failed(now, conn, reason, out);
            }
            (_, Input::Closed { conn, error }) => {
                self.bulk_failed(now, conn, format!("bulk connection lost: {error}"), out)
            }
            (_, Input::BadFrame { conn, error }) => self.bulk_failed(
                now,
                conn,
                format!("the peer sent a bad frame on the bulk connection: {error}"),
                out,
            ),
            // An accepted connection is never the bulk one yet; Connected
            // after the handshake began cannot happen.
            _ => {}
        }
    }

    /// The bulk connection failed or was refused: close it, and (dialer,
    /// control link still up) dial it again after a backoff of its own.
    fn bulk_failed(&mut self, now: Instant, conn: ConnId, reason: String, out: &mut Vec<Output>) {
        out.push(Output::Close { conn, reason: reason.clone() });
        if matches!(self.bulk, Bulk::Up { .. }) {
            out.push(Output::BulkDown { reason: reason.clone() });
            self.bulk_down_since = Some(now);
        }
        self.bulk_error = Some(reason);
        self.bulk = match (self.role, self.up_conn()) {
            (Role::Dialer, Some(_)) => {
                let delay = self.jitter(self.bulk_attempt);
                self.bulk_attempt = self.bulk_attempt.saturating_add(1);
                Bulk::Backoff { until: now + delay }
            }
            _ => Bulk::Off,
        };
    }

    /// Closes the bulk connection without a retry (the control link went,
    /// or the peer replaced it).
    fn drop_bulk(&mut self, reason: &str, out: &mut Vec<Output>) {
        if let Some(conn) = self.bulk_id() {
            out.push(Output::Close { conn, reason: reason.into() });
        }
        if matches!(self.bulk, Bulk::Up { .. }) {
            out.push(Output::BulkDown { reason: reason.into() });
        }
        self.bulk = Bulk::Off;
    }

    fn tick_bulk(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.bulk {
            Bulk::Connecting { conn, deadline } | Bulk::Handshaking { conn, deadline } if now >= deadline => {
                self.bulk_failed(now, conn, "no bulk connection in time".into(), out)
            }
            Bulk::Backoff { until } if now >= until => self.bulk_connect(now, out),
            _ => {}
        }
    }

    /// Refuses the handshake on `conn`: tells the peer why, closes.
    fn refuse(&mut self, now: Instant, conn: ConnId, reason: String, out: &mut Vec<Output>) {
        out.push(Output::Send { conn, msg: Message::Refused { reason: reason.clone() } });
        self.lost(now, conn, reason, true, out);
    }

    fn check_peer(&self, protocol_version: u32, node_id: Uuid) -> Result<(), String> {
        if protocol_version != self.cfg.protocol_version {
            return Err(format!(
                "protocol version mismatch: the peer speaks {protocol_version}, this node {}",
                self.cfg.protocol_version
            ));
        }
        if node_id != self.peer.node_id {
            return Err(format!(
                "the peer says it is node {node_id}, but the paired node is {}",
                self.peer.node_id
            ));
        }
        Ok(())
    }

    fn frame(&mut self, now: Instant, conn: ConnId, msg: Message, out: &mut Vec<Output>) {
        match (self.state, msg) {
            (State::Handshaking { addr, .. }, Message::HelloOk { protocol_version, node_id, name })
                if self.role == Role::Dialer =>
            {
                match self.check_peer(protocol_version, node_id) {
                    Ok(()) => self.up(now, conn, addr, name, out),
                    Err(reason) => self.refuse(now, conn, reason, out),
                }
            }
            (State::Handshaking { .. } | State::Up { .. }, Message::Refused { reason }) => {
                self.lost(now, conn, format!("the peer refused the link: {reason}"), true, out);
            }
            (State::Handshaking { .. }, other) => {
                self.refuse(now, conn, format!("unexpected {} during the handshake", other.kind()), out);
            }
            (State::Up { .. }, msg) => {
                self.last_heard = now;
                match msg {
                    Message::Heartbeat { seq, sent_at } => {
                        self.last_heartbeat = Some(now);
                        out.push(Output::Send { conn, msg: Message::HeartbeatAck { seq, sent_at } });
                    }
                    Message::HeartbeatAck { sent_at, .. } => {
                        self.last_heartbeat = Some(now);
                        let sent = self.base + Duration::from_micros(sent_at);
                        // An ack of a time this side never reached is forged
                        // or corrupt: no RTT from it.
                        if sent <= now {
                            let rtt = now - sent;
                            self.srtt = Some(match self.srtt {
                                None => rtt,
                                Some(s) => (s * 7 + rtt) / 8,
                            });
                        }
                    }
                    Message::Hello { .. } | Message::HelloOk { .. } => {
                        self.refuse(now, conn, "handshake message on an established link".into(), out)
                    }
                    data => out.push(Output::Deliver { msg: data }),
                }
            }
            // Connecting/Idle/Backoff have no current connection to frame on.
            _ => {}
        }
    }

    fn up(
        &mut self,
        now: Instant,
        conn: ConnId,
        addr: Option<usize>,
        peer_name: String,
        out: &mut Vec<Output>,
    ) {
        self.state = State::Up { conn, addr };
        if let Some(a) = addr {
            self.preferred = a;
        }
        self.attempt = 0;
        self.last_heard = now;
        self.next_heartbeat = now;
        self.last_error = None;
        self.ups += 1;
        // Both sides: the bulk connection is expected from now on.
        self.bulk_down_since = Some(now);
        out.push(Output::Up { conn, addr: addr.map(|a| self.peer.addresses[a]), peer_name });
        // The first heartbeat goes out at once: RTT is known within one
        // round trip of the link coming up.
        self.tick(now, out);
        if self.role == Role::Dialer && self.cfg.bulk {
            self.bulk_attempt = 0;
            self.bulk_connect(now, out);
        }
    }

    /// The current connection is gone or refused: close it, say why, then
    /// idle (acceptor) or back off (dialer). A failed handshake (`failed`)
    /// is reported as such; losing an up link as `Down`.
    fn lost(&mut self, now: Instant, conn: ConnId, reason: String, failed: bool, out: &mut Vec<Output>) {
        self.drop_bulk("the control link is down", out);
        out.push(Output::Close { conn, reason: reason.clone() });
        if matches!(self.state, State::Up { .. }) {
            self.downs += 1;
            out.push(Output::Down { reason: reason.clone() });
        } else if failed {
            out.push(Output::Failed { reason: reason.clone() });
            self.handshake_failures += 1;
        }
        self.last_error = Some(reason);
        match self.role {
            Role::Acceptor => self.state = State::Idle,
            Role::Dialer => self.backoff(now),
        }
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
