//! The peer link in the daemon: one supervised task (`cluster.peer_link`)
//! runs `cluster::transport::PeerLink` while this node is paired. It
//! follows the peer row: it starts the link at boot when paired and when a
//! pairing commits, and stops it (closing the connection, so the peer sees
//! it at once) on unpair, on SIGTERM (the cluster stage stops after the
//! API and before the core), or when the row names another peer.
//!
//! The rest of the node sees the running link through the [`LinkHandle`]
//! it publishes ([`NodeCore::set_link`]): the replication driver sends and
//! receives data messages on it; `GET /v1/peer`, health and metrics read
//! its status.

use super::NodeCore;
use crate::cluster::transport::{LocalNode, PeerLink, TransportConfig};
use crate::cluster::PeerTarget;
use crate::store::{PeerRecord, PeerState};
use crate::tasks::{Policy, Stage, Stop, Supervisor};
use std::net::SocketAddr;
use std::sync::Arc;

/// Whom the link talks to: only a finished pairing gives a target (a
/// `joining` row waits for the inviter's answer first).
fn target_of(rec: Option<&PeerRecord>) -> Option<PeerTarget> {
    let p = rec.filter(|p| p.state == PeerState::Paired)?;
    Some(PeerTarget {
        node_id: p.node.node_id,
        addresses: p.node.addresses.iter().map(|ip| SocketAddr::new(*ip, p.node.link_port)).collect(),
        fingerprint: p.node.fingerprint.clone(),
    })
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// Starts the `cluster.peer_link` task.
pub fn spawn<C: NodeCore>(core: &Arc<C>, tasks: &Supervisor, local: LocalNode) {
    let core = core.clone();
    // Restarted with backoff when the link cannot start (its listen
    // address is taken, say): the pairing stays, the link comes later.
    tasks.spawn(Stage::Cluster, "cluster.peer_link", Policy::Restart, move |stop| {
        let (core, local) = (core.clone(), local.clone());
        async move { run(&*core, local, stop).await }
    });
}

async fn run<C: NodeCore>(core: &C, local: LocalNode, mut stop: Stop) -> Result<(), String> {
    let mut records = core.peer_row();
    loop {
        let target = target_of(records.borrow_and_update().as_ref());
        let Some(target) = target else {
            tokio::select! {
                _ = stop.wait() => return Ok(()),
                changed = records.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return Ok(()),
                },
            }
        };
        let cfg = TransportConfig::from_config(&core.cluster_config());
        let listen = list(&cfg.listen);
        let seed = u64::from_le_bytes(crate::util::random_bytes());
        let (link, incoming) = match PeerLink::start(local.clone(), target.clone(), cfg, seed).await {
            Ok(started) => started,
            Err(e) => {
                let why = format!("the peer link cannot start on {listen}: {e}");
                core.set_link_error(Some(why.clone()));
                return Err(why);
            }
        };
        core.set_link_error(None);
        tracing::info!(
            PEER_ID = %target.node_id,
            listen = %list(&link.local_addrs),
            peer_addresses = %list(&target.addresses),
            "peer link started"
        );
        core.set_link(Some(link.handle(target.node_id, incoming)));
        // Until stopped, unpaired, or paired with someone else.
        let stopping = loop {
            tokio::select! {
                _ = stop.wait() => break true,
                changed = records.changed() => {
                    if changed.is_err() {
                        break true;
                    }
                    if target_of(records.borrow().as_ref()).as_ref() != Some(&target) {
                        break false;
                    }
                }
            }
        };
        core.set_link(None);
        link.shutdown().await;
        tracing::info!(PEER_ID = %target.node_id, "peer link stopped");
        if stopping {
            return Ok(());
        }
    }
}
