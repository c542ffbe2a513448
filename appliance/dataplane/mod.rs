//! The data-plane process (`novacron dataplane --config FILE`, unit
//! novacron-dataplane.service): serves the node's disks to QEMU over
//! vhost-user-blk so that guest I/O does not depend on the API daemon, which
//! may restart at any time. One process per node, one export (socket and
//! serving thread) per primary disk; `meta` keeps each replicated disk's
//! durable metadata, `replica` applies the peer's disk frames to a
//! secondary's copy.
//!
//! The API daemon writes the config (`DataplaneConfig::write_atomic`) and
//! asks for `reload` on the control socket: newline-delimited JSON,
//! `{"op":"reload"}` / `{"op":"status"}`, answered with `{"ok":true,...}` or
//! `{"error":{"code","message"}}` (types in `config`, client in `request`).
//! Reload compares exports by their whole entry: unchanged ones keep
//! serving (the guest does not notice), removed ones stop and lose their
//! socket, new or changed ones (re)start.

pub mod config;
pub mod device;
mod links;
pub mod meta;
pub mod peer;
pub mod replica;
mod replica_side;
mod replicate;
pub mod vhost;

pub use config::{
    ControlError, ControlOp, ControlRequest, ControlResponse, DataplaneConfig, DataplaneStatus, DiskExport,
    DiskRole, DiskStatus, ReloadSummary, ReplicationMode,
};
pub use device::{BlockDevice, LocalFile};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};
use uuid::Uuid;
use vhost::{Disk, Export, ExportStats, SocketOwner};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot read {0}: {1}")]
    ReadConfig(PathBuf, std::io::Error),
    #[error("invalid data-plane config: {0}")]
    InvalidConfig(String),
    #[error("data-plane config version {0} is not supported (this build reads version {v})", v = config::CONFIG_VERSION)]
    ConfigVersion(u32),
    #[error("cannot write {0}: {1}")]
    WriteConfig(PathBuf, std::io::Error),
    #[error("cannot open disk {0}: {1}")]
    OpenDisk(PathBuf, std::io::Error),
    #[error("disk {0} is not a regular file")]
    NotRegularFile(PathBuf),
    #[error("disk {0} is {1} bytes, not a multiple of 4096")]
    UnalignedSize(PathBuf, u64),
    #[error("socket {0}: {1}")]
    Socket(PathBuf, std::io::Error),
    #[error("socket owner {0:?} is not a user here")]
    NoSuchUser(String),
    #[error("control group {0:?} is not a group here")]
    NoSuchGroup(String),
    #[error("disk {0} belongs to uid {1}; a config written by uid {2} may only name its own files")]
    DiskOwner(PathBuf, u32, u32),
    #[error("{0} is writable by group or others: refused as a config for a root process")]
    ConfigWritable(PathBuf),
    #[error("another data plane holds {0}: one process per control socket")]
    AlreadyRunning(PathBuf),
    #[error("control socket: {0}")]
    Control(std::io::Error),
    #[error("control socket answered something unexpected: {0}")]
    ControlAnswer(String),
    #[error(transparent)]
    Logging(#[from] crate::telemetry::TelemetryError),
}

/// One round trip on the control socket (for the API daemon and tests).
pub fn request(
    control_socket: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, DataplaneError> {
    let mut s = UnixStream::connect(control_socket).map_err(DataplaneError::Control)?;
    s.set_read_timeout(Some(timeout)).map_err(DataplaneError::Control)?;
    s.set_write_timeout(Some(timeout)).map_err(DataplaneError::Control)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(DataplaneError::Control)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(DataplaneError::Control)?;
    serde_json::from_str(&answer).map_err(|e| DataplaneError::ControlAnswer(format!("{e}: {answer:?}")))
}

/// What an export is made from; an export restarts when this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    disk: DiskExport,
    socket: PathBuf,
    owner: Option<SocketOwner>,
    /// Uid the disk file must belong to: the config file's owner unless
    /// that is root. The API daemon (unprivileged) writes the config; it
    /// must not make this root process serve files it could not open.
    disk_owner: Option<u32>,
}

struct Entry {
    plan: Plan,
    stats: Arc<ExportStats>,
    size: u64,
    /// None: not serving (secondary, or it failed to start: see stats).
    export: Option<Export>,
}

type Key = (Uuid, String);

struct State {
    config: DataplaneConfig,
    entries: BTreeMap<Key, Entry>,
}

/// The running process's exports.
pub struct Dataplane {
    config_path: PathBuf,
    state: Mutex<State>,
    /// Replication: the peer connections and the replicas held here.
    links: links::Links,
}

fn owner_of(cfg: &DataplaneConfig) -> Result<Option<SocketOwner>, DataplaneError> {
    let Some(name) = &cfg.socket_owner else { return Ok(None) };
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(Some(SocketOwner { uid: u.uid.as_raw(), gid: u.gid.as_raw() })),
        _ => Err(DataplaneError::NoSuchUser(name.clone())),
    }
}

/// The config file and the plans made from it.
fn load(path: &Path) -> Result<(DataplaneConfig, Vec<Plan>), DataplaneError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| DataplaneError::ReadConfig(path.to_path_buf(), e))?;
    if meta.mode() & 0o022 != 0 {
        return Err(DataplaneError::ConfigWritable(path.to_path_buf()));
    }
    let disk_owner = (meta.uid() != 0).then_some(meta.uid());
    let cfg = DataplaneConfig::load(path)?;
    let owner = owner_of(&cfg)?;
    let plans = cfg
        .disks
        .iter()
        .map(|d| Plan { disk: d.clone(), socket: d.socket_path(&cfg.socket_dir), owner, disk_owner })
        .collect();
    Ok((cfg, plans))
}

fn key(d: &DiskExport) -> Key {
    (d.vm, d.device.clone())
}

/// Opens the disk and starts its export; a failure is kept in the entry's
/// status (other exports are not affected).
fn start(plan: Plan, links: &links::Links, cfg: &DataplaneConfig) -> Entry {
    let stats = Arc::new(ExportStats::new(plan.disk.queues));
    let name = plan.disk.name();
    if plan.disk.role != DiskRole::Primary {
        // Secondary disks are written by the peer's frames (lead's part).
        return Entry { plan, stats, size: 0, export: None };
    }
    let started = LocalFile::open(&plan.disk.path).and_then(|dev| {
        if let Some(uid) = plan.disk_owner.filter(|&uid| uid != dev.uid()) {
            return Err(DataplaneError::DiskOwner(plan.disk.path.clone(), dev.uid(), uid));
        }
        let size = dev.size();
        let disk = Disk {
            name: name.clone(),
            dev: links.device(cfg, &plan.disk, dev)?,
            serial: plan.disk.serial(),
            queues: plan.disk.queues,
            stats: stats.clone(),
        };
        Export::start(disk, &plan.socket, plan.owner).map(|e| (e, size))
    });
    match started {
        Ok((export, size)) => {
            info!(disk = name, socket = %plan.socket.display(), size, "export started");
            Entry { plan, stats, size, export: Some(export) }
        }
        Err(e) => {
            error!(disk = name, "export not started: {e}");
            stats.set_error(e.to_string());
            Entry { plan, stats, size: 0, export: None }
        }
    }
}

impl Dataplane {
    /// Loads the config and starts every export in it.
    pub fn start(config_path: &Path) -> Result<Dataplane, DataplaneError> {
        let (config, plans) = load(config_path)?;
        make_socket_dir(&config.socket_dir)?;
        let links = links::Links::new()?;
        let entries = plans.into_iter().map(|p| (key(&p.disk), start(p, &links, &config))).collect();
        links.apply(&config);
        Ok(Dataplane {
            config_path: config_path.to_path_buf(),
            state: Mutex::new(State { config, entries }),
            links,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the config file and applies the difference. A bad file
    /// changes nothing.
    pub fn reload(&self) -> Result<ReloadSummary, DataplaneError> {
        let (config, plans) = load(&self.config_path)?;
        make_socket_dir(&config.socket_dir)?;
        let mut st = self.lock();
        if (&config.control_socket, &config.control_group)
            != (&st.config.control_socket, &st.config.control_group)
        {
            warn!("control_socket or control_group changed: applies at the next start");
        }
        let mut summary = ReloadSummary::default();
        let wanted: BTreeMap<Key, Plan> = plans.into_iter().map(|p| (key(&p.disk), p)).collect();
        // Stop first: a restarted export binds the same socket path again.
        let mut keep = BTreeMap::new();
        for (k, old) in std::mem::take(&mut st.entries) {
            let name = old.plan.disk.name();
            match wanted.get(&k) {
                Some(p) if *p == old.plan && (old.export.is_some() || p.disk.role != DiskRole::Primary) => {
                    summary.unchanged.push(name);
                    keep.insert(k, old);
                }
                Some(_) => {
                    stop(old);
                    summary.restarted.push(name);
                }
                None => {
                    stop(old);
                    info!(disk = name, "export removed");
                    summary.stopped.push(name);
                }
            }
        }
        for (k, p) in wanted {
            if keep.contains_key(&k) {
                continue;
            }
            let name = p.disk.name();
            if !summary.restarted.contains(&name) {
                summary.started.push(name);
            }
            keep.insert(k, start(p, &self.links, &config));
        }
        // The control socket stays as it was bound.
        let control_socket = st.config.control_socket.clone();
        let control_group = st.config.control_group.clone();
        st.config = DataplaneConfig { control_socket, control_group, ..config };
        st.entries = keep;
        self.links.apply(&st.config);
        info!(
            started = summary.started.len(),
            stopped = summary.stopped.len(),
            restarted = summary.restarted.len(),
            unchanged = summary.unchanged.len(),
            "configuration reloaded"
        );
        Ok(summary)
    }

    pub fn status(&self) -> DataplaneStatus {
        let st = self.lock();
        let disks = st
            .config
            .disks
            .iter()
            .filter_map(|d| st.entries.get(&key(d)))
            .map(|e| {
                let s = &e.stats;
                DiskStatus {
                    vm: e.plan.disk.vm,
                    device: e.plan.disk.device.clone(),
                    path: e.plan.disk.path.clone(),
                    role: e.plan.disk.role,
                    size_bytes: e.size,
                    socket: e.export.as_ref().map(|x| x.socket().to_path_buf()),
                    connected: s.connected.load(Ordering::Relaxed),
                    connections: s.connections.load(Ordering::Relaxed),
                    reads: s.reads.load(Ordering::Relaxed),
                    writes: s.writes.load(Ordering::Relaxed),
                    flushes: s.flushes.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    per_queue: s.per_queue.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
                    last_error: s.last_error(),
                    replica: self.links.status(&e.plan.disk),
                }
            })
            .collect();
        DataplaneStatus {
            version: config::STATUS_VERSION,
            node_id: st.config.node_id,
            pid: std::process::id(),
            disks,
        }
    }

    /// Stops every export (requests in flight finish first).
    pub fn shutdown(&self) {
        let entries = std::mem::take(&mut self.lock().entries);
        for e in entries.into_values() {
            stop(e);
        }
    }

    /// One control request line to its answer line.
    pub fn answer(&self, line: &str) -> ControlResponse {
        let err = |code: &str, message: String| ControlResponse::Error {
            error: ControlError { code: code.into(), message },
        };
        match serde_json::from_str::<ControlRequest>(line) {
            Err(e) => err("invalid_request", e.to_string()),
            Ok(ControlRequest { op: ControlOp::Status }) => {
                ControlResponse::Status { ok: true, status: self.status() }
            }
            Ok(ControlRequest { op: ControlOp::Reload }) => match self.reload() {
                Ok(reload) => ControlResponse::Reload { ok: true, reload },
                Err(e) => {
                    warn!("configuration not reloaded: {e}");
                    err("reload_failed", e.to_string())
                }
            },
        }
    }

    fn serve_client(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut out) = conn.try_clone() else { return };
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let mut text = serde_json::to_vec(&self.answer(&line)).expect("answer serializes");
            text.push(b'\n');
            if out.write_all(&text).is_err() {
                return;
            }
        }
    }
}

fn stop(e: Entry) {
    if let Some(x) = e.export {
        x.stop();
        info!(disk = e.plan.disk.name(), "export stopped");
    }
}

/// QEMU must traverse the folder to reach its socket.
fn make_socket_dir(dir: &Path) -> Result<(), DataplaneError> {
    if dir.is_dir() {
        return Ok(());
    }
    let err = |e| DataplaneError::Socket(dir.to_path_buf(), e);
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(err)
}

/// The process: exports, the control socket, signals. SIGTERM/SIGINT stop
/// every export and exit 0; SIGHUP is a `reload`.
pub fn run(config_path: &Path) -> Result<(), DataplaneError> {
    crate::telemetry::init_logging_as(&crate::config::LogConfig::default(), "novacron-dataplane")?;
    // Sockets and files we create are ours alone until chmod/chown says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Blocked here, inherited by every thread, taken by the signal thread.
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGINT, nix::sys::signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| DataplaneError::Control(e.into()))?;

    // One process per control socket: a second one (systemd's and a
    // hand-started one) would take over the first one's sockets.
    let (config, _) = load(config_path)?;
    let _lock = lock_instance(&config.control_socket)?;
    let dp = Arc::new(Dataplane::start(config_path)?);
    let (control, group) = {
        let st = dp.lock();
        (st.config.control_socket.clone(), st.config.control_group.clone())
    };
    let listener = bind_control(&control, group.as_deref())?;
    let st = dp.status();
    let serving = st.disks.iter().filter(|d| d.socket.is_some()).count();
    info!(disks = st.disks.len(), serving, control = %control.display(), "data plane serving");
    crate::telemetry::notify::notify(&format!("READY=1\nSTATUS=serving {serving} disks"));

    let sig_dp = dp.clone();
    let sig_control = control.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(nix::sys::signal::SIGHUP) => {
                    if let Err(e) = sig_dp.reload() {
                        warn!("configuration not reloaded: {e}");
                    }
                }
                Ok(sig) => {
                    info!("{sig}: stopping");
                    crate::telemetry::notify::notify("STOPPING=1");
                    sig_dp.shutdown();
                    let _ = std::fs::remove_file(&sig_control);
                    info!("data plane stopped");
                    std::process::exit(0);
                }
                Err(e) => warn!("sigwait: {e}"),
            }
        })
        .map_err(DataplaneError::Control)?;

    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let dp = dp.clone();
                let _ = std::thread::Builder::new().name("control".into()).spawn(move || dp.serve_client(c));
            }
            Err(e) => {
                warn!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

/// `<control_socket>.lock`, flocked for the life of the process (the
/// kernel drops it however the process ends).
fn lock_instance(control: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DataplaneError> {
    let mut name = control.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let err = |e| DataplaneError::Socket(path.clone(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(err)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            DataplaneError::AlreadyRunning(path.clone())
        } else {
            err(e.into())
        }
    })
}

fn bind_control(path: &Path, group: Option<&str>) -> Result<UnixListener, DataplaneError> {
    let gid = match group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            _ => return Err(DataplaneError::NoSuchGroup(name.to_string())),
        },
    };
    let err = |e| DataplaneError::Socket(path.to_path_buf(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(if gid.is_some() { 0o660 } else { 0o600 }),
    )
    .map_err(err)?;
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(err)?;
    }
    Ok(l)
}
