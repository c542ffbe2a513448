//! Replication in the data plane process: which primary disks replicate
//! (wrapped in [`Replicated`]), the connection that dials the peer for
//! them, the listener that accepts the peer's connection for the replicas
//! held here, and their status. Runs on a small tokio runtime of its own;
//! the vhost worker threads only block on the disks' state.

use super::config::{DataplaneConfig, DiskExport, DiskRole, ReplicaView, ReplicationMode, SyncView};
use super::device::{BlockDevice, LocalFile};
use super::meta::{meta_path, Meta, MetaHeader};
use super::peer::{self, PeerTls};
use super::replica_side::Secondaries;
use super::replicate::Replicated;
use super::DataplaneError;
use crate::cluster::disk_frame::DiskRef;
use crate::cluster::disk_repl::Mode;
use crate::cluster::ReplicaState;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

type Key = (uuid::Uuid, String);

/// What a running task was started from; it restarts when this changes.
#[derive(Clone, PartialEq)]
struct Started {
    peer: Option<super::config::PeerEndpoint>,
    tls: Option<super::config::TlsFiles>,
    listen: Vec<std::net::SocketAddr>,
    sync_rate: u64,
}

/// The dialer's stop switch, the disks it serves, what it started from
/// and its task.
type Dialer = (watch::Sender<bool>, Vec<Arc<Replicated>>, Started, tokio::task::JoinHandle<()>);

pub struct Links {
    rt: tokio::runtime::Runtime,
    pub secondaries: Arc<Secondaries>,
    primaries: Mutex<BTreeMap<Key, Arc<Replicated>>>,
    dialer: Mutex<Option<Dialer>>,
    /// A stopped dialer's task, until the next one has waited for it.
    draining: Mutex<Option<tokio::task::JoinHandle<()>>>,
    server: Mutex<Option<(watch::Sender<bool>, Started)>>,
}

fn key(d: &DiskExport) -> Key {
    (d.vm, d.device.clone())
}

fn tls_of(cfg: &DataplaneConfig) -> Result<Option<PeerTls>, DataplaneError> {
    let (Some(peer), Some(files)) = (&cfg.peer, &cfg.tls) else { return Ok(None) };
    let bad = |e: String| DataplaneError::InvalidConfig(format!("peer TLS: {e}"));
    let (chain, key) = crate::tls::load_pem(&files.cert, &files.key).map_err(bad)?;
    let client =
        crate::tls::mutual_client_config(&peer.fingerprint, chain.clone(), key.clone_key(), peer::ALPN)
            .map_err(|e| bad(e.to_string()))?;
    let server = crate::tls::mutual_server_config(&peer.fingerprint, chain, key, peer::ALPN)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some(PeerTls {
        node_id: cfg.node_id,
        peer_id: peer.node_id,
        addresses: peer.addresses.clone(),
        client,
        server,
        sync_rate: cfg.sync_rate_bytes_per_sec,
    }))
}

impl Links {
    pub fn new() -> Result<Links, DataplaneError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dataplane-net")
            .enable_all()
            .build()
            .map_err(DataplaneError::Control)?;
        Ok(Links {
            rt,
            secondaries: Arc::default(),
            primaries: Mutex::default(),
            dialer: Mutex::default(),
            draining: Mutex::default(),
            server: Mutex::default(),
        })
    }

    /// The device a primary export serves: the local file itself, or
    /// wrapped to replicate when the disk has a mode and a peer is set.
    pub fn device(
        &self,
        cfg: &DataplaneConfig,
        d: &DiskExport,
        local: LocalFile,
    ) -> Result<Arc<dyn BlockDevice>, DataplaneError> {
        let mode = match d.replication {
            ReplicationMode::Off => return Ok(Arc::new(local)),
            _ if cfg.peer.is_none() => return Ok(Arc::new(local)),
            ReplicationMode::Sync => Mode::Sync,
            ReplicationMode::Async => Mode::Async,
        };
        let mp = meta_path(&d.path);
        let io = |e: std::io::Error| DataplaneError::OpenDisk(mp.clone(), e);
        let fresh = !mp.exists();
        // An earlier export of this disk (restarted) lets go of its
        // metadata first: one writer at a time.
        if let Some(old) = self.primaries.lock().unwrap().remove(&key(d)) {
            old.retire();
        }
        if !fresh && super::meta::peek(&mp).map_err(io)?.role == DiskRole::Secondary {
            // This node held the peer's primary copy; the record now names
            // this node at a newer epoch (a move or a takeover).
            let disk = DiskRef { vm: d.vm, device: d.device.clone() };
            self.secondaries.forget(&disk);
            let p = super::replica::promote(&d.path, d.vm, &d.device, d.epoch, d.force_promote)
                .map_err(|e| io(std::io::Error::other(format!("cannot promote the replica: {e}"))))?;
            tracing::warn!(
                VM_ID = %d.vm, DEVICE = %d.device, epoch = d.epoch, was = %p.was,
                rolled_back = p.rolled_back, forced = d.force_promote,
                "replica promoted: this node is now the disk's primary"
            );
        }
        let meta = if !fresh {
            let mut meta = Meta::open(&mp).map_err(io)?;
            if meta.header().size_bytes != local.size() {
                // The disk was grown while its VM was stopped: the bitmap
                // follows, and the peer's replica grows at the next Attach.
                meta.resize(local.size()).map_err(io)?;
            }
            meta
        } else {
            Meta::create(
                &mp,
                MetaHeader {
                    vm: d.vm,
                    device: d.device.clone(),
                    role: DiskRole::Primary,
                    epoch: d.epoch,
                    generation: super::replicate::new_generation(),
                    state: ReplicaState::UpToDate,
                    peer_outdated: false,
                    size_bytes: local.size(),
                },
            )
            .map_err(io)?
        };
        let disk = DiskRef { vm: d.vm, device: d.device.clone() };
        let r = Arc::new(Replicated::new(d.name(), disk, d.epoch, local, meta, fresh, mode));
        self.primaries.lock().unwrap().insert(key(d), r.clone());
        Ok(r)
    }

    /// After a start or reload: the replicas held, the dialer for the
    /// replicating primaries and the listener, each restarted only when
    /// what it depends on changed.
    pub fn apply(&self, cfg: &DataplaneConfig) {
        let wanted: Vec<Key> = cfg
            .disks
            .iter()
            .filter(|d| d.role == DiskRole::Primary && d.replication != ReplicationMode::Off)
            .map(key)
            .collect();
        let primaries: Vec<Arc<Replicated>> = {
            let mut p = self.primaries.lock().unwrap();
            p.retain(|k, r| {
                let keep = wanted.contains(k);
                if !keep {
                    // Before a replica of it may open here (a move away).
                    r.retire();
                }
                keep
            });
            p.values().cloned().collect()
        };
        let secondaries: Vec<DiskExport> =
            cfg.disks.iter().filter(|d| d.role == DiskRole::Secondary).cloned().collect();
        self.secondaries.set_exports(&secondaries);
        let started = Started {
            peer: cfg.peer.clone(),
            tls: cfg.tls.clone(),
            listen: cfg.listen.clone(),
            sync_rate: cfg.sync_rate_bytes_per_sec,
        };
        let tls = match tls_of(cfg) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("replication not started: {e}");
                None
            }
        };
        // The dialer, for this node's replicating disks.
        let mut dialer = self.dialer.lock().unwrap();
        let same = dialer.as_ref().is_some_and(|(_, d, s, _)| {
            *s == started
                && d.len() == primaries.len()
                && d.iter().zip(&primaries).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        if !same {
            let mut draining = self.draining.lock().unwrap();
            if let Some((stop, _, _, task)) = dialer.take() {
                let _ = stop.send(true);
                *draining = Some(task);
            }
            if let (Some(tls), false) = (&tls, primaries.is_empty()) {
                let (tx, rx) = watch::channel(false);
                // The old connection's teardown marks its disks down: it
                // must end before the new one attaches the same disks, or it
                // would undo that attach.
                let old = draining.take();
                let (tls, disks) = (tls.clone(), primaries.clone());
                let task = self.rt.spawn(async move {
                    if let Some(old) = old {
                        let _ = old.await;
                    }
                    peer::run_primary(tls, disks, rx).await
                });
                *dialer = Some((tx, primaries, started.clone(), task));
            }
        }
        // The listener, for the replicas of the peer's disks.
        let mut server = self.server.lock().unwrap();
        if !server.as_ref().is_some_and(|(_, s)| *s == started) {
            if let Some((stop, _)) = server.take() {
                let _ = stop.send(true);
            }
            if let (Some(tls), false) = (tls, cfg.listen.is_empty()) {
                let (tx, rx) = watch::channel(false);
                let (listen, sec) = (cfg.listen.clone(), self.secondaries.clone());
                // Bound before apply returns, so a listen error is logged now.
                let bound = self.rt.block_on(async {
                    let mut ls = Vec::new();
                    for a in &listen {
                        ls.push(bind_retrying(*a).await.map_err(|e| format!("{a}: {e}"))?);
                    }
                    Ok::<_, String>(ls)
                });
                match bound {
                    Ok(listeners) => {
                        self.rt.spawn(peer::run_secondary(tls, listeners, sec, rx));
                        *server = Some((tx, started));
                    }
                    Err(e) => tracing::error!("cannot listen for the peer's data plane: {e}"),
                }
            }
        }
    }

    /// Replication status of a disk, if it replicates.
    pub fn status(&self, d: &DiskExport) -> Option<ReplicaView> {
        match d.role {
            DiskRole::Primary => {
                let r = self.primaries.lock().unwrap().get(&key(d))?.clone();
                let s = r.status();
                Some(ReplicaView {
                    local: ReplicaState::UpToDate,
                    peer: Some(s.peer),
                    connected: s.connected,
                    pending_bytes: s.pending_bytes,
                    lag_bytes: s.lag_bytes,
                    lag_seconds: s.lag_seconds,
                    sync: s.sync.map(|p| SyncView {
                        full: p.full,
                        done: p.done,
                        total: p.total,
                        rate_bytes_per_sec: p.rate,
                        eta_seconds: p.eta,
                    }),
                    sync_bytes: s.sync_bytes,
                    detail: String::new(),
                    write_wait: s.write_wait,
                })
            }
            DiskRole::Secondary => Some(match self.secondaries.status(d) {
                Ok(s) => ReplicaView {
                    connected: s.connected,
                    detail: match (s.has_undo, s.connected, s.diverged_bytes) {
                        (true, true, _) => "a delta resync is running: until it ends this copy is not \
                                            consistent; the pre-resync copy is kept (restorable with force)"
                            .into(),
                        (true, false, _) => {
                            "a resync broke off: this copy is not consistent; only the pre-resync copy \
                             can be promoted, and only with force"
                                .into()
                        }
                        (false, _, 0) => String::new(),
                        (false, _, n) => format!(
                            "{} blocks ({n} bytes) written here as the previous primary are discarded by \
                             the resync from the new primary",
                            n / 4096
                        ),
                    },
                    ..ReplicaView::secondary(s.state)
                },
                Err(e) => ReplicaView {
                    detail: e.to_string(),
                    ..ReplicaView::secondary(ReplicaState::Inconsistent)
                },
            }),
        }
    }
}

/// Binds `addr`, retrying for a moment while it is in use: the server
/// just stopped may not have closed its listener yet.
async fn bind_retrying(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}
