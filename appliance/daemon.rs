//! `novacron serve`: wires configuration, telemetry, the core and the API
//! together and runs until SIGTERM/SIGINT.

use crate::api::{self, ApiError};
use crate::cli::ServeArgs;
use crate::config::{Config, ConfigError};
use crate::core::{Core, CoreError};
use crate::hypervisor::libvirt::Libvirt;
use crate::telemetry::{self, metrics::Metrics, notify};
use std::io::IsTerminal;
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
}

/// The configuration in effect: file (or dev profile), then flags.
pub fn effective_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let explicit = args.config.as_os_str() != crate::config::DEFAULT_CONFIG_PATH;
    let mut cfg = if args.dev && !explicit { Config::dev() } else { Config::load(&args.config, explicit)? };
    if let Some(d) = &args.data_dir {
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
    if args.dev && cfg.api.socket.is_none() {
        cfg.api.socket = Some(cfg.data_dir.join("novacron.sock"));
    }
    // Relative data dirs (dev mode) are made absolute: libvirt needs
    // absolute paths for disks and logs.
    if cfg.data_dir.is_relative() {
        let cwd = std::env::current_dir()
            .map_err(|source| ConfigError::Read { path: cfg.data_dir.clone(), source })?;
        cfg.data_dir = cwd.join(&cfg.data_dir);
    }
    cfg.validate()?;
    Ok(cfg)
}

pub async fn serve(args: ServeArgs) -> Result<(), DaemonError> {
    let cfg = effective_config(&args)?;
    telemetry::init_logging(&cfg.log)?;
    let started = std::time::Instant::now();
    // Registers libvirt's event loop: must come before any connection.
    let hv = Arc::new(Libvirt::new(&cfg.hypervisor.uri));
    let metrics = Arc::new(Metrics::default());
    let core = Core::open(cfg.clone(), hv, metrics)?;
    let tls_files = cfg.api.tls_cert.clone().zip(cfg.api.tls_key.clone());
    let identity = api::tls::identity(tls_files, &core.paths.tls, &cfg.api.listen)?;
    core.set_tls_identity(identity.fingerprint.clone(), identity.not_after);

    let first_token = core.bootstrap_admin_token().await?;

    match core.reconcile_all().await {
        Ok(()) => core.autostart_after_boot().await,
        Err(e) => tracing::warn!(error = %e, "libvirt is not usable yet; will keep trying"),
    }
    core.spawn_reconciler();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let socket = cfg.socket_path();
    let api = api::Api::new(core.clone());
    let server = api::serve(api, identity.config.clone(), &cfg.api.listen, &socket, stop_rx).await?;
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
        announce_first_token(&core, &urls, &identity.fingerprint, &t.secret)?;
    }
    notify::notify(&format!("READY=1\nSTATUS=serving, {} VMs managed", core.vm_count()));
    if let Some(interval) = notify::watchdog_interval() {
        let core = core.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                // Only a daemon whose store answers is alive.
                let store = core.store().clone();
                if tokio::task::spawn_blocking(move || store.ping()).await.unwrap_or(false) {
                    notify::notify("WATCHDOG=1");
                }
            }
        });
    }

    wait_for_signal().await?;
    tracing::info!("stopping; guests keep running");
    notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Shows the first admin token once. On a terminal (dev mode) it is
/// printed; under a service manager it goes to a root-only file, never to
/// the log.
fn announce_first_token(
    core: &Core,
    urls: &[String],
    fingerprint: &str,
    secret: &str,
) -> std::io::Result<()> {
    if std::io::stdout().is_terminal()
        || core.cfg.log.target == "stderr"
        || std::env::var_os("NOVACRON_PRINT_TOKEN").is_some()
    {
        println!("NovaCron Edge is running.");
        for u in urls {
            println!("  API:          {u}");
        }
        println!("  fingerprint:  {fingerprint}");
        println!("  admin token:  {secret}");
        println!("The token is shown only now.");
        return Ok(());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = core.paths.data_dir.join("initial-admin-token");
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    writeln!(f, "{secret}")?;
    tracing::info!(path = %path.display(), "the first admin token was written to a root-only file; delete it once read");
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
