//! Telemetry subsystem: logging (journald or stderr), Prometheus metrics and
//! systemd notifications.

pub mod metrics;
pub mod notify;

use crate::config::LogConfig;
use std::sync::OnceLock;
use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry};

/// Swaps the log filter of the installed subscriber (`[log] level` reload).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {0:?}")]
    Filter(String),
    #[error("cannot connect to journald: {0}")]
    Journald(std::io::Error),
}

/// True when stderr is connected to the journal (systemd sets
/// `JOURNAL_STREAM` to the device and inode of that stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(var) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = var.split_once(':') else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the level.
pub fn init_logging(cfg: &LogConfig) -> Result<(), TelemetryError> {
    init_logging_as(cfg, "novacron")
}

/// `init_logging` for another process of the binary (the data plane),
/// with its own journal identifier.
pub fn init_logging_as(cfg: &LogConfig, identifier: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) => EnvFilter::try_new(&f).map_err(|_| TelemetryError::Filter(f))?,
        Err(_) => EnvFilter::try_new(&cfg.level).map_err(|_| TelemetryError::Filter(cfg.level.clone()))?,
    };
    let journald = match cfg.target.as_str() {
        "journald" => true,
        "stderr" => false,
        _ => stderr_is_journal(),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    if journald {
        let layer = tracing_journald::layer()
            .map_err(TelemetryError::Journald)?
            // Fields as named (`journalctl VM_ID=...`), not `F_VM_ID`.
            .with_field_prefix(None)
            .with_syslog_identifier(identifier.into());
        let _ = registry.with(layer).try_init();
    } else {
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    // Colour codes only for a person at a terminal, not in
                    // files, pipes or a log collector.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init();
    }
    Ok(())
}

/// Applies a new `[log] level` to the running subscriber. `RUST_LOG`, when
/// set, keeps precedence (returns `Ok(false)`: nothing changed).
pub fn set_log_level(level: &str) -> Result<bool, TelemetryError> {
    let filter = EnvFilter::try_new(level).map_err(|_| TelemetryError::Filter(level.to_string()))?;
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(false);
    }
    let Some(handle) = FILTER.get() else { return Ok(false) };
    handle.reload(filter).map_err(|_| TelemetryError::Filter(level.to_string()))?;
    Ok(true)
}
