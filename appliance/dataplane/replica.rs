//! The secondary's copy of one replicated disk: a raw replica file, its
//! metadata (`<replica>.meta`, [`super::meta`]) and, during a delta
//! resync, an undo log (`<replica>.undo`). [`Replica`] applies the
//! primary's disk frames and refuses hostile ones before it touches either
//! file: another disk, a stale epoch, a range beyond the disk, a chunk
//! over [`MAX_CHUNK`], a range not in whole sectors, a sequence number
//! that does not increase, data before `Attach` or outside a sync of a
//! replica that is not up to date.
//!
//! Consistency (DRBD's disk states on a plain file):
//! - A full sync makes the replica `Inconsistent` (durably, before any
//!   data) until `SyncEnd`: a broken full sync leaves no consistent copy,
//!   and says so.
//! - A delta resync starts from a consistent replica, so it keeps one
//!   recoverable: the state is `Syncing` (durable) and, before any range
//!   is overwritten, its old content is appended to the undo log and the
//!   log is fdatasync'd. A resync that broke off can be rolled back
//!   (`rollback_to_consistent(force)`) to the exact pre-resync image,
//!   which is then `Outdated`.
//! - `SyncEnd`: data fdatasync'd, then `UpToDate` (durable), then the undo
//!   log deleted. A crash in between leaves `Syncing` with the undo log or
//!   `UpToDate` (whose leftover log `open` deletes), never `UpToDate` over
//!   data that is not durable.
//!
//! The file is opened without O_DIRECT: the secondary's durability points
//! are the fdatasyncs of `Flush`, `SyncEnd` and the undo log, and the
//! undo-before-overwrite order holds because the overwrite is issued only
//! after the log's fdatasync returned.
//!
//! Plain and synchronous: the data plane calls it from a blocking task.

use super::config::DiskRole;
use super::meta::{self, crc32, sync_parent, Meta, MetaHeader};
use crate::cluster::disk_frame::{DiskMsg, DiskRef, RejectReason, SyncKind, MAX_CHUNK, SECTOR};
use crate::cluster::ReplicaState;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Largest disk a primary may announce (64 TiB): a hostile `Attach` must
/// not make a file of any size.
pub const MAX_DISK_SIZE: u64 = 1 << 46;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("no replica of disk {device} of VM {vm} here")]
    UnknownDisk { vm: Uuid, device: String },
    #[error("epoch {theirs} is older than this replica's epoch {ours}")]
    StaleEpoch { theirs: u64, ours: u64 },
    #[error("range {offset}+{len} ends beyond the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("chunk of {len} bytes is over the limit of {MAX_CHUNK}")]
    Oversized { len: usize },
    #[error("range {offset}+{len} is not in whole sectors of {SECTOR} bytes (or empty)")]
    Misaligned { offset: u64, len: u64 },
    /// A sequence number that does not increase, or a message out of the
    /// protocol's order.
    #[error("{0}")]
    BadOrder(String),
    #[error("disk data before Attach")]
    NotAttached,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "rolling back discards what the broken resync applied and leaves the replica outdated \
         (its image from before the resync): pass force to do it"
    )]
    RollbackNeedsForce,
    #[error(
        "the replica is inconsistent (a full sync did not complete) and there is no older \
         consistent copy to roll back to"
    )]
    NoConsistentCopy,
    #[error("the replica is {0}: there is no broken resync to roll back")]
    NothingToRollBack(ReplicaState),
    #[error("a sync of this replica is running")]
    SyncRunning,
    #[error(
        "the replica is {0}: it may lack writes the primary acknowledged; it is promoted only \
         with force (a syncing replica is first rolled back to its image from before the resync)"
    )]
    PromoteNeedsForce(ReplicaState),
    /// The files on disk are not this replica's (another disk's meta, or
    /// this node is the disk's primary).
    #[error("{0}")]
    Mismatch(String),
}

impl ReplicaError {
    /// What the primary is told in `Rejected`.
    pub fn reason(&self) -> RejectReason {
        match self {
            ReplicaError::UnknownDisk { .. } | ReplicaError::Mismatch(_) => RejectReason::UnknownDisk,
            ReplicaError::StaleEpoch { .. } => RejectReason::StaleEpoch,
            ReplicaError::OutOfRange { .. } => RejectReason::OutOfRange,
            ReplicaError::Oversized { .. } => RejectReason::Oversized,
            ReplicaError::Misaligned { .. } => RejectReason::Misaligned,
            ReplicaError::NotAttached => RejectReason::NotAttached,
            ReplicaError::BadOrder(_)
            | ReplicaError::SyncRunning
            | ReplicaError::RollbackNeedsForce
            | ReplicaError::NoConsistentCopy
            | ReplicaError::NothingToRollBack(_)
            | ReplicaError::PromoteNeedsForce(_) => RejectReason::BadOrder,
            ReplicaError::Io { .. } => RejectReason::Io,
        }
    }

    /// The `Rejected` frame for a refusal of `msg`.
    pub fn rejected(&self, msg: &DiskMsg) -> DiskMsg {
        DiskMsg::Rejected {
            disk: msg.disk().cloned(),
            seq: msg.seq(),
            reason: self.reason(),
            message: self.to_string(),
        }
    }
}

type Result<T> = std::result::Result<T, ReplicaError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ReplicaError {
    let what = what.into();
    move |source| ReplicaError::Io { what, source }
}

/// `<replica>.undo`, beside the replica file.
pub fn undo_path(replica: &Path) -> PathBuf {
    let mut name = replica.file_name().unwrap_or_default().to_os_string();
    name.push(".undo");
    replica.with_file_name(name)
}

/// Steps at which a test makes the replica fail, as a crash there would
/// leave it (the files as they are at that point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// apply: the undo records are durable, no data written yet.
    UndoSynced,
    /// apply: the first chunk of a batch is written, the rest not.
    FirstChunkWritten,
    /// end_sync: data fdatasync'd, state not yet up to date.
    EndSyncDataSynced,
    /// end_sync: state up to date, undo log not yet deleted.
    EndSyncStateWritten,
}

/// What the current primary's `Attach` set up; gone with `Detach`, a new
/// `Attach`, or the replica dropped.
#[derive(Debug)]
struct Attachment {
    epoch: u64,
    /// The primary's data generation: the replica's own once a sync ends.
    generation: u64,
    last_seq: Option<u64>,
    sync: Option<SyncKind>,
    /// Applied and durable through this seq.
    applied: Option<u64>,
    durable: Option<u64>,
    /// A sequenced frame was refused or failed: every later one is
    /// refused too, so a cumulative ack can never cover a write that was
    /// not applied. The primary attaches again and resyncs.
    broken: Option<String>,
}

/// One write: a `Data` frame's payload.
#[derive(Debug, Clone, Copy)]
struct Chunk<'a> {
    seq: u64,
    offset: u64,
    data: &'a [u8],
}

#[derive(Debug)]
pub struct Replica {
    path: PathBuf,
    file: File,
    meta: Meta,
    disk: DiskRef,
    attached: Option<Attachment>,
    /// Open while a delta resync is being applied.
    undo: Option<UndoLog>,
    fail_at: Option<Step>,
    /// Written since the last writeback hint: the span and its bytes.
    unhinted: Option<(u64, u64, u64)>,
}

/// Bytes written between two writeback hints ([`start_writeback`]): one
/// call per few MiB, not per 4 KiB write, whose ack it would delay.
const HINT_EVERY: u64 = 4 << 20;

impl Replica {
    /// Opens the replica of `vm`'s `device` at `path`, creating it (a
    /// sparse file of `size_bytes`, `Inconsistent`, epoch 0) when it has no
    /// metadata yet; an existing replica keeps its own size (the primary's
    /// `Attach` resizes it). Finishes what a crash interrupted: an undo log
    /// left beside a consistent or inconsistent replica is deleted; a
    /// `Syncing` replica without its undo log is `Inconsistent`.
    pub fn open(path: &Path, size_bytes: u64, vm: Uuid, device: &str) -> Result<Replica> {
        let disk = DiskRef { vm, device: device.to_owned() };
        let meta_path = meta::meta_path(path);
        let shown = path.display().to_string();
        let (file, meta) = if meta_path.exists() {
            let meta = Meta::open(&meta_path).map_err(io_err(format!("{}", meta_path.display())))?;
            let h = meta.header();
            if h.vm != vm || h.device != device {
                return Err(ReplicaError::Mismatch(format!(
                    "{shown} is the replica of disk {} of VM {}, not {device} of {vm}",
                    h.device, h.vm
                )));
            }
            if h.role != DiskRole::Secondary {
                return Err(ReplicaError::Mismatch(format!(
                    "{shown}: this node is the primary of disk {device} of VM {vm}, not a replica"
                )));
            }
            let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(&shown))?;
            let len = file.metadata().map_err(io_err(&shown))?.len();
            if len < h.size_bytes && h.state == ReplicaState::Inconsistent {
                // A full sync's zeroing (truncate, extend) cut by a crash:
                // the content means nothing yet.
                file.set_len(h.size_bytes).map_err(io_err(&shown))?;
            } else if len < h.size_bytes {
                return Err(ReplicaError::Mismatch(format!(
                    "{shown} has {len} bytes, its metadata says {}",
                    h.size_bytes
                )));
            }
            if len > h.size_bytes {
                // A shrink that crashed after the metadata was written.
                file.set_len(h.size_bytes).map_err(io_err(&shown))?;
            }
            (file, meta)
        } else {
            check_size(size_bytes)?;
            // The file first: a crash before the metadata exists leaves a
            // file the next open takes as new (inconsistent) again.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_err(&shown))?;
            file.set_len(size_bytes).map_err(io_err(&shown))?;
            file.sync_data().map_err(io_err(&shown))?;
            sync_parent(path).map_err(io_err(&shown))?;
            let header = MetaHeader {
                vm,
                device: device.to_owned(),
                role: DiskRole::Secondary,
                epoch: 0,
                generation: 0,
                state: ReplicaState::Inconsistent,
                peer_outdated: false,
                size_bytes,
            };
            let meta =
                Meta::create(&meta_path, header).map_err(io_err(format!("{}", meta_path.display())))?;
            (file, meta)
        };
        let mut replica = Replica {
            path: path.to_owned(),
            file,
            meta,
            disk,
            attached: None,
            undo: None,
            fail_at: None,
            unhinted: None,
        };
        let undo = undo_path(path);
        match (replica.state(), undo.exists()) {
            (ReplicaState::Syncing, false) => {
                tracing::warn!(replica = %shown, "replica was syncing but has no undo log: inconsistent");
                replica.set_state(ReplicaState::Inconsistent)?;
            }
            (ReplicaState::Syncing, true) => {}
            (_, true) => remove_undo(&undo)?,
            (_, false) => {}
        }
        Ok(replica)
    }

    pub fn disk(&self) -> &DiskRef {
        &self.disk
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state(&self) -> ReplicaState {
        self.meta.header().state
    }

    pub fn epoch(&self) -> u64 {
        self.meta.header().epoch
    }

    /// The generation of the last sync completed.
    pub fn generation(&self) -> u64 {
        self.meta.header().generation
    }

    pub fn size_bytes(&self) -> u64 {
        self.meta.header().size_bytes
    }

    /// The metadata (read only): its dirty bitmap holds the blocks this
    /// node wrote while it was primary (after a failback: what the new
    /// primary's resync must also cover, and what it discards).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// A broken delta resync's undo log is there (rollback is possible).
    pub fn has_undo(&self) -> bool {
        undo_path(&self.path).exists()
    }

    /// Highest seq applied, and highest made durable, in this attachment.
    pub fn applied_seq(&self) -> Option<u64> {
        self.attached.as_ref().and_then(|a| a.applied)
    }

    pub fn durable_seq(&self) -> Option<u64> {
        self.attached.as_ref().and_then(|a| a.durable)
    }

    /// The epoch of the primary attached now, if any.
    pub fn attached_epoch(&self) -> Option<u64> {
        self.attached.as_ref().map(|a| a.epoch)
    }

    /// Refuses a frame that is about another disk (the caller looks
    /// replicas up by `DiskRef`; this is the check behind it).
    pub fn check_disk(&self, msg: &DiskMsg) -> Result<()> {
        match msg.disk() {
            Some(d) if *d == self.disk => Ok(()),
            Some(d) => Err(ReplicaError::UnknownDisk { vm: d.vm, device: d.device.clone() }),
            None => Err(ReplicaError::BadOrder(format!("{} is not about a disk", msg.kind()))),
        }
    }

    /// Applies one frame of the primary; the answer to send, if any
    /// (`Attached` to `Attach`, a durable `Ack` to `Flush` and `SyncEnd`;
    /// `Data` is acknowledged by the caller from [`Replica::applied_seq`],
    /// batched). On an error nothing of the frame was applied; answer it
    /// with [`ReplicaError::rejected`].
    pub fn handle(&mut self, msg: &DiskMsg) -> Result<Option<DiskMsg>> {
        self.check_disk(msg)?;
        let disk = self.disk.clone();
        match msg {
            DiskMsg::Attach { epoch, size_bytes, generation, .. } => {
                let state = self.attach(*epoch, *size_bytes, *generation)?;
                Ok(Some(DiskMsg::Attached { disk, state, generation: self.generation() }))
            }
            DiskMsg::SyncBegin { kind, .. } => self.begin_sync(*kind).map(|()| None),
            DiskMsg::Data { .. } => self.apply_batch(std::slice::from_ref(msg)).map(|()| None),
            DiskMsg::Flush { seq, .. } => {
                let seq = self.flush(*seq)?;
                Ok(Some(DiskMsg::Ack { disk, seq, durable: true }))
            }
            DiskMsg::SyncEnd { seq, .. } => {
                self.end_sync(*seq)?;
                Ok(Some(DiskMsg::Ack { disk, seq: *seq, durable: true }))
            }
            DiskMsg::Detach { .. } => {
                self.detach();
                Ok(None)
            }
            other => {
                Err(ReplicaError::BadOrder(format!("{} is not a message for a secondary", other.kind())))
            }
        }
    }

    /// The primary of `epoch` takes the disk. Refused for an epoch lower
    /// than the one stored; a higher one is stored durably. A different
    /// `size_bytes` resizes the replica (not during a broken resync: its
    /// undo log covers the old size). Returns the replica's own state.
    pub fn attach(&mut self, epoch: u64, size_bytes: u64, generation: u64) -> Result<ReplicaState> {
        let ours = self.epoch();
        if epoch < ours {
            return Err(ReplicaError::StaleEpoch { theirs: epoch, ours });
        }
        check_size(size_bytes)?;
        if size_bytes != self.size_bytes() {
            if self.has_undo() {
                return Err(ReplicaError::BadOrder(
                    "cannot resize a replica during a broken resync: roll it back or finish the resync first"
                        .into(),
                ));
            }
            self.resize(size_bytes)?;
        }
        if epoch > ours {
            self.meta.set_header(|h| h.epoch = epoch).map_err(io_err("storing the epoch"))?;
        }
        self.undo = None;
        self.attached = Some(Attachment {
            epoch,
            generation,
            last_seq: None,
            sync: None,
            applied: None,
            durable: None,
            broken: None,
        });
        Ok(self.state())
    }

    fn resize(&mut self, size: u64) -> Result<()> {
        let shown = self.path.display().to_string();
        if size > self.size_bytes() {
            self.file.set_len(size).map_err(io_err(&shown))?;
            self.file.sync_data().map_err(io_err(&shown))?;
            self.meta.resize(size).map_err(io_err("resizing the metadata"))
        } else {
            self.meta.resize(size).map_err(io_err("resizing the metadata"))?;
            self.file.set_len(size).map_err(io_err(&shown))?;
            self.file.sync_data().map_err(io_err(&shown))
        }
    }

    /// The primary stops replicating this disk here (for now).
    pub fn detach(&mut self) {
        self.attached = None;
        self.undo = None;
    }

    /// The attachment, unless it is missing or broken.
    fn live(&self) -> Result<&Attachment> {
        let a = self.attached.as_ref().ok_or(ReplicaError::NotAttached)?;
        if let Some(why) = &a.broken {
            return Err(ReplicaError::BadOrder(format!(
                "an earlier frame of this attachment failed ({why}): attach again"
            )));
        }
        Ok(a)
    }

    fn check_seq(a: &Attachment, last: Option<u64>, seq: u64) -> Result<()> {
        match last.or(a.last_seq) {
            Some(last) if seq <= last => {
                Err(ReplicaError::BadOrder(format!("seq {seq} does not follow seq {last}")))
            }
            _ => Ok(()),
        }
    }

    /// Runs `f`; if it fails, the attachment is broken (see
    /// [`Attachment::broken`]).
    fn sequenced<T>(&mut self, f: impl FnOnce(&mut Replica) -> Result<T>) -> Result<T> {
        let r = f(self);
        if let Err(e) = &r {
            if let Some(a) = self.attached.as_mut() {
                a.broken.get_or_insert_with(|| e.to_string());
            }
        }
        r
    }

    /// A sync begins. Full: the replica is `Inconsistent` (durable) and
    /// zeroed before any data (the primary sends only allocated extents).
    /// Delta: the replica must be consistent, or a broken delta resync
    /// (whose undo log it continues); it becomes `Syncing` with an undo log
    /// that is durable before the state says so.
    pub fn begin_sync(&mut self, kind: SyncKind) -> Result<()> {
        self.sequenced(|r| r.begin_sync_inner(kind))
    }

    fn begin_sync_inner(&mut self, kind: SyncKind) -> Result<()> {
        if self.live()?.sync.is_some() {
            return Err(ReplicaError::SyncRunning);
        }
        let undo = undo_path(&self.path);
        match kind {
            SyncKind::Full => {
                self.set_state(ReplicaState::Inconsistent)?;
                self.undo = None;
                if undo.exists() {
                    remove_undo(&undo)?;
                }
                let shown = self.path.display().to_string();
                let size = self.size_bytes();
                self.file.set_len(0).map_err(io_err(&shown))?;
                self.file.set_len(size).map_err(io_err(&shown))?;
                self.file.sync_data().map_err(io_err(&shown))?;
            }
            SyncKind::Delta => match self.state() {
                ReplicaState::Inconsistent => {
                    return Err(ReplicaError::BadOrder(
                        "an inconsistent replica needs a full sync, not a delta".into(),
                    ))
                }
                ReplicaState::Syncing => self.undo = Some(UndoLog::resume(&undo, self.size_bytes())?),
                ReplicaState::UpToDate | ReplicaState::Outdated => {
                    self.undo = Some(UndoLog::create(&undo)?);
                    self.set_state(ReplicaState::Syncing)?;
                }
            },
        }
        self.attached.as_mut().expect("live").sync = Some(kind);
        Ok(())
    }

    /// A streamed write (a batch of one, see [`Replica::apply_batch`]).
    pub fn write(&mut self, seq: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.sequenced(|r| r.apply_chunks(&[Chunk { seq, offset, data }]))
    }

    /// Applies consecutive `Data` frames of this disk. All are checked
    /// first: on a refusal nothing of the batch is applied. During a delta
    /// resync the old content of every range is appended to the undo log
    /// and the log fdatasync'd once, before the first byte is overwritten.
    pub fn apply_batch(&mut self, msgs: &[DiskMsg]) -> Result<()> {
        let mut chunks = Vec::with_capacity(msgs.len());
        for m in msgs {
            self.check_disk(m)?;
            match m {
                DiskMsg::Data { seq, offset, data, .. } => {
                    chunks.push(Chunk { seq: *seq, offset: *offset, data })
                }
                other => {
                    return Err(ReplicaError::BadOrder(format!("{} in a batch of data", other.kind())));
                }
            }
        }
        self.sequenced(|r| r.apply_chunks(&chunks))
    }

    fn check_chunk(&self, c: &Chunk, last: Option<u64>) -> Result<()> {
        let a = self.live()?;
        let len = c.data.len() as u64;
        if c.data.len() > MAX_CHUNK {
            return Err(ReplicaError::Oversized { len: c.data.len() });
        }
        if len == 0 || c.offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(ReplicaError::Misaligned { offset: c.offset, len });
        }
        let size = self.size_bytes();
        if !matches!(c.offset.checked_add(len), Some(end) if end <= size) {
            return Err(ReplicaError::OutOfRange { offset: c.offset, len, size });
        }
        Self::check_seq(a, last, c.seq)?;
        if a.sync.is_none() && self.state() != ReplicaState::UpToDate {
            return Err(ReplicaError::BadOrder(format!(
                "data outside a sync for a replica that is {}",
                self.state()
            )));
        }
        Ok(())
    }

    fn apply_chunks(&mut self, chunks: &[Chunk]) -> Result<()> {
        let mut last = None;
        for c in chunks {
            self.check_chunk(c, last)?;
            last = Some(c.seq);
        }
        let shown = self.path.display().to_string();
        if let Some(undo) = self.undo.as_mut() {
            undo.save(&self.file, chunks).map_err(io_err(format!("{}", undo.path.display())))?;
        }
        self.step(Step::UndoSynced)?;
        for (i, c) in chunks.iter().enumerate() {
            self.file.write_all_at(c.data, c.offset).map_err(io_err(&shown))?;
            let (start, end) = (c.offset, c.offset + c.data.len() as u64);
            let (lo, hi, bytes) =
                self.unhinted.map_or((start, end, 0), |(lo, hi, b)| (lo.min(start), hi.max(end), b));
            self.unhinted = Some((lo, hi, bytes + c.data.len() as u64));
            if bytes + c.data.len() as u64 >= HINT_EVERY {
                start_writeback(&self.file, lo, hi - lo);
                self.unhinted = None;
            }
            if i == 0 {
                self.step(Step::FirstChunkWritten)?;
            }
        }
        let a = self.attached.as_mut().expect("checked live");
        a.last_seq = last.or(a.last_seq);
        a.applied = a.last_seq;
        Ok(())
    }

    /// Makes everything applied durable (fdatasync); returns the seq now
    /// durable (`seq`: all before it is covered).
    pub fn flush(&mut self, seq: u64) -> Result<u64> {
        self.sequenced(|r| {
            Self::check_seq(r.live()?, None, seq)?;
            r.file.sync_data().map_err(io_err(r.path.display().to_string()))?;
            r.unhinted = None;
            let a = r.attached.as_mut().expect("checked live");
            a.last_seq = Some(seq);
            a.applied = Some(seq);
            a.durable = Some(seq);
            Ok(seq)
        })
    }

    /// The sync is complete: data fdatasync'd, then `UpToDate` with the
    /// primary's generation (durable), then the undo log deleted.
    pub fn end_sync(&mut self, seq: u64) -> Result<()> {
        self.sequenced(|r| {
            let a = r.live()?;
            Self::check_seq(a, None, seq)?;
            if a.sync.is_none() {
                return Err(ReplicaError::BadOrder("SyncEnd without SyncBegin".into()));
            }
            let generation = a.generation;
            r.file.sync_data().map_err(io_err(r.path.display().to_string()))?;
            r.step(Step::EndSyncDataSynced)?;
            r.meta
                .set_header(|h| {
                    h.state = ReplicaState::UpToDate;
                    h.generation = generation;
                })
                .map_err(io_err("storing the state"))?;
            r.step(Step::EndSyncStateWritten)?;
            if r.undo.take().is_some() || r.has_undo() {
                remove_undo(&undo_path(&r.path))?;
            }
            // Blocks this node wrote as a primary (failback) now hold the
            // new primary's data: its bits mean nothing any more. Lazy, like
            // every clear: a bit left by a crash costs one block's resync.
            let size = r.size_bytes();
            if r.meta.dirty_bytes() > 0 {
                r.meta.clear(0, size).map_err(io_err("clearing the dirty bitmap"))?;
                r.meta.persist_clears().map_err(io_err("clearing the dirty bitmap"))?;
            }
            let a = r.attached.as_mut().expect("checked live");
            a.sync = None;
            a.last_seq = Some(seq);
            a.applied = Some(seq);
            a.durable = Some(seq);
            Ok(())
        })
    }

    /// After a delta resync broke off (`Syncing`, undo log present): puts
    /// the old content back from the undo log, newest record first, so the
    /// file is exactly the pre-resync image; fdatasync; `Outdated`
    /// (consistent, but older than the primary); the undo log deleted. A
    /// crash in the middle leaves `Syncing` and the log: running it again
    /// gives the same result. Needs `force` (it discards the resync's
    /// data). After a broken full sync there is nothing to go back to.
    pub fn rollback_to_consistent(&mut self, force: bool) -> Result<ReplicaState> {
        if self.attached.as_ref().is_some_and(|a| a.sync.is_some()) {
            return Err(ReplicaError::SyncRunning);
        }
        match self.state() {
            ReplicaState::Inconsistent => return Err(ReplicaError::NoConsistentCopy),
            ReplicaState::Syncing => {}
            other => return Err(ReplicaError::NothingToRollBack(other)),
        }
        if !force {
            return Err(ReplicaError::RollbackNeedsForce);
        }
        let undo = undo_path(&self.path);
        let shown = self.path.display().to_string();
        self.undo = None;
        UndoLog::roll_back(&undo, &self.file, self.size_bytes()).map_err(io_err(&shown))?;
        self.file.sync_data().map_err(io_err(&shown))?;
        self.set_state(ReplicaState::Outdated)?;
        remove_undo(&undo)?;
        Ok(ReplicaState::Outdated)
    }

    /// An up-to-date replica learns it is behind (durable). The states
    /// below `UpToDate` stay as they are: each is already not promotable.
    pub fn mark_outdated(&mut self) -> Result<ReplicaState> {
        if self.state() == ReplicaState::UpToDate {
            self.set_state(ReplicaState::Outdated)?;
        }
        Ok(self.state())
    }

    fn set_state(&mut self, state: ReplicaState) -> Result<()> {
        self.meta.set_header(|h| h.state = state).map_err(io_err("storing the state"))
    }

    fn step(&self, at: Step) -> Result<()> {
        if self.fail_at == Some(at) {
            return Err(ReplicaError::Io {
                what: format!("test failure at {at:?}"),
                source: io::Error::other(""),
            });
        }
        Ok(())
    }
}

/// A promotion: the state the replica had, and what it is now (after a
/// forced rollback of a broken resync, `Outdated` data is served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promoted {
    pub was: ReplicaState,
    pub rolled_back: bool,
}

fn meta_of(path: &Path, vm: Uuid, device: &str) -> Result<Meta> {
    let mp = meta::meta_path(path);
    let meta = Meta::open(&mp).map_err(io_err(format!("{}", mp.display())))?;
    let h = meta.header();
    if h.vm != vm || h.device != device {
        return Err(ReplicaError::Mismatch(format!(
            "{} belongs to disk {} of VM {}, not {device} of {vm}",
            mp.display(),
            h.device,
            h.vm
        )));
    }
    Ok(meta)
}

/// This node's replica of `vm`'s `device` becomes the primary at `epoch`
/// (a planned move or a takeover; the epoch comes from the API daemon's
/// record and must be newer than any primary the replica attached to).
/// `UpToDate` always; `Outdated` or `Syncing` only with `force` (a broken
/// resync is rolled back first: the pre-resync image is what is served);
/// `Inconsistent` never. Durable before it returns: role `Primary`, the
/// state `UpToDate` (the copy everything is measured against now), and
/// the peer marked outdated (its copy is behind until a resync says else).
pub fn promote(path: &Path, vm: Uuid, device: &str, epoch: u64, force: bool) -> Result<Promoted> {
    let mut meta = meta_of(path, vm, device)?;
    let h = meta.header().clone();
    if h.role == DiskRole::Primary {
        return Ok(Promoted { was: h.state, rolled_back: false });
    }
    if epoch <= h.epoch {
        return Err(ReplicaError::StaleEpoch { theirs: epoch, ours: h.epoch });
    }
    let rolled_back = match h.state {
        ReplicaState::UpToDate => false,
        ReplicaState::Inconsistent => return Err(ReplicaError::NoConsistentCopy),
        s if !force => return Err(ReplicaError::PromoteNeedsForce(s)),
        ReplicaState::Outdated => false,
        ReplicaState::Syncing => {
            drop(meta);
            // open() settles a crash's leftovers (Syncing without a log is
            // Inconsistent); then the undo log puts the old image back.
            let mut r = Replica::open(path, h.size_bytes, vm, device)?;
            if r.state() == ReplicaState::Syncing {
                r.rollback_to_consistent(true)?;
            }
            if r.state() != ReplicaState::Outdated {
                return Err(ReplicaError::NoConsistentCopy);
            }
            drop(r);
            meta = meta_of(path, vm, device)?;
            true
        }
    };
    meta.set_header(|m| {
        m.role = DiskRole::Primary;
        m.epoch = epoch;
        m.state = ReplicaState::UpToDate;
        m.peer_outdated = true;
    })
    .map_err(io_err("storing the promotion"))?;
    Ok(Promoted { was: h.state, rolled_back })
}

/// This node was the primary of `vm`'s `device`, and the peer now holds it
/// at the newer `epoch` (it took the VM over, or the VM moved): the files
/// become a replica, `Outdated`. The dirty bitmap stays: it names the
/// blocks written here that the new primary may lack, which its resync
/// overwrites (they are discarded). Returns their bytes when it demoted.
pub fn demote(path: &Path, vm: Uuid, device: &str, epoch: u64) -> Result<Option<u64>> {
    if !meta::meta_path(path).exists() {
        return Ok(None);
    }
    let mut meta = meta_of(path, vm, device)?;
    let h = meta.header().clone();
    if h.role == DiskRole::Secondary {
        return Ok(None);
    }
    if epoch <= h.epoch {
        return Err(ReplicaError::Mismatch(format!(
            "this node is the primary of disk {device} of VM {vm} at epoch {}; a replica at epoch \
             {epoch} cannot replace it",
            h.epoch
        )));
    }
    meta.set_header(|m| {
        m.role = DiskRole::Secondary;
        m.state = ReplicaState::Outdated;
        m.peer_outdated = false;
    })
    .map_err(io_err("storing the demotion"))?;
    Ok(Some(meta.dirty_bytes()))
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % SECTOR != 0 {
        return Err(ReplicaError::Misaligned { offset: 0, len: size });
    }
    if size > MAX_DISK_SIZE {
        return Err(ReplicaError::OutOfRange { offset: 0, len: size, size: MAX_DISK_SIZE });
    }
    Ok(())
}

fn remove_undo(path: &Path) -> Result<()> {
    let what = || format!("{}", path.display());
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(what())(e)),
    }
    sync_parent(path).map_err(io_err(what()))
}

/// The undo log of a delta resync: a magic, then records `[offset u64]
/// [len u32][old bytes][crc32 of all three]`, little-endian, appended in
/// the order the ranges were overwritten. A record torn by a crash ends the
/// log: its range was not yet overwritten (that happens only after the
/// log's fdatasync). Only the first overwrite of a byte in a resync is
/// saved (its pre-resync content is what a rollback needs), so a guest
/// rewriting one block during a long resync does not grow the log.
#[derive(Debug)]
struct UndoLog {
    file: File,
    path: PathBuf,
    /// Bytes of valid log: where the next record goes.
    len: u64,
    /// Byte ranges of the replica saved already, `start -> end`, merged.
    saved: std::collections::BTreeMap<u64, u64>,
}

const UNDO_MAGIC: [u8; 8] = *b"NCUNDO\x00\x01";
const RECORD_HEAD: usize = 12;

impl UndoLog {
    /// A new, empty log, durable with its folder entry before it is used.
    fn create(path: &Path) -> Result<UndoLog> {
        let what = || format!("{}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(what()))?;
        file.write_all_at(&UNDO_MAGIC, 0).map_err(io_err(what()))?;
        file.sync_data().map_err(io_err(what()))?;
        sync_parent(path).map_err(io_err(what()))?;
        Ok(UndoLog { file, path: path.to_owned(), len: UNDO_MAGIC.len() as u64, saved: Default::default() })
    }

    /// The log of a broken resync, to append to: cut after its last valid
    /// record.
    fn resume(path: &Path, size: u64) -> Result<UndoLog> {
        let what = || format!("{}", path.display());
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(what()))?;
        let records = Self::records(&file, size).map_err(io_err(what()))?;
        let len = records.last().map_or(UNDO_MAGIC.len() as u64, |r| r.at + r.len as u64 + 4);
        file.set_len(len).map_err(io_err(what()))?;
        file.sync_data().map_err(io_err(what()))?;
        let mut log = UndoLog { file, path: path.to_owned(), len, saved: Default::default() };
        for r in &records {
            log.note_saved(r.offset, r.offset + r.len as u64);
        }
        Ok(log)
    }

    /// Appends the current content of every chunk's range, then
    /// fdatasyncs: only then may the ranges be overwritten.
    fn save(&mut self, replica: &File, chunks: &[Chunk]) -> io::Result<()> {
        let mut buf = Vec::new();
        let before = self.saved.clone();
        for c in chunks {
            for (start, end) in self.unsaved(c.offset, c.offset + c.data.len() as u64) {
                let rec = buf.len();
                buf.extend(start.to_le_bytes());
                buf.extend(((end - start) as u32).to_le_bytes());
                let at = buf.len();
                buf.resize(at + (end - start) as usize, 0);
                replica.read_exact_at(&mut buf[at..], start)?;
                let crc = crc32(&buf[rec..]);
                buf.extend(crc.to_le_bytes());
                self.note_saved(start, end);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let written = self.file.write_all_at(&buf, self.len).and_then(|()| self.file.sync_data());
        if written.is_err() {
            self.saved = before;
        }
        written?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// The parts of `start..end` not saved yet, in order.
    fn unsaved(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        if let Some((_, &e)) = self.saved.range(..start).next_back() {
            at = at.max(e.min(end));
        }
        for (&s, &e) in self.saved.range(start..end) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e.min(end));
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    fn note_saved(&mut self, start: u64, end: u64) {
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.saved.range(..s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let touched: Vec<u64> = self.saved.range(s..=e).map(|(&k, _)| k).collect();
        for k in touched {
            e = e.max(self.saved.remove(&k).expect("listed"));
        }
        self.saved.insert(s, e);
    }

    /// The valid records of a log, in order; a torn or foreign record
    /// ends it.
    fn records(file: &File, size: u64) -> io::Result<Vec<Record>> {
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0)?;
        if magic != UNDO_MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an undo log"));
        }
        let file_len = file.metadata()?.len();
        let mut at = UNDO_MAGIC.len() as u64;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while at + RECORD_HEAD as u64 + 4 <= file_len {
            let mut head = [0u8; RECORD_HEAD];
            file.read_exact_at(&mut head, at)?;
            let offset = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
            let end = at + (RECORD_HEAD + len + 4) as u64;
            if len > MAX_CHUNK
                || end > file_len
                || !matches!(offset.checked_add(len as u64), Some(e) if e <= size)
            {
                break;
            }
            buf.resize(RECORD_HEAD + len + 4, 0);
            file.read_exact_at(&mut buf, at)?;
            let crc = u32::from_le_bytes(buf[RECORD_HEAD + len..].try_into().expect("4 bytes"));
            if crc != crc32(&buf[..RECORD_HEAD + len]) {
                break;
            }
            out.push(Record { offset, at: at + RECORD_HEAD as u64, len });
            at = end;
        }
        Ok(out)
    }

    /// Writes every record's old bytes back. Records are disjoint (only a
    /// first overwrite is saved); newest first all the same, so that the
    /// oldest record of a byte would win if they were not.
    fn roll_back(path: &Path, replica: &File, size: u64) -> io::Result<()> {
        let file = File::open(path)?;
        let mut buf = Vec::new();
        for r in Self::records(&file, size)?.iter().rev() {
            buf.resize(r.len, 0);
            file.read_exact_at(&mut buf, r.at)?;
            replica.write_all_at(&buf, r.offset)?;
        }
        Ok(())
    }
}

/// Where a record's old bytes are in the log (`at`) and where they belong
/// in the replica (`offset`).
#[derive(Debug)]
struct Record {
    offset: u64,
    at: u64,
    len: usize,
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;

/// Starts writing `[off, off + len)` back to the disk now, without waiting
/// for it. The next `Flush` fdatasyncs what the guest wrote since the last
/// one; left to the kernel's writeback, all of it waited for that flush, so
/// a 128 MiB stream and its fsync paid for the disk twice in a row (on the
/// primary while the guest wrote, then here). POSIX_FADV_DONTNEED starts
/// the writeback of dirty pages (WB_SYNC_NONE) and drops the clean ones,
/// which a replica does not read back. A hint: errors show at the
/// fdatasync.
fn start_writeback(file: &File, off: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let _ = posix_fadvise(file, off as i64, len as i64, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}
