//! Black-box API tests against the real binary with libvirt's test driver.

mod common;

use common::{call, error_code, Daemon, Opts};
use hyper::{Method, StatusCode};
use novacron::cli::client::Client;
use serde_json::{json, Value};

fn vm_spec(name: &str) -> Value {
    json!({"name": name, "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]})
}

async fn snapshot(c: &Client) -> (Value, Value) {
    let (s1, vms) = call(c, Method::GET, "/v1/vms", None).await;
    let (s2, tokens) = call(c, Method::GET, "/v1/tokens", None).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    (vms, tokens)
}

async fn new_token(admin: &Client, name: &str, role: &str) -> String {
    let (s, v) = call(admin, Method::POST, "/v1/tokens", Some(json!({"name": name, "role": role}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["secret"].as_str().unwrap().len() >= 64 + 4, "secret too short");
    v["secret"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_over_https() {
    let d = Daemon::start("lifecycle", Opts::test_driver(11));
    let c = d.admin();

    let (s, health) = call(&d.https(None), Method::GET, "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert!(health["node"].is_string() && health["version"].is_string());

    let (s, host) = call(&c, Method::GET, "/v1/host", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(host["domain_type"], "qemu");
    assert_eq!(host["tls_fingerprint"], d.fingerprint.as_str());
    assert!(host["memory_total_mib"].as_u64().unwrap() > 0);

    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(vm_spec("web-1"))).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["state"], "stopped");
    let id = vm["id"].as_str().unwrap().to_string();
    let disk = vm["disks"][0]["path"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&disk).exists());

    // By id and by name.
    assert_eq!(call(&c, Method::GET, &format!("/v1/vms/{id}"), None).await.1["name"], "web-1");
    assert_eq!(call(&c, Method::GET, "/v1/vms/web-1", None).await.1["id"], id.as_str());

    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(vm_spec("web-1"))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "name_taken"));

    let step = |action: &'static str, expect: &'static str| {
        let c = c.clone();
        let id = id.clone();
        async move {
            let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/{action}"), None).await;
            assert_eq!(s, StatusCode::OK, "{action}: {v}");
            assert_eq!(v["state"], expect, "{action}");
        }
    };
    step("start", "running").await;
    let (s, v) = call(&c, Method::POST, "/v1/vms/web-1/start", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"));
    let (s, v) = call(&c, Method::PATCH, "/v1/vms/web-1", Some(json!({"vcpus": 2}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"));
    step("pause", "paused").await;
    step("resume", "running").await;
    step("reboot", "running").await;
    step("stop", "stopped").await;
    step("start", "running").await;
    // The test driver powers off at once on ACPI shutdown.
    let (s, v) = call(&c, Method::POST, "/v1/vms/web-1/shutdown?wait=10", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "stopped");

    let (s, v) = call(&c, Method::PATCH, "/v1/vms/web-1", Some(json!({"vcpus": 2, "memory_mib": 128}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["vcpus"].as_u64(), v["memory_mib"].as_u64()), (Some(2), Some(128)));

    // Admission: a guest bigger than the host's free memory is refused.
    let (s, v) = call(&c, Method::PATCH, "/v1/vms/web-1", Some(json!({"memory_mib": 4 * 1024 * 1024}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(&c, Method::POST, "/v1/vms/web-1/start", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "insufficient_memory"), "{v}");
    assert_eq!(call(&c, Method::GET, "/v1/vms/web-1", None).await.1["state"], "stopped");
    call(&c, Method::PATCH, "/v1/vms/web-1", Some(json!({"memory_mib": 128}))).await;

    step("start", "running").await;
    let (s, v) = call(&c, Method::DELETE, "/v1/vms/web-1", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "wrong_state"));
    let (s, _) = call(&c, Method::DELETE, "/v1/vms/web-1?force=true", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!std::path::Path::new(&disk).exists(), "disk left behind");
    let (s, v) = call(&c, Method::GET, "/v1/vms/web-1", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    // The test driver's own domain "test" is listed read-only and refused.
    let (_, list) = call(&c, Method::GET, "/v1/vms", None).await;
    let test = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "test")
        .expect("unmanaged domain listed");
    assert_eq!(test["managed"], false);
    let (s, v) = call(&c, Method::POST, "/v1/vms/test/stop", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "unmanaged"));
    let (s, v) = call(&c, Method::DELETE, "/v1/vms/test?force=true", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "unmanaged"));

    // Every mutation is in the audit log with the token's name.
    let (_, audit) = call(&c, Method::GET, "/v1/audit?limit=100", None).await;
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["action"] == "vm.delete" && e["result"] == "ok" && e["actor"] == "admin"));
    assert!(entries.iter().any(|e| e["action"] == "vm.create" && e["result"] == "name_taken"));

    let (s, metrics) = c.request(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8_lossy(&metrics);
    assert!(text.contains(
        "novacron_http_requests_total{route=\"/v1/vms/{id}/start\",method=\"POST\",status=\"200\"}"
    ));
    assert!(text.contains("novacron_operations_total{op=\"vm.start\",result=\"ok\"}"));
    assert!(text.contains("novacron_libvirt_connected 1"));
}

/// Every route × every kind of caller.
#[tokio::test(flavor = "multi_thread")]
async fn role_matrix() {
    let d = Daemon::start("roles", Opts::test_driver(12));
    let admin = d.admin();
    let viewer = d.https(Some(&new_token(&admin, "v", "viewer").await));
    let operator = d.https(Some(&new_token(&admin, "o", "operator").await));
    let revoked_secret = new_token(&admin, "gone", "admin").await;
    let (s, _) = call(&admin, Method::DELETE, "/v1/tokens/gone", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let revoked = d.https(Some(&revoked_secret));
    let anonymous = d.https(None);
    // The admin secret with its last digit changed (to a different one).
    let last = if d.admin.ends_with('0') { '1' } else { '0' };
    let forged = d.https(Some(&format!("{}{last}", &d.admin[..d.admin.len() - 1])));

    let (s, _) = call(&admin, Method::POST, "/v1/vms", Some(vm_spec("m"))).await;
    assert_eq!(s, StatusCode::CREATED);

    // (method, path, body, weakest role: 0 public, 1 viewer, 2 operator, 3 admin)
    let routes: Vec<(Method, &str, Option<Value>, u8)> = vec![
        (Method::GET, "/v1/health", None, 0),
        (Method::GET, "/v1/openapi.json", None, 0),
        (Method::GET, "/v1/ready", None, 1),
        (Method::GET, "/v1/host", None, 1),
        (Method::GET, "/v1/health/details", None, 1),
        (Method::GET, "/metrics", None, 1),
        (Method::GET, "/v1/vms", None, 1),
        (Method::GET, "/v1/vms/m", None, 1),
        (Method::POST, "/v1/vms", Some(vm_spec("x")), 2),
        (Method::PATCH, "/v1/vms/m", Some(json!({"autostart": true})), 2),
        (Method::POST, "/v1/vms/m/start", None, 2),
        (Method::POST, "/v1/vms/m/pause", None, 2),
        (Method::POST, "/v1/vms/m/resume", None, 2),
        (Method::POST, "/v1/vms/m/reboot", None, 2),
        (Method::POST, "/v1/vms/m/shutdown", None, 2),
        (Method::POST, "/v1/vms/m/stop", None, 2),
        (Method::DELETE, "/v1/vms/x?force=true", None, 2),
        (Method::GET, "/v1/tokens", None, 3),
        (Method::POST, "/v1/tokens", Some(json!({"name": "t", "role": "viewer"})), 3),
        (Method::DELETE, "/v1/tokens/t", None, 3),
        (Method::GET, "/v1/audit", None, 3),
        (Method::GET, "/v1/images", None, 1),
        (Method::GET, "/v1/images/none", None, 1),
        (Method::POST, "/v1/images", Some(json!({"name": "i", "path": "/nonexistent"})), 2),
        (Method::DELETE, "/v1/images/none", None, 2),
        (Method::GET, "/v1/networks", None, 1),
        (Method::POST, "/v1/networks", Some(json!({"name": "n", "kind": "bridge", "bridge": "nobr"})), 3),
        (Method::DELETE, "/v1/networks/none", None, 3),
        (Method::GET, "/v1/events?after=999999", None, 1),
        (Method::GET, "/v1/vms/m/snapshots", None, 1),
        (Method::POST, "/v1/vms/m/snapshots", Some(json!({"name": "s"})), 2),
        (Method::POST, "/v1/vms/m/snapshots/s/revert", None, 2),
        (Method::DELETE, "/v1/vms/m/snapshots/s", None, 2),
        (Method::GET, "/v1/vms/m/console/log", None, 2),
        (Method::GET, "/v1/vms/m/console", None, 2),
        (Method::POST, "/v1/vms/m/clone", Some(json!({"name": "m2"})), 2),
        (Method::POST, "/v1/vms/m/disks", Some(json!({"size_gib": 1})), 2),
        (Method::POST, "/v1/vms/m/disks/vdb/resize", Some(json!({"size_gib": 2})), 2),
        (Method::DELETE, "/v1/vms/m/disks/vdb", None, 2),
        (Method::GET, "/v1/host/update", None, 1),
        (Method::POST, "/v1/host/update", None, 3),
    ];
    let callers: [(&str, &Client, Option<u8>); 6] = [
        ("anonymous", &anonymous, None),
        ("revoked", &revoked, None),
        ("forged", &forged, None),
        ("viewer", &viewer, Some(1)),
        ("operator", &operator, Some(2)),
        ("admin", &admin, Some(3)),
    ];
    for (method, path, body, need) in &routes {
        for (who, client, level) in &callers {
            let before = snapshot(&admin).await;
            // The event stream never ends: an open stream counts as a 200.
            let (s, v) = match tokio::time::timeout(
                std::time::Duration::from_secs(if path.starts_with("/v1/events") { 1 } else { 10 }),
                call(client, method.clone(), path, body.clone()),
            )
            .await
            {
                Ok(r) => r,
                Err(_) if path.starts_with("/v1/events") => (StatusCode::OK, Value::Null),
                Err(_) => panic!("{who} {method} {path}: no answer"),
            };
            let allowed = *need == 0 || level.is_some_and(|l| l >= *need);
            if allowed {
                // Allowed: whatever the outcome, it is not an auth refusal
                // and not a server error (a plain GET of the console is a
                // 400: it is not a WebSocket upgrade).
                assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN && !s.is_server_error(),
                    "{who} {method} {path}: {s} {v}"
                );
            } else {
                let expect = if level.is_none() { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
                assert_eq!(s, expect, "{who} {method} {path}: {v}");
                assert_eq!(error_code(&v), if level.is_none() { "unauthorized" } else { "forbidden" });
                assert_eq!(snapshot(&admin).await, before, "{who} {method} {path} changed state");
            }
        }
    }
    // Root on the local socket is admin without a token.
    let (s, _) = call(&d.local(), Method::GET, "/v1/tokens", None).await;
    assert_eq!(s, StatusCode::OK);
}

/// (what, method, path, raw body, content type, expected status, expected code)
type Case<'a> = (&'a str, Method, String, Vec<u8>, Option<&'a str>, u16, &'a str);

/// Hostile and malformed requests: each gets a clear 4xx and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_change_nothing() {
    let d = Daemon::start("hostile", Opts::test_driver(13));
    let c = d.admin();
    let (s, _) = call(&c, Method::POST, "/v1/vms", Some(vm_spec("keep"))).await;
    assert_eq!(s, StatusCode::CREATED);
    let boot = d.data().join("boot");
    std::fs::write(boot.join("vmlinuz"), b"kernel").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", boot.join("shadow-link")).unwrap();

    let spec = |extra: Value| {
        let mut v = vm_spec("evil");
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let big = "x".repeat(2 * 1024 * 1024);
    // (what, method, path, raw body, content type, status, code)
    let cases: Vec<Case> = vec![
        (
            "bad json",
            Method::POST,
            "/v1/vms".into(),
            b"{\"name\":".to_vec(),
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            "not json",
            Method::POST,
            "/v1/vms".into(),
            b"hello".to_vec(),
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            "empty body",
            Method::POST,
            "/v1/vms".into(),
            vec![],
            Some("application/json"),
            400,
            "malformed_json",
        ),
        (
            "json array",
            Method::POST,
            "/v1/vms".into(),
            b"[]".to_vec(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"colour": "red"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "wrong type",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"vcpus": "two"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "negative memory",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"memory_mib": -1})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "huge memory",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"memory_mib": 1u64 << 40})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "zero vcpus",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"vcpus": 0})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "huge vcpus",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"vcpus": 100000})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "huge disk",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"disks": [{"size_gib": 1u64 << 50}]})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "zero disk",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"disks": [{"size_gib": 0}]})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "disk both",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"disks": [{"size_gib": 1, "image": "a"}]})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name with slash",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": "a/b"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name dotdot",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": ".."})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name quote",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": "a\"b"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name xml",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": "<x>&y"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name empty",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": ""})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "name too long",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"name": "a".repeat(64)})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "network xml",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"network": "n'><x"})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "kernel outside data dir",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"boot": {"kernel": "/etc/shadow"}})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "kernel traversal",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"boot": {"kernel": "boot/../../../../etc/passwd"}})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "kernel symlink escape",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"boot": {"kernel": boot.join("shadow-link")}})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "initrd missing",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"boot": {"kernel": boot.join("vmlinuz"), "initrd": "boot/none"}})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "cmdline newline",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"boot": {"kernel": boot.join("vmlinuz"), "cmdline": "a\nb"}})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "image outside images",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"disks": [{"image": "/etc/passwd"}]})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "image traversal",
            Method::POST,
            "/v1/vms".into(),
            spec(json!({"disks": [{"image": "../state.db"}]})).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "2 MiB body",
            Method::POST,
            "/v1/vms".into(),
            big.clone().into_bytes(),
            Some("application/json"),
            413,
            "payload_too_large",
        ),
        (
            "wrong content type",
            Method::POST,
            "/v1/vms".into(),
            vm_spec("evil").to_string().into(),
            Some("text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            Method::POST,
            "/v1/vms".into(),
            vm_spec("evil").to_string().into(),
            None,
            415,
            "unsupported_media_type",
        ),
        ("unknown vm", Method::POST, "/v1/vms/nope/start".into(), vec![], None, 404, "not_found"),
        ("unknown vm delete", Method::DELETE, "/v1/vms/nope".into(), vec![], None, 404, "not_found"),
        ("unknown action", Method::POST, "/v1/vms/keep/explode".into(), vec![], None, 404, "not_found"),
        ("unknown route", Method::GET, "/v1/../etc/passwd".into(), vec![], None, 404, "not_found"),
        ("wrong method", Method::PUT, "/v1/vms".into(), vec![], None, 405, "method_not_allowed"),
        ("bad query", Method::DELETE, "/v1/vms/keep?force=yes".into(), vec![], None, 400, "invalid_query"),
        ("unknown query", Method::GET, "/v1/vms?debug=1".into(), vec![], None, 400, "invalid_query"),
        (
            "patch unknown field",
            Method::PATCH,
            "/v1/vms/keep".into(),
            json!({"name": "renamed"}).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "patch zero memory",
            Method::PATCH,
            "/v1/vms/keep".into(),
            json!({"memory_mib": 0}).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "token bad role",
            Method::POST,
            "/v1/tokens".into(),
            json!({"name": "t", "role": "root"}).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "token bad name",
            Method::POST,
            "/v1/tokens".into(),
            json!({"name": "../t", "role": "admin"}).to_string().into(),
            Some("application/json"),
            400,
            "invalid_value",
        ),
        (
            "token name taken",
            Method::POST,
            "/v1/tokens".into(),
            json!({"name": "admin", "role": "admin"}).to_string().into(),
            Some("application/json"),
            409,
            "name_taken",
        ),
        ("revoke unknown token", Method::DELETE, "/v1/tokens/nope".into(), vec![], None, 404, "not_found"),
        // The request is checked before the host (item 13): no checksum is
        // a 400 on any host; `not_appliance` is checked below.
        (
            "host update without a checksum",
            Method::POST,
            "/v1/host/update".into(),
            b"bundle".to_vec(),
            Some("application/octet-stream"),
            400,
            "invalid_value",
        ),
        (
            "host update, tries out of range",
            Method::POST,
            "/v1/host/update?tries=10".into(),
            b"bundle".to_vec(),
            Some("application/octet-stream"),
            400,
            "invalid_query",
        ),
        (
            "host update, not a stream",
            Method::POST,
            "/v1/host/update".into(),
            b"{}".to_vec(),
            Some("application/json"),
            415,
            "unsupported_media_type",
        ),
    ];
    assert!(cases.len() >= 25);
    let before = snapshot(&c).await;
    for (what, method, path, body, ct, status, code) in cases {
        let body = if body.is_empty() && ct.is_none() { None } else { Some(body) };
        let (s, bytes) = c.request_with(method, &path, body, ct).await.unwrap();
        let v: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{what}: not JSON: {bytes:?}"));
        assert_eq!(s.as_u16(), status, "{what}: {v}");
        assert_eq!(error_code(&v), code, "{what}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{what}: no message");
        assert_eq!(snapshot(&c).await, before, "{what} changed state");
    }
    // A well-formed update on a host not booted from the appliance image
    // (no A/B slots).
    let req = c
        .builder(novacron::core::Action::HostUpdate, &[], "")
        .header("content-type", "application/octet-stream")
        .header("x-checksum-sha256", "0".repeat(64))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"bundle")))
        .unwrap();
    let (s, bytes) = novacron::cli::client::collect(c.send(req, false).await.unwrap()).await.unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((s.as_u16(), error_code(&v)), (409, "not_appliance"), "{v}");
    assert_eq!(snapshot(&c).await, before, "host update off the appliance changed state");
    // Error messages name the offending field.
    let (_, v) = call(&c, Method::POST, "/v1/vms", Some(spec(json!({"vcpus": 0})))).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("vcpus"), "{v}");
    let (_, v) = call(&c, Method::POST, "/v1/vms", Some(spec(json!({"colour": 1})))).await;
    assert!(v["error"]["message"].as_str().unwrap().contains("colour"), "{v}");
    // No disk file was left behind by any refused create.
    let disks: Vec<_> = std::fs::read_dir(d.data().join("disks")).unwrap().collect();
    assert_eq!(disks.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_and_rate_limit() {
    let mut opts = Opts::test_driver(14);
    opts.rate_limit = 20;
    let d = Daemon::start("ratelimit", opts);
    let admin = d.admin();
    let secret = new_token(&admin, "burst", "viewer").await;
    let v = d.https(Some(&secret));
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(call(&v, Method::GET, "/v1/vms", None).await.0);
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::OK));
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!(limited >= 10, "only {limited} of 40 were limited");
    let (s, body) = call(&v, Method::GET, "/v1/host", None).await;
    if s == StatusCode::TOO_MANY_REQUESTS {
        assert_eq!(error_code(&body), "rate_limited");
    }
    // Revocation takes effect on the very next request.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(call(&v, Method::GET, "/v1/vms", None).await.0, StatusCode::OK);
    let (s, _) = call(&admin, Method::DELETE, "/v1/tokens/burst", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(call(&v, Method::GET, "/v1/vms", None).await.0, StatusCode::UNAUTHORIZED);
    // Secrets are stored only as hashes.
    let db = std::fs::read(d.data().join("state.db")).unwrap();
    let wal = std::fs::read(d.data().join("state.db-wal")).unwrap_or_default();
    let raw = secret.rsplit('_').next().unwrap().as_bytes();
    assert!(!db.windows(raw.len()).any(|w| w == raw) && !wal.windows(raw.len()).any(|w| w == raw));
    assert!(!d.log().contains(&secret[10..]), "a secret reached the log");
}

/// Conflicting operations on one VM never interleave; different VMs run
/// concurrently.
#[tokio::test(flavor = "multi_thread")]
async fn per_vm_operations_are_serialized() {
    let d = Daemon::start("serial", Opts::test_driver(15));
    let c = d.admin();
    for n in ["a", "b"] {
        assert_eq!(call(&c, Method::POST, "/v1/vms", Some(vm_spec(n))).await.0, StatusCode::CREATED);
    }
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = c.clone();
        let (vm, action) = match i % 4 {
            0 => ("a", "start"),
            1 => ("a", "stop"),
            2 => ("b", "start"),
            _ => ("b", "stop"),
        };
        tasks.push(tokio::spawn(async move {
            call(&c, Method::POST, &format!("/v1/vms/{vm}/{action}"), None).await
        }));
    }
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert!(
            s == StatusCode::OK || (s == StatusCode::CONFLICT && error_code(&v) == "wrong_state"),
            "{s} {v}"
        );
    }
    // The store agrees with libvirt after the storm.
    for n in ["a", "b"] {
        let (_, v) = call(&c, Method::GET, &format!("/v1/vms/{n}"), None).await;
        let state = v["state"].as_str().unwrap().to_string();
        let (s, _) = call(&c, Method::POST, &format!("/v1/vms/{n}/start"), None).await;
        assert_eq!(s == StatusCode::OK, state == "stopped", "{n} was reported {state}");
    }
}

/// TLS 1.3 only, HTTP/1.1 and h2, and no plaintext listener.
#[tokio::test(flavor = "multi_thread")]
async fn tls_policy() {
    let d = Daemon::start("tls", Opts::test_driver(16));
    let url = format!("{}/v1/health", d.url);
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
            .args(args)
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&["--http2"]), "2 200");
    assert_eq!(curl(&["--http1.1"]), "1.1 200");
    assert_eq!(curl(&["--tls-max", "1.2"]), "0 000", "TLS 1.2 must be refused");
    let plain = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(url.replace("https://", "http://"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "000", "plaintext HTTP must not be served");
    // The fingerprint the daemon printed is the certificate it serves.
    let (s, _) = call(&d.https(None), Method::GET, "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK);
    let wrong = novacron::cli::client::Client::https(&d.url, None, Some(&"AB:".repeat(32)), None).unwrap();
    assert!(wrong.request(Method::GET, "/v1/health", None).await.is_err(), "a wrong pin must fail");
}

/// Idle connections are closed after the header timeout, and connections
/// beyond the limit are refused rather than queued.
#[tokio::test(flavor = "multi_thread")]
async fn connection_limit_and_header_timeout() {
    use tokio::io::AsyncReadExt;
    let mut opts = Opts::test_driver(17);
    opts.max_connections = 3;
    opts.header_timeout_secs = 3;
    let d = Daemon::start("connlimit", opts);
    let tls = novacron::cli::client::pinned_tls_config(&d.fingerprint, &[b"http/1.1"]).unwrap();
    let addr = d.url.trim_start_matches("https://").to_string();
    let connect = || {
        let tls = tls.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut conn = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            // TLS 1.3 finishes the client side before the server has read
            // its Finished message; a read shows whether the server kept us.
            let mut buf = [0u8; 1];
            match tokio::time::timeout(std::time::Duration::from_millis(300), conn.read(&mut buf)).await {
                Err(_) => Ok(conn),
                Ok(_) => Err(std::io::Error::other("closed by the server")),
            }
        }
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect().await.expect("connection within the limit"));
    }
    assert!(connect().await.is_err(), "a fourth connection was accepted over the limit of 3");
    // Silent clients are cut off by the header timeout, freeing the slots.
    for mut conn in held {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("an idle connection outlived the header timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "unexpected data on an idle connection");
    }
    let (s, _) = call(&d.https(None), Method::GET, "/v1/health", None).await;
    assert_eq!(s, StatusCode::OK);
}

/// Autostart VMs start once per host boot (the kernel's boot id), not on
/// every daemon restart.
#[tokio::test(flavor = "multi_thread")]
async fn autostart_once_per_boot() {
    let mut d = Daemon::start("autostart", Opts::test_driver(18));
    let c = d.admin();
    let spec = json!({"name": "auto", "vcpus": 1, "memory_mib": 64, "autostart": true});
    assert_eq!(call(&c, Method::POST, "/v1/vms", Some(spec)).await.0, StatusCode::CREATED);
    assert_eq!(call(&c, Method::POST, "/v1/vms", Some(vm_spec("manual"))).await.0, StatusCode::CREATED);
    // The daemon already recorded this boot at its first start, so a
    // restart (test:///default forgets its domains with the process) leaves
    // the VM stopped...
    d.restart();
    let c = d.admin();
    assert_eq!(call(&c, Method::GET, "/v1/vms/auto", None).await.1["state"], "stopped");
    // ...until the host has booted since: then it is started, once.
    std::fs::write(d.data().join("autostart-boot-id"), "a-previous-boot").unwrap();
    d.restart();
    let c = d.admin();
    assert_eq!(call(&c, Method::GET, "/v1/vms/auto", None).await.1["state"], "running");
    assert_eq!(call(&c, Method::GET, "/v1/vms/manual", None).await.1["state"], "stopped");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(std::fs::read_to_string(d.data().join("autostart-boot-id")).unwrap().trim(), boot_id.trim());
}

/// The VMs named in the `autostarted` lines of `log`, in log order.
fn autostarted(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" autostarted"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("VM_NAME=")))
        .map(String::from)
        .collect()
}

/// `autostart_priority`: checked at create and PATCH (a bad value is a 400
/// that changes nothing), shown, kept across restarts, and the order in
/// which autostart VMs start at boot: higher first, ties by name, one after
/// the other.
#[tokio::test(flavor = "multi_thread")]
async fn autostart_priority_is_checked_kept_and_orders_the_boot() {
    let mut d = Daemon::start("autoprio", Opts::test_driver(19));
    let c = d.admin();
    let spec = |name: &str, prio: Value| {
        let mut v = json!({"name": name, "vcpus": 1, "memory_mib": 64, "autostart": true});
        if !prio.is_null() {
            v["autostart_priority"] = prio;
        }
        v
    };
    for bad in [json!(1001), json!(-1001), json!(i64::from(i32::MAX) + 1), json!("high"), json!(1.5)] {
        let (s, v) = call(&c, Method::POST, "/v1/vms", Some(spec("bad", bad.clone()))).await;
        assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{bad}: {v}");
        // The range is the core's check, which names the field and the range.
        if bad.as_i64().is_some_and(|b| b.abs() == 1001) {
            let m = v["error"]["message"].as_str().unwrap();
            assert!(m.contains("autostart_priority") && m.contains("-1000 and 1000"), "{bad}: {v}");
        }
    }
    assert_eq!(call(&c, Method::GET, "/v1/vms/bad", None).await.0, StatusCode::NOT_FOUND);
    // The edges are allowed; unset is 0.
    let made = [
        ("low", json!(-1000)),
        ("web", Value::Null),
        ("db", json!(10)),
        ("cache", json!(10)),
        ("dns", json!(1000)),
    ];
    for (name, prio) in &made {
        let (s, v) = call(&c, Method::POST, "/v1/vms", Some(spec(name, prio.clone()))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["autostart_priority"], if prio.is_null() { json!(0) } else { prio.clone() }, "{v}");
    }
    let manual = json!({"name": "manual", "vcpus": 1, "memory_mib": 64, "autostart_priority": 999});
    assert_eq!(call(&c, Method::POST, "/v1/vms", Some(manual)).await.0, StatusCode::CREATED);

    // PATCH: set, refused out of range / null / with another bad field,
    // each refusal changing nothing.
    let (s, v) = call(&c, Method::PATCH, "/v1/vms/web", Some(json!({"autostart_priority": 50}))).await;
    assert_eq!((s, v["autostart_priority"].clone()), (StatusCode::OK, json!(50)), "{v}");
    for bad in [
        json!({"autostart_priority": 1001}),
        json!({"autostart_priority": null}),
        json!({"autostart_priority": "1"}),
        json!({"autostart_priority": 7, "vcpus": 0}),
        json!({"autostart_priority": 7, "priority": 7}),
    ] {
        let (s, v) = call(&c, Method::PATCH, "/v1/vms/web", Some(bad.clone())).await;
        assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{bad}: {v}");
        let now = call(&c, Method::GET, "/v1/vms/web", None).await.1;
        assert_eq!(
            (now["autostart_priority"].clone(), now["vcpus"].clone()),
            (json!(50), json!(1)),
            "{bad}: {now}"
        );
    }
    // `vm show` and `vm edit` (a negative value is a value, not a flag).
    let r = common::cli(&d, &["vm", "edit", "low", "--autostart-priority", "-7"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let r = common::cli(&d, &["vm", "show", "low"]);
    assert!(r.stdout.contains("autostart:   true (priority -7)"), "{}", r.stdout);
    let r = common::cli(&d, &["vm", "edit", "low", "--autostart-priority", "5000"]);
    assert_ne!(r.code, 0, "out of range accepted: {}", r.stdout);
    assert!(r.stderr.contains("autostart_priority"), "{}", r.stderr);

    // Kept across a restart; after a host boot the autostart VMs start in
    // start order (manual is not autostart: its priority does not start it).
    let before = d.log().len();
    std::fs::write(d.data().join("autostart-boot-id"), "a-previous-boot").unwrap();
    d.restart();
    let c = d.admin();
    let (_, list) = call(&c, Method::GET, "/v1/vms", None).await;
    let prio: std::collections::BTreeMap<String, (Value, Value)> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (v["name"].as_str().unwrap().to_string(), (v["autostart_priority"].clone(), v["state"].clone()))
        })
        .collect();
    let want = [
        ("cache", 10, "running"),
        ("db", 10, "running"),
        ("dns", 1000, "running"),
        ("low", -7, "running"),
        ("manual", 999, "stopped"),
        ("web", 50, "running"),
    ];
    for (name, p, state) in want {
        assert_eq!(prio[name], (json!(p), json!(state)), "{name}: {list}");
    }
    assert_eq!(autostarted(&d.log()[before..]), ["dns", "web", "cache", "db", "low"], "{}", d.log());
}
