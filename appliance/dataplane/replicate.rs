//! The primary side's driver: a [`BlockDevice`] that writes the local raw
//! file and ships every write to the peer's data plane in write order,
//! around the state machine `cluster::disk_repl::Primary`. Guest requests
//! arrive on vhost worker threads and block here (sync mode) until the
//! state machine says they may complete; the connection to the peer runs
//! on the data plane's tokio runtime.

use super::device::{BlockDevice, LocalFile};
use super::meta::Meta;
use crate::cluster::disk_frame::{DiskMsg, DiskRef, ReplicaState, SyncKind, MAX_CHUNK};
use crate::cluster::disk_repl::{Fault, MetaChange, Mode, PeerCopy, Primary};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How long a sync-mode peer may take to acknowledge before the link is
/// dropped and the disk goes on degraded.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Async mode: bytes shipped and not yet durable on the peer before the
/// link is dropped (the rest goes by delta resync).
pub const ASYNC_QUEUE: u64 = 256 << 20;
/// Frames older than this that are only applied (not durable) on the peer
/// get a flush of their own.
pub const BACKGROUND_FLUSH: Duration = Duration::from_millis(500);
/// A sync keeps at most this much unacknowledged data in flight.
pub const SYNC_WINDOW: u64 = 16 << 20;

/// Upper bounds (seconds) of the write-wait histogram: from a LAN round
/// trip (~0.1 ms) to past the ack timeout, when a write is let go degraded.
pub const WAIT_BOUNDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A fixed-bucket histogram of atomics: a guest write adds one count
/// without a lock.
#[derive(Default)]
pub struct WaitCounts {
    buckets: [AtomicU64; WAIT_BOUNDS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl WaitCounts {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = WAIT_BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub fn snapshot(&self) -> super::config::WaitHistogram {
        super::config::WaitHistogram {
            bounds: WAIT_BOUNDS.to_vec(),
            counts: self.buckets.iter().map(|c| c.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// One primary disk that replicates.
pub struct Replicated {
    pub name: String,
    pub disk: DiskRef,
    pub epoch: u64,
    local: LocalFile,
    size: u64,
    sm: Mutex<Primary>,
    /// Woken whenever the state machine lets requests complete.
    done: Condvar,
    /// `None` once retired: the metadata's lock is released for the next
    /// holder of the disk (see `meta`'s one-writer rule).
    meta: Mutex<Option<Meta>>,
    /// Set by `retire`: read by waiters without taking `meta`.
    retired: AtomicBool,
    /// The data generation, fixed for a primary.
    generation: u64,
    /// Held from a write's sequence number until its frame is queued (and
    /// by the sync from a chunk's number to its frame), so frames leave in
    /// sequence order.
    order: Mutex<()>,
    /// Ranges whose local write is under way. The local write runs outside
    /// `order`, so that a queue's requests reach the disk together (under
    /// `order` a QD32 guest wrote one block at a time), and this set keeps
    /// the two copies equal instead: a write over a range still being
    /// written waits for it (else the local file and the peer could end
    /// with different winners), and so does a sync chunk's read (else it
    /// could send the block's old content after the write's frame).
    writing: Mutex<Vec<(u64, u64)>>,
    /// Woken when a range leaves `writing`.
    written: Condvar,
    /// The live connection's frame queue.
    out: Mutex<Option<UnboundedSender<DiskMsg>>>,
    pub stats: ReplStats,
    /// The peer node of the current (or last) connection, for the logs.
    peer: Mutex<Option<uuid::Uuid>>,
    /// The peer answered this disk's `Attach` on the live connection.
    linked: AtomicBool,
    /// The running sync: full, bytes planned, started (for its end's log).
    sync_run: Mutex<Option<(bool, u64, Instant)>>,
}

/// Counters shown in the status and `/metrics`.
#[derive(Default)]
pub struct ReplStats {
    /// Bytes sent by syncs (initial and delta) since the data plane started.
    pub sync_bytes: std::sync::atomic::AtomicU64,
    pub resyncs: std::sync::atomic::AtomicU64,
    pub outdates: std::sync::atomic::AtomicU64,
    /// Sum and count of the time sync-mode writes waited for the peer (µs).
    pub wait_us: std::sync::atomic::AtomicU64,
    pub waits: std::sync::atomic::AtomicU64,
    /// Sync mode: what waiting for the peer added to each guest write
    /// (its FUA flush included), from the local write's completion.
    pub write_wait: WaitCounts,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Replicated {
    pub fn new(
        name: String,
        disk: DiskRef,
        epoch: u64,
        local: LocalFile,
        meta: Meta,
        fresh: bool,
        mode: Mode,
    ) -> Replicated {
        let size = local.size();
        let dirty: Vec<(u64, u64)> = meta.dirty_ranges().collect();
        let h = meta.header();
        let generation = h.generation;
        // Until the peer answers, its copy is what the metadata says: never
        // synced for a new disk, else possibly behind.
        let synced_once = h.peer_outdated || !dirty.is_empty() || h.state == ReplicaState::UpToDate && !fresh;
        let sm = Primary::new(mode, size, &dirty, synced_once, h.peer_outdated, ACK_TIMEOUT, ASYNC_QUEUE);
        Replicated {
            name,
            disk,
            epoch,
            local,
            size,
            sm: Mutex::new(sm),
            done: Condvar::new(),
            meta: Mutex::new(Some(meta)),
            retired: AtomicBool::new(false),
            generation,
            order: Mutex::new(()),
            writing: Mutex::new(Vec::new()),
            written: Condvar::new(),
            out: Mutex::new(None),
            stats: ReplStats::default(),
            peer: Mutex::new(None),
            linked: AtomicBool::new(false),
            sync_run: Mutex::new(None),
        }
    }

    /// The peer's node id for the journal's `PEER_ID` ("-" before the first connection).
    fn peer_id(&self) -> String {
        self.peer.lock().unwrap().map_or("-".into(), |p| p.to_string())
    }

    fn send(&self, msg: DiskMsg) {
        if let Some(tx) = self.out.lock().unwrap().as_ref() {
            // A closed queue: the connection is going; its teardown marks
            // everything in flight pending.
            let _ = tx.send(msg);
        }
    }

    /// Blocks until the state machine lets request `seq` complete; an
    /// error if this value is retired first (the write is not known to be
    /// on the peer, and no mark can say so any more).
    fn wait(&self, seq: u64, durable: bool) -> io::Result<()> {
        let started = Instant::now();
        let mut sm = self.sm.lock().unwrap();
        while !sm.done(seq, durable) {
            if self.retired.load(Relaxed) {
                return Err(self.gone());
            }
            sm = self.done.wait_timeout(sm, Duration::from_millis(200)).unwrap().0;
        }
        self.stats.wait_us.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        self.stats.waits.fetch_add(1, Relaxed);
        Ok(())
    }

    fn gone(&self) -> io::Error {
        io::Error::other(format!("{}: no longer served here", self.name))
    }

    /// Waits until no local write overlaps `[off, off + len)`.
    fn settle(&self, off: u64, len: u64) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        let overlaps = |w: &Vec<(u64, u64)>| w.iter().any(|&(o, l)| o < off + len && off < o + l);
        let writing = self.writing.lock().unwrap();
        self.written.wait_while(writing, |w| overlaps(w)).unwrap()
    }

    /// Claims `[off, off + len)` for a local write (after any overlapping
    /// one ends); the guard gives it back. Called under `order`.
    fn claim(&self, off: u64, len: u64) -> Claim<'_> {
        self.settle(off, len).push((off, len));
        Claim { r: self, range: (off, len) }
    }

    /// Runs `f` on the metadata; an error once retired.
    fn with_meta<T>(&self, f: impl FnOnce(&mut Meta) -> io::Result<T>) -> io::Result<T> {
        match self.meta.lock().unwrap().as_mut() {
            Some(m) => f(m),
            None => Err(self.gone()),
        }
    }

    /// This node stops being the disk's primary through this value (its
    /// export stopped, or a new one replaces it): the metadata is closed
    /// now, though a connection task may still hold the value for a while,
    /// so that the disk's next holder (a replica after a move, a new
    /// primary) can open it. Nothing of this value writes to it after.
    pub fn retire(&self) {
        *self.out.lock().unwrap() = None;
        self.meta.lock().unwrap().take();
        self.retired.store(true, Relaxed);
        // Under `sm`, so that no waiter misses the wake-up between its
        // check and its wait.
        let _sm = self.sm.lock().unwrap();
        self.done.notify_all();
    }

    /// Writes a metadata change of the state machine (bitmap clears, the
    /// outdated mark): fdatasyncs, so never on the runtime.
    pub fn apply_meta(&self, change: MetaChange) -> io::Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        self.with_meta(|meta| {
            for (o, l) in &change.clear {
                meta.clear(*o, *l)?;
            }
            if !change.clear.is_empty() {
                meta.persist_clears()?;
            }
            if let Some(out) = change.outdated {
                meta.set_header(|h| h.peer_outdated = out)?;
            }
            Ok(())
        })
    }

    pub fn status(&self) -> ReplStatus {
        let sm = self.sm.lock().unwrap();
        let now = Instant::now();
        let (lag_bytes, lag_age) = sm.lag(now);
        ReplStatus {
            write_wait: (sm.mode() == Mode::Sync).then(|| self.stats.write_wait.snapshot()),
            sync_bytes: self.stats.sync_bytes.load(std::sync::atomic::Ordering::Relaxed),
            peer: sm.peer().as_state(),
            connected: sm.is_up(),
            pending_bytes: sm.pending_bytes(),
            lag_bytes,
            lag_seconds: lag_age.as_secs_f64(),
            sync: sm.sync_progress().map(|p| {
                let secs = now.saturating_duration_since(p.started).as_secs_f64();
                let rate = if secs > 0.0 { p.done as f64 / secs } else { 0.0 };
                SyncStatus {
                    full: p.full,
                    done: p.done,
                    total: p.total.max(p.done),
                    rate,
                    eta: (rate > 0.0).then(|| p.total.saturating_sub(p.done) as f64 / rate),
                }
            }),
        }
    }

    // -- the connection's side (called on the runtime) --

    /// A new connection to node `peer` is up: frames go to `tx`; returns
    /// the `Attach`.
    pub fn connect(&self, tx: UnboundedSender<DiskMsg>, peer: uuid::Uuid) -> DiskMsg {
        *self.out.lock().unwrap() = Some(tx);
        *self.peer.lock().unwrap() = Some(peer);
        DiskMsg::Attach {
            disk: self.disk.clone(),
            epoch: self.epoch,
            size_bytes: self.size,
            generation: self.generation,
        }
    }

    /// The peer's `Diverged` (it was this disk's primary before): its
    /// blocks join the coming resync, which overwrites them there.
    pub fn diverged(&self, ranges: &[(u64, u64)]) {
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        tracing::warn!(disk = %self.name, bytes, ranges = ranges.len(), "the peer's copy has blocks it wrote as the previous primary; the resync replaces them with this node's data");
        self.sm.lock().unwrap().diverged(ranges);
    }

    /// The peer's `Attached`: decides the sync and queues its `SyncBegin`.
    /// Returns whether a sync runs (then [`Replicated::pump`]).
    pub fn attached(&self, state: ReplicaState, generation: u64) -> io::Result<bool> {
        let ours = self.generation;
        // A replica of another data history (never synced from this one,
        // or of data this node has since replaced): its blocks mean nothing.
        let state = if generation != ours { ReplicaState::Inconsistent } else { state };
        let allocated =
            if state == ReplicaState::Inconsistent { allocated(&self.local)? } else { Vec::new() };
        let _order = self.order.lock().unwrap();
        let plan = self.sm.lock().unwrap().attached(Instant::now(), state, &allocated);
        if !self.linked.swap(true, Relaxed) {
            tracing::info!(
                VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                peer_copy = state.as_str(), "the disk's link to the peer is up"
            );
        }
        let Some((full, total)) = plan else { return Ok(false) };
        let kind = if full { SyncKind::Full } else { SyncKind::Delta };
        *self.sync_run.lock().unwrap() = Some((full, total, Instant::now()));
        if full {
            tracing::info!(
                VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                SYNC = "full", BYTES = total, "full sync to the peer begins"
            );
        } else {
            tracing::info!(
                VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                SYNC = "delta", BYTES = total, "resync (delta) to the peer begins"
            );
        }
        self.stats.resyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send(DiskMsg::SyncBegin { disk: self.disk.clone(), kind, total_bytes: total });
        Ok(true)
    }

    /// Sends the next chunk of the sync if the window allows. Returns
    /// `Some(bytes)` sent, `None` when the sync is complete (`SyncEnd`
    /// sent) or not running.
    pub fn pump(&self) -> io::Result<Option<u64>> {
        let _order = self.order.lock().unwrap();
        let mut sm = self.sm.lock().unwrap();
        if sm.sync_progress().is_none() || !sm.is_up() {
            return Ok(None);
        }
        if let Some(seq) = sm.window_flush(Instant::now(), SYNC_WINDOW) {
            drop(sm);
            self.send(DiskMsg::Flush { disk: self.disk.clone(), seq });
            return Ok(Some(0));
        }
        if sm.lag(Instant::now()).0 >= SYNC_WINDOW {
            return Ok(Some(0));
        }
        match sm.sync_chunk(Instant::now(), MAX_CHUNK as u64) {
            Some((off, len, seq)) => {
                drop(sm);
                // A write that took its number before this chunk may still
                // be writing the local file: read after it. (Later writes
                // wait for `order`.)
                drop(self.settle(off, len));
                let mut data = vec![0u8; len as usize];
                self.local.read_at(&mut data, off)?;
                self.send(DiskMsg::Data { disk: self.disk.clone(), seq, offset: off, data });
                self.stats.sync_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                Ok(Some(len))
            }
            None => {
                if let Some(seq) = sm.sync_end(Instant::now()) {
                    self.send(DiskMsg::SyncEnd { disk: self.disk.clone(), seq });
                }
                Ok(None)
            }
        }
    }

    /// The peer's `Ack`, the state machine's part (waiters released): brief,
    /// for the connection's task. The metadata change it returns (only at
    /// the end of a sync) is for [`Replicated::apply_meta`].
    pub fn ack_state(&self, seq: u64, durable: bool) -> MetaChange {
        let (change, now_up) = {
            let mut sm = self.sm.lock().unwrap();
            let was = sm.peer();
            let change = sm.ack(Instant::now(), seq, durable);
            (change, was != PeerCopy::UpToDate && sm.peer() == PeerCopy::UpToDate)
        };
        self.done.notify_all();
        if now_up {
            match self.sync_run.lock().unwrap().take() {
                Some((full, bytes, started)) => tracing::info!(
                    VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                    SYNC = if full { "full" } else { "delta" }, BYTES = bytes,
                    seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                    "sync to the peer done: the peer's copy is up to date"
                ),
                None => tracing::info!(
                    VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                    "the peer's copy is up to date"
                ),
            }
        }
        change
    }

    /// Periodic: the ack timeout and the lag limit, lazy bitmap clears and
    /// background flushes. A fault means: drop the connection.
    pub fn tick(&self) -> io::Result<Option<Fault>> {
        let now = Instant::now();
        let (fault, clear) = {
            // The flush takes a sequence number: it must be queued in that
            // order with a sync chunk or guest write that took one before
            // (they hold `order` from taking the number to queueing). A
            // flush that overtook a write was acknowledged durable and
            // dropped the write from the flights: a hole in the replica that
            // no resync filled (tests/disk_failures.rs, async mode).
            let _order = self.order.lock().unwrap();
            let mut sm = self.sm.lock().unwrap();
            let (fault, clear) = sm.tick(now);
            if let Some(seq) = sm.background_flush(now, BACKGROUND_FLUSH) {
                drop(sm);
                self.send(DiskMsg::Flush { disk: self.disk.clone(), seq });
            }
            (fault, clear)
        };
        self.apply_meta(MetaChange { outdated: None, clear })?;
        Ok(fault)
    }

    /// The connection is gone: mark the peer outdated durably, then let
    /// every waiting guest request complete (degraded, never blocked).
    pub fn disconnected(&self, why: &str) {
        *self.out.lock().unwrap() = None;
        let change = self.sm.lock().unwrap().down();
        if self.linked.swap(false, Relaxed) {
            let broke =
                self.sync_run.lock().unwrap().take().map(|(full, ..)| if full { "full" } else { "delta" });
            tracing::warn!(
                VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                reason = why, sync_broken_off = broke.unwrap_or("none"), "the disk's link to the peer is lost"
            );
        }
        if change.outdated == Some(true) {
            self.stats.outdates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                VM_ID = %self.disk.vm, PEER_ID = %self.peer_id(), DEVICE = %self.disk.device,
                reason = why, "the peer's copy is marked outdated; going on degraded"
            );
        }
        // If the mark cannot be written, the waiters must not be released:
        // they would be acknowledged writes the peer may never get.
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.apply_meta(change.clone()) {
                Ok(()) => break,
                // Retired: the waiters fail (`wait`); the disk's next
                // holder reads the state from the metadata itself.
                Err(_) if self.retired.load(Relaxed) => return,
                Err(e) => {
                    tracing::error!(disk = %self.name, error = %e, "cannot record the peer outdated; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        self.sm.lock().unwrap().release();
        self.done.notify_all();
    }
}

/// A local write's range in `Replicated::writing`, until dropped.
struct Claim<'a> {
    r: &'a Replicated,
    range: (u64, u64),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut w = self.r.writing.lock().unwrap();
        if let Some(i) = w.iter().position(|&r| r == self.range) {
            w.swap_remove(i);
        }
        drop(w);
        self.r.written.notify_all();
    }
}

/// Status of one replicating primary disk.
#[derive(Debug, Clone)]
pub struct ReplStatus {
    pub peer: ReplicaState,
    pub connected: bool,
    pub pending_bytes: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub sync: Option<SyncStatus>,
    pub sync_bytes: u64,
    pub write_wait: Option<super::config::WaitHistogram>,
}

#[derive(Debug, Clone)]
pub struct SyncStatus {
    pub full: bool,
    pub done: u64,
    pub total: u64,
    pub rate: f64,
    pub eta: Option<f64>,
}

impl BlockDevice for Replicated {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.local.read_at(buf, off)
    }

    fn write_at(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        let (seq, wait, flush, claim) = {
            let _order = self.order.lock().unwrap();
            let claim = self.claim(off, data.len() as u64);
            let plan = self.sm.lock().unwrap().write(Instant::now(), off, data.len() as u64);
            if !plan.mark.is_empty() {
                // Write-ahead: the blocks are in the durable bitmap before
                // they can be on the disk.
                self.with_meta(|m| m.mark_dirty_durable(&plan.mark).map_err(io_err))?;
            }
            // Shipped before the local write, as DRBD submits both at once:
            // the peer's round trip overlaps the local write instead of
            // following it (sync mode waits for both). A local write that
            // then fails leaves the peer with a block the guest was told
            // failed, whose content is undefined either way.
            let flush = match plan.seq {
                Some(seq) => {
                    self.send(DiskMsg::Data {
                        disk: self.disk.clone(),
                        seq,
                        offset: off,
                        data: data.to_vec(),
                    });
                    // FUA: durable on both copies, like a flush of this write.
                    let f = if fua { self.sm.lock().unwrap().flush(Instant::now()) } else { None };
                    if let Some(f) = f {
                        self.send(DiskMsg::Flush { disk: self.disk.clone(), seq: f });
                    }
                    f
                }
                None => None,
            };
            (plan.seq, plan.wait, flush, claim)
        };
        let local = self.local.write_at(data, off, fua);
        drop(claim);
        local?;
        if let (Some(seq), true) = (seq, wait) {
            let started = Instant::now();
            self.wait(seq, false)?;
            if let Some(f) = flush {
                self.wait(f, true)?;
            }
            self.stats.write_wait.observe(started.elapsed());
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.local.flush()?;
        let seq = {
            let _order = self.order.lock().unwrap();
            let seq = self.sm.lock().unwrap().flush(Instant::now());
            if let Some(seq) = seq {
                self.send(DiskMsg::Flush { disk: self.disk.clone(), seq });
            }
            seq
        };
        // Never acknowledge a flush the peer has not made durable (sync);
        // async flushes are local.
        let mode = self.sm.lock().unwrap().mode();
        if let (Some(seq), Mode::Sync) = (seq, mode) {
            self.wait(seq, true)?;
        }
        Ok(())
    }
}

/// A fresh, non-zero data generation: names a disk's data history, given
/// when its metadata is made. A replica that completed a sync of it holds
/// the same number; any other replica needs a full sync.
pub fn new_generation() -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("OS random source unavailable");
    u64::from_le_bytes(b) | 1
}

/// The file's allocated extents (SEEK_DATA / SEEK_HOLE): what a full sync
/// sends. Holes read as zeros on both sides.
pub fn allocated(f: &LocalFile) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = f.fd();
    let size = f.size() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(io_err(e)),
        };
        let hole = lseek(fd, data, Whence::SeekHole).map_err(io_err)?.min(size);
        // Whole blocks: the state machine tracks 4 KiB.
        let start = data as u64 / 4096 * 4096;
        let end = (hole as u64).div_ceil(4096) * 4096;
        out.push((start, end.min(size as u64) - start));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::config::DiskRole;
    use crate::dataplane::meta::MetaHeader;

    /// A primary disk of 1 MiB (async) whose fresh peer has completed its
    /// (empty) full sync: streaming, with the frame queue.
    fn streaming(
        tag: &str,
    ) -> (std::sync::Arc<Replicated>, tokio::sync::mpsc::UnboundedReceiver<DiskMsg>, std::path::PathBuf) {
        let dir = super::super::meta::scratch(tag);
        let path = dir.join("vda.raw");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let disk = DiskRef { vm: uuid::Uuid::from_bytes([7; 16]), device: "vda".into() };
        let header = MetaHeader {
            vm: disk.vm,
            device: "vda".into(),
            role: DiskRole::Primary,
            epoch: 1,
            generation: 9,
            state: ReplicaState::UpToDate,
            peer_outdated: false,
            size_bytes: 1 << 20,
        };
        let meta = Meta::create(&super::super::meta::meta_path(&path), header).unwrap();
        let local = LocalFile::open(&path).unwrap();
        let r = std::sync::Arc::new(Replicated::new("t".into(), disk, 1, local, meta, true, Mode::Async));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = r.connect(tx, uuid::Uuid::from_bytes([8; 16]));
        assert!(r.attached(ReplicaState::Inconsistent, 0).unwrap());
        while r.pump().unwrap().is_some() {}
        let mut end = None;
        while let Ok(m) = rx.try_recv() {
            if let DiskMsg::SyncEnd { seq, .. } = m {
                end = Some(seq);
            }
        }
        let change = r.ack_state(end.unwrap(), true);
        r.apply_meta(change).unwrap();
        (r, rx, dir)
    }

    /// Writes to different blocks run their local writes together; a
    /// write over a block whose local write is under way waits for it, so
    /// that the local file and the peer end with the same winner.
    #[test]
    fn an_overlapping_write_waits_for_the_local_write_under_way() {
        let (r, mut rx, dir) = streaming("replicate-claim");
        let held = r.claim(4096, 8192);
        // Another block: not held up.
        r.write_at(&[1; 4096], 0, false).unwrap();
        let r2 = r.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let overlapping = std::thread::spawn(move || {
            r2.write_at(&[2; 4096], 8192, false).unwrap();
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err(), "went past a claimed block");
        drop(held);
        done_rx.recv_timeout(Duration::from_secs(10)).expect("released when the claim ended");
        overlapping.join().unwrap();
        let offsets: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                DiskMsg::Data { offset, .. } => Some(offset),
                _ => None,
            })
            .collect();
        assert_eq!(offsets, [0, 8192]);
        assert!(r.writing.lock().unwrap().is_empty(), "claims left behind");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A sync chunk is read only after the local writes that took a number
    /// before it have finished: else it could carry a block's old content
    /// after the write's own frame, and the peer would keep the old one.
    #[test]
    fn a_sync_chunk_reads_after_the_local_write_under_way() {
        let (r, _rx, dir) = streaming("replicate-settle");
        // An outage, writes, the link back: a delta resync of those blocks.
        r.disconnected("test");
        r.write_at(&[3; 4096], 4096, false).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = r.connect(tx, uuid::Uuid::from_bytes([8; 16]));
        assert!(r.attached(ReplicaState::UpToDate, 9).unwrap());
        let held = r.claim(4096, 4096);
        let r2 = r.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let pumping = std::thread::spawn(move || {
            let sent = r2.pump().unwrap();
            done_tx.send(sent).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err(), "read a block being written");
        drop(held);
        let sent = done_rx.recv_timeout(Duration::from_secs(10)).expect("read once the write ended");
        pumping.join().unwrap();
        assert_eq!(sent, Some(4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A background flush never overtakes a guest write that took its seq
    /// before it: the write holds `order` from its seq to its frame.
    #[test]
    fn a_background_flush_waits_for_the_write_that_took_an_earlier_seq() {
        let (r, mut rx, dir) = streaming("replicate-order");
        r.write_at(&[1; 4096], 0, false).unwrap();
        std::thread::sleep(BACKGROUND_FLUSH + Duration::from_millis(100));
        // A second write between its seq and its frame, when the tick
        // comes: the tick's flush is due (the first write is old enough).
        let order = r.order.lock().unwrap();
        let seq = r.sm.lock().unwrap().write(Instant::now(), 4096, 4096).seq.unwrap();
        let r2 = r.clone();
        let ticking = std::thread::spawn(move || r2.tick().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        r.send(DiskMsg::Data { disk: r.disk.clone(), seq, offset: 4096, data: vec![2; 4096] });
        drop(order);
        ticking.join().unwrap();
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).filter_map(|m| m.seq()).collect();
        assert!(seqs.len() >= 3, "{seqs:?}");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "frames left out of order: {seqs:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
