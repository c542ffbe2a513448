//! Two-node harness: two real `novacron serve` daemons, each in its own
//! network namespace, joined by two veth links (the primary and the
//! redundant address), with helpers to cut, degrade and restore the links
//! and a third namespace for a witness.
//!
//! ```text
//!   ns A                                   ns B
//!   peer0 10.209.X.1/30  <---- veth ---->  peer0 10.209.X.2/30
//!   peer1 10.209.Y.1/30  <---- veth ---->  peer1 10.209.Y.2/30    (Y = X + 10)
//!   wit0  10.209.X.6/30  <-> ns W <->      wit0  10.209.X.10/30   (add_witness)
//!   third0 10.209.X.13/30 <-> ns C <->     third0 10.209.Y.5/30   (add_third)
//! ```
//!
//! Every address lives inside the namespaces only: nothing is added to the
//! root namespace, so the test's traffic never leaves them. Names and
//! subnets come from the environment, so that several checkouts (and the
//! tests of one binary) run side by side:
//! - `NOVACRON_NETNS_PREFIX` (default `nctest`): namespace names are
//!   `PREFIX-PID-N-a`, `-b`, `-w`.
//! - `NOVACRON_TEST_NET` (default 0): X above, 0..=245.
//!
//! The test process stays in the root namespace. It reaches each daemon
//! through its Unix socket ([`Node::local`], a path, so it works across
//! namespaces) and runs clients inside a namespace with [`Node::exec`] /
//! [`Node::cli_to`] (`ip netns exec`). Dropping the [`Pair`] (also when a
//! test panics) stops the daemons and deletes the namespaces and links.
//!
//! The daemons use the URI in the options they are given: on
//! `test:///default` each has its own fake libvirt; on `qemu:///system`
//! both share the host's libvirtd (each sees the other's domains).

use super::{api_port, Daemon, Opts, Run, BIN};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Interface names inside the namespaces (the same on both sides: a veth
/// is created inside its namespaces, never in the root one).
pub const LINKS: [&str; 2] = ["peer0", "peer1"];
const WITNESS_IF: &str = "wit0";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    std::env::var("NOVACRON_NETNS_PREFIX").unwrap_or_else(|_| "nctest".into())
}

/// X in 10.209.X.0/24 (the primary link and the witness) and X + 10 (the
/// redundant link).
pub fn test_net() -> u8 {
    let x: u8 = std::env::var("NOVACRON_TEST_NET").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(x <= 245, "NOVACRON_TEST_NET must be at most 245");
    x
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    run_ok("ip", args);
}

fn run_ok(prog: &str, args: &[&str]) -> Output {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        assert!(name.len() <= 64, "namespace name too long: {name}");
        // A leftover of a crashed run of this same name.
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", name]);
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A command to run inside the namespace.
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    pub fn exec(&self, prog: &str, args: &[&str]) -> Output {
        self.command(prog).args(args).output().unwrap_or_else(|e| panic!("ip netns exec {prog}: {e}"))
    }

    /// Runs `f` on a thread that has entered this namespace (only that
    /// thread moves): every socket it opens belongs to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// [`Netns::run`] without waiting: for a server (a relay) in the
    /// namespace. Threads it starts are in the namespace too.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    fn exec_ok(&self, prog: &str, args: &[&str]) -> Output {
        let out = self.exec(prog, args);
        assert!(
            out.status.success(),
            "in {}: {prog} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth ends, and so their peers.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Deletes this prefix's namespaces left by test processes that are gone
/// (killed before their `Drop` ran): `PREFIX-PID-...` with no such PID.
fn sweep_stale() {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    let head = format!("{}-", prefix());
    for line in String::from_utf8_lossy(&out).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = name
            .strip_prefix(&head)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// Joins `a` and `b` with a veth pair named `ifname` on both sides, with
/// `a_ip`/`b_ip` as /30 addresses.
fn veth(a: &Netns, b: &Netns, ifname: &str, a_ip: Ipv4Addr, b_ip: Ipv4Addr) {
    a.ip(&["link", "add", ifname, "type", "veth", "peer", "name", ifname, "netns", &b.name]);
    for (ns, addr) in [(a, a_ip), (b, b_ip)] {
        ns.ip(&["addr", "add", &format!("{addr}/30"), "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// One daemon of the pair and its namespace.
pub struct Node {
    pub daemon: Daemon,
    pub ns: Netns,
    /// Its address on each link (`LINKS[i]`).
    pub addrs: [IpAddr; 2],
}

impl Node {
    /// The API's URL on link `link`.
    pub fn url(&self, link: usize) -> String {
        format!("https://{}:{}", self.addrs[link], api_port())
    }

    /// A client on the daemon's Unix socket (root: admin, no token).
    pub fn local(&self) -> novacron::cli::client::Client {
        self.daemon.local()
    }

    /// Runs `prog ARGS` inside this node's namespace.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Output {
        self.ns.exec(prog, args)
    }

    /// Runs the CLI inside this node's namespace against `to`'s HTTPS API
    /// on link `link` (admin token, certificate pinned), giving up after
    /// `timeout` (a dropped packet leaves a TCP connect hanging).
    pub fn cli_to(&self, to: &Node, link: usize, timeout: Duration, args: &[&str]) -> Run {
        let secs = format!("{}", timeout.as_secs_f64());
        let url = to.url(link);
        let mut full = vec![secs.as_str(), BIN, "--url", &url, "--fingerprint", &to.daemon.fingerprint];
        full.extend_from_slice(&["--token", &to.daemon.admin]);
        full.extend_from_slice(args);
        let out = self
            .ns
            .command("timeout")
            .args(full)
            .env_remove("NOVACRON_URL")
            .env_remove("NOVACRON_TOKEN")
            .env_remove("NOVACRON_SOCKET")
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// One HTTPS request from this node's namespace to `to`'s API on link
    /// `link` with `token` (None: anonymous; `to`'s certificate pinned),
    /// through the library's client: for status codes and JSON bodies the
    /// CLI does not show. Blocks (its own thread and runtime inside the
    /// namespace).
    pub fn call_to(
        &self,
        to: &Node,
        link: usize,
        token: Option<&str>,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (hyper::StatusCode, serde_json::Value) {
        let (url, fp, token, path) =
            (to.url(link), to.daemon.fingerprint.clone(), token.map(String::from), path.to_string());
        self.ns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let c = novacron::cli::client::Client::https(&url, token, Some(&fp), None).unwrap();
            rt.block_on(super::call(&c, method, &path, body))
        })
    }

    /// True when `novacron status` from this namespace reaches `to` over
    /// link `link` within 5 s.
    pub fn reaches(&self, to: &Node, link: usize) -> bool {
        self.cli_to(to, link, Duration::from_secs(5), &["status"]).code == 0
    }
}

/// The witness namespace: joined to A and B by its own links.
pub struct Witness {
    pub ns: Netns,
    /// Its address towards A and towards B.
    pub addrs: [IpAddr; 2],
    /// A's and B's addresses on their links to the witness.
    pub node_addrs: [IpAddr; 2],
}

impl Witness {
    /// True when a TCP connection from W to `addr:port` is answered (by
    /// the service or with a refusal) within 3 s: the route works.
    pub fn routes_to(&self, addr: IpAddr, port: u16) -> bool {
        let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
        let out = self.ns.exec("timeout", &["3", "bash", "-c", &script]);
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("refused")
    }
}

/// Two daemons in two namespaces, joined by two veth links.
pub struct Pair {
    // Dropped in this order: daemons first, then the namespaces.
    pub a: Node,
    pub b: Node,
    pub witness: Option<Witness>,
    /// A third daemon ([`Pair::add_third`]).
    pub third: Option<Node>,
}

fn v4(x: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 209, x, host)
}

impl Pair {
    /// Creates the namespaces and links, then starts a daemon in each with
    /// `opts(node)` (node is "a" or "b"); `listen` is filled in with the
    /// node's two addresses.
    pub fn start(tag: &str, mut opts: impl FnMut(&str) -> Opts) -> Pair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            sweep_stale();
        }
        // Slot n gets its own /30s within the /24s, so that packet captures
        // of parallel pairs are told apart (the namespaces isolate them anyway).
        assert!(n < 16, "at most 16 pairs per test process");
        let base = std::format!("{}-{}-{n}", prefix(), std::process::id());
        let (x, y) = (test_net(), test_net() + 10);
        let host = (n * 16) as u8;
        let ns_a = Netns::create(&format!("{base}-a"));
        let ns_b = Netns::create(&format!("{base}-b"));
        veth(&ns_a, &ns_b, LINKS[0], v4(x, host + 1), v4(x, host + 2));
        veth(&ns_a, &ns_b, LINKS[1], v4(y, host + 1), v4(y, host + 2));
        let addrs_a = [IpAddr::V4(v4(x, host + 1)), IpAddr::V4(v4(y, host + 1))];
        let addrs_b = [IpAddr::V4(v4(x, host + 2)), IpAddr::V4(v4(y, host + 2))];
        let start = |node: &str, ns: &Netns, addrs: [IpAddr; 2], o: Opts| {
            let wrapper = ["ip", "netns", "exec", &ns.name].map(String::from).to_vec();
            Daemon::start(&format!("{tag}-{node}"), Opts { wrapper, listen: addrs.to_vec(), ..o })
        };
        let da = start("a", &ns_a, addrs_a, opts("a"));
        let a = Node { daemon: da, ns: ns_a, addrs: addrs_a };
        let db = start("b", &ns_b, addrs_b, opts("b"));
        let b = Node { daemon: db, ns: ns_b, addrs: addrs_b };
        Pair { a, b, witness: None, third: None }
    }

    /// Both daemons on libvirt's test driver.
    pub fn test_driver(tag: &str) -> Pair {
        Pair::start(tag, |_| Opts::test_driver(1))
    }

    fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }

    /// Pulls the cable of link `link`: both ends down.
    pub fn cut(&self, link: usize) {
        for n in self.nodes() {
            n.ns.ip(&["link", "set", LINKS[link], "down"]);
        }
    }

    /// Plugs link `link` back in and waits until the kernel has it up on
    /// both ends (the addresses return with the link).
    pub fn restore(&self, link: usize) {
        for n in self.nodes() {
            n.ns.ip(&["link", "set", LINKS[link], "up"]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in self.nodes() {
            while !String::from_utf8_lossy(&n.exec("ip", &["-br", "link", "show", LINKS[link]]).stdout)
                .contains(" UP ")
            {
                assert!(Instant::now() < deadline, "{} did not come back up in {}", LINKS[link], n.ns.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Drops each packet arriving at `node` over link `link` with
    /// probability `p` (0.0..=1.0): `iptables -m statistic` inside the
    /// namespace (this kernel has no netem). [`Pair::clear_loss`] removes it.
    pub fn loss(&self, node: &Node, link: usize, p: f64) {
        assert!((0.0..=1.0).contains(&p));
        let p = format!("{p}");
        node.ns.exec_ok(
            "iptables",
            &[
                "-A",
                "INPUT",
                "-i",
                LINKS[link],
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        );
    }

    /// Removes every loss rule of `node`.
    pub fn clear_loss(&self, node: &Node) {
        node.ns.exec_ok("iptables", &["-F", "INPUT"]);
    }

    /// Limits what `node` sends over link `link` to `rate` (tc's units, e.g.
    /// `1mbit`), with packets queued up to `latency` (e.g. `200ms`) before
    /// they are dropped: a token bucket (`tc qdisc ... tbf`), so queueing
    /// delay grows with the load. [`Pair::clear_shape`] removes it.
    pub fn shape(&self, node: &Node, link: usize, rate: &str, latency: &str) {
        node.ns.exec_ok(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                LINKS[link],
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "16kb",
                "latency",
                latency,
            ],
        );
    }

    pub fn clear_shape(&self, node: &Node, link: usize) {
        node.ns.exec_ok("tc", &["qdisc", "del", "dev", LINKS[link], "root"]);
    }

    /// Creates the witness namespace W, joined to A and to B by a link
    /// each (`wit0` on A and B; `to-a`, `to-b` in W). Runs nothing in it:
    /// start a witness with `pair.witness.as_ref().unwrap().ns.command(..)`.
    pub fn add_witness(&mut self) -> &Witness {
        let name = self.a.ns.name.trim_end_matches("-a").to_string() + "-w";
        let w = Netns::create(&name);
        let x = test_net();
        let host = self.slot_base();
        // 10.209.X.(host+4)/30 towards A, (host+8)/30 towards B.
        for (node, ifname, first) in [(&self.a, "to-a", host + 4), (&self.b, "to-b", host + 8)] {
            w.ip(&[
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                WITNESS_IF,
                "netns",
                &node.ns.name,
            ]);
            w.ip(&["addr", "add", &format!("{}/30", v4(x, first + 1)), "dev", ifname]);
            w.ip(&["link", "set", ifname, "up"]);
            node.ns.ip(&["addr", "add", &format!("{}/30", v4(x, first + 2)), "dev", WITNESS_IF]);
            node.ns.ip(&["link", "set", WITNESS_IF, "up"]);
        }
        let addrs = [IpAddr::V4(v4(x, host + 5)), IpAddr::V4(v4(x, host + 9))];
        let node_addrs = [IpAddr::V4(v4(x, host + 6)), IpAddr::V4(v4(x, host + 10))];
        self.witness = Some(Witness { ns: w, addrs, node_addrs });
        self.witness.as_ref().unwrap()
    }

    /// The first address of this pair's slot (host part; see `start`).
    fn slot_base(&self) -> u8 {
        let IpAddr::V4(a) = self.a.addrs[0] else { unreachable!("the harness uses IPv4") };
        a.octets()[3] - 1
    }

    /// Starts a third daemon (`TAG`, in namespace `...-c`) joined to A by
    /// a link on 10.209.X.(host+12)/30 and to B on 10.209.Y.(host+4)/30
    /// (`third0` on A and B, `to-a`/`to-b` in C), with routes to both
    /// nodes' addresses on the pair's links: a node that is not the peer
    /// (a code replayed from elsewhere). It listens on its two addresses;
    /// A and B have no route to the pair's links through it.
    pub fn add_third(&mut self, tag: &str, opts: Opts) -> &Node {
        let name = self.a.ns.name.trim_end_matches("-a").to_string() + "-c";
        let ns = Netns::create(&name);
        let host = self.slot_base();
        let (x, y) = (test_net(), test_net() + 10);
        let (to_a, at_a) = (v4(x, host + 14), v4(x, host + 13));
        let (to_b, at_b) = (v4(y, host + 6), v4(y, host + 5));
        for (node, ifname, mine, theirs) in [(&self.a, "to-a", to_a, at_a), (&self.b, "to-b", to_b, at_b)] {
            ns.ip(&["link", "add", ifname, "type", "veth", "peer", "name", "third0", "netns", &node.ns.name]);
            ns.ip(&["addr", "add", &format!("{mine}/30"), "dev", ifname]);
            ns.ip(&["link", "set", ifname, "up"]);
            node.ns.ip(&["addr", "add", &format!("{theirs}/30"), "dev", "third0"]);
            node.ns.ip(&["link", "set", "third0", "up"]);
            for addr in node.addrs {
                ns.ip(&["route", "add", &format!("{addr}/32"), "via", &theirs.to_string()]);
            }
        }
        let addrs = [IpAddr::V4(to_a), IpAddr::V4(to_b)];
        let wrapper = ["ip", "netns", "exec", &ns.name].map(String::from).to_vec();
        let daemon = Daemon::start(tag, Opts { wrapper, listen: addrs.to_vec(), ..opts });
        self.third = Some(Node { daemon, ns, addrs });
        self.third.as_ref().unwrap()
    }
}
