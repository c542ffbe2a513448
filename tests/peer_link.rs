//! The peer link's transport: two endpoints in this process over loopback
//! (127.3.N.x with N = `NOVACRON_TEST_NET`, default 0, so parallel runs keep
//! apart; ports chosen by the OS), real TCP and mutual TLS.
//! Raw TLS clients play a hostile or broken peer.

use novacron::cluster::frame::{Channel, Message, PROTOCOL_VERSION, WIRE_VERSION};
use novacron::cluster::link::{LinkConfig, LinkState};
use novacron::cluster::transport::{Inbox, LocalNode, PeerLink, TransportConfig, TransportStatus, ALPN};
use novacron::cluster::{ClusterError, PeerTarget};
use rustls::pki_types::PrivateKeyDer;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const A: Uuid = Uuid::from_u128(0xA); // the smaller id: dials
const B: Uuid = Uuid::from_u128(0xB);

struct Node {
    id: Uuid,
    name: &'static str,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: Vec<u8>,
    fp: String,
}

impl Node {
    fn new(id: Uuid, name: &'static str) -> Node {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let cert = cert.der().clone();
        Node { id, name, fp: novacron::tls::fingerprint(&cert), cert, key: key.serialize_der() }
    }

    fn local(&self) -> LocalNode {
        LocalNode {
            node_id: self.id,
            name: self.name.into(),
            chain: vec![self.cert.clone()],
            key: PrivateKeyDer::try_from(self.key.clone()).unwrap(),
        }
    }
}

fn ip(n: u8) -> SocketAddr {
    let net = std::env::var("NOVACRON_TEST_NET").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    SocketAddr::from(([127, 3, net, n], 0))
}

fn cfg(listen: SocketAddr) -> TransportConfig {
    TransportConfig {
        link: LinkConfig {
            heartbeat: Duration::from_millis(100),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            ..LinkConfig::default()
        },
        listen: vec![listen],
        max_frame: novacron::cluster::frame::MAX_FRAME,
    }
}

async fn start(
    me: &Node,
    peer: &Node,
    peer_addrs: Vec<SocketAddr>,
    cfg: TransportConfig,
) -> (PeerLink, Inbox) {
    let target = PeerTarget { node_id: peer.id, addresses: peer_addrs, fingerprint: peer.fp.clone() };
    PeerLink::start(me.local(), target, cfg, 42).await.unwrap()
}

async fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn up(l: &PeerLink) -> bool {
    l.status().link.state == LinkState::Up
}

/// A raw mutual-TLS connection to `to`, as `me`: a peer that says whatever
/// the test wants.
async fn raw_client(me: &Node, to: &Node, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls = novacron::tls::mutual_client_config(
        &to.fp,
        vec![me.cert.clone()],
        PrivateKeyDer::try_from(me.key.clone()).unwrap(),
        ALPN,
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap()
}

async fn read_message(s: &mut (impl AsyncReadExt + Unpin)) -> Option<Message> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.ok()?;
    let mut body = vec![0; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(Message::decode(&body).unwrap())
}

#[tokio::test]
async fn handshake_heartbeats_rtt_and_data() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    let (lb, mut inb) = start(&b, &a, vec![], cfg(ip(2))).await;
    let (la, mut ina) = start(&a, &b, lb.local_addrs.clone(), cfg(ip(1))).await;
    wait("both up", 10, || up(&la) && up(&lb)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (l, who) in [(&la, "a"), (&lb, "b")] {
        let st: TransportStatus = l.status();
        let rtt = st.link.rtt_ms.unwrap_or_else(|| panic!("{who}: no rtt"));
        assert!(rtt > 0.0 && rtt < 100.0, "{who}: rtt {rtt} ms");
        assert!(st.link.last_heartbeat_age_ms.unwrap() < 300, "{who}: {st:?}");
        assert_eq!((st.link.ups, st.link.downs, st.refused_connections), (1, 0, 0), "{who}");
    }
    assert_eq!(la.status().link.address, Some(lb.local_addrs[0]));
    // Data both ways, delivered in order.
    let da = la.data().borrow().clone().unwrap();
    let db = lb.data().borrow().clone().unwrap();
    for seq in 1..=3 {
        da.send(&Message::Changes { origin: A, seq, entries: vec![(seq, vec![2, seq as u8])] })
            .await
            .unwrap();
    }
    db.send_control(&Message::Ack { origin: A, seq: 3 }).unwrap();
    for seq in 1..=3 {
        let got = tokio::time::timeout(Duration::from_secs(5), inb.control.recv()).await.unwrap().unwrap();
        assert_eq!(got, Message::Changes { origin: A, seq, entries: vec![(seq, vec![2, seq as u8])] });
    }
    let got = tokio::time::timeout(Duration::from_secs(5), ina.control.recv()).await.unwrap().unwrap();
    assert_eq!(got, Message::Ack { origin: A, seq: 3 });
    // The bulk connection came up beside it, and carries its own data.
    wait("bulk up", 5, || la.bulk().borrow().is_some() && lb.bulk().borrow().is_some()).await;
    let (ba, bb) = (la.bulk().borrow().clone().unwrap(), lb.bulk().borrow().clone().unwrap());
    assert_ne!(ba.conn, da.conn);
    let chunk = Message::ImageData { sha256: "ab".into(), offset: 0, last: true, data: vec![7; 1000] };
    ba.send(&chunk).await.unwrap();
    bb.send(&Message::ImageAck { sha256: "ab".into(), offset: 1000 }).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), inb.bulk.recv()).await.unwrap().unwrap();
    assert_eq!(got, chunk);
    let got = tokio::time::timeout(Duration::from_secs(5), ina.bulk.recv()).await.unwrap().unwrap();
    assert_eq!(got, Message::ImageAck { sha256: "ab".into(), offset: 1000 });
    assert!(inb.control.try_recv().is_err(), "bulk data only on the bulk queue");
    assert_eq!(la.status().link.bulk, LinkState::Up);
    // A clean shutdown is seen at once, not after missed heartbeats.
    let t = Instant::now();
    lb.shutdown().await;
    wait("a down", 5, || !up(&la)).await;
    assert!(t.elapsed() < Duration::from_millis(350), "{:?}", t.elapsed());
    assert!(da.send(&Message::NeedSnapshot { origin: B }).await.is_err() || !up(&la));
}

#[tokio::test]
async fn wrong_pinned_fingerprint_is_refused_on_both_sides() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    // Same ids and names, other certificates.
    let (fake_a, fake_b) = (Node::new(A, "a"), Node::new(B, "b"));
    // B expects another certificate for A, the real A dials: B refuses A's
    // client certificate; A learns it from the TLS alert.
    let (lb, _ib) = start(&b, &fake_a, vec![], cfg(ip(4))).await;
    let (la, _ia) = start(&a, &b, lb.local_addrs.clone(), cfg(ip(3))).await;
    wait("b refuses", 10, || lb.status().refused_connections >= 1).await;
    wait("a reports", 10, || la.status().link.last_error.is_some()).await;
    let (sa, sb) = (la.status(), lb.status());
    assert!(sb.last_refusal.as_deref().unwrap().contains("client certificate does not match"), "{sb:?}");
    let ea = sa.link.last_error.unwrap();
    assert!(ea.contains("closed by the peer in the handshake") && ea.contains("pinned"), "{ea}");
    assert_eq!((sa.link.ups, sb.link.ups), (0, 0));
    la.shutdown().await;
    lb.shutdown().await;

    // A pins the wrong certificate for B: A refuses B's server certificate,
    // B sees the aborted handshake.
    let (lb, _ib) = start(&b, &a, vec![], cfg(ip(6))).await;
    let (la, _ia) = start(&a, &fake_b, lb.local_addrs.clone(), cfg(ip(5))).await;
    wait("a refuses", 10, || la.status().link.last_error.is_some()).await;
    wait("b sees it", 10, || lb.status().refused_connections >= 1).await;
    let ea = la.status().link.last_error.unwrap();
    assert!(ea.contains("server certificate does not match the pinned fingerprint"), "{ea}");
    assert_eq!((la.status().link.ups, lb.status().link.ups), (0, 0));
}

#[tokio::test]
async fn protocol_version_mismatch_is_refused_on_both_sides() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    let (lb, _ib) = start(&b, &a, vec![], cfg(ip(8))).await;
    let mut newer = cfg(ip(7));
    newer.link.protocol_version = PROTOCOL_VERSION + 1;
    let (la, _ia) = start(&a, &b, lb.local_addrs.clone(), newer).await;
    wait("both report", 10, || {
        la.status().link.last_error.is_some() && lb.status().link.last_error.is_some()
    })
    .await;
    let why = format!(
        "protocol version mismatch: the peer speaks {}, this node {PROTOCOL_VERSION}",
        PROTOCOL_VERSION + 1
    );
    assert_eq!(lb.status().link.last_error.as_deref(), Some(why.as_str()));
    let ea = la.status().link.last_error.unwrap();
    assert_eq!(ea, format!("the peer refused the link: {why}"));
    // And it stays so: the dialer retries, each time refused, never up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!((la.status().link.ups, lb.status().link.ups), (0, 0));
    assert_ne!(la.status().link.state, LinkState::Up);
}

#[tokio::test]
async fn garbage_and_oversized_frames_are_refused_without_harm() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    let (lb, _ib) = start(&b, &a, vec![], cfg(ip(10))).await;
    let addr = lb.local_addrs[0];
    // Not TLS at all.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap();
    wait("plaintext refused", 5, || lb.status().refused_connections == 1).await;
    assert!(lb.status().last_refusal.unwrap().contains("TLS"), "{:?}", lb.status());
    // The pinned peer's certificate, then bad frames: each closes its
    // connection, the listener lives on.
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: A,
        name: "a".into(),
        channel: Channel::Control,
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (u32::MAX.to_be_bytes().to_vec(), "over the limit"),
        (((4 << 20) + 1u32).to_be_bytes().to_vec(), "over the limit"),
        ([&5u32.to_be_bytes()[..], &[WIRE_VERSION, 0xFF, 0xFF, 0xFF, 0xFF]].concat(), "malformed"),
        ([&3u32.to_be_bytes()[..], &[9, 3, 1]].concat(), "wire version 9"),
        ([&0u32.to_be_bytes()[..]].concat(), "empty frame"),
    ];
    for (i, (bytes, why)) in cases.into_iter().enumerate() {
        let mut s = raw_client(&a, &b, addr).await;
        if i % 2 == 1 {
            // After a good handshake too.
            s.write_all(&hello.encode()).await.unwrap();
            assert!(matches!(read_message(&mut s).await, Some(Message::HelloOk { .. })));
            wait("up", 5, || up(&lb)).await;
        }
        s.write_all(&bytes).await.unwrap();
        // The node closes the connection (the heartbeat it may have sent
        // first is read past).
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while read_message(&mut s).await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "case {i}: not closed");
        wait("closed", 5, || lb.status().link.last_error.as_deref().is_some_and(|e| e.contains(why))).await;
        // Said as what it is: this node refused the frame.
        let e = lb.status().link.last_error.unwrap();
        assert!(e.starts_with("the peer sent a bad frame: "), "case {i}: {e}");
        assert_ne!(lb.status().link.state, LinkState::Up, "case {i}");
    }
    // The real peer still gets in.
    let (la, _ia) = start(&a, &b, lb.local_addrs.clone(), cfg(ip(9))).await;
    wait("both up", 10, || up(&la) && up(&lb)).await;
}

#[tokio::test]
async fn reconnects_after_the_listener_restarts_and_uses_the_second_address() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    let (lb, _ib) = start(&b, &a, vec![], cfg(ip(12))).await;
    let real = lb.local_addrs[0];
    // The first address has nothing listening: the second carries the link.
    let dead = SocketAddr::new(ip(13).ip(), real.port());
    let (la, _ia) = start(&a, &b, vec![dead, real], cfg(ip(11))).await;
    wait("both up", 10, || up(&la) && up(&lb)).await;
    assert_eq!(la.status().link.address, Some(real));
    // The listener goes away and comes back on the same address.
    lb.shutdown().await;
    wait("a down", 5, || !up(&la)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (lb, _ib) = start(&b, &a, vec![], cfg(real)).await;
    wait("up again", 10, || up(&la) && up(&lb)).await;
    let st = la.status();
    assert_eq!((st.link.ups, st.link.downs, st.link.address), (2, 1, Some(real)));
}

#[tokio::test]
async fn a_peer_that_stops_reading_never_makes_the_sender_buffer() {
    let (a, b) = (Node::new(A, "a"), Node::new(B, "b"));
    // B is a raw listener that answers the handshake, then sends heartbeats
    // but never reads again.
    let server = novacron::tls::mutual_server_config(
        &a.fp,
        vec![b.cert.clone()],
        PrivateKeyDer::try_from(b.key.clone()).unwrap(),
        ALPN,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind(ip(14)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.unwrap();
        assert!(matches!(read_message(&mut s).await, Some(Message::Hello { .. })));
        let ok = Message::HelloOk { protocol_version: PROTOCOL_VERSION, node_id: B, name: "b".into() };
        s.write_all(&ok.encode()).await.unwrap();
        for seq in 0.. {
            if s.write_all(&Message::Heartbeat { seq, sent_at: 0 }.encode()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let (la, _ia) = start(&a, &b, vec![addr], cfg(ip(15))).await;
    wait("up", 10, || up(&la)).await;
    let data = la.data().borrow().clone().unwrap();
    let batch = Message::Changes { origin: A, seq: 1, entries: vec![(1, vec![0x5A; 250 << 10])] };
    // The sender is held back after what the queues and socket buffers take
    // (a few MiB), not after everything it was asked to send.
    let mut sent = 0;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_secs(2), data.send(&batch)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(ClusterError::LinkDown)) => break "link down",
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break "waiting",
        }
        assert!(sent < 200, "sent {sent} batches of 250 KiB to a peer that reads nothing");
    };
    assert!(sent >= 4, "{sent}");
    eprintln!("sender held back after {sent} batches of 250 KiB ({blocked})");
    // Heartbeats and acks pile up behind the stuck socket: the link gives
    // the connection up instead of queueing them forever.
    wait("down", 20, || !up(&la)).await;
    let err = la.status().link.last_error.unwrap();
    assert!(err.contains("does not read") || err.contains("nothing heard"), "{blocked}: {err}");
    stalled.abort();
}
