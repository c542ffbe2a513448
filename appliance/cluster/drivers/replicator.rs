//! The tokio driver of state replication: feeds [`Replication`] from the
//! node (this node's seq, its feed and snapshot, through [`NodeCore`]) and
//! the link (up/down, the peer's messages), and carries out what it asks:
//! store calls through the node, frames on the link's data channel. All decisions are the
//! state machine's (`replication.rs`).
//!
//! One loop, one thing at a time: a store call's answer is fed back before
//! the next message is taken, as the state machine expects. The windows
//! keep what the peer can have in flight bounded, so the link's received
//! queue never fills while this loop waits on a disk flush.

use super::NodeCore;
use crate::cluster::frame::Message;
use crate::cluster::replication::{Input, Output, ReplConfig, ReplStatus, Replication};
use crate::cluster::transport::DataSender;
use crate::cluster::ClusterError;
use crate::store::Applied;
use crate::tasks::{Policy, Stage, Stop, Supervisor};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// The lag and counters as `GET /v1/peer` and `/metrics` read them:
/// `Some` while replication runs.
pub type StatusCell = Arc<std::sync::RwLock<Option<ReplStatus>>>;

/// Starts the `cluster.replication` task: for each peer link the daemon
/// runs ([`NodeCore::link`]), replication with that peer (and the image
/// copy beside it), until the link stops (unpair) or the cluster stage
/// stops.
pub fn spawn<C: NodeCore>(core: &Arc<C>, tasks: &Supervisor) {
    let core = core.clone();
    tasks.spawn(Stage::Cluster, "cluster.replication", Policy::Restart, move |stop| {
        let core = core.clone();
        async move { follow_links(core, stop).await }
    });
}

async fn follow_links<C: NodeCore>(core: Arc<C>, mut stop: Stop) -> Result<(), String> {
    let mut links = core.link();
    loop {
        let handle = links.borrow_and_update().clone();
        if let Some(h) = handle {
            let mut inbox = h.incoming().await;
            let status = core.replication_status();
            // The image copy runs on the bulk connection, beside this.
            let (images_stop, images_stopped) = tokio::sync::oneshot::channel::<()>();
            let images = tokio::spawn(super::image_copy::run(
                core.clone(),
                h.peer_id,
                h.bulk(),
                h.bulk_incoming().await,
                images_stopped,
                stop.clone(),
            ));
            let ran = run(core.clone(), h.peer_id, h.data(), &mut inbox, status, stop.clone()).await;
            drop(images_stop);
            let _ = images.await;
            match ran {
                Ok(()) if stop.is_stopped() => return Ok(()),
                // The link stopped (unpaired): wait for the next one.
                Ok(()) => {}
                Err(e) => return Err(e),
            }
            if links.has_changed().unwrap_or(true) {
                continue;
            }
        }
        tokio::select! {
            _ = stop.wait() => return Ok(()),
            changed = links.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// Runs replication with `peer` until `stop` or the link stops. `data` is
/// the link's sender while it is up; `incoming` the messages it received.
pub async fn run<C: NodeCore>(
    core: Arc<C>,
    peer: Uuid,
    mut data: watch::Receiver<Option<DataSender>>,
    incoming: &mut mpsc::Receiver<Message>,
    status: StatusCell,
    mut stop: Stop,
) -> Result<(), String> {
    let mut local = core.local_seq();
    let seq = *local.borrow_and_update();
    let mark = core.applied_mark(peer).await.map_err(|e| e.to_string())?;
    let ids = (core.node_id(), peer);
    let mut m =
        Replication::new(ReplConfig::default(), ids, seq, mark, Instant::now(), crate::util::now_ms());
    let mut link: Option<DataSender> = None;
    let mut inputs = VecDeque::new();
    let mut conflicts_seen = newest_conflict(&*core).await;
    tracing::info!(PEER_ID = %peer, local_seq = seq, applied_mark = mark, "state replication started");
    loop {
        if link.is_none() {
            if let Some(d) = data.borrow_and_update().clone() {
                link = Some(d);
                inputs.push_back(Input::LinkUp);
            }
        }
        while let Some(input) = inputs.pop_front() {
            for o in m.handle(Instant::now(), input) {
                let applies = matches!(o, Output::Apply { .. } | Output::ApplySnapshot { .. });
                if let Some(next) = carry_out(&*core, peer, link.as_ref(), o).await {
                    if applies && matches!(next, Input::Applied { .. }) {
                        report_conflicts(&*core, peer, &mut conflicts_seen).await;
                    }
                    inputs.push_back(next);
                }
            }
        }
        *status.write().unwrap() = Some(m.status(crate::util::now_ms()));
        let wake = m.next_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = stop.wait() => break,
            changed = data.changed() => {
                if changed.is_err() {
                    break;
                }
                let (down, up) = follow_sender(&mut link, data.borrow_and_update().clone());
                inputs.extend(down.then_some(Input::LinkDown).into_iter().chain(up.then_some(Input::LinkUp)));
            }
            changed = local.changed() => {
                if changed.is_err() {
                    return Err("the core stopped".into());
                }
                let seq = *local.borrow_and_update();
                inputs.push_back(Input::LocalSeq { seq, at: crate::util::now_ms() });
            }
            msg = incoming.recv() => match msg {
                Some(msg) => inputs.push_back(Input::Message(msg)),
                None => break,
            },
            _ = sleep_until(wake) => inputs.push_back(Input::Tick),
        }
    }
    // A last ack for pruning; the peer resumes from its own mark anyway.
    if let Some(seq) = m.status(0).peer_acked {
        let _ = core.record_peer_ack(peer, seq).await;
    }
    *status.write().unwrap() = None;
    tracing::info!(PEER_ID = %peer, "state replication stopped");
    Ok(())
}

async fn newest_conflict<C: NodeCore>(core: &C) -> i64 {
    core.conflicts(1).await.ok().and_then(|c| c.first().map(|c| c.at)).unwrap_or(0)
}

/// Logs the name conflicts the last apply resolved, with the peer's id
/// (the store records them; health reports them).
async fn report_conflicts<C: NodeCore>(core: &C, peer: Uuid, seen: &mut i64) {
    let Ok(recent) = core.conflicts(20).await else { return };
    for c in recent.iter().rev().filter(|c| c.at > *seen) {
        tracing::warn!(
            PEER_ID = %peer,
            KIND = %c.kind,
            NAME = %c.name,
            KEPT = %c.kept,
            LOSER = %c.loser,
            "name conflict with the peer resolved: {} {:?} {}",
            c.kind,
            c.name,
            c.outcome
        );
    }
    if let Some(c) = recent.first() {
        *seen = (*seen).max(c.at);
    }
}

/// Takes the link's new sender (a new connection, or `None`: down): whether
/// the old one went down and whether the link is up now.
pub(super) fn follow_sender(link: &mut Option<DataSender>, now: Option<DataSender>) -> (bool, bool) {
    let down = link.take().is_some();
    let up = now.is_some();
    *link = now;
    (down, up)
}

pub(super) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Carries out one output; the answer, if it has one, is the next input.
async fn carry_out<C: NodeCore>(core: &C, peer: Uuid, link: Option<&DataSender>, o: Output) -> Option<Input> {
    match o {
        Output::Send(msg) => {
            let link = link?;
            let sent = match msg {
                Message::Changes { .. } | Message::SnapshotChunk { .. } => link.send(&msg).await,
                _ => link.send_control(&msg),
            };
            // A link gone down shows as the next `data` value; nothing to do here.
            if let Err(e) = sent {
                tracing::debug!(PEER_ID = %peer, "replication frame not sent: {e}");
            }
            None
        }
        Output::ReadTail { read, after, limit } => Some(match core.changes_since(after, limit).await {
            Ok(tail) => Input::Tail { read, tail },
            Err(e) => Input::ReadFailed { read, error: e.to_string() },
        }),
        Output::ReadSnapshot { read } => Some(match core.snapshot().await {
            Ok(snapshot) => Input::Snapshot { read, snapshot },
            Err(e) => Input::ReadFailed { read, error: e.to_string() },
        }),
        Output::Apply { origin, entries } => {
            let (first, n) = (entries.first().map_or(0, |e| e.seq), entries.len() as u64);
            Some(match core.apply_remote_batch(origin, entries).await {
                Ok(applied) => {
                    let new = applied.iter().filter(|a| matches!(a, Applied::Applied(_))).count();
                    tracing::debug!(PEER_ID = %peer, first, applied = new, "applied the peer's changes");
                    Input::Applied { mark: first + n - 1 }
                }
                Err(e) => failed(core, origin, e).await,
            })
        }
        Output::ApplySnapshot { origin, snapshot } => {
            let (seq, n) = (snapshot.seq, snapshot.changes.len());
            Some(match core.apply_snapshot(origin, snapshot).await {
                Ok(_) => {
                    tracing::info!(PEER_ID = %peer, seq, records = n, "applied the peer's snapshot");
                    Input::Applied { mark: core.applied_mark(origin).await.unwrap_or(seq) }
                }
                Err(e) => failed(core, origin, e).await,
            })
        }
        Output::Resumed { after, local, snapshot } => {
            let from = if snapshot { "a snapshot, then the changes after it" } else { "its mark" };
            tracing::info!(PEER_ID = %peer, peer_mark = after, local_seq = local, "state replication resumes from {from}");
            None
        }
        Output::PersistAck { peer, seq } => {
            if let Err(e) = core.record_peer_ack(peer, seq).await {
                tracing::warn!(PEER_ID = %peer, "recording the peer's ack: {e}");
            }
            None
        }
    }
}

async fn failed<C: NodeCore>(core: &C, origin: Uuid, e: ClusterError) -> Input {
    let gap = matches!(&e, ClusterError::Gap(_));
    if !gap {
        tracing::warn!(PEER_ID = %origin, "applying the peer's changes failed: {e}");
        // Not at once again: a store that fails now likely fails next time.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mark = core.applied_mark(origin).await.unwrap_or(0);
    Input::ApplyFailed { mark, gap, error: e.to_string() }
}
