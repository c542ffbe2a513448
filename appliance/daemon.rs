//! `novacron serve`: wires configuration, telemetry, the core and the API
//! together and runs until SIGTERM/SIGINT.

use crate::api::{self, ApiError};
use crate::config::{Config, ConfigError};
use crate::core::{Core, CoreError};
use crate::hypervisor::libvirt::Libvirt;
use crate::tasks::{Policy, Stage, Supervisor};
use crate::telemetry::{self, metrics::Metrics, notify};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a background task failed: {0}")]
    TaskFailed(String),
}

/// Where the daemon's configuration comes from; shared by `serve` and the
/// commands that work on a node's data dir (`backup`).
#[derive(Args, Debug, Clone)]
pub struct ConfigSource {
    /// Configuration file.
    #[arg(long, short, default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Data directory (overrides the config file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Development profile: data in ./novacron-dev, API on 127.0.0.1:8443,
    /// TCG guests, socket in the data dir.
    #[arg(long)]
    pub dev: bool,
}

/// The flags of `novacron serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// HTTPS listen address (repeatable; overrides the config file).
    #[arg(long)]
    pub listen: Vec<std::net::SocketAddr>,
    /// Unix socket path (overrides the config file).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// libvirt URI (overrides the config file).
    #[arg(long)]
    pub libvirt_uri: Option<String>,
    /// libvirt domain type: kvm or qemu (overrides the config file).
    #[arg(long)]
    pub domain_type: Option<String>,
}

/// The configuration in effect: file (or dev profile), then flags.
pub fn effective_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let explicit = args.source.config.as_os_str() != crate::config::DEFAULT_CONFIG_PATH;
    let mut cfg = if args.source.dev && !explicit {
        Config::dev()
    } else {
        Config::load(&args.source.config, explicit)?
    };
    if let Some(d) = &args.source.data_dir {
        cfg.data_dir = d.clone();
    }
    if !args.listen.is_empty() {
        cfg.api.listen = args.listen.clone();
    }
    if let Some(s) = &args.socket_path {
        cfg.api.socket = Some(s.clone());
    }
    if let Some(u) = &args.libvirt_uri {
        cfg.hypervisor.uri = u.clone();
    }
    if let Some(t) = &args.domain_type {
        cfg.hypervisor.domain_type = t.clone();
    }
    // Relative data dirs (dev mode) are made absolute: libvirt needs
    // absolute paths for disks and logs.
    if cfg.data_dir.is_relative() {
        let cwd = std::env::current_dir()
            .map_err(|source| ConfigError::Read { path: cfg.data_dir.clone(), source })?;
        cfg.data_dir = cwd.join(&cfg.data_dir);
    }
    // After the above, so that the path printed for NOVACRON_SOCKET works
    // from any directory.
    if args.source.dev && cfg.api.socket.is_none() {
        cfg.api.socket = Some(cfg.data_dir.join("novacron.sock"));
    }
    cfg.validate()?;
    Ok(cfg)
}

pub async fn serve(args: ServeArgs) -> Result<(), DaemonError> {
    let cfg = effective_config(&args)?;
    telemetry::init_logging(&cfg.log)?;
    // Before anything slow: SIGHUP's default action would kill the daemon.
    let mut signals = Signals::new()?;
    let started = std::time::Instant::now();
    // Registers libvirt's event loop: must come before any connection.
    let hv = Arc::new(Libvirt::new(&cfg.hypervisor.uri));
    let metrics = Arc::new(Metrics::default());
    // Before anything reads the store or touches a domain: a second daemon
    // on this data dir would reconcile the same guests as the first.
    std::fs::create_dir_all(&cfg.data_dir)?;
    let _lock = crate::store::lock::lock_data_dir(&cfg.data_dir).map_err(CoreError::from)?;
    let core = Core::open(cfg.clone(), hv, metrics)?;
    let tls_files = cfg.api.tls_cert.clone().zip(cfg.api.tls_key.clone());
    let identity = api::tls::identity(tls_files, &core.paths.tls, &cfg.api.listen)?;
    core.set_tls_identity(identity.fingerprint.clone(), identity.not_after);

    let first_token = core.bootstrap_admin_token().await?;

    match core.reconcile_all().await {
        Ok(()) => core.autostart_after_boot().await,
        Err(e) => tracing::warn!(error = %e, "libvirt is not usable yet; will keep trying"),
    }
    // After a host update's reboot: success or rollback, guests back on.
    core.recover_update().await;
    // Every long-lived task runs under `tasks` and is stopped in order
    // (api, cluster, core) before the store is closed. The cluster
    // subsystem registers its tasks in `Stage::Cluster`.
    let tasks = Supervisor::default();
    core.spawn_reconciler(&tasks);
    core.spawn_dataplane_keeper(&tasks);
    // `vm shutdown --timeout` deadlines a stop or crash left due.
    core.resume_shutdowns().await;
    // A join cut short by a lost answer or a crash: settled with the inviter.
    core.spawn_peer_resolver(&tasks);
    // The peer link, while paired; the API certificate is the node's
    // identity on it, pinned by the peer at pairing.
    let local = crate::cluster::transport::LocalNode {
        node_id: core.node.id,
        name: core.node.name.clone(),
        chain: identity.chain.clone(),
        key: identity.key.clone_key(),
    };
    // State replication and the image copy over it (they follow the link).
    crate::cluster::drivers::spawn(&core, &tasks, local);

    let socket = cfg.socket_path();
    let api = api::Api::new(core.clone());
    let server = api::serve(api.clone(), identity.config.clone(), &cfg.api.listen, &socket, &tasks).await?;
    let urls: Vec<String> = server.tcp.iter().map(|a| format!("https://{a}")).collect();
    tracing::info!(
        NODE_ID = %core.node.id,
        listen = %urls.join(","),
        socket = %server.socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "NovaCron Edge {} serving",
        crate::VERSION
    );
    if let Some(t) = first_token {
        announce_first_token(
            &core,
            &urls,
            &server.socket,
            &identity.fingerprint,
            &t.secret,
            args.source.dev,
        )?;
    }
    notify::notify(&format!("READY=1\nSTATUS=serving, {} VMs managed", core.vm_count()));
    if let Some(interval) = notify::watchdog_interval() {
        // Restarted if it ever fails: a daemon that stops petting the
        // watchdog is killed by systemd, which is the fallback, not the plan.
        let core = core.clone();
        tasks.spawn(Stage::Core, "daemon.watchdog", Policy::Restart, move |mut stop| {
            let core = core.clone();
            async move {
                let mut tick = tokio::time::interval(interval / 2);
                loop {
                    tokio::select! {
                        _ = stop.wait() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    // Only a daemon whose store answers is alive.
                    if core.store_answers().await {
                        notify::notify("WATCHDOG=1");
                    }
                }
            }
        });
    }

    // SIGHUP (`systemctl reload`) re-reads the configuration; SIGTERM
    // (`systemctl stop`) or SIGINT ends the daemon, and so does a fatal task
    // failure (with an error, for systemd's Restart=on-failure). None of it
    // touches guests.
    let mut live = cfg.clone();
    let failure = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Hup => {
                    notify::reloading();
                    reload(&args, &mut live, &api);
                    notify::notify(&format!("READY=1\nSTATUS=serving, {} VMs managed", core.vm_count()));
                }
                Signal::Stop => break None,
            },
            reason = tasks.failed() => break Some(reason),
        }
    };
    // Guests belong to libvirt: nothing on the way out calls libvirt on a
    // domain; the next start re-adopts them.
    tracing::info!("stopping; guests keep running");
    notify::notify("STOPPING=1");
    stop_in_order(&tasks, &core, &socket).await;
    match failure {
        Some(reason) => Err(DaemonError::TaskFailed(reason)),
        None => Ok(()),
    }
}

/// How long each stage's tasks get to finish once asked to stop; together
/// well inside the unit's TimeoutStopSec (20 s). The cluster's is the
/// longest: releasing a lease needs a round trip to the peer or witness.
fn stop_grace(stage: Stage) -> Duration {
    match stage {
        Stage::Api => Duration::from_secs(2),
        Stage::Cluster => Duration::from_secs(8),
        Stage::Core => Duration::from_secs(5),
    }
}

/// The shutdown order: the API stops accepting (no new commands), then the
/// cluster tasks (a lease is released while the store and the link still
/// work), then the core's (the reconciler finishes its pass), and only
/// then is the store closed, so that no task loses a write halfway.
async fn stop_in_order(tasks: &Supervisor, core: &Core, socket: &std::path::Path) {
    for stage in Stage::ALL {
        let (ended, aborted) = tasks.shutdown(stage, stop_grace(stage)).await;
        if stage == Stage::Api {
            let _ = std::fs::remove_file(socket);
        }
        tracing::info!(
            STAGE = stage.name(),
            tasks = %ended.join(","),
            aborted = %aborted.join(","),
            "stopped the {} tasks",
            stage.name()
        );
    }
    // The next start continues the event feed right after the last event.
    core.events.checkpoint();
    match core.close_store().await {
        Ok(()) => tracing::info!("store closed"),
        Err(e) => tracing::error!(error = %e, "cannot close the store cleanly"),
    }
}

/// Shows the first admin token once. On a terminal, with logs on stderr or
/// in the dev profile it is printed with the API's URLs and the
/// certificate's fingerprint; under a service manager it goes to a
/// root-only file instead (the appliance's first-boot banner shows it),
/// never to the log. The dev profile also keeps the file, so the token
/// outlives the terminal it was printed on.
fn announce_first_token(
    core: &Core,
    urls: &[String],
    socket: &std::path::Path,
    fingerprint: &str,
    secret: &str,
    dev: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let print = dev
        || std::io::stdout().is_terminal()
        || core.cfg.log.target == "stderr"
        || std::env::var_os("NOVACRON_PRINT_TOKEN").is_some();
    let path = core.paths.data_dir.join("initial-admin-token");
    if dev || !print {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        writeln!(f, "{secret}")?;
    }
    if !print {
        tracing::info!(path = %path.display(), "the first admin token was written to a root-only file; delete it once read");
        return Ok(());
    }
    let mut text = crate::ops::setup::banner(urls, fingerprint, secret);
    if dev {
        text.push_str(&format!(
            "The token is also in {} (root-only); delete that file once you have it.\n\
             For the CLI on this host: export NOVACRON_SOCKET={}\n",
            path.display(),
            socket.display()
        ));
    }
    // Best effort: a closed stdout must not stop the daemon.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Hup,
    Stop,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Hup,
        }
    }
}

/// SIGHUP: re-reads the configuration (same file and flags as at start),
/// applies what can change while running (log level, rate limits) and names
/// the changes that need a restart. A file that does not load or validate is
/// logged and ignored: `live` stays as it was.
fn reload(args: &ServeArgs, live: &mut Config, api: &api::Api) {
    let new = match effective_config(args) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded; keeping the one in effect");
            return;
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&new.log.level) {
        tracing::error!(error = %e, level = %new.log.level, "configuration not reloaded: bad log.level");
        return;
    }
    if new.log.level != live.log.level {
        match telemetry::set_log_level(&new.log.level) {
            Ok(true) => {}
            Ok(false) => tracing::warn!("RUST_LOG is set and overrides log.level"),
            Err(e) => tracing::warn!(error = %e, "log.level not applied"),
        }
        live.log.level = new.log.level.clone();
    }
    if (new.api.rate_limit_per_sec, new.api.rate_limit_burst)
        != (live.api.rate_limit_per_sec, live.api.rate_limit_burst)
    {
        api.set_rate_limits(new.api.rate_limit_per_sec, new.api.rate_limit_burst);
        live.api.rate_limit_per_sec = new.api.rate_limit_per_sec;
        live.api.rate_limit_burst = new.api.rate_limit_burst;
    }
    let pending = needs_restart(live, &new);
    if !pending.is_empty() {
        tracing::warn!(
            settings = %pending.join(","),
            "these settings changed but take effect only after a restart (systemctl restart novacron)"
        );
    }
    tracing::info!(
        log_level = %live.log.level,
        rate_limit_per_sec = live.api.rate_limit_per_sec,
        rate_limit_burst = live.api.rate_limit_burst,
        "configuration reloaded"
    );
}

/// Settings that differ between `live` and `new` and are read only at start.
fn needs_restart(live: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (live, new);
    [
        ("data_dir", a.data_dir != b.data_dir),
        ("node.name", a.node.name != b.node.name),
        ("api.listen", a.api.listen != b.api.listen),
        ("api.socket", a.api.socket != b.api.socket),
        ("api.tls_cert", a.api.tls_cert != b.api.tls_cert),
        ("api.tls_key", a.api.tls_key != b.api.tls_key),
        ("api.max_connections", a.api.max_connections != b.api.max_connections),
        (
            "api.max_connections_per_address",
            a.api.max_connections_per_address != b.api.max_connections_per_address,
        ),
        ("api.local_connections", a.api.local_connections != b.api.local_connections),
        ("api.header_timeout_secs", a.api.header_timeout_secs != b.api.header_timeout_secs),
        ("api.auth_failure_burst", a.api.auth_failure_burst != b.api.auth_failure_burst),
        ("api.idle_timeout_secs", a.api.idle_timeout_secs != b.api.idle_timeout_secs),
        ("hypervisor.uri", a.hypervisor.uri != b.hypervisor.uri),
        ("hypervisor.domain_type", a.hypervisor.domain_type != b.hypervisor.domain_type),
        ("hypervisor.memory_reserve_mib", a.hypervisor.memory_reserve_mib != b.hypervisor.memory_reserve_mib),
        (
            "hypervisor.shutdown_timeout_secs",
            a.hypervisor.shutdown_timeout_secs != b.hypervisor.shutdown_timeout_secs,
        ),
        ("images", a.images != b.images),
        ("log.target", a.log.target != b.log.target),
        ("cluster", a.cluster != b.cluster),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        assert!(needs_restart(&a, &b).is_empty());
        b.log.level = "debug".into();
        b.api.rate_limit_per_sec = 1;
        assert!(needs_restart(&a, &b).is_empty(), "runtime settings need no restart");
        b.api.listen.clear();
        b.log.target = "stderr".into();
        assert_eq!(needs_restart(&a, &b), ["api.listen", "log.target"]);
    }
}
