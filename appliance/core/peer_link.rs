//! The peer link in the daemon: one supervised task (`cluster.peer_link`)
//! runs `cluster::transport::PeerLink` while this node is paired. It
//! follows the peer row: it starts the link at boot when paired and when a
//! pairing commits, and stops it (closing the connection, so the peer sees
//! it at once) on unpair, on SIGTERM (the cluster stage stops after the
//! API and before the core), or when the row names another peer.
//!
//! The rest of the node sees the running link through a [`LinkHandle`]
//! ([`Core::peer_link`]): the replication driver sends and receives data
//! messages on it; `GET /v1/peer`, health and metrics read its status.

use super::Core;
use crate::cluster::link::{LinkState, Role};
use crate::cluster::transport::{LinkHandle, LocalNode, PeerLink, TransportConfig, TransportStatus};
use crate::cluster::PeerTarget;
use crate::store::{PeerRecord, PeerState};
use crate::tasks::{Policy, Stage, Stop, Supervisor};
use crate::types::PeerLink as PeerLinkView;
use std::net::SocketAddr;
use std::sync::Arc;

/// Whom the link talks to: only a finished pairing gives a target (a
/// `joining` row waits for the inviter's answer first).
fn target_of(rec: Option<&PeerRecord>) -> Option<PeerTarget> {
    let p = rec.filter(|p| p.state == PeerState::Paired)?;
    Some(PeerTarget {
        node_id: p.node_id,
        addresses: p.addresses.iter().map(|ip| SocketAddr::new(*ip, p.link_port)).collect(),
        fingerprint: p.fingerprint.clone(),
    })
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
}

/// `detail` of the link in `GET /v1/peer`.
fn describe(st: &TransportStatus) -> String {
    let l = &st.link;
    let at = l.address.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    let last = l.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
    match (l.state, l.role) {
        (LinkState::Up, Role::Dialer) => format!("up over {at} (this node dials)"),
        (LinkState::Up, Role::Acceptor) => format!("up over {at} (the peer dials)"),
        (LinkState::Connecting, _) => format!("connecting to {at}{last}"),
        (LinkState::Handshaking, _) => format!("handshaking with {at}{last}"),
        (LinkState::Backoff, _) => format!("retrying shortly{last}"),
        (LinkState::Idle, _) => format!("waiting for the peer to connect{last}"),
    }
}

impl Core {
    /// The running peer link: `Some` from the link's start to its stop (one
    /// per pairing and daemon run), `None` while not paired. A consumer
    /// (the replication driver) waits on this, then uses the handle's
    /// `data()` and `incoming()`; see docs/design/peer-link.md.
    pub fn peer_link(&self) -> tokio::sync::watch::Receiver<Option<LinkHandle>> {
        self.peer.link.subscribe()
    }

    /// The link's status now, or None when no link runs.
    pub fn peer_link_status(&self) -> Option<TransportStatus> {
        self.peer.link.borrow().as_ref().map(LinkHandle::status)
    }

    pub(super) fn link_view(&self, rec: &PeerRecord) -> PeerLinkView {
        let down = |detail: String| PeerLinkView {
            state: "down".into(),
            detail,
            address: None,
            last_heartbeat: None,
            rtt_ms: None,
            bulk: "down".into(),
        };
        if rec.state != PeerState::Paired {
            return down("not started: the pairing is not finished".into());
        }
        let Some(st) = self.peer_link_status() else {
            let why = self.peer.link_error.lock().unwrap().clone();
            return down(why.unwrap_or_else(|| "not running".into()));
        };
        let up = st.link.state == LinkState::Up;
        let now = crate::util::now_ms();
        PeerLinkView {
            state: if up { "up" } else { "down" }.into(),
            detail: describe(&st),
            address: st.link.address.filter(|_| up).map(|a| a.to_string()),
            last_heartbeat: st.link.last_heartbeat_age_ms.map(|age| crate::util::rfc3339(now - age as i64)),
            rtt_ms: st.link.rtt_ms.filter(|_| up),
            bulk: if st.link.bulk == LinkState::Up { "up" } else { "down" }.into(),
        }
    }

    /// Starts the `cluster.peer_link` task; `local` is this node on the
    /// link (its id and the API's certificate and key).
    pub fn spawn_peer_link(self: &Arc<Self>, tasks: &Supervisor, local: LocalNode) {
        let core = self.clone();
        // Restarted with backoff when the link cannot start (its listen
        // address is taken, say): the pairing stays, the link comes later.
        tasks.spawn(Stage::Cluster, "cluster.peer_link", Policy::Restart, move |stop| {
            let (core, local) = (core.clone(), local.clone());
            async move { core.run_peer_link(local, stop).await }
        });
    }

    async fn run_peer_link(&self, local: LocalNode, mut stop: Stop) -> Result<(), String> {
        let mut records = self.peer.record.subscribe();
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
            let cfg = TransportConfig::from_config(&self.cfg.cluster);
            let listen = list(&cfg.listen);
            let seed = u64::from_le_bytes(crate::util::random_bytes());
            let (link, incoming) = match PeerLink::start(local.clone(), target.clone(), cfg, seed).await {
                Ok(started) => started,
                Err(e) => {
                    let why = format!("the peer link cannot start on {listen}: {e}");
                    *self.peer.link_error.lock().unwrap() = Some(why.clone());
                    return Err(why);
                }
            };
            *self.peer.link_error.lock().unwrap() = None;
            tracing::info!(
                PEER_ID = %target.node_id,
                listen = %list(&link.local_addrs),
                peer_addresses = %list(&target.addresses),
                "peer link started"
            );
            self.peer.link.send_replace(Some(link.handle(target.node_id, incoming)));
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
            self.peer.link.send_replace(None);
            link.shutdown().await;
            tracing::info!(PEER_ID = %target.node_id, "peer link stopped");
            if stopping {
                return Ok(());
            }
        }
    }
}
