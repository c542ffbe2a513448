//! The secondary side's dispatcher: the replicas this node holds (the
//! config's secondary disks), opened on the primary's first `Attach`, and
//! the frames of the peer's connection applied to them. A frame about a
//! disk that is not listed here, or refused by its replica, is answered
//! `Rejected` and changes nothing.
//!
//! A replica belongs to the connection that attached it last: frames of any
//! other connection about it are refused (`NotAttached`) and the end of
//! another connection leaves it attached. A newer connection's `Attach`
//! takes the replica over (the primary redialed; its old connection may
//! linger half-open) and the older connection is closed, so that a
//! primary whose connection lost a replica redials and attaches again.

use super::config::DiskExport;
use super::replica::{Replica, ReplicaError};
use crate::cluster::disk_frame::{DiskMsg, DiskRef, RejectReason};
use crate::cluster::ReplicaState;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// One accepted connection of the peer's data plane.
pub type ConnId = u64;

#[derive(Default)]
pub struct Secondaries {
    exports: Mutex<HashMap<DiskRef, DiskExport>>,
    open: Mutex<HashMap<DiskRef, Replica>>,
    /// The connection each attached replica belongs to.
    owners: Mutex<HashMap<DiskRef, ConnId>>,
    /// Connections being served, each with the switch that closes it.
    conns: Mutex<HashMap<ConnId, std::sync::Arc<tokio::sync::Notify>>>,
    next_conn: std::sync::atomic::AtomicU64,
    /// Disks with data applied since the last acknowledgement, by connection.
    touched: Mutex<BTreeSet<(ConnId, uuid::Uuid, String)>>,
    pub rejected: std::sync::atomic::AtomicU64,
}

/// A secondary disk as the status shows it.
#[derive(Debug, Clone)]
pub struct SecondaryStatus {
    pub state: ReplicaState,
    pub connected: bool,
    pub has_undo: bool,
    /// Bytes this node wrote as the disk's previous primary that the new
    /// primary's resync discards (0 once a sync completed).
    pub diverged_bytes: u64,
}

/// Opens the replica of an export, first demoting files this node wrote
/// as the disk's primary when the config's epoch is newer (the peer took
/// the disk over): logged, with what the resync will discard.
fn open_replica(d: &DiskExport) -> Result<Replica, ReplicaError> {
    if let Some(bytes) = super::replica::demote(&d.path, d.vm, &d.device, d.epoch)? {
        tracing::warn!(
            VM_ID = %d.vm, DEVICE = %d.device, epoch = d.epoch, discarded_bytes = bytes,
            "the peer holds this disk at a newer epoch: this node's copy is now its replica; \
             blocks written here after the last replicated write are discarded by the resync"
        );
    }
    Replica::open(&d.path, d.size_bytes, d.vm, &d.device)
}

fn key(d: &DiskExport) -> DiskRef {
    DiskRef { vm: d.vm, device: d.device.clone() }
}

impl Secondaries {
    /// The replicas this node holds now (after a reload). Replicas no
    /// longer listed are closed; their files are the API daemon's to keep
    /// or delete.
    pub fn set_exports(&self, exports: &[DiskExport]) {
        let map: HashMap<DiskRef, DiskExport> = exports.iter().map(|d| (key(d), d.clone())).collect();
        self.open.lock().unwrap().retain(|k, _| map.contains_key(k));
        self.owners.lock().unwrap().retain(|k, _| map.contains_key(k));
        *self.exports.lock().unwrap() = map;
    }

    /// Closes the replica of `disk` (it is being promoted to primary here).
    pub fn forget(&self, disk: &DiskRef) {
        self.exports.lock().unwrap().remove(disk);
        self.open.lock().unwrap().remove(disk);
    }

    /// Status of a replica held here; it is opened (read only its metadata)
    /// when it was not yet.
    pub fn status(&self, d: &DiskExport) -> Result<SecondaryStatus, ReplicaError> {
        let k = key(d);
        let mut open = self.open.lock().unwrap();
        if let Some(r) = open.get(&k) {
            return Ok(SecondaryStatus {
                state: r.state(),
                connected: r.attached_epoch().is_some(),
                has_undo: r.has_undo(),
                diverged_bytes: r.meta().dirty_bytes(),
            });
        }
        if !super::meta::meta_path(&d.path).exists() {
            // Never attached: nothing on disk yet.
            return Ok(SecondaryStatus {
                state: ReplicaState::Inconsistent,
                connected: false,
                has_undo: false,
                diverged_bytes: 0,
            });
        }
        // Opened under the map's lock: a second value of the same replica
        // would be a second writer of its metadata.
        let r = open_replica(d)?;
        let st = SecondaryStatus {
            state: r.state(),
            connected: false,
            has_undo: r.has_undo(),
            diverged_bytes: r.meta().dirty_bytes(),
        };
        open.insert(k, r);
        Ok(st)
    }

    fn reject(&self, msg: &DiskMsg, reason: RejectReason, message: String) -> DiskMsg {
        self.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(frame = msg.kind(), reason = ?reason, "refused a frame of the peer: {message}");
        DiskMsg::Rejected { disk: msg.disk().cloned(), seq: msg.seq(), reason, message }
    }

    /// A new connection of the peer (after its handshake): its id, and the
    /// switch that tells its server to close it (when a newer connection
    /// takes its replicas over).
    pub fn connected(&self) -> (ConnId, std::sync::Arc<tokio::sync::Notify>) {
        let id = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        self.conns.lock().unwrap().insert(id, close.clone());
        (id, close)
    }

    /// Applies one frame of connection `conn`; returns the answers to send.
    /// `batch_end`: no further frame is buffered, so acknowledge what was
    /// applied.
    pub fn handle(&self, conn: ConnId, msg: DiskMsg, batch_end: bool) -> Vec<DiskMsg> {
        let mut out = Vec::new();
        match msg.disk().cloned() {
            None => out.push(self.reject(
                &msg,
                RejectReason::BadOrder,
                format!("{} after the handshake", msg.kind()),
            )),
            Some(disk) => {
                let export = self.exports.lock().unwrap().get(&disk).cloned();
                match export {
                    None => out.push(self.reject(
                        &msg,
                        RejectReason::UnknownDisk,
                        format!("no replica of {}/{} is kept here", disk.vm, disk.device),
                    )),
                    Some(export) => self.apply(conn, &export, &disk, &msg, &mut out),
                }
            }
        }
        if batch_end {
            let mine: Vec<(uuid::Uuid, String)> = {
                let mut touched = self.touched.lock().unwrap();
                let (mine, others) = std::mem::take(&mut *touched).into_iter().partition(|t| t.0 == conn);
                *touched = others;
                mine.into_iter().map(|(_, vm, device)| (vm, device)).collect()
            };
            let open = self.open.lock().unwrap();
            let owners = self.owners.lock().unwrap();
            for (vm, device) in mine {
                let disk = DiskRef { vm, device };
                if owners.get(&disk) != Some(&conn) {
                    continue;
                }
                if let Some(seq) = open.get(&disk).and_then(|r| r.applied_seq()) {
                    out.push(DiskMsg::Ack { disk, seq, durable: false });
                }
            }
        }
        out
    }

    fn apply(
        &self,
        conn: ConnId,
        export: &DiskExport,
        disk: &DiskRef,
        msg: &DiskMsg,
        out: &mut Vec<DiskMsg>,
    ) {
        let attach = matches!(msg, DiskMsg::Attach { .. });
        if let DiskMsg::Attach { size_bytes, .. } = msg {
            if export.size_bytes != 0 && *size_bytes != export.size_bytes {
                out.push(self.reject(
                    msg,
                    RejectReason::OutOfRange,
                    format!(
                        "the primary says {size_bytes} bytes; this node's record says {}",
                        export.size_bytes
                    ),
                ));
                return;
            }
        }
        // Held from the owner check to the end: an Attach of another
        // connection cannot come in between.
        let mut open = self.open.lock().unwrap();
        if !attach && self.owners.lock().unwrap().get(disk) != Some(&conn) {
            // Another connection's attachment (or none): never ride on it.
            drop(open);
            let why = "no Attach for this disk on this connection".into();
            out.push(self.reject(msg, RejectReason::NotAttached, why));
            return;
        }
        if !open.contains_key(disk) {
            if !matches!(msg, DiskMsg::Attach { .. }) {
                drop(open);
                out.push(self.reject(msg, RejectReason::NotAttached, "no Attach for this disk yet".into()));
                return;
            }
            // The VM's folder, as on its owner (QEMU may need it after a move).
            let made = match export.path.parent() {
                Some(dir) => crate::util::create_vm_dir(dir),
                None => Ok(()),
            };
            match made
                .map_err(|e| ReplicaError::Io {
                    what: format!("create {}", export.path.display()),
                    source: e,
                })
                .and_then(|()| open_replica(export))
            {
                Ok(r) => {
                    open.insert(disk.clone(), r);
                }
                Err(e) => {
                    drop(open);
                    out.push(self.reject(msg, e.reason(), e.to_string()));
                    return;
                }
            }
        }
        let replica = open.get_mut(disk).expect("opened above");
        match replica.handle(msg) {
            Ok(answer) => {
                if matches!(answer, Some(DiskMsg::Attached { .. })) {
                    // What this node wrote as the previous primary, before
                    // the state: the primary plans its resync on Attached.
                    let ranges: Vec<(u64, u64)> = replica.meta().dirty_ranges().collect();
                    for chunk in ranges.chunks(crate::cluster::disk_frame::MAX_DIVERGED_RANGES) {
                        out.push(DiskMsg::Diverged { disk: disk.clone(), ranges: chunk.to_vec() });
                    }
                }
                if matches!(msg, DiskMsg::Data { .. }) {
                    self.touched.lock().unwrap().insert((conn, disk.vm, disk.device.clone()));
                }
                if attach {
                    let before = self.owners.lock().unwrap().insert(disk.clone(), conn);
                    if let Some(old) = before.filter(|&c| c != conn) {
                        // Superseded: its primary must redial to attach again.
                        if let Some(close) = self.conns.lock().unwrap().get(&old) {
                            close.notify_one();
                        }
                    }
                }
                out.extend(answer);
            }
            Err(e) => {
                let r = e.rejected(msg);
                drop(open);
                self.rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(frame = msg.kind(), disk = %format!("{}/{}", disk.vm, disk.device), "refused a frame of the peer: {e}");
                out.push(r);
            }
        }
    }

    /// Connection `conn` closed: its attachments end (not another's).
    pub fn disconnected(&self, conn: ConnId) {
        self.conns.lock().unwrap().remove(&conn);
        let mut open = self.open.lock().unwrap();
        self.owners.lock().unwrap().retain(|disk, owner| {
            if *owner != conn {
                return true;
            }
            if let Some(r) = open.get_mut(disk) {
                r.detach();
            }
            false
        });
        self.touched.lock().unwrap().retain(|t| t.0 != conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::config::{DiskRole, ReplicationMode};

    const SIZE: u64 = 1 << 20;

    fn vda() -> DiskRef {
        DiskRef { vm: uuid::Uuid::from_bytes([0xC3; 16]), device: "vda".into() }
    }

    fn held(tag: &str) -> (Secondaries, std::path::PathBuf) {
        let path = super::super::meta::scratch(&format!("secondaries-{tag}")).join("vda.raw");
        let s = Secondaries::default();
        s.set_exports(&[DiskExport {
            vm: vda().vm,
            device: "vda".into(),
            path: path.clone(),
            role: DiskRole::Secondary,
            epoch: 1,
            replication: ReplicationMode::Sync,
            max_lag_seconds: 10,
            size_bytes: SIZE,
            queues: 1,
            force_promote: false,
        }]);
        (s, path)
    }

    fn attach() -> DiskMsg {
        DiskMsg::Attach { disk: vda(), epoch: 1, size_bytes: SIZE, generation: 5 }
    }

    fn data(seq: u64, byte: u8) -> DiskMsg {
        DiskMsg::Data { disk: vda(), seq, offset: 4096, data: vec![byte; 4096] }
    }

    fn reason(out: &[DiskMsg]) -> Option<RejectReason> {
        out.iter().find_map(|m| match m {
            DiskMsg::Rejected { reason, .. } => Some(*reason),
            _ => None,
        })
    }

    /// A full sync by connection 1, so the replica takes plain data.
    fn synced(s: &Secondaries, c: ConnId) {
        assert!(matches!(s.handle(c, attach(), true)[..], [DiskMsg::Attached { .. }]));
        let begin = DiskMsg::SyncBegin {
            disk: vda(),
            kind: crate::cluster::disk_frame::SyncKind::Full,
            total_bytes: 0,
        };
        assert_eq!(s.handle(c, begin, true), vec![]);
        assert!(matches!(
            s.handle(c, DiskMsg::SyncEnd { disk: vda(), seq: 1 }, true)[..],
            [DiskMsg::Ack { .. }]
        ));
    }

    /// Found by tests/disk_failures.rs: a frame of a connection that never
    /// attached was applied on another connection's attachment, and the
    /// end of any connection detached every replica.
    #[test]
    fn a_replica_belongs_to_the_connection_that_attached_it() {
        let (s, path) = held("owner");
        let (c1, _) = s.connected();
        let (c2, close2) = s.connected();
        synced(&s, c1);
        let before = std::fs::read(&path).unwrap();
        // Connection 2 did not attach: its frames are refused, not applied.
        assert_eq!(reason(&s.handle(c2, data(1 << 40, 0xEE), true)), Some(RejectReason::NotAttached));
        let flush = DiskMsg::Flush { disk: vda(), seq: 1 << 40 };
        assert_eq!(reason(&s.handle(c2, flush, true)), Some(RejectReason::NotAttached));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Its end leaves connection 1's attachment alone.
        s.disconnected(c2);
        let out = s.handle(c1, data(2, 0x11), true);
        assert!(matches!(out[..], [DiskMsg::Ack { seq: 2, .. }]), "{out:?}");
        drop(close2);

        // A newer connection's Attach takes the replica over and closes
        // the older one; the older's frames are refused from then on, and
        // its acknowledgements never go to the newer one.
        let (c3, _) = s.connected();
        let close1 = s.conns.lock().unwrap()[&c1].clone();
        assert!(matches!(s.handle(c3, attach(), true)[..], [DiskMsg::Attached { .. }]));
        assert_closed(close1.notified());
        assert_eq!(reason(&s.handle(c1, data(3, 0x22), true)), Some(RejectReason::NotAttached));
        let out = s.handle(c3, data(3, 0x33), true);
        assert!(matches!(out[..], [DiskMsg::Ack { seq: 3, .. }]), "{out:?}");
        s.disconnected(c1);
        let st = s.status(&s.exports.lock().unwrap()[&vda()].clone()).unwrap();
        assert!(st.connected, "connection 1's end detached connection 3's replica");
        let mut block = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&path).unwrap(), &mut block, 4096)
            .unwrap();
        assert_eq!(block, vec![0x33; 4096]);
    }

    /// The connection was told to close: the permit `notify_one` stored
    /// makes its `notified()` ready at once.
    fn assert_closed(f: tokio::sync::futures::Notified<'_>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), f).await.expect("not closed");
        });
    }
}
