//! State replication over the peer link, as a plain state machine: the
//! driver (`replication_driver.rs`) feeds it inputs with the time and
//! carries out its outputs (store reads and applies through the core,
//! frames on the link's data channel). No I/O and no clock here, so tests
//! step it message by message and a seeded simulation runs two nodes over a
//! network that drops, reorders and cuts (`replication_tests.rs`).
//!
//! Each node streams its own changes (origin = this node) and applies the
//! peer's; the two directions are independent ([`Sender`], [`Receiver`]).
//! Changes applied from the peer are never in this node's feed, so nothing
//! is echoed back. The protocol, in docs/design/replication-state.md:
//!
//! - On link up the receiver sends `Ack{mark}`: the peer's highest seq it
//!   has applied (durable, moved in the apply's transaction). The sender
//!   resumes after it: from a snapshot when the mark is 0 (a new peer) or
//!   the rows after it were pruned, else the tail.
//! - At most `window` batches are unacknowledged; each receiver ack is the
//!   mark after applying (cumulative). Snapshot chunks have their own
//!   window (`SnapshotAck`).
//! - A batch that does not follow the mark (a gap) is not applied: the
//!   receiver asks `Resend{after: mark}` once per mark. A receiver that
//!   cannot use the stream (an undecodable change, a broken snapshot)
//!   asks `NeedSnapshot`.
//! - Nothing acknowledged for `ack_timeout`: the sender rewinds to the last
//!   ack. The receiver repeats its ack every `keepalive` while up, so a
//!   lost ack (or resume point) is repaired without a reconnect.

use super::frame::{Message, MAX_BATCH_BYTES};
use crate::store::{EncodedChange, Snapshot, Tail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Encoding of a snapshot's bytes as its chunks carry them: this byte, the
/// SHA-256 of the rest, then postcard [`SnapshotBody`]. The hash catches
/// chunks of two snapshots put together. Bump on any change to it.
pub const SNAPSHOT_FORMAT: u8 = 1;

#[derive(Debug, Clone)]
pub struct ReplConfig {
    /// Unacknowledged batches (and, separately, snapshot chunks) in flight.
    /// With both directions' batches and acks this bounds what waits in the
    /// link's received-data queue (32) to about four times the window.
    pub window: usize,
    /// Changes read from the store per batch.
    pub batch_entries: usize,
    /// A batch is cut below this many bytes of changes (at least one).
    pub batch_bytes: usize,
    /// Nothing acknowledged for this long while something is in flight:
    /// rewind to the last ack (a lost frame; the link itself never loses).
    pub ack_timeout: Duration,
    /// How often a receiver repeats its ack while the link is up.
    pub keepalive: Duration,
    /// How often the peer's ack is written to the store (for pruning only;
    /// resuming uses the peer's own mark).
    pub persist_every: Duration,
    /// A snapshot larger than this is refused.
    pub max_snapshot: usize,
}

impl Default for ReplConfig {
    fn default() -> ReplConfig {
        ReplConfig {
            window: 4,
            batch_entries: 512,
            batch_bytes: MAX_BATCH_BYTES - 4096,
            ack_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(5),
            persist_every: Duration::from_secs(1),
            max_snapshot: 256 << 20,
        }
    }
}

/// Wait before asking the store again after a failed or empty read.
const RETRY: Duration = Duration::from_secs(1);

/// What the chunks of a snapshot carry (after [`SNAPSHOT_FORMAT`]): the
/// store's encoded put-changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub changes: Vec<Vec<u8>>,
}

pub fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let body = postcard::to_allocvec(&SnapshotBody { changes: s.changes.clone() })
        .expect("postcard encoding of a snapshot");
    let mut out = vec![SNAPSHOT_FORMAT];
    out.extend(Sha256::digest(&body));
    out.extend(body);
    out
}

pub fn decode_snapshot(seq: u64, bytes: &[u8]) -> Result<Snapshot, String> {
    match bytes.split_first() {
        Some((&SNAPSHOT_FORMAT, rest)) if rest.len() >= 32 => {
            let (hash, rest) = rest.split_at(32);
            if Sha256::digest(rest).as_slice() != hash {
                return Err("snapshot does not match its hash".into());
            }
            let (body, tail) = postcard::take_from_bytes::<SnapshotBody>(rest).map_err(|e| e.to_string())?;
            if !tail.is_empty() {
                return Err(format!("{} trailing bytes", tail.len()));
            }
            Ok(Snapshot { seq, changes: body.changes })
        }
        Some((&SNAPSHOT_FORMAT, _)) => Err("snapshot shorter than its hash".into()),
        Some((v, _)) => Err(format!("snapshot format {v}; this node reads {SNAPSHOT_FORMAT}")),
        None => Err("empty snapshot".into()),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    LinkUp,
    LinkDown,
    /// This node's newest committed seq ([`super::drivers::NodeCore::local_seq`])
    /// and the wall clock (Unix ms) when the driver saw it move.
    LocalSeq {
        seq: u64,
        at: i64,
    },
    /// A replication message from the peer.
    Message(Message),
    /// The answer to [`Output::ReadTail`] with the same `read`.
    Tail {
        read: u64,
        tail: Tail,
    },
    /// The answer to [`Output::ReadSnapshot`] with the same `read`.
    Snapshot {
        read: u64,
        snapshot: Snapshot,
    },
    /// A read failed; it is asked again on the next tick.
    ReadFailed {
        read: u64,
        error: String,
    },
    /// [`Output::Apply`] or [`Output::ApplySnapshot`] succeeded; `mark` is
    /// the peer's highest seq applied here now.
    Applied {
        mark: u64,
    },
    /// It failed; `mark` is the applied mark as the store has it, `gap`
    /// when the store refused a batch that skips a seq.
    ApplyFailed {
        mark: u64,
        gap: bool,
        error: String,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A frame for the peer (`Changes` and `SnapshotChunk` are data, the
    /// rest control frames).
    Send(Message),
    /// Read this node's changes after `after` (`Core::changes_since`).
    ReadTail { read: u64, after: u64, limit: usize },
    /// Read a snapshot of this node's state (`Core::snapshot`).
    ReadSnapshot { read: u64 },
    /// Apply the peer's changes (`Core::apply_remote_batch`); they follow
    /// the mark exactly. Feed the result before the next message.
    Apply { origin: Uuid, entries: Vec<EncodedChange> },
    /// Apply the peer's snapshot (`Core::apply_snapshot`).
    ApplySnapshot { origin: Uuid, snapshot: Snapshot },
    /// Persist the peer's ack (`Core::record_peer_ack`).
    PersistAck { peer: Uuid, seq: u64 },
    /// The stream to the peer resumes after `after` (its mark), from a
    /// snapshot first when `snapshot`: for the log.
    Resumed { after: u64, local: u64, snapshot: bool },
}

/// What `GET /v1/peer` and the metrics show.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplStatus {
    /// This node's changes the peer has not acknowledged; `None` until the
    /// peer first told its mark since this daemon started.
    pub lag_records: Option<u64>,
    /// Age of the oldest of them (0 when none), as of the `wall_ms` given
    /// to [`Replication::status`]; [`ReplStatus::lag_seconds_at`] for later.
    pub lag_seconds: Option<f64>,
    /// Commit time (Unix ms) of the oldest unacknowledged change, while
    /// there is one.
    pub behind_since: Option<i64>,
    /// The peer's changes not applied here, as of its last batch.
    pub behind_records: u64,
    /// The peer's highest seq applied here.
    pub applied_mark: u64,
    /// The peer's last acknowledgement of this node's changes.
    pub peer_acked: Option<u64>,
    pub snapshots_sent: u64,
    pub snapshots_applied: u64,
    pub resends: u64,
    /// The last thing that stopped the stream, until it moves again.
    pub fault: Option<String>,
}

impl ReplStatus {
    /// The lag in seconds at `wall_ms`: it grows while nothing happens
    /// (the link down, the peer silent), so readers compute it when they read.
    pub fn lag_seconds_at(&self, wall_ms: i64) -> Option<f64> {
        self.lag_records.map(|n| match (n, self.behind_since) {
            (0, _) | (_, None) => 0.0,
            (_, Some(at)) => (wall_ms - at).max(0) as f64 / 1000.0,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum SendState {
    Down,
    /// Up; waiting for the peer's ack (its resume point).
    Resuming,
    /// Sending a snapshot; `chunks` is empty until it is read.
    Snapshot {
        seq: u64,
        chunks: Vec<Vec<u8>>,
        sent: usize,
        acked: usize,
    },
    Streaming,
}

/// A batch in flight: its last seq and its oldest change's commit time.
#[derive(Debug, Clone, PartialEq)]
struct Flight {
    last: u64,
    first_at: i64,
}

/// This node's changes to the peer.
#[derive(Debug)]
pub struct Sender {
    me: Uuid,
    peer: Uuid,
    cfg: ReplConfig,
    state: SendState,
    /// Newest local seq.
    local: u64,
    /// The peer's ack (its mark of this node), once known.
    acked: Option<u64>,
    /// Highest seq handed to the link in this round.
    sent: u64,
    flights: VecDeque<Flight>,
    /// The read asked and not answered, by number; answers to other numbers
    /// are stale (the state moved on) and dropped.
    reading: Option<u64>,
    reads: u64,
    /// A read failed or came back empty: ask again then.
    retry_at: Option<Instant>,
    /// When the driver last saw the local seq move (Unix ms).
    local_at: i64,
    /// Last ack progress, or when the first thing went in flight.
    progress_at: Instant,
    persisted: u64,
    persist_at: Instant,
    /// Commit time (Unix ms) of the oldest unacknowledged change, an upper
    /// bound when it is not in flight.
    behind_since: Option<i64>,
    snapshots: u64,
    resends: u64,
    fault: Option<String>,
}

impl Sender {
    pub fn new(cfg: ReplConfig, me: Uuid, peer: Uuid, local: u64, now: Instant, wall_ms: i64) -> Sender {
        Sender {
            me,
            peer,
            cfg,
            state: SendState::Down,
            local,
            acked: None,
            sent: 0,
            flights: VecDeque::new(),
            reading: None,
            reads: 0,
            retry_at: None,
            local_at: wall_ms,
            progress_at: now,
            persisted: 0,
            persist_at: now,
            behind_since: None,
            snapshots: 0,
            resends: 0,
            fault: None,
        }
    }

    /// Forgets what is in flight and any read under way.
    fn reset(&mut self) {
        self.flights.clear();
        self.reading = None;
        self.retry_at = None;
        self.reads += 1;
    }

    fn start_snapshot(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.reset();
        self.state = SendState::Snapshot { seq: 0, chunks: Vec::new(), sent: 0, acked: 0 };
        self.progress_at = now;
        self.reading = Some(self.reads);
        self.snapshots += 1;
        out.push(Output::ReadSnapshot { read: self.reads });
    }

    /// Streams from `after` (the peer has everything up to it).
    fn stream_from(&mut self, after: u64, now: Instant) {
        self.reset();
        self.state = SendState::Streaming;
        self.sent = after;
        self.progress_at = now;
    }

    fn in_flight(&self) -> bool {
        match &self.state {
            SendState::Streaming => !self.flights.is_empty(),
            SendState::Snapshot { chunks, acked, .. } => self.reading.is_some() || *acked < chunks.len(),
            _ => false,
        }
    }

    fn on_ack(&mut self, seq: u64, now: Instant, out: &mut Vec<Output>) {
        match self.state {
            SendState::Down => return,
            SendState::Resuming => {
                self.acked = Some(seq);
                if seq > self.local {
                    // The peer has more of this node's changes than this
                    // node has: its store was restored or replaced. New
                    // changes would reuse seqs the peer skips as applied.
                    self.fault = Some(format!(
                        "the peer has applied this node's changes up to {seq}, this node has only {}",
                        self.local
                    ));
                }
                let snapshot = seq == 0 && self.local > 0;
                out.push(Output::Resumed { after: seq, local: self.local, snapshot });
                if snapshot {
                    // A new peer is seeded from a snapshot, never from seq 0.
                    self.start_snapshot(now, out);
                } else {
                    self.stream_from(seq, now);
                }
            }
            SendState::Snapshot { .. } | SendState::Streaming => {
                if self.acked.is_some_and(|a| seq <= a) {
                    return;
                }
                self.acked = Some(seq);
                self.progress_at = now;
                self.fault = None;
                while self.flights.front().is_some_and(|f| f.last <= seq) {
                    self.flights.pop_front();
                }
                if self.state == SendState::Streaming && seq > self.sent {
                    self.sent = seq;
                }
            }
        }
        self.behind_since = if seq >= self.local {
            None
        } else {
            // The next unacknowledged change is the first of the oldest
            // batch in flight; otherwise keep the older bound (or, with
            // none, when this node last saw its seq move: a lower bound).
            match self.flights.front() {
                Some(f) => Some(f.first_at),
                None => self.behind_since.or(Some(self.local_at)),
            }
        };
    }

    fn handle(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::LinkUp => {
                self.reset();
                self.state = SendState::Resuming;
                self.progress_at = now;
            }
            Input::LinkDown => {
                self.reset();
                self.state = SendState::Down;
            }
            Input::LocalSeq { seq, at } => {
                if seq > self.local {
                    if self.behind_since.is_none() && self.acked.is_some_and(|a| a >= self.local) {
                        self.behind_since = Some(at);
                    }
                    self.local = seq;
                    self.local_at = at;
                }
            }
            Input::Message(msg) => match msg {
                Message::Ack { origin, seq } if origin == self.me => self.on_ack(seq, now, out),
                Message::SnapshotAck { origin, seq, index } if origin == self.me => {
                    if let SendState::Snapshot { seq: s, acked, chunks, .. } = &mut self.state {
                        if *s == seq && !chunks.is_empty() && index as usize >= *acked {
                            *acked = index as usize + 1;
                            self.progress_at = now;
                        }
                    }
                }
                Message::NeedSnapshot { origin } if origin == self.me && self.state != SendState::Down => {
                    self.start_snapshot(now, out);
                }
                Message::Resend { origin, after }
                    if origin == self.me && self.state == SendState::Streaming =>
                {
                    // `after` is the peer's mark: everything up to it is there.
                    let from = self.acked.map_or(after, |a| a.max(after));
                    self.acked = Some(from);
                    self.resends += 1;
                    self.stream_from(from, now);
                }
                _ => {}
            },
            Input::Tail { read, tail } => {
                if self.reading != Some(read) {
                    return;
                }
                self.reading = None;
                match tail {
                    Tail::Reseed { .. } => self.start_snapshot(now, out),
                    Tail::Changes(changes) => self.send_batch(changes, now, out),
                }
            }
            Input::Snapshot { read, snapshot } => {
                if self.reading != Some(read) {
                    return;
                }
                self.reading = None;
                if let SendState::Snapshot { seq, chunks, .. } = &mut self.state {
                    *seq = snapshot.seq;
                    *chunks =
                        encode_snapshot(&snapshot).chunks(self.cfg.batch_bytes).map(<[u8]>::to_vec).collect();
                    self.progress_at = now;
                }
            }
            Input::ReadFailed { read, error } => {
                if self.reading == Some(read) {
                    self.reading = None;
                    self.retry_at = Some(now + RETRY);
                    self.fault = Some(format!("reading this node's changes: {error}"));
                }
            }
            Input::Tick => {
                if self.in_flight() && now >= self.progress_at + self.cfg.ack_timeout {
                    self.resends += 1;
                    self.fault = Some(format!(
                        "nothing acknowledged for {} s: sending again from the last ack",
                        self.cfg.ack_timeout.as_secs()
                    ));
                    match self.state {
                        SendState::Snapshot { .. } => self.start_snapshot(now, out),
                        _ => self.stream_from(self.acked.unwrap_or(0), now),
                    }
                }
                if self.retry_at.is_some_and(|t| now >= t) {
                    self.retry_at = None;
                    if matches!(&self.state, SendState::Snapshot { chunks, .. } if chunks.is_empty()) {
                        self.start_snapshot(now, out);
                    }
                }
            }
            Input::Applied { .. } | Input::ApplyFailed { .. } => {}
        }
        self.pump(now, out);
    }

    fn send_batch(&mut self, changes: Vec<EncodedChange>, now: Instant, out: &mut Vec<Output>) {
        if self.state != SendState::Streaming {
            return;
        }
        let Some(first) = changes.first() else {
            // The seq moved but the feed has nothing after `sent`: do not
            // spin on it; ask again shortly.
            self.retry_at = Some(now + RETRY);
            return;
        };
        if first.seq != self.sent + 1 {
            // The feed is dense; anything else means rows went missing.
            self.fault = Some(format!("this node's feed after {} starts at {}", self.sent, first.seq));
            self.start_snapshot(now, out);
            return;
        }
        let (first_seq, first_at) = (first.seq, first.at);
        let mut bytes = 0;
        let mut entries = Vec::new();
        for c in changes {
            bytes += c.bytes.len() + 10;
            if !entries.is_empty() && bytes > self.cfg.batch_bytes {
                // The rest is read again with the next batch.
                break;
            }
            entries.push((c.seq, c.bytes));
        }
        let last = entries.last().expect("one entry").0;
        if self.flights.is_empty() {
            self.progress_at = now;
            if self.acked.is_some_and(|a| a + 1 == first_seq) {
                // The oldest unacknowledged change: its commit time exactly.
                self.behind_since = Some(first_at);
            }
        }
        self.flights.push_back(Flight { last, first_at });
        self.sent = last;
        out.push(Output::Send(Message::Changes { origin: self.me, seq: self.local.max(last), entries }));
    }

    /// Sends what the window allows.
    fn pump(&mut self, now: Instant, out: &mut Vec<Output>) {
        match &mut self.state {
            SendState::Streaming
                if self.reading.is_none()
                    && self.retry_at.is_none()
                    && self.flights.len() < self.cfg.window
                    && self.sent < self.local =>
            {
                self.reads += 1;
                self.reading = Some(self.reads);
                out.push(Output::ReadTail {
                    read: self.reads,
                    after: self.sent,
                    limit: self.cfg.batch_entries,
                });
            }
            SendState::Snapshot { seq, chunks, sent, acked } if !chunks.is_empty() => {
                while *sent < chunks.len() && *sent < *acked + self.cfg.window {
                    out.push(Output::Send(Message::SnapshotChunk {
                        origin: self.me,
                        seq: *seq,
                        index: *sent as u32,
                        last: *sent + 1 == chunks.len(),
                        data: chunks[*sent].clone(),
                    }));
                    *sent += 1;
                }
                if *acked == chunks.len() {
                    // Every chunk arrived: the tail after the snapshot
                    // follows; the peer acks the snapshot's seq once applied.
                    let seq = *seq;
                    self.state = SendState::Streaming;
                    self.sent = seq;
                    if self.acked.is_some_and(|a| a < seq) {
                        let first_at = self.behind_since.unwrap_or(self.local_at);
                        self.flights.push_back(Flight { last: seq, first_at });
                    }
                    self.progress_at = now;
                    self.pump(now, out);
                }
            }
            _ => {}
        }
        if let Some(acked) = self.acked {
            if acked > self.persisted && now >= self.persist_at + self.cfg.persist_every {
                self.persisted = acked;
                self.persist_at = now;
                out.push(Output::PersistAck { peer: self.peer, seq: acked });
            }
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        let mut t = None;
        if self.in_flight() {
            t = Some(self.progress_at + self.cfg.ack_timeout);
        }
        if let Some(r) = self.retry_at {
            t = Some(t.map_or(r, |x: Instant| x.min(r)));
        }
        if self.acked.is_some_and(|a| a > self.persisted) {
            let p = self.persist_at + self.cfg.persist_every;
            t = Some(t.map_or(p, |x: Instant| x.min(p)));
        }
        t
    }
}

/// An incoming snapshot being put together from its chunks.
#[derive(Debug)]
struct Assembly {
    seq: u64,
    next: u32,
    data: Vec<u8>,
}

/// The peer's changes to this node.
#[derive(Debug)]
pub struct Receiver {
    peer: Uuid,
    cfg: ReplConfig,
    up: bool,
    mark: u64,
    /// The peer's newest seq as of its last batch.
    newest: u64,
    assembly: Option<Assembly>,
    /// The mark a `Resend` was asked at (asked once per mark).
    resend_asked: Option<u64>,
    /// A snapshot was asked and has not started arriving.
    snapshot_asked: bool,
    keepalive_at: Instant,
    applied_snapshots: u64,
    fault: Option<String>,
}

impl Receiver {
    pub fn new(cfg: ReplConfig, peer: Uuid, mark: u64, now: Instant) -> Receiver {
        Receiver {
            peer,
            cfg,
            up: false,
            mark,
            newest: mark,
            assembly: None,
            resend_asked: None,
            snapshot_asked: false,
            keepalive_at: now,
            applied_snapshots: 0,
            fault: None,
        }
    }

    fn ack(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.keepalive_at = now + self.cfg.keepalive;
        out.push(Output::Send(Message::Ack { origin: self.peer, seq: self.mark }));
    }

    fn need_snapshot(&mut self, fault: String, out: &mut Vec<Output>) {
        self.fault = Some(fault);
        self.assembly = None;
        if !self.snapshot_asked {
            self.snapshot_asked = true;
            out.push(Output::Send(Message::NeedSnapshot { origin: self.peer }));
        }
    }

    fn resend(&mut self, out: &mut Vec<Output>) {
        if self.resend_asked != Some(self.mark) {
            self.resend_asked = Some(self.mark);
            out.push(Output::Send(Message::Resend { origin: self.peer, after: self.mark }));
        }
    }

    fn handle(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::LinkUp => {
                self.up = true;
                self.assembly = None;
                self.resend_asked = None;
                self.snapshot_asked = false;
                self.ack(now, out);
            }
            Input::LinkDown => {
                self.up = false;
                self.assembly = None;
            }
            Input::Message(Message::Changes { origin, seq, entries }) if origin == self.peer => {
                self.newest = self.newest.max(seq);
                let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return };
                let (first, last) = (first.0, last.0);
                if last <= self.mark {
                    // A resend of what is here: say so again.
                    self.ack(now, out);
                } else if first > self.mark + 1 {
                    self.resend(out);
                } else {
                    let mark = self.mark;
                    let entries = entries
                        .into_iter()
                        .filter(|(s, _)| *s > mark)
                        .map(|(seq, bytes)| EncodedChange { seq, at: 0, bytes })
                        .collect();
                    out.push(Output::Apply { origin: self.peer, entries });
                }
            }
            Input::Message(Message::SnapshotChunk { origin, seq, index, last, data })
                if origin == self.peer =>
            {
                match &mut self.assembly {
                    _ if index == 0 => {
                        self.snapshot_asked = false;
                        self.assembly = Some(Assembly { seq, next: 1, data });
                    }
                    Some(a) if a.seq == seq && a.next == index => {
                        a.next += 1;
                        a.data.extend(data);
                    }
                    // A chunk missing (the start, or one in between).
                    _ => {
                        return self.need_snapshot(format!("snapshot {seq}: chunk {index} out of order"), out)
                    }
                }
                if self.assembly.as_ref().is_some_and(|a| a.data.len() > self.cfg.max_snapshot) {
                    let limit = self.cfg.max_snapshot;
                    return self.need_snapshot(format!("snapshot {seq} is over {limit} bytes"), out);
                }
                out.push(Output::Send(Message::SnapshotAck { origin: self.peer, seq, index }));
                if last {
                    let a = self.assembly.take().expect("assembling");
                    match decode_snapshot(a.seq, &a.data) {
                        Ok(snapshot) => {
                            self.applied_snapshots += 1;
                            out.push(Output::ApplySnapshot { origin: self.peer, snapshot })
                        }
                        Err(e) => self.need_snapshot(format!("snapshot {seq}: {e}"), out),
                    }
                }
            }
            Input::Applied { mark } => {
                if mark > self.mark {
                    self.fault = None;
                }
                self.mark = self.mark.max(mark);
                self.newest = self.newest.max(self.mark);
                if self.up {
                    self.ack(now, out);
                }
            }
            Input::ApplyFailed { mark, gap, error } => {
                self.mark = mark;
                if gap {
                    self.resend(out);
                } else {
                    self.need_snapshot(format!("applying the peer's changes after {mark}: {error}"), out);
                }
            }
            Input::Tick if self.up && now >= self.keepalive_at => self.ack(now, out),
            _ => {}
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.up.then_some(self.keepalive_at)
    }
}

/// Both directions of one pair.
#[derive(Debug)]
pub struct Replication {
    pub sender: Sender,
    pub receiver: Receiver,
}

impl Replication {
    /// `ids`: this node's and the peer's; `local`: this node's newest seq;
    /// `mark`: the peer's highest seq applied here (both from the store).
    /// `wall_ms`: the wall clock (Unix ms).
    pub fn new(
        cfg: ReplConfig,
        ids: (Uuid, Uuid),
        local: u64,
        mark: u64,
        now: Instant,
        wall_ms: i64,
    ) -> Replication {
        let (me, peer) = ids;
        Replication {
            sender: Sender::new(cfg.clone(), me, peer, local, now, wall_ms),
            receiver: Receiver::new(cfg, peer, mark, now),
        }
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match &input {
            Input::LinkUp | Input::LinkDown | Input::Tick => {
                self.receiver.handle(now, input.clone(), &mut out);
                self.sender.handle(now, input, &mut out);
            }
            Input::Message(Message::Changes { .. } | Message::SnapshotChunk { .. })
            | Input::Applied { .. }
            | Input::ApplyFailed { .. } => self.receiver.handle(now, input, &mut out),
            _ => self.sender.handle(now, input, &mut out),
        }
        out
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        match (self.sender.next_timeout(), self.receiver.next_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `wall_ms`: the wall clock now (Unix ms), for the lag in seconds.
    pub fn status(&self, wall_ms: i64) -> ReplStatus {
        let s = &self.sender;
        let lag_records = s.acked.map(|a| s.local.saturating_sub(a));
        let behind_since = s.behind_since.filter(|_| lag_records.is_some_and(|n| n > 0));
        let mut st = ReplStatus {
            lag_records,
            lag_seconds: None,
            behind_since,
            behind_records: self.receiver.newest.saturating_sub(self.receiver.mark),
            applied_mark: self.receiver.mark,
            peer_acked: s.acked,
            snapshots_sent: s.snapshots,
            snapshots_applied: self.receiver.applied_snapshots,
            resends: s.resends,
            fault: s.fault.clone().or_else(|| self.receiver.fault.clone()),
        };
        st.lag_seconds = st.lag_seconds_at(wall_ms);
        st
    }
}

#[cfg(test)]
#[path = "replication_tests.rs"]
mod tests;
