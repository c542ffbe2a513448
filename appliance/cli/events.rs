//! `novacron events`: follows `GET /v1/events` (Server-Sent Events) and
//! prints one line per event, reconnecting after the last seen sequence
//! number if the stream ends.

use super::client::{Client, ClientError};
use crate::core::Action;
use http_body_util::BodyExt;
use hyper::StatusCode;
use std::io::Write;
use std::time::Duration;

/// One dispatched SSE event (only the fields the daemon sends).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Incremental `text/event-stream` parser: feed it chunks as they arrive,
/// whatever their boundaries, and get back the complete events.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    cur: SseEvent,
    has_data: bool,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for &b in chunk {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if let Some(ev) = self.line_done(&String::from_utf8_lossy(&line)) {
                out.push(ev);
            }
        }
        out
    }

    fn line_done(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let ev = std::mem::take(&mut self.cur);
            // An event without data lines is not dispatched (per the spec).
            return std::mem::take(&mut self.has_data).then_some(ev);
        }
        if line.starts_with(':') {
            return None; // comment: keep-alive
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.cur.id = Some(value.to_string()),
            "event" => self.cur.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.cur.data.push('\n');
                }
                self.cur.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

/// The human line for an event's data (the daemon's event JSON):
/// `SEQ TIME KIND DATA`.
pub fn event_line(data: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(v) => {
            let s = |k: &str| match &v[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            format!("{} {} {} {}", s("seq"), s("at"), s("kind"), v["data"])
        }
        Err(_) => data.to_string(),
    }
}

/// What to tell the user about an `events.lost` event.
pub fn lost_note(data: &str) -> String {
    let after = serde_json::from_str::<serde_json::Value>(data).ok().map(|v| v["data"]["after"].clone());
    let after = after.filter(|a| !a.is_null()).map_or("the last one seen".into(), |a| a.to_string());
    format!(
        "events after {after} are lost (daemon restart or too slow a reader); re-read the state you follow"
    )
}

/// Follows the feed until Ctrl-C; returns the exit code.
pub async fn follow(c: &Client, after: Option<u64>, json: bool) -> i32 {
    tokio::select! {
        code = follow_inner(c, after, json) => code,
        _ = tokio::signal::ctrl_c() => 0,
    }
}

async fn follow_inner(c: &Client, after: Option<u64>, json: bool) -> i32 {
    let mut last = after;
    let mut connected_once = false;
    loop {
        let query = last.map(|n| format!("?after={n}")).unwrap_or_default();
        let req = c
            .builder(Action::EventList, &[], &query)
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("static request parts are valid");
        let resp = match c.send(req, false).await {
            Ok(r) => r,
            // The first connection failing is an error; later ones are a
            // daemon restart we wait out.
            Err(e) if !connected_once => {
                eprintln!("novacron: {e}");
                return if matches!(e, ClientError::Connect { .. }) { 6 } else { 1 };
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        if resp.status() != StatusCode::OK {
            return match super::client::collect(resp).await {
                Ok((status, body)) => super::output::print(status, &body, super::output::Kind::Raw, json),
                Err(e) => {
                    eprintln!("novacron: {e}");
                    1
                }
            };
        }
        connected_once = true;
        let mut body = resp.into_body();
        let mut parser = SseParser::default();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else { continue };
            for ev in parser.push(&data) {
                if let Some(seq) = ev.id.as_deref().and_then(|i| i.parse().ok()) {
                    last = Some(seq);
                }
                if ev.event.as_deref() == Some("events.lost") {
                    eprintln!("novacron: {}", lost_note(&ev.data));
                }
                let line = if json { ev.data } else { event_line(&ev.data) };
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return 0; // the reader went away (`| head`)
                }
            }
        }
        eprintln!("novacron: the event stream ended; reconnecting");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parses_across_chunks() {
        let mut p = SseParser::default();
        let mut evs = p.push(b": keep-alive\n\nid: 7\nevent: vm.st");
        assert!(evs.is_empty());
        evs = p.push(b"ate\ndata: {\"seq\":7}\n\nid: 8\r\ndata:a\r\ndata: b\r\n\r\n");
        assert_eq!(
            evs,
            vec![
                SseEvent { id: Some("7".into()), event: Some("vm.state".into()), data: "{\"seq\":7}".into() },
                SseEvent { id: Some("8".into()), event: None, data: "a\nb".into() },
            ]
        );
        // No data: nothing dispatched.
        assert!(p.push(b"id: 9\n\n").is_empty());
    }

    #[test]
    fn event_lines() {
        let d = r#"{"seq":3,"kind":"vm.state","at":"2025-01-01T00:00:00Z","data":{"vm":"web"}}"#;
        assert_eq!(event_line(d), r#"3 2025-01-01T00:00:00Z vm.state {"vm":"web"}"#);
        assert_eq!(event_line("not json"), "not json");
        let lost = r#"{"seq":9,"kind":"events.lost","at":"t","data":{"after":300,"next":10}}"#;
        assert!(lost_note(lost).starts_with("events after 300 are lost"), "{}", lost_note(lost));
    }
}
