//! The tokio drivers of the pair's protocols, as supervised tasks: the
//! peer link (`peer_link.rs`, around `transport::PeerLink`), state
//! replication (`replicator.rs`, around `replication::Replication`) and the
//! image copy (`image_copy.rs`, around `imagecopy::ImageCopy`). All
//! decisions are the state machines'; these carry them out.
//!
//! They reach the rest of the node only through [`NodeCore`]: the change
//! feed, `apply_remote`, the peer row and the image records. The core
//! implements it (`core/replica.rs`); nothing here imports `core`, so the
//! drivers can be read, and run against another implementation, alone.

pub mod image_copy;
pub mod peer_link;
pub mod replicator;

use super::transport::{LinkHandle, LocalNode};
use super::ClusterError;
use crate::config::ClusterConfig;
use crate::store::{Applied, ConflictRecord, EncodedChange, PeerRecord, Snapshot, Tail};
use crate::tasks::Supervisor;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use uuid::Uuid;

pub use image_copy::{FileView, FilesCell};
pub use replicator::StatusCell;

/// An image record as the image copy needs it: the content it names and
/// where that content's file belongs on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub sha256: String,
    pub size: u64,
    pub path: PathBuf,
}

/// What the cluster drivers need of this node. Errors are
/// [`ClusterError::Gap`] (a batch that does not follow the applied mark:
/// resend from it) or [`ClusterError::Local`] (anything else this node
/// failed at).
pub trait NodeCore: Send + Sync + 'static {
    fn node_id(&self) -> Uuid;

    // -- the peer row and the link --
    /// The peer row (`None` while not paired); changes on pair and unpair.
    fn peer_row(&self) -> watch::Receiver<Option<PeerRecord>>;
    fn cluster_config(&self) -> ClusterConfig;
    /// Publishes the running link (`None` once it stopped) for the other
    /// drivers, `GET /v1/peer`, health and metrics.
    fn set_link(&self, link: Option<LinkHandle>);
    /// Why the link cannot run (its port taken, say), or `None`.
    fn set_link_error(&self, error: Option<String>);
    /// The running link, as published by [`NodeCore::set_link`].
    fn link(&self) -> watch::Receiver<Option<LinkHandle>>;

    // -- state replication (core/replica.rs documents each) --
    /// The number of this node's newest committed change.
    fn local_seq(&self) -> watch::Receiver<u64>;
    fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Tail, ClusterError>> + Send;
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, ClusterError>> + Send;
    fn record_peer_ack(&self, peer: Uuid, seq: u64) -> impl Future<Output = Result<(), ClusterError>> + Send;
    fn applied_mark(&self, origin: Uuid) -> impl Future<Output = Result<u64, ClusterError>> + Send;
    fn apply_remote_batch(
        &self,
        origin: Uuid,
        batch: Vec<EncodedChange>,
    ) -> impl Future<Output = Result<Vec<Applied>, ClusterError>> + Send;
    fn apply_snapshot(
        &self,
        origin: Uuid,
        snapshot: Snapshot,
    ) -> impl Future<Output = Result<Applied, ClusterError>> + Send;
    /// Name conflicts resolved here, newest first.
    fn conflicts(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ConflictRecord>, ClusterError>> + Send;
    /// Where the replicator reports its lag and counters.
    fn replication_status(&self) -> StatusCell;

    // -- image files --
    /// Every image record's content and local file path.
    fn image_files(&self) -> Vec<ImageFile>;
    fn images_dir(&self) -> PathBuf;
    fn max_image_bytes(&self) -> u64;
    /// Where the image copy reports its progress.
    fn image_view(&self) -> FilesCell;
}

/// Starts the cluster tasks (stage `Cluster`): the peer link while paired,
/// and state replication and the image copy over it. `local` is this node
/// on the link (its id and the API's certificate and key).
pub fn spawn<C: NodeCore>(core: &Arc<C>, tasks: &Supervisor, local: LocalNode) {
    peer_link::spawn(core, tasks, local);
    replicator::spawn(core, tasks);
}
