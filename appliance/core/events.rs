//! The event feed behind `GET /v1/events`: VM state changes, operations,
//! image, network and snapshot changes, each with a sequence number.
//!
//! A bounded ring keeps the newest events so a client that reconnects with
//! `Last-Event-ID` gets what it missed (if it is still in the ring), then
//! follows the live broadcast. Sequence numbers keep growing across daemon
//! restarts: they are handed out from a block reserved in the store, so a
//! restart skips ahead instead of starting again at 1, and a clean stop
//! records the exact last number so the next run continues right after it.
//! A client whose `Last-Event-ID` lies before what the ring holds (or after
//! anything this feed handed out) gets an `events.lost` event first: it
//! must re-read the state it follows.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::broadcast;

const RING: usize = 4096;
/// Sequence numbers reserved in the store at a time: one store write per
/// this many events, and the most a `kill -9` can skip.
pub const SEQ_BLOCK: u64 = 1 << 16;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// `vm.state`, `operation.started|finished|failed`, `image.created|deleted`,
    /// `network.created|deleted`, `snapshot.created|deleted|reverted`, and
    /// `events.lost` (only ever first on a stream, never in the ring).
    pub kind: &'static str,
    pub at: String,
    pub data: serde_json::Value,
}

impl Event {
    /// The event as callers below admin see it: `operation.*` events keep
    /// what was done (`op`, the target, the error code) but not who did it
    /// (`actor`), which tokens (the target of `token.*`) or the error text;
    /// those are audit data, admin-only like `/v1/audit`.
    pub fn without_audit_detail(&self) -> std::borrow::Cow<'_, Event> {
        if !self.kind.starts_with("operation.") {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut ev = self.clone();
        if let Some(data) = ev.data.as_object_mut() {
            data.remove("actor");
            if data.get("op").and_then(|o| o.as_str()).is_some_and(|o| o.starts_with("token.")) {
                data.remove("target");
            }
            if let Some(err) = data.get_mut("error").and_then(|e| e.as_object_mut()) {
                err.retain(|k, _| k == "code");
            }
        }
        std::borrow::Cow::Owned(ev)
    }
}

/// Records a new high-water mark of sequence numbers (durably).
pub type PersistSeq = Box<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

struct Inner {
    /// The last sequence number handed out.
    seq: u64,
    /// Numbers up to here are reserved in the store.
    reserved: u64,
    ring: VecDeque<Event>,
}

pub struct EventBus {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    persist: PersistSeq,
}

impl Default for EventBus {
    /// A feed that starts at 1 and remembers nothing (unit tests).
    fn default() -> Self {
        EventBus::resume(0, u64::MAX, Box::new(|_| Ok(())))
    }
}

impl EventBus {
    /// A feed whose next event is `last + 1`, with numbers up to `reserved`
    /// already recorded; `persist` records further reservations.
    pub fn resume(last: u64, reserved: u64, persist: PersistSeq) -> EventBus {
        let (tx, _) = broadcast::channel(1024);
        let inner = Inner { seq: last, reserved, ring: VecDeque::with_capacity(RING) };
        EventBus { inner: Mutex::new(inner), tx, persist }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn publish(&self, kind: &'static str, data: serde_json::Value) {
        let mut inner = self.lock();
        inner.seq += 1;
        if inner.seq > inner.reserved {
            // Once per SEQ_BLOCK events: a short synchronous store write.
            let upto = inner.seq.saturating_add(SEQ_BLOCK);
            if let Err(e) = (self.persist)(upto) {
                // Numbers may repeat after the next restart; clients then
                // get `events.lost` (their Last-Event-ID is ahead of the feed).
                tracing::error!(error = %e, "cannot reserve event sequence numbers");
            }
            inner.reserved = upto;
        }
        let ev = Event { seq: inner.seq, kind, at: crate::util::rfc3339(crate::store::now_ms()), data };
        if inner.ring.len() == RING {
            inner.ring.pop_front();
        }
        inner.ring.push_back(ev.clone());
        // Sent under the lock so subscribers see events in sequence order.
        let _ = self.tx.send(ev);
    }

    /// Events after `after` still in the ring, and a receiver for what comes
    /// next. Taken together under the lock, so nothing falls in between.
    /// When events after `after` are gone (or `after` is ahead of this
    /// feed), the backlog starts with an `events.lost` event whose `seq` is
    /// the number the feed resumes after. `after == 0` asks for whatever the
    /// ring holds and never gets one.
    pub fn subscribe(&self, after: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let inner = self.lock();
        let oldest = inner.ring.front().map_or(inner.seq + 1, |e| e.seq);
        let mut backlog = Vec::new();
        if after != 0 && (after.saturating_add(1) < oldest || after > inner.seq) {
            backlog.push(Event {
                seq: oldest - 1,
                kind: "events.lost",
                at: crate::util::rfc3339(crate::store::now_ms()),
                data: serde_json::json!({"after": after, "next": oldest}),
            });
        }
        let from = if after > inner.seq { 0 } else { after };
        backlog.extend(inner.ring.iter().filter(|e| e.seq > from).cloned());
        (backlog, self.tx.subscribe())
    }

    pub fn last_seq(&self) -> u64 {
        self.lock().seq
    }

    /// Records the exact last sequence number (on a clean stop), so the next
    /// run continues right after it and resuming clients lose nothing.
    pub fn checkpoint(&self) {
        let mut inner = self.lock();
        match (self.persist)(inner.seq) {
            Ok(()) => inner.reserved = inner.seq,
            Err(e) => tracing::warn!(error = %e, "cannot record the last event sequence number"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn resume_after_last_event_id() {
        let bus = EventBus::default();
        for i in 0..5 {
            bus.publish("vm.state", serde_json::json!({ "i": i }));
        }
        let (backlog, mut rx) = bus.subscribe(3);
        assert_eq!(backlog.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        bus.publish("image.created", serde_json::json!({}));
        assert_eq!(rx.try_recv().unwrap().seq, 6);
    }

    #[test]
    fn numbers_are_reserved_in_blocks_and_gaps_are_announced() {
        let marks = Arc::new(Mutex::new(Vec::new()));
        let m = marks.clone();
        let bus = EventBus::resume(
            100,
            100,
            Box::new(move |n| {
                m.lock().unwrap().push(n);
                Ok(())
            }),
        );
        bus.publish("vm.state", serde_json::json!({}));
        bus.publish("vm.state", serde_json::json!({}));
        assert_eq!(*marks.lock().unwrap(), vec![101 + SEQ_BLOCK], "one reservation for the block");
        // Right after the previous run's last event: nothing lost.
        let (b, _) = bus.subscribe(100);
        assert_eq!(
            b.iter().map(|e| (e.seq, e.kind)).collect::<Vec<_>>(),
            [(101, "vm.state"), (102, "vm.state")]
        );
        // Before it, or ahead of the feed: told first, then the ring.
        for after in [42, 5000] {
            let (b, _) = bus.subscribe(after);
            assert_eq!(b[0].kind, "events.lost", "after {after}");
            assert_eq!((b[0].seq, &b[0].data["next"]), (100, &serde_json::json!(101)));
            assert_eq!(b[1..].iter().map(|e| e.seq).collect::<Vec<_>>(), [101, 102]);
        }
        assert!(bus.subscribe(0).0.iter().all(|e| e.kind != "events.lost"));
        bus.checkpoint();
        assert_eq!(marks.lock().unwrap().last(), Some(&102));
    }

    #[test]
    fn ring_overflow_is_announced() {
        let bus = EventBus::default();
        for _ in 0..RING + 10 {
            bus.publish("vm.state", serde_json::json!({}));
        }
        let (b, _) = bus.subscribe(3);
        assert_eq!((b[0].kind, b[0].seq, b[1].seq), ("events.lost", 10, 11));
        assert_eq!(b.len(), RING + 1);
    }

    #[test]
    fn audit_detail_is_stripped() {
        let bus = EventBus::default();
        let op = |op: &str| {
            serde_json::json!({"op": op, "target": "t", "actor": "ann",
            "error": {"code": "not_found", "message": "token \"ops\" not found"}})
        };
        bus.publish("operation.failed", op("token.revoke"));
        bus.publish("operation.failed", op("vm.start"));
        bus.publish("vm.state", serde_json::json!({"name": "web", "state": "running"}));
        let (evs, _) = bus.subscribe(0);
        let shown: Vec<_> = evs.iter().map(|e| e.without_audit_detail().data.clone()).collect();
        assert_eq!(shown[0], serde_json::json!({"op": "token.revoke", "error": {"code": "not_found"}}));
        assert_eq!(
            shown[1],
            serde_json::json!({"op": "vm.start", "target": "t", "error": {"code": "not_found"}})
        );
        assert_eq!(shown[2], evs[2].data);
    }
}
