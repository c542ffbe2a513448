//! The primary side of one replicated disk, as a plain state machine: what
//! a guest write or flush must wait for, which blocks the peer lacks, what
//! must be made durable before what, and what the peer's copy is. Time is
//! a parameter; the data plane's driver does the I/O and feeds the answers
//! back (docs/design/replication.md).
//!
//! Three sets of blocks (4 KiB each) carry the guarantees:
//! - `pending`: blocks the peer may lack. A block leaves it only when the
//!   peer said it is *durable* there, so neither a lost link nor a crash of
//!   the peer host can make the two copies differ unnoticed.
//! - the durable bitmap (the driver's `meta` file) is always a superset of
//!   `pending`, so a crash of this node loses nothing: while the link is up,
//!   whole extents are marked before their first write (DRBD's activity
//!   log: one metadata write per 4 MiB, not per write); while it is down,
//!   each write's own blocks are, so the delta resync sends what changed.
//! - in flight: frames sent and not yet acknowledged durable.

use super::disk_frame::ReplicaState;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Bytes per tracked block (one bitmap bit).
pub const BLOCK: u64 = 4096;
/// Bytes per activity-log extent.
pub const EXTENT: u64 = 4 << 20;
/// An extent stays marked this long after its last write is durable on
/// the peer, so a hot extent costs one metadata write, not one per burst.
pub const EXTENT_COOL: Duration = Duration::from_secs(5);
/// Extents marked beyond a new one that follows a hot one: a sequential
/// writer pays one metadata write (an fdatasync) per 64 MiB instead of one
/// per 4 MiB (half of async mode's cost on 1 MiB writes, docs/performance.md),
/// and a crash resyncs at most this much more.
pub const SEQ_AHEAD: u64 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

/// A set of blocks of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    words: Vec<u64>,
    blocks: u64,
}

impl Blocks {
    pub fn new(size: u64) -> Blocks {
        let blocks = size.div_ceil(BLOCK);
        Blocks { words: vec![0; blocks.div_ceil(64) as usize], blocks }
    }

    fn span(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        let end = (off + len).div_ceil(BLOCK).min(self.blocks);
        (off / BLOCK).min(end)..end
    }

    pub fn insert(&mut self, off: u64, len: u64) {
        for b in self.span(off, len) {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    pub fn remove(&mut self, off: u64, len: u64) {
        for b in self.span(off, len) {
            self.words[(b / 64) as usize] &= !(1 << (b % 64));
        }
    }

    pub fn contains_any(&self, off: u64, len: u64) -> bool {
        self.span(off, len).any(|b| self.words[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn bytes(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum::<u64>() * BLOCK
    }

    /// The first run of set blocks at or after `from`, at most `max` bytes:
    /// `(offset, length)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = from / BLOCK;
        while b < self.blocks {
            let w = self.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += w.trailing_zeros() as u64;
            let start = b;
            let limit = start + (max / BLOCK).max(1);
            while b < self.blocks && b < limit && self.words[(b / 64) as usize] & (1 << (b % 64)) != 0 {
                b += 1;
            }
            return Some((start * BLOCK, (b - start) * BLOCK));
        }
        None
    }
}

/// The peer's copy as this node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCopy {
    /// Never completely synced (or the sync broke off).
    Inconsistent,
    /// A sync (full or delta) is running.
    Syncing,
    /// Holds every block; follows every write.
    UpToDate,
    /// Consistent but missing blocks (`pending`): the link was lost.
    Outdated,
}

impl PeerCopy {
    pub fn as_state(self) -> ReplicaState {
        match self {
            PeerCopy::Inconsistent => ReplicaState::Inconsistent,
            PeerCopy::Syncing => ReplicaState::Syncing,
            PeerCopy::UpToDate => ReplicaState::UpToDate,
            PeerCopy::Outdated => ReplicaState::Outdated,
        }
    }
}

/// What the driver must do before a guest write goes to the local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// Mark these ranges in the durable bitmap first (fdatasync'd).
    pub mark: Vec<(u64, u64)>,
    /// Ship the write with this sequence number; None: the peer is away,
    /// the blocks are pending.
    pub seq: Option<u64>,
    /// Sync mode with a shipped write: the guest's request completes only
    /// when [`Primary::done`] says so.
    pub wait: bool,
}

/// A frame in flight, until the peer has it durable.
#[derive(Debug, Clone)]
struct Flight {
    seq: u64,
    /// (offset, len) of data; (0, 0) for a flush or the end of a sync.
    range: (u64, u64),
    bytes: u64,
    sent: Instant,
}

/// Why the driver must drop the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Sync mode: the peer did not acknowledge within the timeout.
    AckTimeout { seq: u64, waited: Duration },
    /// Async mode: more unacknowledged bytes than the queue may hold.
    Overflow { bytes: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncProgress {
    pub full: bool,
    pub done: u64,
    pub total: u64,
    pub started: Instant,
}

#[derive(Debug)]
pub struct Primary {
    mode: Mode,
    size: u64,
    ack_timeout: Duration,
    max_queue: u64,
    peer: PeerCopy,
    /// Attached on a live connection.
    up: bool,
    next_seq: u64,
    applied: u64,
    durable: u64,
    /// Waiters of seqs up to this are released (the link broke and what
    /// they wrote is marked durably as pending).
    released: u64,
    flights: VecDeque<Flight>,
    pending: Blocks,
    /// The sync's cursor over `pending`, and its progress.
    sync: Option<(u64, SyncProgress)>,
    sync_end_sent: Option<u64>,
    /// Extents marked in the durable bitmap, and when they last were
    /// written or had a write in flight.
    hot: BTreeMap<u64, Instant>,
    /// The durable "peer outdated" mark (DRBD's outdate): set before any
    /// write the peer did not get is acknowledged to the guest.
    outdated_mark: bool,
    /// Blocks in `pending` that were marked one by one (link down): the
    /// durable bitmap holds them, not only their extents.
    exact: Blocks,
    /// When `applied` and `durable` last advanced: a peer that keeps
    /// acknowledging is slow, not silent (a resync window on a slow link
    /// takes longer than the timeout to drain, each frame acknowledged in
    /// turn).
    applied_at: Option<Instant>,
    durable_at: Option<Instant>,
}

/// What changed in the durable metadata, for the driver to write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaChange {
    /// Set the durable "peer outdated" mark (before releasing waiters).
    pub outdated: Option<bool>,
    /// Clear these ranges of the durable bitmap (lazy: a stale set bit
    /// only costs an extra resync).
    pub clear: Vec<(u64, u64)>,
}

impl MetaChange {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.outdated.is_none() && self.clear.is_empty()
    }
}

impl Primary {
    /// A primary disk at start. `dirty` is the durable bitmap as loaded
    /// (every block the peer may lack after whatever happened before);
    /// `peer_synced`: the peer completed a sync of this disk once.
    pub fn new(
        mode: Mode,
        size: u64,
        dirty: &[(u64, u64)],
        peer_synced: bool,
        outdated_mark: bool,
        ack_timeout: Duration,
        max_queue: u64,
    ) -> Primary {
        let mut pending = Blocks::new(size);
        for &(o, l) in dirty {
            pending.insert(o, l);
        }
        let exact = pending.clone();
        Primary {
            mode,
            size,
            ack_timeout,
            max_queue,
            peer: if !peer_synced { PeerCopy::Inconsistent } else { PeerCopy::Outdated },
            up: false,
            next_seq: 1,
            applied: 0,
            durable: 0,
            released: 0,
            flights: VecDeque::new(),
            pending,
            sync: None,
            sync_end_sent: None,
            hot: BTreeMap::new(),
            outdated_mark,
            exact,
            applied_at: None,
            durable_at: None,
        }
    }

    pub fn peer(&self) -> PeerCopy {
        self.peer
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending.bytes()
    }

    pub fn sync_progress(&self) -> Option<&SyncProgress> {
        self.sync.as_ref().map(|(_, p)| p)
    }

    /// Bytes sent and not yet durable on the peer, and the age of the
    /// oldest such frame.
    pub fn lag(&self, now: Instant) -> (u64, Duration) {
        let bytes = self.flights.iter().map(|f| f.bytes).sum();
        let age = self.flights.front().map_or(Duration::ZERO, |f| now.saturating_duration_since(f.sent));
        (bytes, age)
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn extent_ranges(&mut self, now: Instant, off: u64, len: u64) -> Vec<(u64, u64)> {
        let mut mark: Vec<(u64, u64)> = Vec::new();
        let (first, mut last) = (off / EXTENT, (off + len.max(1) - 1) / EXTENT);
        if !self.hot.contains_key(&last) && last > 0 && self.hot.contains_key(&(last - 1)) {
            // A sequential run entered a new extent: mark the ones it is
            // heading into with the same metadata write.
            last += SEQ_AHEAD;
        }
        let end = self.size.div_ceil(EXTENT);
        for e in first..=last.min(end.saturating_sub(1)) {
            if self.hot.insert(e, now).is_none() {
                let start = e * EXTENT;
                let len = EXTENT.min(self.size - start);
                match mark.last_mut() {
                    Some(m) if m.0 + m.1 == start => m.1 += len,
                    _ => mark.push((start, len)),
                }
            }
        }
        mark
    }

    /// A guest write of `len` bytes at `off` is about to go to the local
    /// file.
    pub fn write(&mut self, now: Instant, off: u64, len: u64) -> WritePlan {
        // Shipped while the peer follows: up to date, or syncing (the sync
        // sends older blocks; this write goes after them in order).
        let ship = self.up && matches!(self.peer, PeerCopy::UpToDate | PeerCopy::Syncing);
        if !ship {
            self.pending.insert(off, len);
            self.exact.insert(off, len);
            return WritePlan { mark: vec![(off, len)], seq: None, wait: false };
        }
        let mark = self.extent_ranges(now, off, len);
        let seq = self.seq();
        self.flights.push_back(Flight { seq, range: (off, len), bytes: len, sent: now });
        WritePlan { mark, seq: Some(seq), wait: self.mode == Mode::Sync }
    }

    /// A guest flush: the sequence number of the `Flush` frame to send,
    /// if the peer follows. Sync mode waits for it to be durable.
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        if !(self.up && matches!(self.peer, PeerCopy::UpToDate | PeerCopy::Syncing)) {
            return None;
        }
        let seq = self.seq();
        self.flights.push_back(Flight { seq, range: (0, 0), bytes: 0, sent: now });
        Some(seq)
    }

    /// Whether the guest's request that got `seq` may complete: applied on
    /// the peer (a write) or durable there (`durable`: a flush), or given
    /// up after the link broke and its blocks were marked pending.
    pub fn done(&self, seq: u64, durable: bool) -> bool {
        seq <= self.released || seq <= if durable { self.durable } else { self.applied }
    }

    /// The connection is up and the peer answered `Attach` with its copy's
    /// state. Returns the sync to begin, if any, and its byte count.
    /// `allocated`: the local file's allocated extents (for a full sync).
    pub fn attached(
        &mut self,
        now: Instant,
        peer_state: ReplicaState,
        allocated: &[(u64, u64)],
    ) -> Option<(bool, u64)> {
        self.up = true;
        self.flights.clear();
        self.sync_end_sent = None;
        (self.applied_at, self.durable_at) = (None, None);
        let full = match peer_state {
            // A copy that never finished a sync has nothing to build on.
            ReplicaState::Inconsistent => true,
            // Consistent (or a delta resync that broke off and resumes on
            // the same undo log): only what it lacks.
            ReplicaState::UpToDate | ReplicaState::Outdated | ReplicaState::Syncing => {
                self.peer == PeerCopy::Inconsistent
            }
        };
        if full {
            for &(o, l) in allocated {
                self.pending.insert(o, l);
            }
        }
        if self.pending.is_empty() && peer_state == ReplicaState::UpToDate {
            self.peer = PeerCopy::UpToDate;
            return None;
        }
        let total = self.pending.bytes();
        self.peer = PeerCopy::Syncing;
        self.sync = Some((0, SyncProgress { full, done: 0, total, started: now }));
        Some((full, total))
    }

    /// The peer's `Diverged`, before its `Attached`: blocks it wrote as
    /// the disk's previous primary that this node may not hold. The sync
    /// sends them like blocks dirty here, which puts this node's data back
    /// over them. In memory only: the peer keeps them in its own bitmap
    /// until a sync completes, and says them again on the next attach.
    pub fn diverged(&mut self, ranges: &[(u64, u64)]) {
        for &(o, l) in ranges {
            self.pending.insert(o, l);
        }
    }

    /// The next block run of the sync to send (read from the local file by
    /// the driver under the same lock as guest writes, so it is ordered
    /// with them), with its sequence number. None: nothing left to send;
    /// then [`Primary::sync_end`].
    pub fn sync_chunk(&mut self, now: Instant, max: u64) -> Option<(u64, u64, u64)> {
        let (cursor, _) = self.sync.as_ref()?;
        let run = self.pending.next_run(*cursor, max).or_else(|| self.pending.next_run(0, max))?;
        self.pending.remove(run.0, run.1);
        let seq = self.seq();
        self.flights.push_back(Flight { seq, range: run, bytes: run.1, sent: now });
        if let Some((c, p)) = self.sync.as_mut() {
            *c = run.0 + run.1;
            p.done += run.1;
        }
        Some((run.0, run.1, seq))
    }

    /// Frames applied on the peer but not yet durable there stay in flight
    /// (and their blocks count as lacking) until a flush: without guest
    /// flushes, one is sent when the oldest is `after` old and no flush is
    /// in flight. Returns the `Flush` frame's seq.
    pub fn background_flush(&mut self, now: Instant, after: Duration) -> Option<u64> {
        let oldest = self.flights.front()?;
        if !self.up || self.flush_in_flight() || now.saturating_duration_since(oldest.sent) < after {
            return None;
        }
        self.flush(now)
    }

    /// During a sync, frames count against the window until they are
    /// durable on the peer, so waiting for the background flush would hold
    /// the sync to a window per [`Primary::background_flush`] period. A
    /// flush goes out once half the window is unflushed, so the peer's
    /// fdatasync overlaps the sending of the other half. Returns its seq.
    pub fn window_flush(&mut self, now: Instant, window: u64) -> Option<u64> {
        if !self.up || self.flush_in_flight() || self.lag(now).0 < window / 2 {
            return None;
        }
        self.flush(now)
    }

    /// A `Flush` or `SyncEnd` frame is unacknowledged (the flights
    /// without a block range): one at a time is enough.
    fn flush_in_flight(&self) -> bool {
        self.flights.iter().any(|f| f.range.1 == 0)
    }

    /// Everything of the sync is sent: the `SyncEnd` frame's seq (once).
    pub fn sync_end(&mut self, now: Instant) -> Option<u64> {
        if self.sync.is_none() || self.sync_end_sent.is_some() || !self.pending.is_empty() {
            return None;
        }
        let seq = self.seq();
        self.flights.push_back(Flight { seq, range: (0, 0), bytes: 0, sent: now });
        self.sync_end_sent = Some(seq);
        Some(seq)
    }

    /// The peer's cumulative acknowledgement. Returns the metadata to
    /// change (the outdated mark cleared once the peer is up to date).
    pub fn ack(&mut self, now: Instant, seq: u64, durable: bool) -> MetaChange {
        let mut change = MetaChange::default();
        if seq >= self.next_seq {
            return change;
        }
        if seq > self.applied {
            self.applied = seq;
            self.applied_at = Some(now);
        }
        if !durable {
            return change;
        }
        if seq > self.durable {
            self.durable = seq;
            self.durable_at = Some(now);
        }
        while self.flights.front().is_some_and(|f| f.seq <= seq) {
            self.flights.pop_front();
        }
        if self.sync_end_sent.is_some_and(|s| s <= seq) {
            self.sync = None;
            self.sync_end_sent = None;
            self.peer = PeerCopy::UpToDate;
            // The blocks marked one by one are on the peer now.
            let exact = std::mem::replace(&mut self.exact, Blocks::new(self.size));
            let mut off = 0;
            while let Some((o, l)) = exact.next_run(off, u64::MAX) {
                change.clear.push((o, l));
                off = o + l;
            }
            if self.outdated_mark {
                self.outdated_mark = false;
                change.outdated = Some(false);
            }
        }
        change
    }

    /// The connection is gone (or the driver dropped it on a [`Fault`]).
    /// Every block in flight goes back to `pending`; the returned change
    /// (the outdated mark) and these blocks — already covered by their
    /// extents in the durable bitmap — must be durable before
    /// [`Primary::release`] lets the waiting guest requests complete.
    pub fn down(&mut self) -> MetaChange {
        self.up = false;
        for f in self.flights.drain(..) {
            if f.range.1 > 0 {
                self.pending.insert(f.range.0, f.range.1);
            }
        }
        self.sync = None;
        self.sync_end_sent = None;
        if self.peer != PeerCopy::Inconsistent {
            self.peer = PeerCopy::Outdated;
        }
        let mut change = MetaChange::default();
        if !self.outdated_mark {
            self.outdated_mark = true;
            change.outdated = Some(true);
        }
        change
    }

    /// The driver made [`Primary::down`]'s change durable: every request
    /// issued so far may complete.
    pub fn release(&mut self) {
        self.released = self.next_seq - 1;
    }

    /// Time passed. Returns a fault the driver must act on (drop the link)
    /// and extents to clear from the durable bitmap (cool, nothing of
    /// them pending or in flight).
    pub fn tick(&mut self, now: Instant) -> (Option<Fault>, Vec<(u64, u64)>) {
        let mut fault = None;
        if self.up {
            // The oldest frame still waiting for its acknowledgement: a
            // write for "applied", a flush or the end of a sync for
            // "durable". A silent peer (no acknowledgement of that kind
            // since the frame was sent, or since the last one) drops the
            // link instead of holding the guest's writes (sync) or growing
            // the queue (async).
            let late = self
                .flights
                .iter()
                .find(|f| f.seq > if f.range.1 == 0 { self.durable } else { self.applied });
            if let Some(f) = late {
                let progress = if f.range.1 == 0 { self.durable_at } else { self.applied_at };
                let since = progress.map_or(f.sent, |p| p.max(f.sent));
                let waited = now.saturating_duration_since(since);
                if waited > self.ack_timeout {
                    fault = Some(Fault::AckTimeout { seq: f.seq, waited });
                }
            }
            let (bytes, _) = self.lag(now);
            if self.mode == Mode::Async && bytes > self.max_queue {
                fault = Some(Fault::Overflow { bytes });
            }
        }
        let mut clear = Vec::new();
        if self.up && self.peer == PeerCopy::UpToDate {
            let busy: Vec<u64> = self
                .flights
                .iter()
                .filter(|f| f.range.1 > 0)
                .flat_map(|f| f.range.0 / EXTENT..=(f.range.0 + f.range.1 - 1) / EXTENT)
                .collect();
            let size = self.size;
            self.hot.retain(|&e, last| {
                let cool = now.saturating_duration_since(*last) >= EXTENT_COOL && !busy.contains(&e);
                if cool {
                    let start = e * EXTENT;
                    clear.push((start, EXTENT.min(size - start)));
                }
                !cool
            });
            for &(o, l) in &clear {
                // Marked one by one while the link was down: still needed.
                debug_assert!(!self.pending.contains_any(o, l));
            }
        }
        (fault, clear)
    }
}

/// Paces sync data to at most `rate` bytes per second (0: unpaced) so
/// that an initial sync or a resync leaves the link to guest writes.
/// Guest writes are never paced. Time is a parameter.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    /// When the bytes sent so far have "drained" at the rate.
    until: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: u64) -> Pacer {
        Pacer { rate, until: None }
    }

    /// `bytes` were sent at `now`; returns how long to wait before the
    /// next chunk. Up to 100 ms worth go without a wait; idle time banks no
    /// credit, so a sync resumed after a pause does not burst.
    pub fn sent(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let base = self.until.filter(|u| *u > now).unwrap_or(now);
        let until = base + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        self.until = Some(until);
        until.saturating_duration_since(now + Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn primary(mode: Mode) -> (Primary, Instant) {
        (Primary::new(mode, 64 * MIB, &[], false, false, Duration::from_secs(2), 8 * MIB), Instant::now())
    }

    /// Attach with a fresh peer, send the whole initial sync and finish it.
    fn synced(mode: Mode) -> (Primary, Instant) {
        let (mut p, t) = primary(mode);
        assert_eq!(p.attached(t, ReplicaState::Inconsistent, &[(0, 2 * MIB)]), Some((true, 2 * MIB)));
        let mut last = 0;
        while let Some((_, _, seq)) = p.sync_chunk(t, MIB) {
            last = seq;
        }
        let end = p.sync_end(t).unwrap();
        assert!(end > last);
        p.ack(t, end, true);
        assert_eq!(p.peer(), PeerCopy::UpToDate);
        (p, t)
    }

    #[test]
    fn a_returning_primarys_blocks_are_resynced_even_when_nothing_changed_here() {
        // Promoted from an up-to-date replica (the peer presumed behind), no
        // write since; the old primary comes back with blocks of its own.
        let mut p = Primary::new(Mode::Sync, 64 * MIB, &[], true, true, Duration::from_secs(2), 8 * MIB);
        let t = Instant::now();
        p.diverged(&[(8 * BLOCK, 2 * BLOCK), (63 * MIB, 100 * MIB)]);
        assert_eq!(p.attached(t, ReplicaState::Outdated, &[]), Some((false, 2 * BLOCK + MIB)));
        let mut sent = Vec::new();
        while let Some((o, l, _)) = p.sync_chunk(t, MIB) {
            sent.push((o, l));
        }
        assert_eq!(sent, vec![(8 * BLOCK, 2 * BLOCK), (63 * MIB, MIB)]);
        let end = p.sync_end(t).unwrap();
        p.ack(t, end, true);
        assert_eq!(p.peer(), PeerCopy::UpToDate);
        // Nothing diverged and nothing dirty: up to date at once.
        let mut q = Primary::new(Mode::Sync, 64 * MIB, &[], true, true, Duration::from_secs(2), 8 * MIB);
        q.diverged(&[]);
        assert_eq!(q.attached(t, ReplicaState::UpToDate, &[]), None);
        assert_eq!(q.peer(), PeerCopy::UpToDate);
    }

    #[test]
    fn the_pacer_keeps_sync_data_to_its_rate() {
        let t = Instant::now();
        let mut p = Pacer::new(10 * MIB);
        // 1 MiB chunks sent back to back: after the first 100 ms of burst,
        // each waits its 100 ms.
        let mut at = t;
        let mut sent = 0u64;
        while at < t + Duration::from_secs(10) {
            at += p.sent(at, MIB);
            sent += MIB;
        }
        let rate = sent as f64 / (at - t).as_secs_f64();
        assert!((rate - (10 * MIB) as f64).abs() < (MIB as f64), "{rate} bytes/s");
        // Idle for a while: no credit beyond the burst is banked.
        let later = at + Duration::from_secs(5);
        assert_eq!(p.sent(later, MIB / 2), Duration::ZERO);
        assert!(p.sent(later, 2 * MIB) > Duration::from_millis(100));
        // Unpaced.
        assert_eq!(Pacer::new(0).sent(t, 1 << 40), Duration::ZERO);
    }

    #[test]
    fn blocks_runs_and_counts() {
        let mut b = Blocks::new(10 * BLOCK);
        b.insert(BLOCK, 2 * BLOCK);
        b.insert(5 * BLOCK + 100, 10);
        assert_eq!(b.bytes(), 3 * BLOCK);
        assert_eq!(b.next_run(0, u64::MAX), Some((BLOCK, 2 * BLOCK)));
        assert_eq!(b.next_run(3 * BLOCK, u64::MAX), Some((5 * BLOCK, BLOCK)));
        assert_eq!(b.next_run(0, BLOCK), Some((BLOCK, BLOCK)));
        b.remove(0, 10 * BLOCK);
        assert!(b.is_empty());
        // Past the end is clipped, not a panic.
        b.insert(9 * BLOCK, 100 * BLOCK);
        assert_eq!(b.bytes(), BLOCK);
    }

    #[test]
    fn initial_sync_sends_allocated_extents_then_writes_follow() {
        let (mut p, t) = primary(Mode::Sync);
        // Nothing shipped before the peer is attached: pending, marked exactly.
        let w = p.write(t, 0, 4096);
        assert_eq!(w, WritePlan { mark: vec![(0, 4096)], seq: None, wait: false });
        assert_eq!(p.attached(t, ReplicaState::Inconsistent, &[(MIB, MIB)]), Some((true, MIB + 4096)));
        assert_eq!(p.sync_chunk(t, 256 << 10).map(|c| (c.0, c.1)), Some((0, 4096)));
        assert_eq!(p.sync_chunk(t, 256 << 10).map(|c| (c.0, c.1)), Some((MIB, 256 << 10)));
        // A guest write during the sync is shipped and waited for.
        let w = p.write(t, 10 * MIB, 4096);
        assert!(w.wait && w.seq.is_some());
        assert_eq!(w.mark, vec![(8 * MIB, 4 * MIB)], "its extent is marked once");
        assert_eq!(p.write(t, 10 * MIB + 4096, 4096).mark, vec![]);
        while p.sync_chunk(t, 256 << 10).is_some() {}
        assert_eq!(p.sync_progress().unwrap().done, MIB + 4096);
        let end = p.sync_end(t).unwrap();
        assert_eq!(p.sync_end(t), None, "SyncEnd once");
        assert!(!p.done(w.seq.unwrap(), false));
        p.ack(t, w.seq.unwrap(), false);
        assert!(p.done(w.seq.unwrap(), false) && !p.done(w.seq.unwrap(), true));
        assert_eq!(p.peer(), PeerCopy::Syncing);
        let change = p.ack(t, end, true);
        assert_eq!(p.peer(), PeerCopy::UpToDate);
        assert_eq!(change.clear, vec![(0, 4096)], "the exactly marked block is on the peer now");
    }

    #[test]
    fn a_flush_waits_for_durable() {
        let (mut p, t) = synced(Mode::Sync);
        let w = p.write(t, 0, 4096).seq.unwrap();
        let f = p.flush(t).unwrap();
        p.ack(t, f, false);
        assert!(p.done(w, false) && !p.done(f, true), "applied is not durable");
        p.ack(t, f, true);
        assert!(p.done(f, true));
    }

    #[test]
    fn a_sync_flushes_once_half_its_window_is_unflushed() {
        let (mut p, t) = synced(Mode::Sync);
        p.down();
        p.release();
        for i in 0..8 {
            p.write(t, i * MIB, MIB);
        }
        p.attached(t, ReplicaState::UpToDate, &[]);
        let window = 4 * MIB;
        let (_, _, s1) = p.sync_chunk(t, MIB).unwrap();
        assert_eq!(p.window_flush(t, window), None, "1 MiB of 4 unflushed");
        let (_, _, s2) = p.sync_chunk(t, MIB).unwrap();
        let f = p.window_flush(t, window).expect("half the window unflushed");
        assert!(f > s2 && s2 > s1);
        p.sync_chunk(t, MIB).unwrap();
        assert_eq!(p.window_flush(t, window), None, "one flush in flight at a time");
        p.ack(t, f, true);
        assert_eq!(p.lag(t).0, MIB, "the flush took the two chunks before it out of the window");
    }

    #[test]
    fn link_loss_marks_outdated_before_releasing_waiters() {
        let (mut p, t) = synced(Mode::Sync);
        let w = p.write(t, 3 * MIB, 8192).seq.unwrap();
        assert!(!p.done(w, false));
        let change = p.down();
        assert_eq!(change.outdated, Some(true));
        assert!(!p.done(w, false), "released only once the mark is durable");
        p.release();
        assert!(p.done(w, false));
        assert_eq!(p.peer(), PeerCopy::Outdated);
        assert_eq!(p.pending_bytes(), 8192, "the write in flight is pending");
        // Degraded: writes complete locally, marked block by block.
        let w2 = p.write(t, 20 * MIB, 4096);
        assert_eq!(w2, WritePlan { mark: vec![(20 * MIB, 4096)], seq: None, wait: false });
        assert_eq!(p.down().outdated, None, "marked once");
        // Reconnect: a delta resync of exactly the changed blocks.
        assert_eq!(p.attached(t, ReplicaState::UpToDate, &[(0, 64 * MIB)]), Some((false, 3 * 4096)));
        let mut sent = 0;
        while let Some((_, len, _)) = p.sync_chunk(t, MIB) {
            sent += len;
        }
        assert_eq!(sent, 3 * 4096);
        let end = p.sync_end(t).unwrap();
        let change = p.ack(t, end, true);
        assert_eq!(change.outdated, Some(false));
        assert_eq!(p.peer(), PeerCopy::UpToDate);
    }

    /// Found by tests/disk_failures.rs: a delta resync over a slow link
    /// (its 16 MiB window takes longer than the ack timeout to drain) was
    /// dropped as a silent peer again and again, and never completed.
    #[test]
    fn a_slow_peer_that_keeps_acknowledging_is_not_timed_out() {
        let (mut p, t) = synced(Mode::Sync);
        let seqs: Vec<u64> = (0..40).map(|i| p.write(t, i * 4096, 4096).seq.unwrap()).collect();
        // One acknowledgement every 500 ms: 20 s for the lot, never 2 s
        // without progress.
        for (i, &s) in seqs.iter().enumerate() {
            let now = t + Duration::from_millis(500 * (i as u64 + 1));
            assert_eq!(p.tick(now).0, None, "timed out at {i} while acknowledgements flow");
            p.ack(now, s, false);
        }
        // Then silence with a flush outstanding: timed out 2 s after it.
        let now = t + Duration::from_secs(21);
        let f = p.background_flush(now, Duration::from_secs(1)).unwrap();
        assert_eq!(p.tick(now + Duration::from_secs(1)).0, None);
        assert!(matches!(
            p.tick(now + Duration::from_millis(2100)).0,
            Some(Fault::AckTimeout { seq, .. }) if seq == f
        ));
        // Data acknowledged does not count as progress for a flush.
        let w = p.write(now, 0, 4096).seq.unwrap();
        p.ack(now, w, false);
        assert!(
            matches!(p.tick(now + Duration::from_secs(3)).0, Some(Fault::AckTimeout { seq, .. }) if seq == f)
        );
    }

    #[test]
    fn applied_but_not_durable_is_resent_after_a_loss() {
        let (mut p, t) = synced(Mode::Sync);
        let w = p.write(t, 0, 4096).seq.unwrap();
        p.ack(t, w, false);
        // The peer host may lose what it had not made durable.
        p.down();
        p.release();
        assert_eq!(p.pending_bytes(), 4096);
    }

    #[test]
    fn sync_mode_times_out_instead_of_blocking_forever() {
        let (mut p, t) = synced(Mode::Sync);
        let w = p.write(t, 0, 4096).seq.unwrap();
        assert_eq!(p.tick(t + Duration::from_secs(1)).0, None);
        assert!(matches!(p.tick(t + Duration::from_secs(3)).0, Some(Fault::AckTimeout { .. })));
        // Applied in time: not late, though not durable until a flush.
        p.ack(t, w, false);
        assert_eq!(p.tick(t + Duration::from_secs(3)).0, None);
        let f = p.background_flush(t + Duration::from_secs(3), Duration::from_secs(1)).unwrap();
        assert_eq!(
            p.background_flush(t + Duration::from_secs(3), Duration::from_secs(1)),
            None,
            "one at a time"
        );
        assert!(
            matches!(p.tick(t + Duration::from_secs(6)).0, Some(Fault::AckTimeout { seq, .. }) if seq == f)
        );
        p.ack(t, f, true);
        assert_eq!(p.tick(t + Duration::from_secs(6)).0, None);
        assert_eq!(p.lag(t).0, 0);
    }

    #[test]
    fn async_mode_never_waits_and_overflows_to_a_resync() {
        let (mut p, t) = synced(Mode::Async);
        for i in 0..8 {
            let w = p.write(t, i * MIB, MIB);
            assert!(!w.wait && w.seq.is_some());
        }
        assert_eq!(p.lag(t + Duration::from_secs(1)), (8 * MIB, Duration::from_secs(1)));
        assert_eq!(p.tick(t).0, None);
        p.write(t, 9 * MIB, 4096);
        assert!(matches!(p.tick(t).0, Some(Fault::Overflow { .. })));
        p.down();
        assert_eq!(p.pending_bytes(), 8 * MIB + 4096);
    }

    #[test]
    fn cool_extents_are_cleared_only_when_nothing_of_them_is_in_flight() {
        let (mut p, t) = synced(Mode::Sync);
        let w = p.write(t, 0, 4096).seq.unwrap();
        assert_eq!(p.tick(t + EXTENT_COOL * 2).1, vec![], "in flight");
        p.ack(t, w, true);
        assert_eq!(p.tick(t + EXTENT_COOL * 2).1, vec![(0, EXTENT)]);
        // Marked again on the next write.
        assert_eq!(p.write(t, 0, 4096).mark, vec![(0, EXTENT)]);
    }

    #[test]
    fn a_sequential_run_marks_the_extents_ahead_in_one_write() {
        let (mut p, t) = synced(Mode::Async);
        assert_eq!(p.write(t, 0, MIB).mark, vec![(0, EXTENT)], "a lone write marks its own extent");
        // Extents 1..=1+SEQ_AHEAD, clamped at the end of the 64 MiB disk.
        assert_eq!(p.write(t, EXTENT - MIB, 2 * MIB).mark, vec![(EXTENT, 64 * MIB - EXTENT)]);
        for off in (EXTENT..64 * MIB).step_by(MIB as usize) {
            assert_eq!(p.write(t, off, MIB).mark, vec![], "at {off}: marked ahead already");
        }
        let mut q = synced(Mode::Async).0;
        q.write(t, 14 * EXTENT, 4096);
        assert_eq!(q.write(t, 15 * EXTENT, 4096).mark, vec![(15 * EXTENT, EXTENT)]);
    }

    #[test]
    fn a_restart_resyncs_what_the_durable_bitmap_holds() {
        let p = Primary::new(Mode::Sync, 64 * MIB, &[(0, EXTENT)], true, true, Duration::from_secs(2), MIB);
        assert_eq!(p.peer(), PeerCopy::Outdated);
        assert_eq!(p.pending_bytes(), EXTENT);
    }

    #[test]
    fn acks_for_unsent_seqs_are_ignored() {
        let (mut p, t) = synced(Mode::Sync);
        p.ack(t, 1_000, true);
        assert!(!p.done(999, false));
    }
}
