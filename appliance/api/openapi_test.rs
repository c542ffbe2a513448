//! Keeps `docs/openapi.json` honest: every row of the route table
//! (`routes::ROUTES`) is in the document with the right action and role, every operation in the document
//! routes, and the request/response schemas have the fields the Rust types
//! serialize. The streaming routes (image upload, console WebSocket, event
//! stream) are checked for their non-JSON bodies and headers.

use super::routes::{route, Edge, Route, ROUTES};
use super::ApiError;
use crate::core::{Action, CoreError};
use crate::types::*;
use hyper::Method;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// Query parameters any route might take; each operation must document
/// exactly the ones its route accepts.
const QUERY_PARAMS: [(&str, &str); 7] = [
    ("force", "true"),
    ("wait", "1"),
    ("timeout", "1"),
    ("limit", "1"),
    ("bytes", "1"),
    ("after", "1"),
    ("tries", "1"),
];

/// What an action answers on success, from `Api::render` and the streaming
/// edges: (status, media type or "" for no body, schema name or "" for an
/// inline schema).
fn successes(action: &str) -> &'static [(&'static str, &'static str, &'static str)] {
    const JSON: &str = "application/json";
    match action {
        "metrics" => &[("200", "text/plain", "")],
        "health" => &[("200", JSON, "Health")],
        "health.details" => &[("200", JSON, "HealthReport")],
        "ready" => &[("200", JSON, "Ready")],
        "host.info" => &[("200", JSON, "HostInfo")],
        "openapi" => &[("200", JSON, "")],
        "vm.list" => &[("200", JSON, "VmList")],
        "vm.create" | "vm.clone" => &[("201", JSON, "Vm")],
        "vm.get" | "vm.update" | "vm.start" | "vm.stop" | "vm.reboot" | "vm.pause" | "vm.resume"
        | "vm.snapshot.revert" | "vm.disk.attach" | "vm.disk.detach" | "vm.disk.resize" => {
            &[("200", JSON, "Vm")]
        }
        "vm.shutdown" => &[("200", JSON, "Vm"), ("202", JSON, "Vm")],
        "vm.delete" | "vm.snapshot.delete" | "image.delete" | "network.delete" | "token.revoke" => {
            &[("204", "", "")]
        }
        "vm.console" => &[("101", "", "")],
        "vm.console.log" => &[("200", "text/plain", "")],
        "vm.snapshot.list" => &[("200", JSON, "SnapshotList")],
        "vm.snapshot.create" => &[("201", JSON, "Snapshot")],
        "image.list" => &[("200", JSON, "ImageList")],
        "image.get" => &[("200", JSON, "Image")],
        "image.upload" | "image.import" => &[("201", JSON, "Image")],
        "network.list" => &[("200", JSON, "NetworkList")],
        "network.create" => &[("201", JSON, "Network")],
        "event.list" => &[("200", "text/event-stream", "")],
        "token.list" => &[("200", JSON, "TokenList")],
        "token.create" => &[("201", JSON, "TokenCreated")],
        "audit.list" => &[("200", JSON, "AuditList")],
        "host.update.status" => &[("200", JSON, "UpdateView")],
        "host.update" => &[("202", JSON, "UpdateView")],
        "peer.get" | "peer.join" => &[("200", JSON, "PeerView")],
        "peer.invite" => &[("201", JSON, "PeerInvitation")],
        "peer.handshake" => &[("200", JSON, "PeerHandshakeReply")],
        "peer.unpair" => &[("200", JSON, "PeerUnpaired")],
        "peer.takeover" => &[("200", JSON, "TakeoverReport")],
        "vm.move" => &[("200", JSON, "VmMoved")],
        other => panic!("add {other} to successes()"),
    }
}

/// Request headers an action reads (`stream.rs`, `mod.rs`), lower case;
/// Authorization and Content-Type are covered by the security scheme and
/// the request body.
fn header_params(action: &str) -> &'static [&'static str] {
    match action {
        "image.upload" | "host.update" => &["content-length", "x-checksum-sha256"],
        "vm.console" => &["connection", "sec-websocket-key", "sec-websocket-version", "upgrade"],
        "event.list" => &["last-event-id"],
        _ => &[],
    }
}

fn doc() -> Value {
    serde_json::from_str(super::OPENAPI).expect("docs/openapi.json is valid JSON")
}

fn method(m: &str) -> Method {
    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap()
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let p = r.strip_prefix('#').expect("local $ref");
            resolve(doc, doc.pointer(p).unwrap_or_else(|| panic!("dangling $ref {r}")))
        }
        None => v,
    }
}

/// The schema name a `$ref` points at.
fn ref_name(v: &Value) -> Option<&str> {
    v.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/components/schemas/"))
}

fn operation<'a>(doc: &'a Value, template: &str, m: &str) -> &'a Value {
    let path =
        doc["paths"].get(template).unwrap_or_else(|| panic!("{template} is missing from the document"));
    path.get(m.to_ascii_lowercase()).unwrap_or_else(|| panic!("{m} {template} is missing from the document"))
}

/// A concrete path for a template: every `{param}` becomes `x`.
fn fill(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "x" } else { s }).collect::<Vec<_>>().join("/")
}

fn role_name(action: Action) -> &'static str {
    action.required_role().map(Role::as_str).unwrap_or("none")
}

fn params_in(doc: &Value, op: &Value, location: &str) -> Vec<Value> {
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    params.iter().map(|p| resolve(doc, p).clone()).filter(|p| p["in"] == location).collect()
}

fn query_params(doc: &Value, op: &Value) -> BTreeSet<String> {
    params_in(doc, op, "query").iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
}

/// Checks one operation of the document against what the router says.
fn check_operation(doc: &Value, m: &str, concrete: &str, template: &str, op: &Value) {
    let what = format!("{m} {template}");
    let matched = route(&method(m), concrete, None).unwrap_or_else(|e| panic!("{what}: router refuses: {e}"));
    assert_eq!(matched.template, template, "{what}: router template");
    let action = matched.action.name();
    assert_eq!(op["x-action"].as_str(), Some(action), "{what}: x-action");
    let role = role_name(matched.action);
    match op.get("x-required-role").and_then(Value::as_str) {
        None => assert_eq!(role, "none", "{what}: x-required-role missing but {action} needs {role}"),
        Some(r) => assert_eq!(r, role, "{what}: x-required-role"),
    }
    let desc = op["description"].as_str().unwrap_or("");
    assert!(
        desc.contains(&format!("`{role}`")) || role == "none",
        "{what}: description must name role {role}"
    );

    // Security: public operations opt out; the others inherit the bearer
    // requirement and can answer 401.
    let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{what}: no responses"));
    if role == "none" {
        assert_eq!(op.get("security"), Some(&json!([])), "{what}: public operations need `security: []`");
        assert!(!responses.contains_key("401"), "{what}: public operation documents 401");
    } else {
        assert_ne!(op.get("security"), Some(&json!([])), "{what}: must not be public");
        for code in ["401", "429"] {
            assert!(responses.contains_key(code), "{what}: missing {code}");
        }
        assert_eq!(
            responses.contains_key("403"),
            role != "viewer",
            "{what}: 403 iff the role is above viewer"
        );
    }
    assert!(responses.contains_key("400"), "{what}: unknown query parameters are a 400");

    // Success answers: the statuses, media types and schemas the API renders.
    let expected = successes(action);
    let documented: BTreeSet<&str> =
        responses.keys().map(String::as_str).filter(|k| k.parse::<u16>().is_ok_and(|s| s < 400)).collect();
    let wanted: BTreeSet<&str> = expected.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(documented, wanted, "{what}: success statuses");
    for (status, media, schema) in expected {
        let r = resolve(doc, &responses[*status]);
        let content = r.get("content").and_then(Value::as_object);
        if media.is_empty() {
            assert!(content.is_none(), "{what}: {status} has no body");
            continue;
        }
        let content = content.unwrap_or_else(|| panic!("{what}: {status} has no content"));
        let types: Vec<&str> = content.keys().map(String::as_str).collect();
        assert_eq!(types, [*media], "{what}: {status} media type");
        let s = &content[*media]["schema"];
        if schema.is_empty() {
            assert!(s.is_object() && ref_name(s).is_none(), "{what}: {status} inline schema");
        } else {
            assert_eq!(ref_name(s), Some(*schema), "{what}: {status} schema");
        }
        if *media == "text/event-stream" {
            let data = &content[*media]["x-sse-data"];
            assert_eq!(ref_name(data), Some("Event"), "{what}: x-sse-data names the event schema");
        }
    }

    // Bodies: documented exactly when the route reads one; JSON bodies are
    // the type the router parses, uploads are octet streams.
    let upload = matches!(matched.route, Route::Edge(Edge::UploadImage(_) | Edge::UploadUpdate { .. }));
    let body = op.get("requestBody");
    assert_eq!(body.is_some(), matched.needs_body() || upload, "{what}: requestBody");
    if let Some(body) = body {
        let body = resolve(doc, body);
        assert_eq!(body["required"], true, "{what}: requestBody.required");
        let content = body["content"].as_object().unwrap_or_else(|| panic!("{what}: requestBody.content"));
        let types: Vec<&str> = content.keys().map(String::as_str).collect();
        if upload {
            assert_eq!(types, ["application/octet-stream"], "{what}: upload media type");
            assert_eq!(
                content["application/octet-stream"]["schema"],
                json!({"type": "string", "format": "binary"}),
                "{what}: upload schema"
            );
        } else {
            assert_eq!(types, ["application/json"], "{what}: JSON media type");
            let name = ref_name(&content["application/json"]["schema"])
                .unwrap_or_else(|| panic!("{what}: request schema must be a $ref"));
            // A body that is one of named types (the peer handshake) is
            // tried with the first.
            let name = schema(doc, name).get("oneOf").and_then(|v| ref_name(&v[0])).unwrap_or(name);
            let sample = request_samples()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{what}: no request sample for {name}"))
                .1;
            let cmd = matched
                .clone()
                .into_command(&serde_json::to_vec(&sample).unwrap())
                .unwrap_or_else(|e| panic!("{what}: the router does not take a {name}: {e}"));
            assert_eq!(cmd.action(), matched.action, "{what}: command");
        }
        for code in ["413", "415"] {
            assert!(responses.contains_key(code), "{what}: missing {code}");
        }
    }

    // Path parameters: exactly the template's, all required.
    let in_template: BTreeSet<String> = template
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(String::from)
        .collect();
    let path_params = params_in(doc, op, "path");
    for p in &path_params {
        assert_eq!(p["required"], true, "{what}: path parameter {} must be required", p["name"]);
    }
    let documented: BTreeSet<String> =
        path_params.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(documented, in_template, "{what}: path parameters");

    // Header parameters: exactly the ones the route reads.
    let headers: BTreeSet<String> = params_in(doc, op, "header")
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_ascii_lowercase())
        .collect();
    let wanted: BTreeSet<String> = header_params(action).iter().map(|h| h.to_string()).collect();
    assert_eq!(headers, wanted, "{what}: header parameters");

    // Query parameters: documented exactly when the router accepts them.
    let documented = query_params(doc, op);
    for (name, value) in QUERY_PARAMS {
        let accepted = route(&method(m), concrete, Some(&format!("{name}={value}"))).is_ok();
        assert_eq!(documented.contains(name), accepted, "{what}: query parameter {name}");
    }
    for name in &documented {
        assert!(QUERY_PARAMS.iter().any(|(n, _)| n == name), "{what}: add {name} to QUERY_PARAMS");
    }
}

#[test]
fn document_is_openapi_3() {
    let doc = doc();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi version");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let scheme = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));
    // Every $ref resolves.
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(m) => {
                resolve(doc, v);
                m.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    walk(&doc, &doc);
}

#[test]
fn every_route_is_documented() {
    let doc = doc();
    for r in ROUTES {
        let concrete = fill(r.template());
        let op = operation(&doc, r.template(), r.method());
        check_operation(&doc, r.method(), &concrete, r.template(), op);
    }
}

#[test]
fn every_documented_operation_routes() {
    let doc = doc();
    let mut seen = BTreeSet::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let concrete = fill(template);
        for (key, op) in item.as_object().unwrap() {
            if !METHODS.contains(&key.as_str()) {
                continue;
            }
            check_operation(&doc, key, &concrete, template, op);
            seen.insert((key.to_ascii_uppercase(), template.clone()));
        }
    }
    let table: BTreeSet<_> =
        ROUTES.iter().map(|r| (r.method().to_string(), r.template().to_string())).collect();
    assert_eq!(seen, table, "the document and the route table differ");
}

/// Field names a value serializes to.
fn keys<T: serde::Serialize>(v: &T) -> BTreeSet<String> {
    match serde_json::to_value(v).unwrap() {
        Value::Object(m) => m.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Map<String, Value> {
    doc["components"]["schemas"]
        .get(name)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("components.schemas.{name} is missing"))
}

fn schema_keys(doc: &Value, name: &str) -> BTreeSet<String> {
    schema(doc, name)["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{name} has no properties"))
        .keys()
        .cloned()
        .collect()
}

fn boot() -> BootSpec {
    BootSpec {
        kernel: "vmlinuz".into(),
        initrd: Some("initrd.img".into()),
        cmdline: Some("console=ttyS0".into()),
    }
}

/// Fully populated samples of the request types, serialized.
fn request_samples() -> Vec<(&'static str, Value)> {
    let disk = DiskSpec { size_gib: Some(10), image: Some("base.qcow2".into()), copy: true };
    let cloud_init = CloudInit {
        user_data: "#cloud-config\n".into(),
        meta_data: Some("instance-id: web\n".into()),
        network_config: Some("version: 2\n".into()),
    };
    let create = VmCreate {
        name: "web".into(),
        vcpus: 2,
        memory_mib: 1024,
        disks: vec![disk.clone()],
        boot: Some(boot()),
        network: Some("default".into()),
        autostart: true,
        autostart_priority: 10,
        cloud_init: Some(cloud_init.clone()),
        shutdown_timeout_secs: Some(60),
        replication: Some(crate::types::ReplicationSpec {
            mode: crate::types::ReplicationMode::Off,
            max_lag_seconds: 10,
        }),
    };
    let patch = VmPatch {
        vcpus: Some(2),
        memory_mib: Some(512),
        autostart: Some(false),
        autostart_priority: Some(-5),
        shutdown_timeout_secs: Some(30),
    };
    let clone = VmClone { name: "web-2".into(), copy: true };
    let resize = DiskResize { size_gib: 20 };
    let snapshot = SnapshotCreate { name: "before".into(), description: "d".into(), memory: true };
    let import =
        ImageImport { name: "debian-12".into(), path: "/usr/share/novacron/images/debian.qcow2".into() };
    let network = NetworkCreate {
        name: "lan".into(),
        kind: NetworkKind::Nat,
        subnet: Some("10.20.0.0/24".into()),
        gateway: Some("10.20.0.1".into()),
        dhcp_start: Some("10.20.0.128".into()),
        dhcp_end: Some("10.20.0.254".into()),
        bridge: Some("br0".into()),
        vlan: Some(10),
    };
    let token = TokenCreate { name: "ci".into(), role: Role::Operator };
    let node = crate::cluster::pairing::NodeInfo {
        node_id: uuid::Uuid::nil(),
        name: "b".into(),
        addresses: vec!["10.0.0.2".parse().unwrap()],
        api_port: 8443,
        link_port: 8444,
        fingerprint: "AB:CD".into(),
    };
    use crate::cluster::pairing::Handshake as H;
    let (inv, proof, nonce) = ("00".repeat(8), "00".repeat(32), "00".repeat(16));
    let prepare = H::Prepare {
        version: 1,
        invite: inv.clone(),
        joiner: node.clone(),
        nonce: nonce.clone(),
        proof: proof.clone(),
    };
    let commit = H::Commit { invite: inv.clone(), joiner: uuid::Uuid::nil(), proof: proof.clone() };
    let abort = H::Abort { invite: inv, joiner: uuid::Uuid::nil(), proof: proof.clone() };
    let resolve =
        H::Resolve { from: uuid::Uuid::nil(), at_ms: 1, nonce: nonce.clone(), proof: proof.clone() };
    let unpair = H::Unpair { from: uuid::Uuid::nil(), at_ms: 1, nonce, proof };
    fn v<T: serde::Serialize>(x: &T) -> Value {
        serde_json::to_value(x).unwrap()
    }
    vec![
        ("VmCreate", v(&create)),
        ("DiskSpec", v(&disk)),
        ("BootSpec", v(&boot())),
        ("CloudInit", v(&cloud_init)),
        ("ReplicationSpec", v(&create.replication)),
        ("VmPatch", v(&patch)),
        ("VmClone", v(&clone)),
        ("DiskResize", v(&resize)),
        ("SnapshotCreate", v(&snapshot)),
        ("ImageImport", v(&import)),
        ("NetworkCreate", v(&network)),
        ("TokenCreate", v(&token)),
        ("PeerInvite", v(&PeerInvite { expires_secs: Some(60) })),
        ("PeerJoin", v(&PeerJoin { code: "ncj...".into() })),
        ("NodeInfo", v(&node)),
        ("PeerHandshakePrepare", v(&prepare)),
        ("PeerHandshakeCommit", v(&commit)),
        ("PeerHandshakeAbort", v(&abort)),
        ("PeerHandshakeResolve", v(&resolve)),
        ("PeerHandshakeUnpair", v(&unpair)),
        (
            "PeerHandshakeVm",
            v(&crate::cluster::pairing::peer_vm_request(
                crate::cluster::pairing::VmPeerOp::Start { vm: uuid::Uuid::nil(), epoch: 2 },
                b"k",
                uuid::Uuid::nil(),
                uuid::Uuid::nil(),
                1,
                [0; 16],
            )),
        ),
        ("PeerTakeover", v(&crate::types::PeerTakeover { force: true, include: vec!["web".into()] })),
    ]
}

/// Deserializes `v` as the request type named `name`.
fn parse_request(name: &str, v: &Value) -> Result<(), serde_json::Error> {
    fn p<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), serde_json::Error> {
        serde_json::from_value::<T>(v.clone()).map(drop)
    }
    match name {
        "VmCreate" => p::<VmCreate>(v),
        "DiskSpec" => p::<DiskSpec>(v),
        "BootSpec" => p::<BootSpec>(v),
        "CloudInit" => p::<CloudInit>(v),
        "ReplicationSpec" => p::<crate::types::ReplicationSpec>(v),
        "VmPatch" => p::<VmPatch>(v),
        "VmClone" => p::<VmClone>(v),
        "DiskResize" => p::<DiskResize>(v),
        "SnapshotCreate" => p::<SnapshotCreate>(v),
        "ImageImport" => p::<ImageImport>(v),
        "NetworkCreate" => p::<NetworkCreate>(v),
        "TokenCreate" => p::<TokenCreate>(v),
        "PeerInvite" => p::<PeerInvite>(v),
        "PeerJoin" => p::<PeerJoin>(v),
        "PeerTakeover" => p::<crate::types::PeerTakeover>(v),
        "NodeInfo" => p::<crate::cluster::pairing::NodeInfo>(v),
        n if n.starts_with("PeerHandshake") => p::<crate::cluster::pairing::Handshake>(v),
        _ => panic!("no parser for {name}"),
    }
}

#[test]
fn request_schemas_match_the_types() {
    let doc = doc();
    let samples = request_samples();
    // Every strict schema in the document is a request type with a sample.
    let strict: BTreeSet<&str> = doc["components"]["schemas"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["additionalProperties"] == false)
        .map(|(n, _)| n.as_str())
        .filter(|n| !["Error", "ErrorDetail"].contains(n))
        .collect();
    let sampled: BTreeSet<&str> = samples.iter().map(|(n, _)| *n).collect();
    assert_eq!(strict, sampled, "schemas with additionalProperties: false vs request types");

    for (name, value) in &samples {
        let obj = value.as_object().unwrap();
        let fields: BTreeSet<String> = obj.keys().cloned().collect();
        assert_eq!(schema_keys(&doc, name), fields, "{name}: schema properties vs serialized fields");
        // `required` lists exactly the fields serde cannot do without.
        let required: BTreeSet<String> = schema(&doc, name)
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let minimal: Map<String, Value> =
            obj.iter().filter(|(k, _)| required.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        parse_request(name, &Value::Object(minimal.clone()))
            .unwrap_or_else(|e| panic!("{name}: a field outside `required` is needed: {e}"));
        for field in &required {
            let mut less = minimal.clone();
            less.remove(field);
            assert!(
                parse_request(name, &Value::Object(less)).is_err(),
                "{name}: {field} is listed as required but serde does not need it"
            );
        }
        // Strictness is real on both sides.
        let mut extra = obj.clone();
        extra.insert("no_such_field".into(), json!(1));
        assert!(parse_request(name, &Value::Object(extra)).is_err(), "{name}: unknown field accepted");
    }
}

#[test]
fn response_schemas_match_the_types() {
    let doc = doc();
    let uuid = uuid::Uuid::nil();
    let vm = Vm {
        id: uuid,
        name: "web".into(),
        state: VmState::Running,
        vcpus: 1,
        memory_mib: 64,
        disks: vec![Disk { device: "vda".into(), path: "/d".into(), size_bytes: 1, image: Some("i".into()) }],
        boot: Some(boot()),
        nics: vec![NicView {
            network: "lan".into(),
            mac: "52:54:00:12:34:56".into(),
            ip: Some("10.20.0.130".into()),
        }],
        cloud_init: true,
        autostart: false,
        autostart_priority: 0,
        shutdown_timeout_secs: 120,
        managed: true,
        owner_node: Some(uuid),
        epoch: 1,
        replication: Some(crate::types::VmReplication {
            mode: crate::types::ReplicationMode::Sync,
            max_lag_seconds: 10,
            protection: "degraded".into(),
            disks: vec![crate::types::DiskReplica {
                device: "vda".into(),
                local: "up_to_date".into(),
                peer: Some("syncing".into()),
                connected: true,
                sync: Some(crate::types::SyncProgress {
                    kind: "full".into(),
                    bytes_done: 1,
                    bytes_total: 2,
                    rate_bytes_per_sec: 1.5,
                    eta_seconds: Some(0.5),
                }),
                lag_bytes: 0,
                lag_seconds: 0.0,
                dirty_bytes: 4096,
                sync_bytes_total: 8192,
                detail: "syncing".into(),
            }],
        }),
        created_at: "2024-01-01T00:00:00Z".into(),
        updated_at: "2024-01-01T00:00:00Z".into(),
    };
    let token =
        Token { id: "0123456789abcdef".into(), name: "ci".into(), role: Role::Admin, created_at: "t".into() };
    let host = HostInfo {
        node_id: uuid,
        node_name: "n".into(),
        hostname: "h".into(),
        cpus: 1,
        memory_total_mib: 1,
        memory_available_mib: 1,
        memory_reserve_mib: 1,
        load: [0.0; 3],
        kvm_usable: true,
        libvirt_uri: "qemu:///system".into(),
        libvirt_connected: true,
        libvirt_version: Some("1".into()),
        qemu_version: Some("1".into()),
        domain_type: "kvm".into(),
        version: "1".into(),
        tls_fingerprint: "f".into(),
    };
    let health_check = HealthCheck { name: "disk".into(), status: CheckStatus::Warning, message: "m".into() };
    let update = UpdateRecord {
        format: 1,
        state: UpdateState::Rebooting,
        version: "0.2.0".into(),
        from_slot: "a".into(),
        from_version: Some("0.1.0".into()),
        target_slot: "b".into(),
        tries: 3,
        message: None,
        started_at: 1,
        finished_at: None,
        boot_id: None,
        resume_vms: vec![uuid],
    };
    let entry = AuditEntry {
        seq: 1,
        at: "t".into(),
        actor: "a".into(),
        action: "vm.create".into(),
        target: "web".into(),
        result: "ok".into(),
    };
    let snapshot = Snapshot {
        name: "before".into(),
        description: "d".into(),
        memory: true,
        restores_memory: true,
        vm_state: VmState::Running,
        created_at: "t".into(),
    };
    let image = Image {
        name: "debian-12".into(),
        format: "qcow2".into(),
        virtual_size: 1,
        file_size: 1,
        sha256: "0".repeat(64),
        used_by: vec!["web".into()],
        created_at: "t".into(),
        file: "present".into(),
    };
    let network = Network {
        name: "lan".into(),
        kind: NetworkKind::Nat,
        bridge: "virbr1".into(),
        subnet: Some("10.20.0.0/24".into()),
        gateway: Some("10.20.0.1".into()),
        dhcp_start: Some("10.20.0.128".into()),
        dhcp_end: Some("10.20.0.254".into()),
        vlan: Some(10),
        active: true,
        created_at: "t".into(),
    };
    let event = crate::core::events::Event {
        seq: 1,
        kind: "vm.state",
        at: "t".into(),
        data: json!({"vm": {"id": uuid, "name": "web"}, "state": "running"}),
    };
    let peer_node = PeerNode {
        node_id: uuid,
        name: "b".into(),
        addresses: vec!["10.0.0.2".into()],
        api_port: 8443,
        link_port: 8444,
        fingerprint: "AB".into(),
        paired_at: "t".into(),
    };
    let link = PeerLink {
        state: "up".into(),
        detail: "d".into(),
        address: Some("10.0.0.2:8444".into()),
        last_heartbeat: Some("t".into()),
        rtt_ms: Some(0.4),
        bulk: "up".into(),
    };
    let repl = PeerReplication { lag_records: Some(1), lag_seconds: None };
    let disk = ReplicatedDisk { vm: "web".into(), device: "vda".into(), state: "up_to_date".into() };
    let peer_view = PeerView {
        paired: true,
        state: "paired".into(),
        peer: Some(peer_node.clone()),
        link: Some(link.clone()),
        replication: Some(repl.clone()),
        disks: vec![disk.clone()],
        failover: "manual".into(),
    };
    let reply = crate::cluster::pairing::HandshakeReply {
        paired: false,
        inviter: None,
        proof: None,
        epochs: Some(vec![]),
    };
    let taken = crate::types::TakenOver {
        id: uuid,
        name: "web".into(),
        result: "started".into(),
        replica: "up_to_date".into(),
        epoch: 2,
        autostart_priority: 5,
        detail: "d".into(),
    };
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        ("PeerNode", keys(&peer_node)),
        ("PeerLink", keys(&link)),
        ("PeerReplication", keys(&repl)),
        ("ReplicatedDisk", keys(&disk)),
        ("PeerView", keys(&peer_view)),
        (
            "PeerInvitation",
            keys(&PeerInvitation {
                code: "c".into(),
                expires_at: "t".into(),
                addresses: vec![],
                fingerprint: "f".into(),
            }),
        ),
        (
            "PeerUnpaired",
            keys(&PeerUnpaired { peer: peer_node.clone(), peer_notified: true, message: "m".into() }),
        ),
        ("PeerHandshakeReply", keys(&reply)),
        ("TakenOver", keys(&taken)),
        (
            "TakeoverReport",
            keys(&crate::types::TakeoverReport { vms: vec![taken.clone()], message: "m".into() }),
        ),
        (
            "VmMoved",
            keys(&crate::types::VmMoved {
                id: uuid,
                name: "web".into(),
                from: uuid,
                to: uuid,
                epoch: 2,
                started: true,
                shutdown_ms: 1,
                downtime_ms: Some(2),
                message: "m".into(),
            }),
        ),
        ("Vm", keys(&vm)),
        ("Disk", keys(&vm.disks[0])),
        ("NicView", keys(&vm.nics[0])),
        ("VmList", keys(&VmList { vms: vec![vm.clone()] })),
        ("Snapshot", keys(&snapshot)),
        ("SnapshotList", keys(&SnapshotList { snapshots: vec![snapshot.clone()] })),
        ("Image", keys(&image)),
        ("ImageList", keys(&ImageList { images: vec![image.clone()] })),
        ("Network", keys(&network)),
        ("NetworkList", keys(&NetworkList { networks: vec![network.clone()] })),
        ("Event", keys(&event)),
        ("Token", keys(&token)),
        ("TokenCreated", keys(&TokenCreated { token: token.clone(), secret: "nct_x_y".into() })),
        ("TokenList", keys(&TokenList { tokens: vec![token] })),
        ("Health", keys(&Health { status: "ok".into(), version: "1".into(), node: uuid })),
        ("HostInfo", keys(&host)),
        ("HealthCheck", keys(&health_check)),
        (
            "HealthReport",
            keys(&HealthReport {
                status: CheckStatus::Ok,
                node: uuid,
                version: "1".into(),
                checks: vec![health_check.clone()],
            }),
        ),
        ("AuditEntry", keys(&entry)),
        ("UpdateRecord", keys(&update)),
        (
            "UpdateView",
            keys(&UpdateView {
                appliance: true,
                reason: None,
                booted_slot: Some("a".into()),
                booted_version: None,
                update: Some(update.clone()),
            }),
        ),
        ("AuditList", keys(&AuditList { entries: vec![entry] })),
        ("Error", keys(&ErrorBody { error: ErrorDetail { code: "internal".into(), message: "m".into() } })),
        ("ErrorDetail", keys(&ErrorDetail { code: "internal".into(), message: "m".into() })),
    ];
    for (name, fields) in &cases {
        assert_eq!(&schema_keys(&doc, name), fields, "{name}: schema properties vs serialized fields");
    }
    // Response types always serialize every field, so all are required.
    for (name, _) in &cases {
        let required: BTreeSet<String> = schema(&doc, name)["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no required"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(required, schema_keys(&doc, name), "{name}: required");
    }

    let states: Vec<Value> = VmState::ALL.iter().map(|s| json!(s.as_str())).collect();
    assert_eq!(schema(&doc, "VmState")["enum"], json!(states), "VmState enum");
    let roles: Vec<Value> = [Role::Viewer, Role::Operator, Role::Admin].iter().map(|r| json!(r)).collect();
    assert_eq!(schema(&doc, "Role")["enum"], json!(roles), "Role enum");
    let statuses: Vec<Value> =
        [CheckStatus::Ok, CheckStatus::Warning, CheckStatus::Critical].iter().map(|s| json!(s)).collect();
    assert_eq!(schema(&doc, "CheckStatus")["enum"], json!(statuses), "CheckStatus enum");
    let states: Vec<Value> = [
        UpdateState::Installing,
        UpdateState::StoppingGuests,
        UpdateState::Rebooting,
        UpdateState::Succeeded,
        UpdateState::RolledBack,
        UpdateState::Failed,
    ]
    .iter()
    .map(|s| json!(s))
    .collect();
    assert_eq!(schema(&doc, "UpdateState")["enum"], json!(states), "UpdateState enum");
    let kinds: Vec<Value> = [NetworkKind::Nat, NetworkKind::Bridge].iter().map(|k| json!(k)).collect();
    assert_eq!(schema(&doc, "NetworkKind")["enum"], json!(kinds), "NetworkKind enum");
}

#[test]
fn error_codes_are_documented() {
    use crate::hypervisor::HypervisorError;
    use crate::images::ImageError;
    use crate::ops::OpsError;
    use crate::store::StoreError;
    let doc = doc();
    let codes = doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"]
        .as_array()
        .expect("ErrorDetail.code enum")
        .clone();
    let s = || "x".to_string();
    let core = vec![
        CoreError::invalid("f", "m"),
        CoreError::NotFound(s()),
        CoreError::Forbidden { action: "a", have: "viewer", need: "admin" },
        CoreError::NameTaken(s()),
        CoreError::WrongState { vm: s(), state: "running", action: "a" },
        CoreError::Busy(s()),
        CoreError::Unmanaged(s()),
        CoreError::NotOwner { vm: s(), owner: uuid::Uuid::nil(), epoch: 1 },
        CoreError::StaleEpoch { vm: s(), had: 1, now: 2 },
        CoreError::InsufficientMemory { vm: s(), need_mib: 1, available_mib: 0, reserve_mib: 0 },
        CoreError::NotReady(s()),
        CoreError::InUse { what: s(), users: s() },
        CoreError::LastAdmin(s()),
        CoreError::Image(ImageError::TooLarge { max: 1 }),
        CoreError::Image(ImageError::ChecksumMismatch { expected: s(), actual: s() }),
        CoreError::Image(ImageError::BadChecksum),
        CoreError::Image(ImageError::UnsupportedFormat(s())),
        CoreError::Image(ImageError::BackingFile(s())),
        CoreError::Image(ImageError::DataFile(s())),
        CoreError::Image(ImageError::Truncated(s())),
        CoreError::Image(ImageError::NotADisk(6)),
        CoreError::Image(ImageError::Inspect(s())),
        CoreError::Image(ImageError::Io(std::io::Error::other("x"))),
        CoreError::Store(StoreError::Conflict(s())),
        CoreError::Store(StoreError::NotFound(s())),
        CoreError::Store(StoreError::Corrupt(s())),
        CoreError::Hypervisor(HypervisorError::Unavailable { uri: s(), reason: s() }),
        CoreError::Hypervisor(HypervisorError::WrongState(s())),
        CoreError::Hypervisor(HypervisorError::NoDomain(uuid::Uuid::nil())),
        CoreError::Hypervisor(HypervisorError::NoNetwork(s())),
        CoreError::Hypervisor(HypervisorError::NoSnapshot(s())),
        CoreError::Hypervisor(HypervisorError::Disk(s())),
        CoreError::Hypervisor(HypervisorError::Libvirt(s())),
        CoreError::Ops(OpsError::UnknownProfile(s())),
        CoreError::Ops(OpsError::ReadProfile { path: s(), reason: s() }),
        CoreError::Ops(OpsError::InvalidProfile { name: s(), reason: s() }),
        CoreError::Ops(OpsError::BmcUrl(s())),
        CoreError::Ops(OpsError::BmcNoTrust),
        CoreError::Ops(OpsError::BmcFingerprint(s())),
        CoreError::Ops(OpsError::BmcConnect { target: s(), reason: s() }),
        CoreError::Ops(OpsError::BmcHttp { method: s(), path: s(), reason: s() }),
        CoreError::Ops(OpsError::BmcStatus { method: s(), path: s(), status: 500, message: s() }),
        CoreError::Ops(OpsError::BmcShape { path: s(), reason: s() }),
        CoreError::Ops(OpsError::NotAppliance(s())),
        CoreError::Ops(OpsError::Bundle(s())),
        CoreError::Ops(OpsError::Checksum { what: s(), expected: s(), actual: s() }),
        CoreError::Ops(OpsError::Seed(s())),
        CoreError::Ops(OpsError::Io(std::io::Error::other("x"))),
        CoreError::UpdateInProgress(s()),
        CoreError::Internal(s()),
    ];
    use crate::cluster::pairing::PairError as P;
    let pair = vec![
        P::MalformedCode(s()),
        P::CodeVersion(2),
        P::Malformed(s()),
        P::ProtocolVersion(2),
        P::Expired,
        P::Used,
        P::UnknownInvite,
        P::WrongSecret,
        P::InviterProof,
        P::AlreadyPaired(s()),
        P::SelfPair,
        P::FingerprintMismatch { addr: s() },
        P::Unreachable(s()),
        P::refused("no_such_code", "m"),
        P::NotPaired,
        P::NotPeer,
        P::Incomplete(s()),
    ];
    // Every code a pairing error has is one of those relayed with its own.
    for e in &pair {
        assert!(
            crate::cluster::pairing::CODES.contains(&e.code()) || e.code() == "peer_refused",
            "{}",
            e.code()
        );
    }
    let core: Vec<CoreError> = core.into_iter().chain(pair.into_iter().map(CoreError::Pair)).collect();
    let mut errors: Vec<ApiError> = vec![
        ApiError::NoRoute(s()),
        ApiError::MethodNotAllowed { method: s(), path: s(), allow: s() },
        ApiError::Unauthorized,
        ApiError::RateLimited { retry_after: 1 },
        ApiError::AuthRateLimited { retry_after: 1 },
        ApiError::TooLarge(1),
        ApiError::UnsupportedMediaType,
        ApiError::MalformedJson(s()),
        ApiError::InvalidBody(s()),
        ApiError::InvalidQuery { name: s(), message: s() },
        ApiError::Body(s()),
        ApiError::MalformedHead,
        ApiError::Tls(s()),
    ];
    errors.extend(core.into_iter().map(ApiError::Core));
    let responses = doc["components"]["responses"].as_object().unwrap();
    let listing = doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["description"]
        .as_str()
        .expect("ErrorDetail.code description");
    for code in &codes {
        assert!(
            errors.iter().any(|e| json!(e.code()) == *code),
            "ErrorDetail.code lists {code}, which no error produces"
        );
    }
    for e in &errors {
        assert!(codes.contains(&json!(e.code())), "error code {} is not in ErrorDetail.code", e.code());
        // Some shared response for the status names the code.
        let status = e.status().as_u16();
        let described = responses.values().any(|r| {
            let d = r["description"].as_str().unwrap_or("");
            let ex = &r["content"]["application/json"]["example"]["error"]["code"];
            d.contains(&format!("`{}`", e.code()))
                && ex
                    .as_str()
                    .is_some_and(|c| errors.iter().any(|o| o.code() == c && o.status().as_u16() == status))
        });
        assert!(described, "no components.responses entry for {status} lists `{}`", e.code());
        assert!(
            listing.contains(&format!("- `{}` ({status})", e.code())),
            "ErrorDetail.code's description does not list `{}` ({status})",
            e.code()
        );
    }
}
