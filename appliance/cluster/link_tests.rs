//! The link stepped by hand with a fake clock, then two links simulated over
//! a faulty in-memory network for many seeds.

use super::*;
use crate::cluster::frame::PROTOCOL_VERSION;
use std::collections::{BTreeMap, BinaryHeap};

const A: Uuid = Uuid::from_u128(1); // the smaller id: dials
const B: Uuid = Uuid::from_u128(2);

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 209, 3, n], 8444))
}

fn target(node_id: Uuid, addresses: Vec<SocketAddr>) -> PeerTarget {
    PeerTarget { node_id, addresses, fingerprint: "AA".into() }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A pair without the bulk connection: the control link's own tests.
fn pair(now: Instant) -> (Link, Link) {
    pair_with(LinkConfig { bulk: false, ..LinkConfig::default() }, now)
}

fn pair_with(cfg: LinkConfig, now: Instant) -> (Link, Link) {
    let a = Link::new(cfg.clone(), A, "a", target(B, vec![addr(2), addr(12)]), 7, now);
    let b = Link::new(cfg, B, "b", target(A, vec![addr(1)]), 8, now);
    (a, b)
}

fn hello_of(node_id: Uuid, channel: Channel) -> Message {
    Message::Hello { protocol_version: PROTOCOL_VERSION, node_id, name: "x".into(), channel }
}

fn sends(out: &[Output]) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { msg, .. } => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

/// Hands every `Send` in `out` to `to` as frames on `conn`; returns what `to` answered.
fn deliver(to: &mut Link, now: Instant, conn: ConnId, out: &[Output]) -> Vec<Output> {
    sends(out).into_iter().flat_map(|msg| to.handle(now, Input::Frame { conn, msg })).collect()
}

/// Brings a fresh pair up on connection 1 at `t0`; returns the dialer's
/// outputs of the last step.
fn bring_up(a: &mut Link, b: &mut Link, t0: Instant) -> Vec<Output> {
    let out = a.handle(t0, Input::Tick);
    assert_eq!(out, vec![Output::Connect { conn: 1, addr: addr(2) }]);
    assert_eq!(a.state(), LinkState::Connecting);
    assert!(b.handle(t0, Input::Accepted { conn: 1 }).is_empty());
    let hello = a.handle(t0, Input::Connected { conn: 1 });
    assert_eq!(a.state(), LinkState::Handshaking);
    let answer = deliver(b, t0, 1, &hello);
    assert!(answer
        .iter()
        .any(|o| matches!(o, Output::Up { conn: 1, addr: None, peer_name } if peer_name == "a")));
    assert_eq!(b.state(), LinkState::Up);
    let out = deliver(a, t0, 1, &answer);
    assert!(out.iter().any(|o| matches!(o, Output::Up { conn: 1, addr: Some(x), .. } if *x == addr(2))));
    assert_eq!(a.state(), LinkState::Up);
    out
}

#[test]
fn roles_follow_node_ids() {
    assert_eq!(Role::of(A, B), Role::Dialer);
    assert_eq!(Role::of(B, A), Role::Acceptor);
    let now = Instant::now();
    let (a, b) = pair(now);
    assert_eq!(a.next_timeout(), Some(now), "a dialer starts at once");
    assert_eq!(b.next_timeout(), None, "an acceptor waits");
}

#[test]
fn handshake_heartbeats_and_rtt() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    bring_up(&mut a, &mut b, t0);
    assert_eq!(a.status(t0).address, Some(addr(2)));
    // Heartbeats every 500 ms, acked; the RTT is what the clock says.
    let mut now = t0;
    for round in 0..6 {
        now += ms(500);
        assert_eq!(a.next_timeout(), Some(now), "round {round}");
        let hb = a.handle(now, Input::Tick);
        assert!(matches!(sends(&hb)[..], [Message::Heartbeat { .. }]), "{hb:?}");
        let ack = deliver(&mut b, now + ms(20), 1, &hb);
        assert!(matches!(sends(&ack)[..], [Message::HeartbeatAck { .. }]));
        assert!(deliver(&mut a, now + ms(40), 1, &ack).is_empty());
        let _ = deliver(&mut a, now + ms(40), 1, &b.handle(now, Input::Tick));
    }
    let st = a.status(now + ms(40));
    // The first heartbeat (at t0, answered in no time) pulls the average
    // below 40 ms; six 40 ms rounds bring it close.
    let rtt = st.rtt_ms.unwrap();
    assert!((30.0..=40.0).contains(&rtt), "{rtt}");
    assert_eq!(st.last_heartbeat_age_ms, Some(0));
    assert_eq!((st.ups, st.downs, st.state), (1, 0, LinkState::Up));
}

#[test]
fn down_after_missed_heartbeats_then_the_redundant_path_at_once_then_backoff() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    bring_up(&mut a, &mut b, t0);
    // Nothing arrives from b any more: 4 intervals later, and not before,
    // the link is down.
    let mut now = t0;
    while a.state() == LinkState::Up {
        now = a.next_timeout().unwrap();
        let out = a.handle(now, Input::Tick);
        if a.state() != LinkState::Up {
            assert!(out.contains(&Output::Close {
                conn: 1,
                reason: "nothing heard from the peer for 2000 ms".into()
            }));
            assert!(out.iter().any(|o| matches!(o, Output::Down { .. })));
            // The path died: the redundant address is dialed in the same
            // step, without a backoff.
            assert_eq!(out.last(), Some(&Output::Connect { conn: 2, addr: addr(12) }));
        }
    }
    assert_eq!(now - t0, ms(2000));
    assert_eq!(a.state(), LinkState::Connecting);
    let st = a.status(now);
    assert_eq!((st.downs, st.last_error.as_deref()), (1, Some("nothing heard from the peer for 2000 ms")));
    // That fails too: every address was tried, so back off.
    assert!(a.handle(now, Input::ConnectFailed { conn: 2, error: "unreachable".into() }).is_empty());
    assert_eq!(a.state(), LinkState::Backoff);
    // First retry within the first backoff step (125-250 ms), to the
    // address that worked.
    let retry = a.next_timeout().unwrap();
    assert!((ms(125)..=ms(250)).contains(&(retry - now)), "{:?}", retry - now);
    assert_eq!(a.handle(retry, Input::Tick), vec![Output::Connect { conn: 3, addr: addr(2) }]);
    // The acceptor saw the same silence.
    let mut bnow = t0;
    while b.state() == LinkState::Up {
        bnow = b.next_timeout().unwrap();
        b.handle(bnow, Input::Tick);
    }
    assert_eq!((bnow - t0, b.state()), (ms(2000), LinkState::Idle));
}

#[test]
fn redundant_address_then_exponential_jittered_backoff() {
    let t0 = Instant::now();
    let (mut a, _) = pair(t0);
    assert_eq!(a.handle(t0, Input::Tick), vec![Output::Connect { conn: 1, addr: addr(2) }]);
    // The first address fails: the second is tried at once.
    let out = a.handle(t0, Input::ConnectFailed { conn: 1, error: "network unreachable".into() });
    assert_eq!(out, vec![Output::Connect { conn: 2, addr: addr(12) }]);
    // It times out: the round is over, back off.
    let deadline = a.next_timeout().unwrap();
    assert_eq!(deadline - t0, ms(3000));
    let out = a.handle(deadline, Input::Tick);
    assert!(matches!(&out[..], [Output::Close { conn: 2, .. }]), "{out:?}");
    assert_eq!(a.state(), LinkState::Backoff);
    assert!(a.status(deadline).last_error.unwrap().contains("10.209.3.12:8444: no connection within"));
    // Each failed round doubles the delay (equal jitter: between half and
    // all of it) up to the 10 s cap.
    let mut now = deadline;
    let mut delays = Vec::new();
    for _ in 0..9 {
        let until = a.next_timeout().unwrap();
        delays.push((until - now).as_millis() as u64);
        now = until;
        let out = a.handle(now, Input::Tick);
        let [Output::Connect { conn, .. }] = out[..] else { panic!("{out:?}") };
        let out = a.handle(now, Input::ConnectFailed { conn, error: "refused".into() });
        let [Output::Connect { conn, .. }] = out[..] else { panic!("{out:?}") };
        assert!(a.handle(now, Input::ConnectFailed { conn, error: "refused".into() }).is_empty());
    }
    for (i, d) in delays.iter().enumerate() {
        let full = (250u64 << i).min(10_000);
        assert!((full / 2..=full).contains(d), "round {i}: {d} ms not in {}..={full}", full / 2);
    }
    // The jitter is the seed's: the same seed gives the same schedule,
    // another seed another one.
    let schedule = |seed| {
        let mut l = Link::new(LinkConfig::default(), A, "a", target(B, vec![addr(2)]), seed, t0);
        let mut now = t0;
        (0..6)
            .map(|_| {
                now = l.next_timeout().unwrap();
                let [Output::Connect { conn, .. }] = l.handle(now, Input::Tick)[..] else { panic!() };
                l.handle(now, Input::ConnectFailed { conn, error: "x".into() });
                l.next_timeout().unwrap() - now
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(schedule(1), schedule(1));
    assert_ne!(schedule(1), schedule(2));
}

#[test]
fn the_address_that_worked_is_tried_first() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    a.handle(t0, Input::Tick);
    assert_eq!(
        a.handle(t0, Input::ConnectFailed { conn: 1, error: "down".into() }),
        vec![Output::Connect { conn: 2, addr: addr(12) }]
    );
    b.handle(t0, Input::Accepted { conn: 2 });
    let hello = a.handle(t0, Input::Connected { conn: 2 });
    let ok = deliver(&mut b, t0, 2, &hello);
    deliver(&mut a, t0, 2, &ok);
    assert_eq!((a.state(), a.status(t0).address), (LinkState::Up, Some(addr(12))));
    let out = a.handle(t0 + ms(10), Input::Closed { conn: 2, error: "reset".into() });
    assert!(out.contains(&Output::Down { reason: "connection lost: reset".into() }));
    // The peer answered (it reset the connection): the path works, so no
    // failover; a backoff, then the address that worked.
    assert!(!out.iter().any(|o| matches!(o, Output::Connect { .. })), "{out:?}");
    let retry = a.next_timeout().unwrap();
    assert_eq!(a.handle(retry, Input::Tick), vec![Output::Connect { conn: 3, addr: addr(12) }]);
}

#[test]
fn protocol_version_mismatch_is_refused_on_both_sides() {
    let t0 = Instant::now();
    let newer = LinkConfig { protocol_version: PROTOCOL_VERSION + 1, ..LinkConfig::default() };
    let mut a = Link::new(newer, A, "a", target(B, vec![addr(2)]), 1, t0);
    let mut b = Link::new(LinkConfig::default(), B, "b", target(A, vec![addr(1)]), 1, t0);
    a.handle(t0, Input::Tick);
    b.handle(t0, Input::Accepted { conn: 1 });
    let hello = a.handle(t0, Input::Connected { conn: 1 });
    let refused = deliver(&mut b, t0, 1, &hello);
    let (theirs, ours) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION);
    let why = format!("protocol version mismatch: the peer speaks {theirs}, this node {ours}");
    let why = why.as_str();
    assert_eq!(sends(&refused), vec![Message::Refused { reason: why.into() }]);
    assert!(refused.contains(&Output::Close { conn: 1, reason: why.into() }));
    assert!(refused.contains(&Output::Failed { reason: why.into() }));
    assert_eq!((b.state(), b.status(t0).last_error.as_deref()), (LinkState::Idle, Some(why)));
    let out = deliver(&mut a, t0, 1, &refused);
    let theirs = format!("the peer refused the link: {why}");
    assert!(out.contains(&Output::Failed { reason: theirs.clone() }), "{out:?}");
    assert_eq!((a.state(), a.status(t0).last_error), (LinkState::Backoff, Some(theirs)));
    assert_eq!((a.status(t0).ups, b.status(t0).ups), (0, 0));
}

#[test]
fn an_unexpected_node_or_channel_is_refused() {
    let t0 = Instant::now();
    let (_, mut b) = pair(t0);
    b.handle(t0, Input::Accepted { conn: 1 });
    let out = b.handle(t0, Input::Frame { conn: 1, msg: hello_of(Uuid::from_u128(99), Channel::Control) });
    assert!(
        matches!(&sends(&out)[..], [Message::Refused { reason }] if reason.contains("is node 00000000-0000-0000-0000-000000000063"))
    );
    b.handle(t0, Input::Accepted { conn: 2 });
    let out = b.handle(t0, Input::Frame { conn: 2, msg: hello_of(A, Channel::Bulk) });
    assert!(
        matches!(&sends(&out)[..], [Message::Refused { reason }] if reason.contains("no control link")),
        "{out:?}"
    );
    // Data before the handshake is refused too.
    b.handle(t0, Input::Accepted { conn: 3 });
    let out = b.handle(t0, Input::Frame { conn: 3, msg: Message::Ack { origin: A, seq: 1 } });
    assert!(matches!(&sends(&out)[..], [Message::Refused { reason }] if reason.contains("unexpected ack")));
    assert_eq!(b.state(), LinkState::Idle);
}

#[test]
fn data_is_delivered_only_on_the_up_connection() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    bring_up(&mut a, &mut b, t0);
    let ack = Message::Ack { origin: A, seq: 5 };
    assert_eq!(
        b.handle(t0, Input::Frame { conn: 1, msg: ack.clone() }),
        vec![Output::Deliver { msg: ack.clone() }]
    );
    // A stale connection's frames and closes are ignored.
    assert!(b.handle(t0, Input::Frame { conn: 9, msg: ack.clone() }).is_empty());
    assert!(b.handle(t0, Input::Closed { conn: 9, error: "x".into() }).is_empty());
    assert_eq!(b.up_conn(), Some(1));
    // A new connection from the peer replaces the old one once it says
    // hello on the control channel; until then the link is untouched.
    assert!(b.handle(t0, Input::Accepted { conn: 2 }).is_empty());
    assert_eq!(b.up_conn(), Some(1));
    let out = b.handle(t0, Input::Frame { conn: 2, msg: a.hello(Channel::Control) });
    assert!(
        out.contains(&Output::Close { conn: 1, reason: "replaced by a new connection from the peer".into() })
    );
    assert_eq!((b.state(), b.up_conn()), (LinkState::Up, Some(2)));
    // A handshake message on an up link is a protocol error.
    let out = a.handle(t0, Input::Frame { conn: 1, msg: a.hello(Channel::Control) });
    assert!(out.iter().any(|o| matches!(o, Output::Down { .. })));
}

#[test]
fn handshake_timeout_tries_the_next_address() {
    let t0 = Instant::now();
    let (mut a, _) = pair(t0);
    a.handle(t0, Input::Tick);
    a.handle(t0, Input::Connected { conn: 1 });
    let deadline = a.next_timeout().unwrap();
    assert_eq!(deadline - t0, ms(5000));
    let out = a.handle(deadline, Input::Tick);
    assert!(out.contains(&Output::Connect { conn: 2, addr: addr(12) }), "{out:?}");
    assert!(out.iter().any(|o| matches!(o, Output::Failed { .. })));
}

#[test]
fn the_bulk_connection_opens_with_the_link_and_closes_with_it() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair_with(LinkConfig::default(), t0);
    let out = bring_up(&mut a, &mut b, t0);
    // Dialed at once, to the address the link came up on.
    assert!(out.contains(&Output::Connect { conn: 2, addr: addr(2) }), "{out:?}");
    assert_eq!(a.status(t0).bulk, LinkState::Connecting);
    assert!(b.handle(t0, Input::Accepted { conn: 2 }).is_empty());
    let hello = a.handle(t0, Input::Connected { conn: 2 });
    assert!(matches!(&sends(&hello)[..], [Message::Hello { channel: Channel::Bulk, .. }]), "{hello:?}");
    let ok = deliver(&mut b, t0, 2, &hello);
    assert!(ok.contains(&Output::BulkUp { conn: 2 }), "{ok:?}");
    assert_eq!((b.up_conn(), b.bulk_conn()), (Some(1), Some(2)), "the control link is untouched");
    assert_eq!(deliver(&mut a, t0, 2, &ok), vec![Output::BulkUp { conn: 2 }]);
    assert_eq!((a.status(t0).bulk, a.status(t0).bulk_down_ms), (LinkState::Up, None));
    // Each connection's data goes to its own consumer.
    let data = Message::ImageAck { sha256: "ab".into(), offset: 1 };
    assert_eq!(
        b.handle(t0, Input::Frame { conn: 2, msg: data.clone() }),
        vec![Output::DeliverBulk { msg: data.clone() }]
    );
    assert_eq!(
        b.handle(t0, Input::Frame { conn: 1, msg: data.clone() }),
        vec![Output::Deliver { msg: data }]
    );
    // Heartbeats stay on the control connection.
    let hb = a.handle(t0 + ms(500), Input::Tick);
    assert!(matches!(&hb[..], [Output::Send { conn: 1, msg: Message::Heartbeat { .. } }]), "{hb:?}");
    // The bulk connection fails alone: the link stays up, the dialer dials
    // it again within the first backoff step.
    let lost = t0 + ms(600);
    let out = a.handle(lost, Input::Closed { conn: 2, error: "reset".into() });
    assert!(out.contains(&Output::BulkDown { reason: "bulk connection lost: reset".into() }), "{out:?}");
    assert_eq!((a.state(), a.status(lost).bulk), (LinkState::Up, LinkState::Backoff));
    assert_eq!(a.status(lost).bulk_error.as_deref(), Some("bulk connection lost: reset"));
    assert_eq!(a.status(lost + ms(300)).bulk_down_ms, Some(300));
    let out = b.handle(lost, Input::Closed { conn: 2, error: "closed by the peer".into() });
    assert!(out.iter().any(|o| matches!(o, Output::BulkDown { .. })), "{out:?}");
    assert_eq!((b.state(), b.status(lost).bulk), (LinkState::Up, LinkState::Idle));
    let mut now;
    let conn = loop {
        now = a.next_timeout().unwrap();
        let out = a.handle(now, Input::Tick);
        if let Some(Output::Connect { conn, addr: x }) =
            out.iter().find(|o| matches!(o, Output::Connect { .. }))
        {
            assert_eq!(*x, addr(2));
            break *conn;
        }
    };
    assert!(now - lost <= ms(250), "{:?}", now - lost);
    b.handle(now, Input::Accepted { conn });
    let ok = deliver(&mut b, now, conn, &a.handle(now, Input::Connected { conn }));
    deliver(&mut a, now, conn, &ok);
    assert_eq!((a.bulk_conn(), b.bulk_conn()), (Some(conn), Some(conn)));
    // The control link goes: the bulk connection goes with it, no redial.
    let out = a.handle(now, Input::Closed { conn: 1, error: "reset".into() });
    assert!(out.contains(&Output::Close { conn, reason: "the control link is down".into() }), "{out:?}");
    assert!(out.iter().any(|o| matches!(o, Output::BulkDown { .. })));
    assert!(out.iter().any(|o| matches!(o, Output::Down { .. })));
    assert_eq!((a.status(now).bulk, a.bulk_conn()), (LinkState::Idle, None));
    assert_eq!(a.status(now).bulk_down_ms, None, "not counted while the link is down");
    let out = b.handle(now, Input::Closed { conn: 1, error: "reset".into() });
    assert!(out.contains(&Output::Close { conn, reason: "the control link is down".into() }), "{out:?}");
    assert_eq!(b.bulk_conn(), None);
    // While the link is down no bulk connection is dialed.
    let retry = a.next_timeout().unwrap();
    assert_eq!(a.handle(retry, Input::Tick), vec![Output::Connect { conn: conn + 1, addr: addr(2) }]);
}

#[test]
fn a_connection_that_never_says_hello_cannot_take_the_link_down() {
    let t0 = Instant::now();
    let cfg = LinkConfig { bulk: false, handshake_timeout: ms(1000), ..LinkConfig::default() };
    let (mut a, mut b) = pair_with(cfg, t0);
    bring_up(&mut a, &mut b, t0);
    assert!(b.handle(t0, Input::Accepted { conn: 5 }).is_empty());
    assert_eq!(b.up_conn(), Some(1));
    let late = t0 + ms(1000);
    let out = b.handle(late, Input::Tick);
    assert!(out.contains(&Output::Close { conn: 5, reason: "no handshake in time".into() }), "{out:?}");
    assert_eq!(b.up_conn(), Some(1));
    // At most a few wait for their hello: the oldest is dropped.
    for conn in 10..10 + PENDING as u64 + 1 {
        b.handle(late, Input::Accepted { conn });
    }
    assert_eq!(b.pending.len(), PENDING);
    assert!(!b.pending.iter().any(|p| p.0 == 10));
    // A bulk hello from a stranger is refused; the link is untouched.
    let out = b.handle(late, Input::Frame { conn: 11, msg: hello_of(Uuid::from_u128(99), Channel::Bulk) });
    assert!(matches!(&sends(&out)[..], [Message::Refused { .. }]), "{out:?}");
    assert_eq!((b.up_conn(), b.bulk_conn()), (Some(1), None));
    // Counted: the one that timed out and the stranger (a dropped pending
    // connection is not a handshake that failed).
    assert_eq!(b.status(late).handshake_failures, 2);
}

// ---- seeded simulation ----

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum To {
    A,
    B,
}

/// Two links over a simulated network: every frame takes a random delay
/// (in order per connection), the primary path fails at random, and the
/// whole network is cut now and then, silently (frames vanish, nobody is
/// told, as with a pulled cable). Time jumps from event to event.
struct Sim {
    rng: SeededRng,
    now: Instant,
    a: Link,
    b: Link,
    /// (time, order, to, input), popped earliest first.
    queue: BinaryHeap<std::cmp::Reverse<(Instant, u64, To, InputKey)>>,
    inputs: BTreeMap<u64, Input>,
    order: u64,
    cut: bool,
    primary_down: bool,
    /// Last delivery time per (connection, direction): keeps TCP's order.
    fifo: BTreeMap<(ConnId, bool), Instant>,
}

type InputKey = u64;

impl Sim {
    fn new(seed: u64) -> Sim {
        let now = Instant::now();
        let cfg = LinkConfig { backoff_max: Duration::from_secs(4), ..LinkConfig::default() };
        let a = Link::new(cfg.clone(), A, "a", target(B, vec![addr(2), addr(12)]), seed, now);
        let b = Link::new(cfg, B, "b", target(A, vec![addr(1)]), seed ^ 1, now);
        Sim {
            rng: SeededRng::new(seed),
            now,
            a,
            b,
            queue: BinaryHeap::new(),
            inputs: BTreeMap::new(),
            order: 0,
            cut: false,
            primary_down: false,
            fifo: BTreeMap::new(),
        }
    }

    fn at(&mut self, t: Instant, to: To, input: Input) {
        self.order += 1;
        self.inputs.insert(self.order, input);
        self.queue.push(std::cmp::Reverse((t, self.order, to, self.order)));
    }

    fn delay(&mut self) -> Duration {
        ms(1 + self.rng.below(30))
    }

    fn carry(&mut self, from: To, out: Vec<Output>) {
        let to = if from == To::A { To::B } else { To::A };
        for o in out {
            match o {
                Output::Connect { conn, addr: target } => {
                    let d = self.delay();
                    let primary = target == addr(2);
                    if self.cut || (primary && self.primary_down) {
                        // Half the time an error comes back, else silence
                        // until the dialer's timeout.
                        if self.rng.below(2) == 0 {
                            self.at(
                                self.now + d,
                                To::A,
                                Input::ConnectFailed { conn, error: "unreachable".into() },
                            );
                        }
                    } else {
                        self.at(self.now + d, To::B, Input::Accepted { conn });
                        self.at(self.now + d, To::A, Input::Connected { conn });
                    }
                }
                Output::Send { conn, msg } => {
                    if !self.cut {
                        let key = (conn, from == To::A);
                        let d = self.delay();
                        let t = (self.now + d).max(*self.fifo.get(&key).unwrap_or(&self.now));
                        self.fifo.insert(key, t);
                        self.at(t, to.clone(), Input::Frame { conn, msg });
                    }
                }
                Output::Close { conn, .. } => {
                    if !self.cut {
                        let key = (conn, from == To::A);
                        let t = *self.fifo.get(&key).unwrap_or(&self.now) + ms(1);
                        self.at(t, to.clone(), Input::Closed { conn, error: "closed by the peer".into() });
                    }
                }
                Output::Up { .. }
                | Output::Down { .. }
                | Output::Failed { .. }
                | Output::Deliver { .. }
                | Output::BulkUp { .. }
                | Output::BulkDown { .. }
                | Output::DeliverBulk { .. } => {}
            }
        }
    }

    /// Runs until `until`, stepping both links and the network.
    fn run(&mut self, until: Instant) {
        loop {
            let next_event = self.queue.peek().map(|r| r.0 .0);
            let next = [next_event, self.a.next_timeout(), self.b.next_timeout()].into_iter().flatten().min();
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            if next_event == Some(next) {
                let std::cmp::Reverse((_, _, to, key)) = self.queue.pop().unwrap();
                let input = self.inputs.remove(&key).unwrap();
                self.step(to, input);
            } else if self.a.next_timeout() == Some(next) {
                self.step(To::A, Input::Tick);
            } else {
                self.step(To::B, Input::Tick);
            }
        }
    }

    fn step(&mut self, to: To, input: Input) {
        let now = self.now;
        let out = match to {
            To::A => self.a.handle(now, input),
            To::B => self.b.handle(now, input),
        };
        for l in [&self.a, &self.b] {
            assert!(l.bulk_conn().is_none() || l.up_conn().is_some(), "a bulk connection without the link");
        }
        self.carry(to, out);
    }

    fn both_bulk_up(&self) -> bool {
        self.a.bulk_conn().is_some() && self.a.bulk_conn() == self.b.bulk_conn()
    }

    fn both_up(&self) -> bool {
        self.a.up_conn().is_some() && self.a.up_conn() == self.b.up_conn()
    }
}

#[test]
fn seeded_simulation_of_cuts_and_path_failures() {
    let cfg = LinkConfig::default();
    let detect = cfg.heartbeat * cfg.miss_limit + cfg.heartbeat;
    // Reconnect: a 4 s backoff at most, a connect timeout per address, a
    // handshake, frame delays.
    let recover = Duration::from_secs(4) + cfg.connect_timeout * 2 + ms(500);
    for seed in 0..200 {
        let mut sim = Sim::new(seed);
        let mut t = sim.now;
        for phase in 0..8 {
            // Healthy (maybe with the primary path down): the pair comes up.
            sim.primary_down = sim.rng.below(3) == 0;
            t += recover;
            sim.run(t);
            assert!(
                sim.both_up(),
                "seed {seed} phase {phase}: not up after {recover:?} (primary down: {})",
                sim.primary_down
            );
            let st = sim.a.status(sim.now);
            if sim.primary_down {
                assert_eq!(st.address, Some(addr(12)), "seed {seed}: the redundant path carries the link");
            }
            // Up for a while: heartbeats keep it up, RTT is two frame delays.
            t += ms(1000 + sim.rng.below(3000));
            sim.run(t);
            assert!(sim.both_up(), "seed {seed} phase {phase}: went down on a healthy network");
            assert!(sim.both_bulk_up(), "seed {seed} phase {phase}: no bulk connection on a healthy network");
            let rtt = sim.a.status(sim.now).rtt_ms.unwrap();
            assert!((2.0..=62.0).contains(&rtt), "seed {seed}: rtt {rtt}");
            // Cut: both sides notice within the miss limit, neither claims up.
            sim.cut = true;
            t += detect + ms(60);
            sim.run(t);
            assert_ne!(
                sim.a.state(),
                LinkState::Up,
                "seed {seed} phase {phase}: dialer still up after a cut"
            );
            assert_ne!(
                sim.b.state(),
                LinkState::Up,
                "seed {seed} phase {phase}: acceptor still up after a cut"
            );
            assert_eq!((sim.a.bulk_conn(), sim.b.bulk_conn()), (None, None), "seed {seed} phase {phase}");
            t += ms(sim.rng.below(8000));
            sim.run(t);
            sim.cut = false;
        }
        let (sa, sb) = (sim.a.status(sim.now), sim.b.status(sim.now));
        assert_eq!((sa.downs, sb.downs), (8, 8), "seed {seed}: one down per cut");
    }
}

#[test]
fn a_bad_frame_is_reported_as_the_peers_fault_not_as_a_close() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    bring_up(&mut a, &mut b, t0);
    let out = b.handle(t0, Input::BadFrame { conn: 1, error: "malformed frame: x".into() });
    assert!(out.contains(&Output::Down { reason: "the peer sent a bad frame: malformed frame: x".into() }));
    assert_eq!(b.state(), LinkState::Idle);
    // In the handshake: a failed handshake, without the hint about pins.
    b.handle(t0, Input::Accepted { conn: 7 });
    let out = b.handle(t0, Input::BadFrame { conn: 7, error: "frame of wire version 9".into() });
    assert!(
        out.contains(&Output::Failed { reason: "the peer sent a bad frame: frame of wire version 9".into() })
    );
    // Another connection's bad frame is stale.
    assert!(b.handle(t0, Input::BadFrame { conn: 9, error: "x".into() }).is_empty());
}
