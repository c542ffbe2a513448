//! The core's replication interface: what the cluster subsystem (its
//! drivers, through [`NodeCore`]) calls to stream this node's changes and
//! apply the peer's.
//!
//! For the link, a change is opaque bytes (`Vec<u8>`, the format version
//! byte first): it carries them as they are and never decodes them.
//!
//! Sending (this node -> peer):
//! - [`Core::local_seq`]: a watch of the number of this node's newest
//!   committed change; it moves after every local commit, never for a
//!   change applied from the peer. Wait on it instead of polling.
//! - [`Core::changes_since`]`(after, limit)`: this node's own changes after
//!   `after`, in order, densely numbered (`seq` = previous + 1). Changes
//!   that came from the peer are never in it (no echo).
//!   [`Tail::Reseed`] when the rows the peer needs were pruned: send a
//!   [`Core::snapshot`] instead, then follow the tail from its `seq`.
//! - [`Core::record_peer_ack`]`(peer, seq)`: the peer has applied up to
//!   `seq`; rows at or below it become prunable (after the retention).
//!
//! Receiving (peer -> this node):
//! - [`Core::applied_mark`]`(origin)`: the peer's highest seq applied here;
//!   ask the peer to resume after it (after a cut or a restart).
//! - [`Core::apply_remote`]`(origin, seq, bytes)`: applies one change
//!   exactly once. `Duplicate` for a seq at or below the mark (a resend:
//!   harmless, ack it again), an error [`CoreError::Store`] with
//!   `StoreError::Gap` when `seq` skips one (resend from the mark), other
//!   errors for undecodable or corrupt input. The mark moves in the same
//!   SQLite transaction as the apply: acknowledge `seq` to the peer only
//!   after this returned `Ok`.
//! - [`Core::apply_remote_batch`]`(origin, changes)`: the same for a batch,
//!   in one transaction (one disk flush instead of one per change: use it
//!   under load). All or nothing.
//! - [`Core::apply_snapshot`]`(origin, snapshot)`: seeds from a snapshot.
//!
//! Applied changes update the in-memory view and publish the same events
//! as a local change; name conflicts between the nodes are resolved as
//! docs/design/replication-state.md says and listed by [`Core::conflicts`].

use super::{Core, CoreError, Result};
use crate::cluster::drivers::{FilesCell, ImageFile, NodeCore, StatusCell};
use crate::cluster::transport::LinkHandle;
use crate::cluster::ClusterError;
use crate::store::{
    Applied, Change, ConflictRecord, EncodedChange, PeerRecord, Retention, Snapshot, StoreError, Tail,
};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use uuid::Uuid;

/// The cluster drivers see two kinds of failure: a gap (resend) or this
/// node failing.
fn to_cluster(e: CoreError) -> ClusterError {
    match e {
        CoreError::Store(StoreError::Gap { .. }) => ClusterError::Gap(e.to_string()),
        e => ClusterError::Local(e.to_string()),
    }
}

/// The cluster subsystem's view of the core (`cluster::drivers`): the
/// methods below, the peer row and the image records; nothing else.
impl NodeCore for Core {
    fn node_id(&self) -> Uuid {
        self.node.id
    }

    fn peer_row(&self) -> watch::Receiver<Option<PeerRecord>> {
        self.peer.record.subscribe()
    }

    fn cluster_config(&self) -> crate::config::ClusterConfig {
        self.cfg.cluster.clone()
    }

    fn set_link(&self, link: Option<LinkHandle>) {
        self.peer.link.send_replace(link);
    }

    fn set_link_error(&self, error: Option<String>) {
        *self.peer.link_error.lock().unwrap() = error;
    }

    fn link(&self) -> watch::Receiver<Option<LinkHandle>> {
        self.peer_link()
    }

    fn local_seq(&self) -> watch::Receiver<u64> {
        Core::local_seq(self)
    }

    async fn changes_since(&self, after: u64, limit: usize) -> std::result::Result<Tail, ClusterError> {
        Core::changes_since(self, after, limit).await.map_err(to_cluster)
    }

    async fn snapshot(&self) -> std::result::Result<Snapshot, ClusterError> {
        Core::snapshot(self).await.map_err(to_cluster)
    }

    async fn record_peer_ack(&self, peer: Uuid, seq: u64) -> std::result::Result<(), ClusterError> {
        Core::record_peer_ack(self, peer, seq).await.map_err(to_cluster)
    }

    async fn applied_mark(&self, origin: Uuid) -> std::result::Result<u64, ClusterError> {
        Core::applied_mark(self, origin).await.map_err(to_cluster)
    }

    async fn apply_remote_batch(
        &self,
        origin: Uuid,
        batch: Vec<EncodedChange>,
    ) -> std::result::Result<Vec<Applied>, ClusterError> {
        Core::apply_remote_batch(self, origin, batch).await.map_err(to_cluster)
    }

    async fn apply_snapshot(
        &self,
        origin: Uuid,
        snapshot: Snapshot,
    ) -> std::result::Result<Applied, ClusterError> {
        Core::apply_snapshot(self, origin, snapshot).await.map_err(to_cluster)
    }

    async fn conflicts(&self, limit: usize) -> std::result::Result<Vec<ConflictRecord>, ClusterError> {
        Core::conflicts(self, limit).await.map_err(to_cluster)
    }

    fn replication_status(&self) -> StatusCell {
        self.replication.clone()
    }

    fn image_files(&self) -> Vec<ImageFile> {
        self.image_records()
            .iter()
            .map(|r| ImageFile {
                sha256: r.sha256.clone(),
                size: r.file_size,
                path: self.local_image_path(r),
            })
            .collect()
    }

    fn images_dir(&self) -> PathBuf {
        self.paths.images.clone()
    }

    fn max_image_bytes(&self) -> u64 {
        Core::max_image_bytes(self)
    }

    fn image_view(&self) -> FilesCell {
        self.image_files.clone()
    }
}

impl Core {
    /// The number of this node's newest committed change (see module doc).
    pub fn local_seq(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_seq.subscribe()
    }

    /// This node's own changes after `after` (see module doc).
    pub async fn changes_since(&self, after: u64, limit: usize) -> Result<Tail> {
        self.store_call(move |s| s.changes_since(after, limit)).await
    }

    /// Current state as put-changes plus the seq it corresponds to.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        self.store_call(|s| s.snapshot()).await
    }

    pub async fn record_peer_ack(&self, peer: Uuid, seq: u64) -> Result<()> {
        self.store_call(move |s| s.record_peer_ack(peer, seq)).await
    }

    pub async fn applied_mark(&self, origin: Uuid) -> Result<u64> {
        self.store_call(move |s| s.applied_mark(origin)).await
    }

    /// Applies the peer's change `seq` (encoded), exactly once.
    pub async fn apply_remote(&self, origin: Uuid, seq: u64, bytes: Vec<u8>) -> Result<Applied> {
        let change = Change::decode(&bytes)
            .map_err(|e| CoreError::invalid("change", format!("change {seq} of node {origin}: {e}")))?;
        let _order = self.commit_lock.lock().await;
        self.premark_removed_replicas([&change]);
        let applied = self.store_call(move |s| s.apply_remote(origin, seq, &change)).await?;
        self.after_remote(&applied);
        Ok(applied)
    }

    /// Applies a batch of the peer's changes (as [`Core::changes_since`]
    /// gave them) in one transaction: one disk flush for the lot. Nothing
    /// is applied when one does not decode or the batch has a gap.
    pub async fn apply_remote_batch(&self, origin: Uuid, batch: Vec<EncodedChange>) -> Result<Vec<Applied>> {
        let decoded = batch
            .iter()
            .map(|c| Change::decode(&c.bytes).map(|d| (c.seq, d)).map_err(|e| (c.seq, e)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|(seq, e)| {
                CoreError::invalid("change", format!("change {seq} of node {origin}: {e}"))
            })?;
        let _order = self.commit_lock.lock().await;
        self.premark_removed_replicas(decoded.iter().map(|(_, c)| c));
        let applied = self.store_call(move |s| s.apply_remote_batch(origin, &decoded)).await?;
        for a in &applied {
            self.after_remote(a);
        }
        Ok(applied)
    }

    /// Applies the peer's snapshot (see [`Core::snapshot`]).
    pub async fn apply_snapshot(&self, origin: Uuid, snapshot: Snapshot) -> Result<Applied> {
        let changes = snapshot
            .changes
            .iter()
            .map(|b| Change::decode(b))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| CoreError::invalid("snapshot", format!("snapshot of node {origin}: {e}")))?;
        let _order = self.commit_lock.lock().await;
        let seq = snapshot.seq;
        let applied = self.store_call(move |s| s.apply_snapshot(origin, seq, &changes)).await?;
        self.after_remote(&applied);
        Ok(applied)
    }

    fn after_remote(&self, applied: &Applied) {
        let Applied::Applied(effects) = applied else { return };
        // An image the peer deleted: its file here goes too (the peer
        // checked it unused, and VMs are the same on both nodes). Checked
        // after all effects: a conflict's rename deletes and puts the same
        // file under another name.
        let mut gone = Vec::new();
        for effect in effects {
            if let Change::VmPut(v) = effect {
                // Handed to the peer (a takeover there): a domain still
                // here must stop now, not at the next reconcile tick.
                let was_ours = self.vms.read().unwrap().get(&v.id).is_some_and(|old| self.owns(old));
                if was_ours && !self.owns(v) {
                    self.reconcile_now.notify_one();
                }
            }
            if let Change::ImageDelete { name } = effect {
                gone.extend(self.image_record(name).map(|r| self.local_image_path(&r)));
            }
            self.apply_to_cache(effect);
        }
        // A replicated VM of the peer's came, changed or went: the data
        // plane holds its replicas as the record says, at once rather than
        // at the keeper's next tick (the peer's primary is already
        // attaching a new disk).
        if effects.iter().any(|e| match e {
            Change::VmPut(v) => v.replication.is_some(),
            Change::VmDelete { .. } => true,
            _ => false,
        }) {
            self.dataplane_status.kick.notify_one();
        }
        let kept: Vec<_> = self.image_records().iter().map(|r| self.local_image_path(r)).collect();
        for path in gone.into_iter().filter(|p| !kept.contains(p)) {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(IMAGE = %path.display(), "image deleted on the peer: file removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(IMAGE = %path.display(), error = %e, "cannot remove the image file"),
            }
        }
    }

    /// Name conflicts resolved on this node, newest first.
    pub async fn conflicts(&self, limit: usize) -> Result<Vec<ConflictRecord>> {
        self.store_call(move |s| s.conflicts(limit)).await
    }

    /// Drops change rows the retention no longer keeps (run periodically).
    pub async fn prune_changes(self: &Arc<Self>) -> Result<usize> {
        let now = crate::store::now_ms();
        self.store_call(move |s| s.prune(now, &Retention::default())).await
    }
}
