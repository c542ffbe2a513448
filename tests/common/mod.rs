//! Test driver: starts the real `novacron` binary (execve) with its own
//! data dir and loopback address, and talks to it over HTTPS or the socket.
//! `pair.rs`: two daemons in network namespaces joined by veth links;
//! `disk.rs`: helpers of the replicated-disk tests.

#![allow(dead_code)]

pub mod disk;
pub mod pair;

use hyper::{Method, StatusCode};
use novacron::cli::client::Client;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_novacron");

pub struct Opts {
    /// Last octet of 127.0.0.X: each test gets its own address.
    pub ip_octet: u8,
    pub uri: String,
    pub rate_limit: u32,
    /// `api.auth_failure_burst`; 0 (off) unless a test is about it, as the
    /// role tests make many failed authentications from one address.
    pub auth_failure_burst: u32,
    pub max_connections: usize,
    pub header_timeout_secs: u64,
    /// More `[api]` lines, e.g. `idle_timeout_secs = 4`.
    pub extra_api: String,
    pub data_dir: Option<PathBuf>,
    /// A command the daemon is started through, e.g. `setpriv ...` to run it
    /// as another user; empty: started directly.
    pub wrapper: Vec<String>,
    /// Addresses to listen on (port: [`api_port`]) instead of 127.0.0.X,
    /// e.g. a network namespace's (see `pair.rs`).
    pub listen: Vec<std::net::IpAddr>,
    /// Appended to the config file: more sections, e.g. `[cluster]`.
    pub extra: String,
}

impl Opts {
    /// The system libvirt (qemu:///system): real TCG guests.
    pub fn qemu(ip_octet: u8) -> Opts {
        Opts { uri: "qemu:///system".into(), ..Opts::test_driver(ip_octet) }
    }

    pub fn test_driver(ip_octet: u8) -> Opts {
        Opts {
            ip_octet,
            uri: "test:///default".into(),
            rate_limit: 0,
            auth_failure_burst: 0,
            max_connections: 256,
            header_timeout_secs: 10,
            extra_api: String::new(),
            data_dir: None,
            wrapper: Vec::new(),
            listen: Vec::new(),
            extra: String::new(),
        }
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub url: String,
    pub admin: String,
    pub fingerprint: String,
    pub socket: PathBuf,
    wrapper: Vec<String>,
}

/// The daemons' API port. NOVACRON_TEST_PORT moves it, so that two checkouts
/// can run their suites side by side on one machine.
pub fn api_port() -> u16 {
    std::env::var("NOVACRON_TEST_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(18443)
}

/// The daemons' peer-link port: the one after the API's, on the same
/// addresses (so it moves with NOVACRON_TEST_PORT).
pub fn link_port() -> u16 {
    api_port() + 1
}

pub fn scratch_dir(tag: &str) -> PathBuf {
    // Under /var/tmp rather than /tmp: QEMU (as libvirt-qemu) must reach the
    // disks, and some CI hosts mount /tmp privately.
    let base =
        std::env::var_os("NOVACRON_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let dir = base.join(format!("novacron-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

impl Daemon {
    pub fn start(tag: &str, opts: Opts) -> Daemon {
        let dir = opts.data_dir.clone().unwrap_or_else(|| scratch_dir(tag));
        let data = dir.join("data");
        let socket = data.join("novacron.sock");
        let addrs: Vec<String> = if opts.listen.is_empty() {
            vec![format!("127.0.0.{}:{}", opts.ip_octet, api_port())]
        } else {
            opts.listen.iter().map(|ip| std::net::SocketAddr::new(*ip, api_port()).to_string()).collect()
        };
        let addr = addrs[0].clone();
        let listen = addrs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
        // The link listens where the API does (never on the default
        // 0.0.0.0:8444, which every daemon on this host would share).
        let mut more = opts.extra.clone();
        if !more.contains("[cluster]") {
            let links: Vec<String> = addrs
                .iter()
                .map(|a| a.parse::<std::net::SocketAddr>().unwrap().ip())
                .map(|ip| format!("\"{}\"", std::net::SocketAddr::new(ip, link_port())))
                .collect();
            more.push_str(&format!("[cluster]\nlisten = [{}]\n", links.join(", ")));
        }
        let config = dir.join("novacron.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n[api]\nlisten = [{listen}]\nsocket = {socket:?}\nrate_limit_per_sec = {rl}\nrate_limit_burst = {rl}\nauth_failure_burst = {afb}\n\
                 max_connections = {mc}\nheader_timeout_secs = {ht}\n{extra}\
                 [hypervisor]\nuri = {uri:?}\ndomain_type = \"qemu\"\nmemory_reserve_mib = 256\n[images]\nimport_dirs = [{import:?}]\n[log]\nlevel = \"info,novacron=debug\"\ntarget = \"stderr\"\n{more}",
                import = dir.join("import"),
                rl = opts.rate_limit,
                afb = opts.auth_failure_burst,
                mc = opts.max_connections,
                ht = opts.header_timeout_secs,
                extra = opts.extra_api,
                uri = opts.uri,
                more = more,
            ),
        )
        .unwrap();
        let mut d = Daemon {
            child: None,
            dir,
            config,
            url: format!("https://{addr}"),
            admin: String::new(),
            fingerprint: String::new(),
            socket,
            wrapper: opts.wrapper,
        };
        d.spawn(true);
        d
    }

    fn spawn(&mut self, first: bool) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("daemon.log")).unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("NOVACRON_PRINT_TOKEN", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start novacron");
        let stdout = child.stdout.take().unwrap();
        self.child = Some(child);
        if first {
            // The first start prints the fingerprint and a one-time admin token.
            let mut lines = BufReader::new(stdout).lines();
            while self.admin.is_empty() {
                let line = lines.next().expect("daemon exited before printing its token").unwrap();
                if let Some(fp) = line.trim().strip_prefix("fingerprint:") {
                    self.fingerprint = fp.trim().to_string();
                }
                if let Some(t) = line.trim().strip_prefix("admin token:") {
                    self.admin = t.trim().to_string();
                }
            }
            std::thread::spawn(move || for _ in lines {});
        }
        self.wait_ready();
    }

    /// Waits until `/v1/ready` answers 200 over the socket.
    pub fn wait_ready(&self) {
        // Own thread and runtime, so this works from sync and async tests.
        let socket = self.socket.clone();
        let ready = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let c = Client::socket(&socket);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok((StatusCode::OK, _)) = rt.block_on(c.request(Method::GET, "/v1/ready", None)) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
        .join()
        .unwrap();
        assert!(ready, "daemon not ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (what `systemctl stop` sends); the exit status if the daemon
    /// exits within `timeout`, else None (it is then left running).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn(false);
    }

    /// A daemon in a network namespace (pair.rs) listens on addresses
    /// that exist only there: from the root namespace a connection to them
    /// would go out of the machine instead.
    fn not_in_netns(&self) {
        if let ["ip", "netns", "exec", ns, ..] =
            self.wrapper.iter().map(String::as_str).collect::<Vec<_>>()[..]
        {
            panic!(
                "{} is inside network namespace {ns}: use pair.rs's Node::call_to / cli_to, or local()",
                self.url
            );
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn https(&self, token: Option<&str>) -> Client {
        self.not_in_netns();
        Client::https(&self.url, token.map(String::from), Some(&self.fingerprint), None).unwrap()
    }

    pub fn admin(&self) -> Client {
        self.https(Some(&self.admin.clone()))
    }

    pub fn local(&self) -> Client {
        Client::socket(&self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // A data plane the daemon started outlives it by design: stop it.
        kill_dataplane(&self.data());
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {} for inspection", self.dir.display());
        }
    }
}

/// Sends a request and parses the JSON answer (Null for an empty body).
pub async fn call(c: &Client, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, bytes) = c
        .request(method, path, body.map(|b| serde_json::to_vec(&b).unwrap()))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, v)
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket over HTTPS (the console) with `token`.
pub async fn websocket(
    d: &Daemon,
    path: &str,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    d.not_in_netns();
    let tls = novacron::cli::client::pinned_tls_config(&d.fingerprint, &[b"http/1.1"]).unwrap();
    let addr = d.url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let req = hyper::Request::builder()
        .uri(format!("wss://{addr}{path}"))
        .header("Host", &addr)
        .header("Authorization", format!("Bearer {token}"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    tokio_tungstenite::client_async(req, stream).await.map(|(ws, _)| ws)
}

pub fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

pub fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stops the data plane serving `data_dir` (started by its daemon, which
/// never stops it); returns whether one was running.
pub fn kill_dataplane(data_dir: &Path) -> bool {
    let pattern = format!("dataplane --config {}", data_dir.join("dataplane.json").display());
    Command::new("pkill").args(["-9", "-f", "--"]).arg(&pattern).status().is_ok_and(|s| s.success())
}

/// Removes the named domains (and their snapshots' metadata) from the
/// system libvirt even when an assertion fails.
pub struct DomainGuard(pub Vec<String>);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        for name in &self.0 {
            virsh(&["destroy", name]);
            virsh(&["undefine", name, "--snapshots-metadata"]);
        }
    }
}

pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh").arg("-c").arg("qemu:///system").args(args).output().expect("virsh");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Builds (or reuses) the tiny guest and copies it into `boot_dir`.
pub fn install_guest(boot_dir: &Path) -> (PathBuf, PathBuf) {
    let out = PathBuf::from(
        std::env::var("NOVACRON_GUEST_DIR").unwrap_or_else(|_| "/var/tmp/novacron-guest".into()),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    let st = Command::new("bash").arg(&script).arg(&out).status().expect("build guest");
    assert!(st.success(), "building the test guest failed");
    std::fs::create_dir_all(boot_dir).unwrap();
    let k = boot_dir.join("vmlinuz");
    let i = boot_dir.join("initramfs.gz");
    std::fs::copy(out.join("vmlinuz"), &k).unwrap();
    std::fs::copy(out.join("initramfs.gz"), &i).unwrap();
    (k, i)
}

pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs}s waiting for {what}");
}

/// Waits until libvirt has seen the end of domain `name`'s QEMU (killed by
/// a test). The two test "hosts" share one libvirtd: until it reaps the
/// process it still calls the domain running, which the survivor's daemon
/// would take for its own start (a real peer's libvirtd never knew it).
pub fn wait_domain_gone(name: &str) {
    wait_for(&format!("libvirt to see {name}'s QEMU gone"), 30, || {
        let out = Command::new("virsh").args(["-c", "qemu:///system", "domstate", name]).output().unwrap();
        let state = String::from_utf8_lossy(&out.stdout);
        !out.status.success() || !matches!(state.trim(), "running" | "paused" | "in shutdown")
    });
}

/// A self-signed P-256 certificate for `cn`, valid `days`, written by
/// openssl to `cert` and `key`.
pub fn self_signed_cert(cert: &Path, key: &Path, cn: &str, days: u32) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days"])
        .arg(days.to_string())
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
}

fn libvirtd_running() -> bool {
    Command::new("pgrep").args(["-x", "libvirtd"]).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// libvirtd stopped by a test: started again when this goes, also when the
/// test fails before it restarts it (the next tests need it).
pub struct LibvirtdDown(());

impl Drop for LibvirtdDown {
    fn drop(&mut self) {
        if !libvirtd_running() {
            let _ = Command::new("libvirtd").arg("-d").status();
            wait_libvirtd_answers();
        }
    }
}

/// Stops the system libvirtd and waits until it is gone.
pub fn stop_libvirtd() -> LibvirtdDown {
    let down = LibvirtdDown(());
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    wait_for("libvirtd to exit", 60, || !libvirtd_running());
    down
}

fn wait_libvirtd_answers() {
    wait_for("libvirtd to answer", 30, || {
        Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
}

/// Starts libvirtd again (as tests/setup-host.sh does) and waits until it
/// answers.
pub fn start_libvirtd(down: LibvirtdDown) {
    assert!(Command::new("libvirtd").arg("-d").status().unwrap().success(), "libvirtd -d failed");
    wait_libvirtd_answers();
    drop(down);
}

/// What a CLI run printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The CLI against `d`'s local socket, as root on the host would run it.
pub fn cli_command(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--socket").arg(&d.socket).args(args).env_remove("NOVACRON_URL").env_remove("NOVACRON_TOKEN");
    c
}

/// Runs the CLI against `d`'s local socket, as root on the host would.
pub fn cli(d: &Daemon, args: &[&str]) -> Run {
    let out = cli_command(d, args).output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What `GET /v1/events` sends over `d`'s socket in two seconds, resuming
/// after `after` (0: everything the daemon holds).
pub fn read_events(d: &Daemon, after: u64) -> String {
    let out = Command::new("curl")
        .args(["-s", "-N", "--max-time", "2", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", &format!("Last-Event-ID: {after}"), "http://localhost/v1/events"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
