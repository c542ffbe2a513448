//! The HTTP layer against the real binary: connection budgets and idle
//! timeouts, HEAD, early errors with unread bodies, hyper's own 400s, and
//! bounded error messages, over HTTP/1.1 and h2.

mod common;

use bytes::Bytes;
use common::{cli, Daemon, Opts};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

fn addr(d: &Daemon) -> std::net::SocketAddr {
    d.url.trim_start_matches("https://").parse().unwrap()
}

/// A TLS connection to `d` from the loopback address `from`, offering `alpn`.
async fn tls(d: &Daemon, from: &str, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(format!("{from}:0").parse().unwrap())?;
    let tcp = sock.connect(addr(d)).await?;
    let config = novacron::cli::client::pinned_tls_config(&d.fingerprint, &[alpn]).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;
type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A client connection: its sender, and a handle that ends (with the time)
/// when the connection does.
struct Conn<S> {
    send: S,
    opened: Instant,
    ended: tokio::task::JoinHandle<Instant>,
}

/// An h2 connection (preface and settings sent, pings answered by hyper).
async fn h2(d: &Daemon, from: &str) -> std::io::Result<Conn<H2>> {
    let io = tls(d, from, b"h2").await?;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    Ok(Conn { send, opened: Instant::now(), ended })
}

async fn h1(d: &Daemon) -> Conn<H1> {
    let io = tls(d, "127.0.0.1", b"http/1.1").await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    Conn { send, opened: Instant::now(), ended }
}

macro_rules! send {
    ($sender:ty) => {
        impl Conn<$sender> {
            async fn send(
                &mut self,
                req: Request<Full<Bytes>>,
            ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
                self.send.ready().await?;
                self.send.send_request(req).await
            }
        }
    };
}
send!(H1);
send!(H2);

/// Opens `n` idle h2 connections from `from`; returns the ones the server
/// kept (still open a moment later).
async fn hold(d: &Daemon, from: &str, n: usize) -> Vec<Conn<H2>> {
    let mut tried = Vec::new();
    for _ in 0..n {
        tried.extend(h2(d, from).await.ok());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tried.into_iter().filter(|c| !c.ended.is_finished()).collect()
}

fn request(d: &Daemon, method: Method, path: &str, body: Vec<u8>, ct: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{path}", d.url))
        .header("authorization", format!("Bearer {}", d.admin));
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

/// Status, headers and body of one response.
async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> (StatusCode, hyper::HeaderMap, Bytes) {
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(b)))
}

async fn health_answers(d: &Daemon) -> bool {
    let c = d.https(None);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.request(Method::GET, "/v1/health", None)).await,
        Ok(Ok((StatusCode::OK, _)))
    )
}

/// Idle h2 connections from one address cannot fill the daemon: they stop
/// at the per-address cap, others (and root on the socket) still get in, and
/// idle connections are closed after the idle timeout. With every network
/// slot taken, the socket still has its own budget.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_cannot_lock_anyone_out() {
    let mut opts = Opts::test_driver(121);
    opts.max_connections = 24;
    opts.extra_api = "max_connections_per_address = 8\nidle_timeout_secs = 6\n".into();
    let d = Daemon::start("http-idle", opts);

    let flood = hold(&d, "127.0.0.122", 30).await;
    assert_eq!(flood.len(), 8, "one address holds more connections than its cap of 8");
    assert!(health_answers(&d).await, "health over HTTPS from another address failed");
    let status = cli(&d, &["status"]);
    assert_eq!(status.code, 0, "novacron status over the socket failed: {}", status.stderr);

    // Three addresses take every network slot; the socket is apart.
    let more = [hold(&d, "127.0.0.123", 10).await, hold(&d, "127.0.0.124", 10).await];
    assert_eq!(more[0].len() + more[1].len(), 16);
    assert!(!health_answers(&d).await, "a connection beyond max_connections was served");
    let status = cli(&d, &["status"]);
    assert_eq!(status.code, 0, "the socket shares the network's budget: {}", status.stderr);

    // No request in flight for 6 s: every held connection is closed, though
    // it answers pings.
    for c in flood.into_iter().chain(more.into_iter().flatten()) {
        let ended = tokio::time::timeout(Duration::from_secs(20), c.ended)
            .await
            .expect("an idle h2 connection was kept open")
            .unwrap();
        let lived = ended - c.opened;
        assert!(lived > Duration::from_secs(5), "closed after {lived:?}, before the idle timeout");
    }
    assert!(health_answers(&d).await);

    // A request in flight keeps a connection (an event stream here), and an
    // HTTP/1.1 keep-alive connection is closed when idle too.
    let mut two = h2(&d, "127.0.0.122").await.unwrap();
    let events = two.send(request(&d, Method::GET, "/v1/events", vec![], None)).await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let mut one = h1(&d).await;
    let resp = one.send(request(&d, Method::GET, "/v1/health", vec![], None)).await.unwrap();
    assert_eq!(answer(resp).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!two.ended.is_finished(), "a connection with an open stream was closed as idle");
    assert!(one.ended.is_finished(), "an idle HTTP/1.1 keep-alive connection was kept");
    drop(events);
}

/// Every GET route answers HEAD like GET, without a body, over both
/// protocols; curl -I works with both.
#[tokio::test(flavor = "multi_thread")]
async fn head_answers_like_get_without_a_body() {
    let d = Daemon::start("http-head", Opts::test_driver(125));
    let admin = d.admin();
    let vm = serde_json::json!({"name": "h", "vcpus": 1, "memory_mib": 64, "disks": [{"size_gib": 1}]});
    let (s, _) = common::call(&admin, Method::POST, "/v1/vms", Some(vm)).await;
    assert_eq!(s, StatusCode::CREATED);
    // Bodies of these change from one request to the next.
    let varies = ["/metrics", "/v1/health/details", "/v1/host", "/v1/audit"];
    let paths = [
        "/v1/health",
        "/v1/ready",
        "/v1/health/details",
        "/v1/host",
        "/v1/host/update",
        "/v1/openapi.json",
        "/v1/vms",
        "/v1/vms/h",
        "/v1/vms/h/snapshots",
        "/v1/vms/h/console/log",
        "/v1/vms/h/console",
        "/v1/vms/nope",
        "/v1/images",
        "/v1/images/nope",
        "/v1/networks",
        "/v1/tokens",
        "/v1/audit",
        "/metrics",
        "/v1/events",
    ];
    let mut two = h2(&d, "127.0.0.1").await.unwrap();
    let mut one = h1(&d).await;
    for path in paths {
        for proto in ["h2", "http/1.1"] {
            let send = |m: Method| request(&d, m, path, vec![], None);
            let (get, head) = if proto == "h2" {
                let g = two.send(send(Method::GET)).await.unwrap();
                // The event stream never ends: its head is enough.
                let g = if path == "/v1/events" {
                    (g.status(), g.headers().clone(), Bytes::new())
                } else {
                    answer(g).await
                };
                (g, answer(two.send(send(Method::HEAD)).await.unwrap()).await)
            } else {
                if path == "/v1/events" {
                    // Over HTTP/1.1 the stream would hold the connection.
                    continue;
                }
                let g = answer(one.send(send(Method::GET)).await.unwrap()).await;
                (g, answer(one.send(send(Method::HEAD)).await.unwrap()).await)
            };
            let what = format!("HEAD {path} over {proto}");
            assert_eq!(head.0, get.0, "{what}: status");
            assert!(head.2.is_empty(), "{what}: a body of {} bytes", head.2.len());
            assert_eq!(head.1.get("content-type"), get.1.get("content-type"), "{what}: content type");
            assert!(get.1.get("transfer-encoding").is_none(), "GET {path} over {proto} is chunked");
            if path != "/v1/events" && !varies.contains(&path) {
                let len = head.1.get("content-length").map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
                assert_eq!(len, Some(get.2.len()), "{what}: content-length");
            }
        }
    }
    // A path without GET has no HEAD either; Allow names HEAD beside GET.
    for (path, allow) in [("/v1/vms/h/start", "POST"), ("/v1/audit", "GET, HEAD")] {
        for m in [Method::HEAD, Method::PUT] {
            let (status, headers, _) =
                answer(one.send(request(&d, m.clone(), path, vec![], None)).await.unwrap()).await;
            if path == "/v1/audit" && m == Method::HEAD {
                assert_eq!(status, StatusCode::OK);
                continue;
            }
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
            assert_eq!(headers.get("allow").unwrap(), allow, "{m} {path}");
        }
    }
    // curl -I: a protocol error (exit 16 or 92) before HEAD sent no body.
    for proto in ["--http2", "--http1.1"] {
        let out = Command::new("curl")
            .args(["-sS", "-I", "--max-time", "10", "-k", proto])
            .arg(format!("{}/v1/health", d.url))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl -I {proto}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.starts_with("HTTP/"), "{text}");
        assert!(text.to_ascii_lowercase().contains("content-length: "), "{text}");
    }
}

/// `curl PROTO -X PUT --data-binary @FILE URL/PATH` (curl's default form
/// content type unless `ct`): status, body, and how curl ended.
fn curl_put(
    d: &Daemon,
    proto: &str,
    file: &std::path::Path,
    path: &str,
    token: Option<&str>,
    ct: Option<&str>,
) -> (String, Value, String) {
    let out_file = d.dir.join("curl.out");
    let _ = std::fs::remove_file(&out_file);
    let mut c = Command::new("curl");
    c.args(["-sk", proto, "--max-time", "20", "-X", "PUT", "-w", "%{http_code}", "-o"])
        .arg(&out_file)
        .arg("--data-binary")
        .arg(format!("@{}", file.display()));
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(ct) = ct {
        c.args(["-H", &format!("Content-Type: {ct}")]);
    }
    let out = c.arg(format!("{}{path}", d.url)).output().unwrap();
    let how = format!("{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let body = std::fs::read(&out_file).unwrap_or_default();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (String::from_utf8_lossy(&out.stdout).into_owned(), body, how)
}

/// Early errors (answered before the body is read: 415, 401, a refused
/// upload) with a small body reach the client over both protocols, and an
/// HTTP/1.1 connection either serves its next request or says it closes.
#[tokio::test(flavor = "multi_thread")]
async fn early_errors_reach_the_client() {
    let d = Daemon::start("http-early", Opts::test_driver(126));
    let file = d.dir.join("4k.bin");
    std::fs::write(&file, vec![7u8; 4096]).unwrap();
    let octets = Some("application/octet-stream");
    for proto in ["--http2", "--http1.1"] {
        for (path, token, ct, want, code) in [
            ("/v1/images/x", Some(d.admin.as_str()), None, "415", "unsupported_media_type"),
            ("/v1/images/x", None, None, "401", "unauthorized"),
            ("/v1/images/-bad", Some(d.admin.as_str()), octets, "400", "invalid_value"),
        ] {
            let (status, body, how) = curl_put(&d, proto, &file, path, token, ct);
            assert_eq!(status, want, "curl {proto} PUT {path} 4 KiB: {how}");
            assert_eq!(body["error"]["code"], code, "curl {proto} PUT {path}: {body}");
        }
    }

    // HTTP/1.1: after an early error with a small body the connection serves
    // the next request; with a body too large to read it says it closes.
    let mut one = h1(&d).await;
    for (method, path, ct) in [
        (Method::PUT, "/v1/images/x", Some("application/x-www-form-urlencoded")),
        (Method::PUT, "/v1/images/-bad", octets),
        (Method::POST, "/v1/vms", Some("text/plain")),
        (Method::POST, "/v1/vms/nope/start", None),
        (Method::PATCH, "/v1/health", Some("application/json")),
    ] {
        let resp = one.send(request(&d, method.clone(), path, vec![b'x'; 4096], ct)).await.unwrap();
        let (status, headers, body) = answer(resp).await;
        assert!(status.is_client_error(), "{method} {path}: {status}");
        assert!(json(&body)["error"]["code"].is_string());
        assert!(headers.get("connection").is_none(), "{method} {path}: {headers:?}");
        let next = one.send(request(&d, Method::GET, "/v1/health", vec![], None)).await;
        // (Read to its end: hyper's client drops a connection whose answer
        // was not.)
        let (status, _, _) = answer(next.expect("the next request on the connection")).await;
        assert_eq!(status, StatusCode::OK);
    }
    // (Raw, so that the client is not still writing when the answer comes.)
    let mut raw = tls(&d, "127.0.0.1", b"http/1.1").await.unwrap();
    let head = format!(
        "PUT /v1/images/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        d.admin,
        2 << 20
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    raw.write_all(&[b'x'; 65536]).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 415 "), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");

    // The same over the local socket (plain HTTP/1.1; curl --next reuses
    // the connection when it stays open).
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "--unix-socket"])
        .arg(&d.socket)
        .args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .args(["http://x/v1/images/x", "--next", "-s", "--unix-socket"])
        .arg(&d.socket)
        .args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n", "http://x/v1/health"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "415 1\n200 0\n", "second request on a new connection");
}

/// hyper's own 400 for a request head it cannot parse is JSON too, and an
/// error message quotes at most a bounded prefix of what the client sent.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_heads_and_long_input_get_bounded_json_errors() {
    let d = Daemon::start("http-head400", Opts::test_driver(127));
    for length in ["abc", "-1", "1, 2", "99999999999999999999999"] {
        let raw = format!(
            "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{}}"
        );
        // Over TLS and over the socket.
        let mut tls = tls(&d, "127.0.0.1", b"http/1.1").await.unwrap();
        tls.write_all(raw.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
        let mut unix = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        unix.write_all(raw.as_bytes()).await.unwrap();
        let mut got_unix = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), unix.read_to_end(&mut got_unix)).await;
        for got in [got, got_unix] {
            let text = String::from_utf8_lossy(&got);
            let (head, body) =
                text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("Content-Length {length}: {text:?}"));
            assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
            assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
            assert_eq!(json(body.as_bytes())["error"]["code"], "malformed_request", "{text}");
        }
    }

    let long = "y".repeat(60_000);
    let mut one = h1(&d).await;
    for path in [format!("/v1/{long}"), format!("/v1/vms/{long}"), format!("/v1/vms?{long}=1")] {
        let (status, _, body) =
            answer(one.send(request(&d, Method::GET, &path, vec![], None)).await.unwrap()).await;
        assert!(status.is_client_error(), "{status}");
        let message = json(&body)["error"]["message"].as_str().unwrap().to_string();
        assert!(message.len() <= 600, "a {} byte message", message.len());
        assert!(message.contains("yyyy"), "{message}");
    }
    let vm = serde_json::json!({"name": long, "vcpus": 1, "memory_mib": 64, "disks": []});
    let (status, _, body) = answer(
        one.send(request(
            &d,
            Method::POST,
            "/v1/vms",
            serde_json::to_vec(&vm).unwrap(),
            Some("application/json"),
        ))
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json(&body)["error"]["message"].as_str().unwrap().len() <= 600);
}
