//! The running peer link as the core shows it: `GET /v1/peer`'s `link`,
//! health and metrics read the status of the handle the cluster's
//! `peer_link` driver publishes.

use super::Core;
use crate::cluster::link::{LinkState, Role};
use crate::cluster::transport::{LinkHandle, TransportStatus};
use crate::store::{PeerRecord, PeerState};
use crate::types::PeerLink as PeerLinkView;

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

    /// The peer link is up now.
    pub(super) fn peer_link_up(&self) -> bool {
        self.peer_link_status().is_some_and(|s| s.link.state == LinkState::Up)
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
}
