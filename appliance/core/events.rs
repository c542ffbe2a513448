//! The event feed behind `GET /v1/events`: VM state changes, operations,
//! image, network and snapshot changes, each with a sequence number.
//!
//! A bounded ring keeps the newest events so a client that reconnects with
//! `Last-Event-ID` gets what it missed (if it is still in the ring), then
//! follows the live broadcast.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::broadcast;

const RING: usize = 4096;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// `vm.state`, `operation.started|finished|failed`, `image.created|deleted`,
    /// `network.created|deleted`, `snapshot.created|deleted|reverted`.
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

pub struct EventBus {
    inner: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(1024);
        EventBus { inner: Mutex::new((0, VecDeque::with_capacity(RING))), tx }
    }
}

impl EventBus {
    pub fn publish(&self, kind: &'static str, data: serde_json::Value) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0 += 1;
        let ev = Event { seq: inner.0, kind, at: crate::util::rfc3339(crate::store::now_ms()), data };
        if inner.1.len() == RING {
            inner.1.pop_front();
        }
        inner.1.push_back(ev.clone());
        // Sent under the lock so subscribers see events in sequence order.
        let _ = self.tx.send(ev);
    }

    /// Events after `after` still in the ring, and a receiver for what comes
    /// next. Taken together under the lock, so nothing falls in between.
    pub fn subscribe(&self, after: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let backlog = inner.1.iter().filter(|e| e.seq > after).cloned().collect();
        (backlog, self.tx.subscribe())
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
