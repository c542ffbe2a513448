//! Pairing with a second node: drives `cluster::pairing`'s state machines
//! over HTTPS (pinned to the certificate the join code names) and keeps
//! the result in the store's `peer` row. See docs/pairing.md.

use super::{Core, CoreError, Result};
use crate::cluster::pairing::{
    self, Handshake, HandshakeReply, Inviter, JoinCode, Joiner, NodeInfo, PairError, Paired,
};
use crate::store::{PeerRecord, PeerState};
use crate::tasks::{Policy, Stage, Supervisor};
use crate::types::{PeerInvitation, PeerInvite, PeerJoin, PeerNode, PeerReplication, PeerUnpaired, PeerView};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Per attempt at one address of the other node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A handshake answer is a few hundred bytes.
const MAX_ANSWER: usize = 64 * 1024;
/// How often a `joining` row asks the inviter again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// The core's pairing state: invitations in memory, the peer row cached.
#[derive(Default)]
pub struct PeerSide {
    /// Created on first use, when the TLS identity is known.
    inviter: std::sync::Mutex<Option<Inviter>>,
    /// A watch, so the peer link starts and stops with the pairing.
    pub(super) record: tokio::sync::watch::Sender<Option<PeerRecord>>,
    /// The running peer link, if any (see core/peer_link.rs).
    pub(super) link: tokio::sync::watch::Sender<Option<crate::cluster::transport::LinkHandle>>,
    /// Why the link could not start (its listen address taken, say).
    pub(super) link_error: std::sync::Mutex<Option<String>>,
    /// One pairing step (join, commit, abort, unpair) at a time, so two
    /// cannot both see "not paired" and both write.
    lock: tokio::sync::Mutex<()>,
    /// Wakes the resolver when a join ends incomplete.
    resolve_now: tokio::sync::Notify,
}

impl PeerSide {
    pub fn load(record: Option<PeerRecord>) -> PeerSide {
        PeerSide { record: tokio::sync::watch::Sender::new(record), ..Default::default() }
    }
}

fn now() -> u64 {
    crate::util::now_ms().max(0) as u64
}

/// The addresses this node is reached at: the API's listen addresses, or
/// every non-loopback interface address when it listens on a wildcard.
fn advertised_addresses(listen: &[SocketAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = listen.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).collect();
    if listen.iter().any(|a| a.ip().is_unspecified()) {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let ip = match a.address.as_ref() {
                    Some(s) if s.as_sockaddr_in().is_some() => IpAddr::V4(s.as_sockaddr_in().unwrap().ip()),
                    Some(s) if s.as_sockaddr_in6().is_some() => IpAddr::V6(s.as_sockaddr_in6().unwrap().ip()),
                    _ => continue,
                };
                // Link-local IPv6 needs a scope the code cannot carry.
                let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                if !ip.is_loopback() && !link_local {
                    out.push(ip);
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|ip| seen.insert(*ip));
    out
}

fn record_of(p: &Paired, state: PeerState) -> PeerRecord {
    PeerRecord {
        node: p.peer.clone(),
        pair_key: p.pair_key.to_vec(),
        state,
        paired_at: crate::util::now_ms(),
    }
}

fn node_view(r: &PeerRecord) -> PeerNode {
    PeerNode {
        node_id: r.node.node_id,
        name: r.node.name.clone(),
        addresses: r.node.addresses.iter().map(|a| a.to_string()).collect(),
        api_port: r.node.api_port,
        link_port: r.node.link_port,
        fingerprint: r.node.fingerprint.clone(),
        paired_at: crate::util::rfc3339(r.paired_at),
    }
}

/// True when a TLS failure is the pinning verifier refusing the certificate.
fn is_pin_mismatch(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::General(m) if m.contains("pinned fingerprint")))
}

/// One handshake request to the other node, trying its addresses in order.
/// Its answer is trusted only from the certificate with `fingerprint`.
/// What `GET /v1/peer` and `novacron status` say about failover until the
/// witness (automatic failover) exists.
pub(crate) const FAILOVER: &str = "manual: automatic failover is not configured (it needs a witness, \
    not built yet). If the peer dies, confirm it is off, then run `novacron peer takeover --force` \
    on this node";

pub(super) async fn call(
    addrs: &[IpAddr],
    port: u16,
    fingerprint: &str,
    req: &Handshake,
) -> pairing::Result<HandshakeReply> {
    let tls = crate::tls::pinned_client_config(Some(fingerprint), false, &[b"http/1.1"])
        .map_err(|e| PairError::Unreachable(e.to_string()))?;
    let body = serde_json::to_vec(req).expect("handshakes serialize");
    let mut failures = Vec::new();
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(REQUEST_TIMEOUT, call_one(addr, tls.clone(), body.clone())).await {
            Ok(Ok(reply)) => return Ok(reply),
            // An answer, or the wrong certificate: no other address changes that.
            Ok(Err(e @ (PairError::Refused { .. } | PairError::FingerprintMismatch { .. }))) => {
                return Err(e)
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no answer within {} s", REQUEST_TIMEOUT.as_secs())),
        }
    }
    Err(PairError::Unreachable(failures.join("; ")))
}

async fn call_one(
    addr: SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    body: Vec<u8>,
) -> pairing::Result<HandshakeReply> {
    let down = |m: String| PairError::Unreachable(m);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| down("connect timed out".into()))?
        .map_err(|e| down(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| {
        if is_pin_mismatch(&e) {
            PairError::FingerprintMismatch { addr: addr.to_string() }
        } else {
            down(format!("TLS: {e}"))
        }
    })?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| down(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(super::Action::PeerHandshake.method())
        .uri(super::Action::PeerHandshake.template())
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| down(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| down(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| down(format!("reading the answer: {e}")))?
        .to_bytes();
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| down(format!("unexpected answer: {e}")));
    }
    let err: crate::types::ErrorBody =
        serde_json::from_slice(&bytes).map_err(|_| down(format!("HTTP {status} without an error body")))?;
    Err(PairError::refused(&err.error.code, &err.error.message))
}

impl Core {
    /// This node as the other one should pin it.
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.node.id,
            name: self.node.name.clone(),
            addresses: advertised_addresses(&self.cfg.api.listen),
            api_port: self.cfg.api.listen.first().map(|a| a.port()).unwrap_or(crate::config::DEFAULT_PORT),
            link_port: self
                .cfg
                .cluster
                .listen
                .first()
                .map_or(crate::cluster::DEFAULT_LINK_PORT, |a| a.port()),
            fingerprint: self.tls_fingerprint().to_string(),
        }
    }

    pub(crate) fn peer_record(&self) -> Option<PeerRecord> {
        self.peer.record.borrow().clone()
    }

    fn with_inviter<T>(&self, f: impl FnOnce(&mut Inviter) -> T) -> T {
        let mut guard = self.peer.inviter.lock().unwrap();
        let inviter = guard.get_or_insert_with(|| Inviter::new(self.node_info()));
        inviter.set_identity(self.node_info());
        f(inviter)
    }

    async fn store_peer(
        &self,
        op: impl FnOnce(&crate::store::Store) -> crate::store::Result<()> + Send + 'static,
    ) -> Result<()> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        self.reload_peer().await
    }

    async fn reload_peer(&self) -> Result<()> {
        let store = self.store.clone();
        let rec = tokio::task::spawn_blocking(move || store.peer())
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))??;
        self.metrics
            .peer_paired
            .store(rec.as_ref().is_some_and(|r| r.state == PeerState::Paired), Ordering::Relaxed);
        self.peer.record.send_replace(rec);
        Ok(())
    }

    /// An audit entry for a handshake step that changed this node's state,
    /// by the peer (anonymous requests are not audited: anyone can send one).
    async fn audit_peer(&self, peer: uuid::Uuid, step: &'static str) {
        let store = self.store.clone();
        let actor = format!("peer:{peer}");
        let res =
            tokio::task::spawn_blocking(move || store.record_audit(&actor, "peer.handshake", step, "ok"))
                .await;
        if let Ok(Err(e)) = res {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    pub(super) async fn peer_invite(&self, req: PeerInvite) -> Result<PeerInvitation> {
        let ttl = req.expires_secs.unwrap_or(pairing::DEFAULT_TTL_SECS);
        if ttl == 0 || ttl > pairing::MAX_TTL_SECS {
            return Err(CoreError::invalid(
                "expires_secs",
                format!("must be from 1 to {} seconds", pairing::MAX_TTL_SECS),
            ));
        }
        if let Some(p) = self.peer_record() {
            return Err(PairError::AlreadyPaired(p.node.name).into());
        }
        let me = self.node_info();
        if me.addresses.is_empty() {
            return Err(CoreError::invalid("api.listen", "this node has no address to put in a code"));
        }
        let code = self.with_inviter(|i| i.invite(now(), ttl * 1000, crate::util::random_bytes()));
        tracing::info!(
            INVITE = %hex::encode(code.invite),
            expires_secs = ttl,
            "peer invitation made"
        );
        Ok(PeerInvitation {
            code: code.encode(),
            expires_at: crate::util::rfc3339(code.expires_at_ms as i64),
            addresses: code
                .addresses
                .iter()
                .map(|ip| SocketAddr::new(*ip, code.api_port).to_string())
                .collect(),
            fingerprint: code.fingerprint,
        })
    }

    pub(super) async fn peer_join(&self, req: PeerJoin) -> Result<PeerView> {
        let code = JoinCode::decode(&req.code)?;
        let _g = self.peer.lock.lock().await;
        if let Some(p) = self.peer_record() {
            return Err(PairError::AlreadyPaired(p.node.name).into());
        }
        let joiner = Joiner::new(code, self.node_info(), crate::util::random_bytes())?;
        let code = joiner.code().clone();
        let at = |addrs: &[IpAddr]| addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
        let fail = |e: PairError| {
            tracing::warn!(PEER_ID = %code.node_id, peer_addresses = %at(&code.addresses), code = e.code(), error = %e, "pairing refused");
            CoreError::from(e)
        };
        let reply =
            call(&code.addresses, code.api_port, &code.fingerprint, &joiner.prepare()).await.map_err(fail)?;
        let paired = joiner.accept(&reply).map_err(fail)?;
        // Written before the commit: a crash from here on leaves a
        // `joining` row, settled with the inviter at the next start.
        let rec = record_of(&paired, PeerState::Joining);
        self.store_peer(move |s| s.peer_insert(&rec)).await.map_err(|e| match e {
            CoreError::Store(crate::store::StoreError::Conflict(_)) => {
                CoreError::from(PairError::AlreadyPaired(paired.peer.name.clone()))
            }
            other => other,
        })?;
        let peer = paired.peer.clone();
        // The rest of the join goes where prepare went.
        let (addrs, port, fp) = (&code.addresses, code.api_port, &code.fingerprint);
        let commit = call(addrs, port, fp, &joiner.commit()).await;
        match commit {
            Ok(_) => {
                self.store_peer(move |s| s.peer_set_state(peer.node_id, PeerState::Paired)).await?;
                tracing::info!(PEER_ID = %peer.node_id, PEER_NAME = %peer.name, peer_addresses = %at(&peer.addresses), "paired with peer (joined)");
                self.events.publish(
                    "peer.paired",
                    serde_json::json!({"peer": {"id": peer.node_id, "name": peer.name}}),
                );
                Ok(self.peer_view())
            }
            Err(e @ PairError::Refused { .. }) => {
                self.store_peer(move |s| s.peer_delete(peer.node_id).map(drop)).await?;
                Err(fail(e))
            }
            Err(e) => {
                // No answer: A may or may not have committed. Ask it to
                // forget; if it answers at all, both sides are clean.
                match call(addrs, port, fp, &joiner.abort()).await {
                    Ok(_) | Err(PairError::Refused { .. }) => {
                        self.store_peer(move |s| s.peer_delete(peer.node_id).map(drop)).await?;
                        Err(fail(e))
                    }
                    Err(_) => {
                        tracing::warn!(PEER_ID = %peer.node_id, error = %e, "pairing incomplete: the inviter did not answer the commit; settled when it answers");
                        self.peer.resolve_now.notify_one();
                        Err(PairError::Incomplete(peer.name.clone()).into())
                    }
                }
            }
        }
    }

    /// The inviter's side of a handshake step (no token: the proofs
    /// authenticate it).
    pub(super) async fn peer_handshake(self: &Arc<Self>, req: Handshake) -> Result<HandshakeReply> {
        let step = req.step();
        let result = self.peer_handshake_step(req).await;
        if let Err(e) = &result {
            tracing::warn!(step, code = e.code(), error = %e, "peer handshake refused");
        }
        result
    }

    async fn peer_handshake_step(self: &Arc<Self>, req: Handshake) -> Result<HandshakeReply> {
        req.check()?;
        let current = self.peer_record();
        match &req {
            Handshake::Prepare { joiner, .. } => {
                let joiner_id = joiner.node_id;
                let paired_with = current.as_ref().map(|p| p.node.name.clone());
                let reply = self.with_inviter(|i| i.prepare(now(), paired_with.as_deref(), &req))?;
                tracing::info!(PEER_ID = %joiner_id, "pairing prepared");
                Ok(reply)
            }
            Handshake::Commit { .. } => {
                let _g = self.peer.lock.lock().await;
                if let Some(p) = self.peer_record() {
                    return Err(PairError::AlreadyPaired(p.node.name).into());
                }
                let paired = self.with_inviter(|i| i.commit(now(), &req))?;
                let rec = record_of(&paired, PeerState::Paired);
                self.store_peer(move |s| s.peer_insert(&rec)).await?;
                let peer = &paired.peer;
                self.audit_peer(peer.node_id, "commit").await;
                tracing::info!(PEER_ID = %peer.node_id, PEER_NAME = %peer.name, "paired with peer (invited)");
                self.events.publish(
                    "peer.paired",
                    serde_json::json!({"peer": {"id": peer.node_id, "name": peer.name}}),
                );
                Ok(HandshakeReply { paired: true, inviter: None, proof: None, epochs: None })
            }
            Handshake::Abort { .. } => {
                let _g = self.peer.lock.lock().await;
                if let Some(id) = self.with_inviter(|i| i.abort(&req))? {
                    self.store_peer(move |s| s.peer_delete(id).map(drop)).await?;
                    self.audit_peer(id, "abort").await;
                    tracing::info!(PEER_ID = %id, "pairing rolled back at the joiner's request");
                }
                Ok(HandshakeReply { paired: false, inviter: None, proof: None, epochs: None })
            }
            Handshake::Vm { from, op, .. } => {
                let Some(p) = self.peer_record().filter(|p| p.node.node_id == *from) else {
                    return Err(PairError::NotPeer.into());
                };
                pairing::verify_peer_request(&req, self.node.id, p.node.node_id, &p.pair_key, now())?;
                self.peer_vm_op(op.clone()).await
            }
            Handshake::Resolve { from, .. } | Handshake::Unpair { from, .. } => {
                let _g = self.peer.lock.lock().await;
                let Some(p) = self.peer_record().filter(|p| p.node.node_id == *from) else {
                    // Not our peer (any more): nothing to prove or undo.
                    return Ok(HandshakeReply { paired: false, inviter: None, proof: None, epochs: None });
                };
                pairing::verify_peer_request(&req, self.node.id, p.node.node_id, &p.pair_key, now())?;
                if matches!(req, Handshake::Resolve { .. }) {
                    return Ok(HandshakeReply {
                        paired: p.state == PeerState::Paired,
                        inviter: None,
                        proof: None,
                        epochs: None,
                    });
                }
                self.store_peer(move |s| s.peer_delete(p.node.node_id).map(drop)).await?;
                self.forget_peer_vms(p.node.node_id).await;
                self.audit_peer(p.node.node_id, "unpair").await;
                tracing::info!(PEER_ID = %p.node.node_id, PEER_NAME = %p.node.name, "unpaired at the peer's request");
                self.events.publish(
                    "peer.unpaired",
                    serde_json::json!({"peer": {"id": p.node.node_id, "name": p.node.name}, "by": "peer"}),
                );
                Ok(HandshakeReply { paired: false, inviter: None, proof: None, epochs: None })
            }
        }
    }

    /// Settles a `joining` row left by a crash or a lost answer: asks the
    /// inviter whether it committed, at start, every few seconds while the
    /// row stays, and at once when a join ends incomplete.
    pub fn spawn_peer_resolver(self: &std::sync::Arc<Self>, tasks: &Supervisor) {
        let core = self.clone();
        tasks.spawn(Stage::Core, "core.peer_resolver", Policy::Restart, move |mut stop| {
            let core = core.clone();
            async move {
                loop {
                    if core.peer_record().is_some_and(|p| p.state == PeerState::Joining) {
                        core.resolve_join().await;
                    }
                    tokio::select! {
                        _ = stop.wait() => return Ok(()),
                        _ = core.peer.resolve_now.notified() => {}
                        _ = tokio::time::sleep(RESOLVE_EVERY) => {}
                    }
                }
            }
        });
    }

    /// One attempt to settle a `joining` row with the inviter.
    async fn resolve_join(&self) {
        let Some(p) = self.peer_record().filter(|p| p.state == PeerState::Joining) else { return };
        let req = pairing::peer_request(
            "resolve",
            &p.pair_key,
            self.node.id,
            p.node.node_id,
            now(),
            crate::util::random_bytes(),
        );
        let reply = match call(&p.node.addresses, p.node.api_port, &p.node.fingerprint, &req).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(PEER_ID = %p.node.node_id, error = %e, "inviter not reachable to settle the pairing");
                return;
            }
        };
        let _g = self.peer.lock.lock().await;
        let id = p.node.node_id;
        let result = if reply.paired {
            tracing::info!(PEER_ID = %id, PEER_NAME = %p.node.name, "pairing confirmed by the inviter");
            self.store_peer(move |s| s.peer_set_state(id, PeerState::Paired)).await
        } else {
            tracing::info!(PEER_ID = %id, PEER_NAME = %p.node.name, "pairing rolled back: the inviter never committed it");
            self.store_peer(move |s| s.peer_delete(id).map(drop)).await
        };
        if let Err(e) = result {
            tracing::error!(PEER_ID = %id, error = %e, "cannot settle the pairing");
        }
    }

    pub(super) async fn peer_unpair(&self, force: bool) -> Result<PeerUnpaired> {
        let _g = self.peer.lock.lock().await;
        let p = self.peer_record().ok_or(PairError::NotPaired)?;
        let req = pairing::peer_request(
            "unpair",
            &p.pair_key,
            self.node.id,
            p.node.node_id,
            now(),
            crate::util::random_bytes(),
        );
        let (notified, message) = match call(&p.node.addresses, p.node.api_port, &p.node.fingerprint, &req).await {
            Ok(_) => (true, format!("unpaired on both nodes ({} no longer lists this node)", p.node.name)),
            Err(e) if force => (
                false,
                format!(
                    "unpaired on this node only: {} did not take the request ({e}); it still lists this node until it is unpaired there too (`novacron peer unpair --force` on it)",
                    p.node.name
                ),
            ),
            Err(e @ PairError::Unreachable(_)) => {
                return Err(PairError::Unreachable(format!(
                    "{e}; to unpair this node alone, use force (`novacron peer unpair --force`)"
                ))
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        let id = p.node.node_id;
        self.store_peer(move |s| s.peer_delete(id).map(drop)).await?;
        if notified {
            self.forget_peer_vms(id).await;
        }
        tracing::info!(PEER_ID = %p.node.node_id, PEER_NAME = %p.node.name, peer_notified = notified, "unpaired");
        self.events.publish(
            "peer.unpaired",
            serde_json::json!({"peer": {"id": p.node.node_id, "name": p.node.name}, "by": "this node", "peer_notified": notified}),
        );
        Ok(PeerUnpaired { peer: node_view(&p), peer_notified: notified, message })
    }

    pub(super) fn peer_view(&self) -> PeerView {
        let rec = self.peer_record();
        let state = match rec.as_ref().map(|r| r.state) {
            None => "not_paired",
            Some(PeerState::Joining) => "joining",
            Some(PeerState::Paired) => "paired",
        };
        let link = rec.as_ref().map(|r| self.link_view(r));
        let repl = self.replication.read().unwrap().clone().unwrap_or_default();
        let replication = rec.as_ref().map(|_| PeerReplication {
            lag_records: repl.lag_records,
            lag_seconds: repl.lag_seconds_at(crate::util::now_ms()),
        });
        PeerView {
            paired: rec.as_ref().is_some_and(|r| r.state == PeerState::Paired),
            state: state.into(),
            peer: rec.as_ref().map(node_view),
            link,
            replication,
            disks: Vec::new(),
            failover: FAILOVER.into(),
        }
    }
}
