//! The API edge, black-box: the route table's 405 `Allow` header, bearer
//! authentication (scheme case, failure metric, per-address limit), what
//! viewers see on the event feed, and revocation ending open streams.

mod common;

use common::{call, error_code, virsh, Daemon, Opts};
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// curl against `d` with its certificate pinned as the CA, from the source
/// address `from` (a loopback address), printing `%{http_code}` last.
fn curl(d: &Daemon, from: &str, args: &[&str], path: &str) -> std::process::Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--interface", from, "--cacert"])
        .arg(d.data().join("tls/cert.pem"))
        .args(args)
        .arg(format!("{}{path}", d.url));
    cmd
}

/// Status, headers (lower-case names) and body of one curl request.
fn fetch(d: &Daemon, from: &str, args: &[&str], path: &str) -> (u16, String, Value) {
    let out = curl(d, from, &["-i", "-w", "\n%{http_code}"], path).args(args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.into()));
    (code.trim().parse().unwrap_or(0), head.to_ascii_lowercase(), body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
}

async fn token(d: &Daemon, name: &str, role: &str) -> (String, String) {
    let (s, v) =
        call(&d.admin(), Method::POST, "/v1/tokens", Some(json!({"name": name, "role": role}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (v["id"].as_str().unwrap().to_string(), v["secret"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn method_not_allowed_lists_the_paths_methods() {
    let d = Daemon::start("edge-allow", Opts::test_driver(61));
    for (path, allow) in [
        ("/v1/vms/x", "get, head, patch, delete"),
        ("/v1/images", "get, head, post"),
        ("/v1/audit", "get, head"),
    ] {
        let (code, head, body) = fetch(&d, "127.0.0.1", &["-X", "PUT"], path);
        assert_eq!((code, error_code(&body)), (405, "method_not_allowed"), "{path}: {body}");
        assert_eq!(header(&head, "allow"), Some(allow), "{path}:\n{head}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_is_case_insensitive_and_failures_are_counted_and_limited() {
    let mut opts = Opts::test_driver(62);
    opts.auth_failure_burst = 10;
    let d = Daemon::start("edge-auth", opts);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("Authorization: {scheme} {}", d.admin);
        let (code, _, body) = fetch(&d, "127.0.0.1", &["-H", &auth], "/v1/vms");
        assert_eq!(code, 200, "{scheme}: {body}");
    }
    // A client failing to authenticate is told to back off after a burst
    // of failures...
    let bad = "Authorization: Bearer nct_0123456789abcdef_00";
    let mut codes = Vec::new();
    for _ in 0..40 {
        let (code, head, body) = fetch(&d, "127.0.0.1", &["-H", bad], "/v1/vms");
        codes.push(code);
        if code == 429 {
            assert_eq!(error_code(&body), "rate_limited", "{body}");
            let wait: u64 = header(&head, "retry-after").expect("Retry-After").parse().unwrap();
            assert!((1..=10).contains(&wait), "Retry-After {wait}");
            break;
        }
        assert_eq!((code, error_code(&body)), (401, "unauthorized"), "{body}");
    }
    assert_eq!(codes.last(), Some(&429), "no 429 after {} failed authentications", codes.len());
    assert!(codes.len() > 5, "the burst allows a few mistakes: {codes:?}");
    // ...without locking out a valid token from the same address (clients
    // behind one NAT address), and without holding back other addresses.
    let good = format!("Authorization: Bearer {}", d.admin);
    assert_eq!(fetch(&d, "127.0.0.1", &["-H", &good], "/v1/vms").0, 200);
    assert_eq!(fetch(&d, "127.0.0.1", &["-H", bad], "/v1/vms").0, 429, "still held back");
    assert_eq!(fetch(&d, "127.0.0.2", &["-H", bad], "/v1/vms").0, 401, "another address");
    let (code, _, metrics) = fetch(&d, "127.0.0.2", &["-H", &good], "/metrics");
    assert_eq!(code, 200);
    let text = metrics.as_str().unwrap_or_default();
    let counted: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("novacron_auth_failures_total "))
        .unwrap_or_else(|| panic!("no novacron_auth_failures_total:\n{text}"))
        .parse()
        .unwrap();
    assert_eq!(counted, codes.len() + 2, "every failed authentication is counted");
}

/// An SSE stream of `/v1/events` with `secret`, as curl prints it.
fn events(d: &Daemon, secret: &str, http: &str) -> Child {
    curl(d, "127.0.0.1", &["-N", http, "-H", &format!("Authorization: Bearer {secret}")], "/v1/events")
        .arg("--max-time")
        .arg("60")
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl")
}

/// Reads from `child`'s stdout until `want` shows (the stream is open).
fn read_until(child: &mut Child, want: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before {want:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// How long `child` takes to exit, at most `limit`.
fn exits_within(child: &mut Child, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_token_ends_its_event_streams() {
    let d = Daemon::start("edge-sse", Opts::test_driver(63));
    let c = d.admin();
    let (_, other) = token(&d, "other", "viewer").await;
    for http in ["--http2", "--http1.1"] {
        let name = format!("watch{}", &http[6..].replace('.', ""));
        let (id, secret) = token(&d, &name, "viewer").await;
        let mut mine = events(&d, &secret, http);
        let mut theirs = events(&d, &other, http);
        read_until(&mut mine, "event: ");
        read_until(&mut theirs, "event: ");
        let revoked = Instant::now();
        let (s, v) = call(&c, Method::DELETE, &format!("/v1/tokens/{id}"), None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        let took = exits_within(&mut mine, Duration::from_secs(5));
        let took = took.unwrap_or_else(|| panic!("{http}: the stream outlived its token by 5 s"));
        assert!(took < Duration::from_secs(1), "{http}: the stream ended {took:?} after the revocation");
        assert!(revoked.elapsed() < Duration::from_secs(3));
        assert!(theirs.try_wait().unwrap().is_none(), "{http}: another token's stream ended too");
        let _ = theirs.kill();
        let _ = theirs.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn viewers_get_events_without_audit_detail() {
    let d = Daemon::start("edge-redact", Opts::test_driver(64));
    let c = d.admin();
    let (_, viewer) = token(&d, "eve", "viewer").await;
    let (s, _) =
        call(&c, Method::POST, "/v1/vms", Some(json!({"name": "r", "vcpus": 1, "memory_mib": 64}))).await;
    assert_eq!(s, StatusCode::CREATED);
    // A failing operation: its error text names what was asked for.
    let (s, _) = call(&c, Method::DELETE, "/v1/images/secret-plan", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let read = |secret: &str| {
        let out =
            curl(&d, "127.0.0.1", &["-N", "-H", &format!("Authorization: Bearer {secret}")], "/v1/events")
                .args(["--max-time", "2"])
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let events: Vec<Value> =
            text.lines().filter_map(|l| serde_json::from_str(l.strip_prefix("data: ")?).ok()).collect();
        assert!(events.iter().any(|e| e["kind"] == "operation.failed"), "{text}");
        events
    };
    let ops = |evs: &[Value]| -> Vec<Value> {
        evs.iter().filter(|e| e["kind"].as_str().unwrap().starts_with("operation.")).cloned().collect()
    };
    // The admin sees who did what, as in /v1/audit.
    let full = ops(&read(&d.admin));
    assert!(full.iter().all(|e| e["data"]["actor"] == "admin"), "{full:?}");
    assert!(full.iter().any(|e| e["data"]["target"] == "eve"), "token.create names its token: {full:?}");
    assert!(full.iter().any(|e| e["data"]["error"]["message"].is_string()), "{full:?}");
    // A viewer sees what happened, not who did it, which tokens or why.
    let seen = ops(&read(&viewer));
    assert_eq!(seen.len(), full.len());
    for e in &seen {
        let data = e["data"].as_object().unwrap();
        assert!(data.contains_key("op"), "{e}");
        assert!(!data.contains_key("actor"), "{e}");
        if e["data"]["op"].as_str().unwrap().starts_with("token.") {
            assert!(!data.contains_key("target"), "token names and ids are admin-only: {e}");
        }
        if let Some(err) = data.get("error") {
            assert!(err["code"].is_string() && err.get("message").is_none(), "{e}");
        }
    }
    assert!(seen.iter().any(|e| e["data"]["target"] == "r"), "VM targets stay: {seen:?}");
}

/// Removes the test's domain even when an assertion fails.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        virsh(&["destroy", &self.0]);
        virsh(&["undefine", &self.0]);
    }
}

/// The test driver has no consoles: this boots the tiny TCG guest.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn revoking_a_token_ends_its_console() {
    let mut opts = Opts::test_driver(65);
    opts.uri = "qemu:///system".into();
    let d = Daemon::start("edge-console", opts);
    let c = d.admin();
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let vm = format!("edge-{}", std::process::id());
    let _undefine = Undefine(vm.clone());
    let spec = json!({
        "name": vm, "vcpus": 1, "memory_mib": 128,
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=-1 quiet"},
    });
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(call(&c, Method::POST, &format!("/v1/vms/{vm}/start"), None).await.0, StatusCode::OK);
    let (id, secret) = token(&d, "ops", "operator").await;
    let mut ws = common::websocket(&d, &format!("/v1/vms/{vm}/console"), &secret).await.expect("console");
    // The guest's shell answers: the session is live (retried while it boots).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = String::new();
    while !out.contains("40002") {
        assert!(Instant::now() < deadline, "no answer on the console: {out:?}");
        ws.send(Message::Binary(b"echo $((40000+2))\n".to_vec().into())).await.unwrap();
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            out.push_str(&String::from_utf8_lossy(&m.into_data()));
        }
    }
    let (s, v) = call(&c, Method::DELETE, &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let revoked = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return revoked.elapsed(),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the console outlived its token by 5 s");
    assert!(ended < Duration::from_secs(1), "the console ended {ended:?} after the revocation");
    let (s, _) = call(&c, Method::POST, &format!("/v1/vms/{vm}/stop"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(call(&c, Method::DELETE, &format!("/v1/vms/{vm}"), None).await.0, StatusCode::NO_CONTENT);
}
