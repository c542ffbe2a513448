//! Daemon configuration: `/etc/novacron/novacron.toml`, strict like every
//! request type. Every field has a default, so an empty file (or none, with
//! `--dev`) is a working configuration.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/novacron/novacron.toml";
pub const DEFAULT_SOCKET: &str = "/run/novacron/novacron.sock";
pub const DEFAULT_PORT: u16 = 8443;
/// The peer link's port when `[cluster] listen` is not set.
pub const DEFAULT_LINK_PORT: u16 = 8444;
/// Upper bound of `hypervisor.vcpu_overcommit`.
pub const MAX_VCPU_OVERCOMMIT: u32 = 16;

/// The embedded default configuration, shown by `novacron config default`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../docs/novacron.toml.example");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, disks, keys and logs live.
    pub data_dir: PathBuf,
    pub node: NodeConfig,
    pub api: ApiConfig,
    pub hypervisor: HypervisorConfig,
    pub images: ImagesConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
    pub dataplane: DataplaneConfig,
}

/// The data plane: the process that serves replicated VM disks
/// (docs/design/replication.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Start the data plane when it does not answer. Ignored under systemd,
    /// where novacron-dataplane.service runs it.
    pub spawn: bool,
    /// The user QEMU runs as: vhost-user sockets are handed to it (mode
    /// 0600). Unset: `libvirt-qemu` if that user exists, else root only.
    pub socket_owner: Option<String>,
    /// Replication of a VM created on a paired node without `replication`:
    /// `sync`, `async`, or `off` (plain qcow2 disks, not replicated).
    pub default_mode: crate::types::ReplicationMode,
    /// Limit of initial syncs and resyncs to the peer, MiB/s for all disks
    /// together (0: as fast as the link goes). Guest writes are never held.
    pub sync_rate_mib: u64,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        let libvirt_qemu = nix::unistd::User::from_name("libvirt-qemu").ok().flatten().map(|u| u.name);
        DataplaneConfig {
            spawn: true,
            socket_owner: libvirt_qemu,
            default_mode: crate::types::ReplicationMode::Sync,
            sync_rate_mib: 0,
        }
    }
}

/// The pair: the peer link (docs/design/peer-link.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Peer-link listen addresses (mutual TLS 1.3 with the pinned peer only).
    pub listen: Vec<SocketAddr>,
    /// Heartbeat interval, both ways.
    pub heartbeat_ms: u64,
    /// The link is down after this many heartbeat intervals with nothing
    /// heard from the peer.
    pub heartbeat_misses: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_LINK_PORT))],
            heartbeat_ms: 500,
            heartbeat_misses: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Largest accepted image upload or import, GiB.
    pub max_upload_gib: u64,
    /// Host folders `POST /v1/images` may import from (the appliance's
    /// preloaded images); nothing else on the host can be imported.
    pub import_dirs: Vec<PathBuf>,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig { max_upload_gib: 256, import_dirs: vec![PathBuf::from("/usr/share/novacron/images")] }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node name; the host name when unset.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// HTTPS listen addresses (TLS 1.3 only; there is no plaintext listener).
    pub listen: Vec<SocketAddr>,
    /// Local Unix socket for the CLI; `<data_dir>/novacron.sock` when unset
    /// in dev mode.
    pub socket: Option<PathBuf>,
    /// PEM certificate chain and key; generated under the data dir if unset.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Network (HTTPS) connections at once, TLS handshakes included.
    pub max_connections: usize,
    /// Network connections at once from one client address (IPv6: one /64),
    /// so that a single client cannot take every slot.
    pub max_connections_per_address: usize,
    /// Connections at once on the local socket, a budget of its own that no
    /// network client can use up (root keeps its way in).
    pub local_connections: usize,
    pub header_timeout_secs: u64,
    /// A connection with no request in flight (HTTP/2 without an open
    /// stream, HTTP/1.1 keep-alive between requests) is closed after this.
    pub idle_timeout_secs: u64,
    /// Requests per second allowed per token (token bucket); 0 disables.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// Failed authentications a client address may make before it is
    /// answered 429 (it then earns one every 10 s); 0 disables.
    pub auth_failure_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    /// libvirt connection URI.
    pub uri: String,
    /// libvirt domain type: `kvm` on real hosts, `qemu` (TCG) where KVM
    /// cannot run guests.
    pub domain_type: String,
    /// Memory kept free for the host; starting a VM that would eat into it
    /// is refused.
    pub memory_reserve_mib: u64,
    /// Default wait for an ACPI shutdown before `--timeout` forces it off.
    pub shutdown_timeout_secs: u64,
    /// vCPUs one VM may have per host CPU: 1 refuses a VM with more vCPUs
    /// than the host has CPUs (it would only run slower); raise it to
    /// overcommit.
    pub vcpu_overcommit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `novacron=debug`.
    pub level: String,
    /// `auto` (journald when under systemd, else stderr), `journald`, `stderr`.
    pub target: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("/var/lib/novacron"),
            node: NodeConfig::default(),
            api: ApiConfig::default(),
            hypervisor: HypervisorConfig::default(),
            images: ImagesConfig::default(),
            log: LogConfig::default(),
            cluster: ClusterConfig::default(),
            dataplane: DataplaneConfig::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))],
            socket: None,
            tls_cert: None,
            tls_key: None,
            max_connections: 1024,
            max_connections_per_address: 128,
            local_connections: 64,
            header_timeout_secs: 10,
            idle_timeout_secs: 30,
            rate_limit_per_sec: 200,
            rate_limit_burst: 400,
            auth_failure_burst: 10,
        }
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            uri: "qemu:///system".into(),
            domain_type: "kvm".into(),
            memory_reserve_mib: 1024,
            shutdown_timeout_secs: 120,
            vcpu_overcommit: 1,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), target: "auto".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path`; a missing file at the default path means "defaults".
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path: path.into(), source }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.message().to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The dev profile: everything under `./novacron-dev`, TCG guests, API on
    /// loopback only.
    pub fn dev() -> Config {
        let mut cfg = Config { data_dir: PathBuf::from("novacron-dev"), ..Config::default() };
        cfg.api.listen = vec![SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))];
        cfg.cluster.listen = vec![SocketAddr::from(([127, 0, 0, 1], DEFAULT_LINK_PORT))];
        cfg.hypervisor.domain_type = "qemu".into();
        cfg.hypervisor.memory_reserve_mib = 256;
        cfg
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.hypervisor.domain_type.as_str(), "kvm" | "qemu") {
            return Err(ConfigError::Invalid(format!(
                "hypervisor.domain_type must be \"kvm\" or \"qemu\", not {:?}",
                self.hypervisor.domain_type
            )));
        }
        if !matches!(self.log.target.as_str(), "auto" | "journald" | "stderr") {
            return Err(ConfigError::Invalid(
                "log.target must be \"auto\", \"journald\" or \"stderr\"".into(),
            ));
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            return Err(ConfigError::Invalid("api.tls_cert and api.tls_key go together".into()));
        }
        if !(1..=MAX_VCPU_OVERCOMMIT).contains(&self.hypervisor.vcpu_overcommit) {
            return Err(ConfigError::Invalid(format!(
                "hypervisor.vcpu_overcommit must be between 1 and {MAX_VCPU_OVERCOMMIT}"
            )));
        }
        if !(50..=60_000).contains(&self.cluster.heartbeat_ms) {
            return Err(ConfigError::Invalid("cluster.heartbeat_ms must be between 50 and 60000".into()));
        }
        if !(2..=100).contains(&self.cluster.heartbeat_misses) {
            return Err(ConfigError::Invalid("cluster.heartbeat_misses must be between 2 and 100".into()));
        }
        // Pairing tells the peer one link port for all of this node's
        // addresses, so every listen address uses the same one.
        match self.cluster.listen.first() {
            None => return Err(ConfigError::Invalid("cluster.listen must name at least one address".into())),
            Some(first)
                if first.port() == 0 || self.cluster.listen.iter().any(|a| a.port() != first.port()) =>
            {
                return Err(ConfigError::Invalid(
                    "cluster.listen addresses must share one port, not 0".into(),
                ))
            }
            Some(_) => {}
        }
        for (name, n) in [
            ("max_connections", self.api.max_connections),
            ("max_connections_per_address", self.api.max_connections_per_address),
            ("local_connections", self.api.local_connections),
            ("idle_timeout_secs", self.api.idle_timeout_secs as usize),
        ] {
            if n == 0 {
                return Err(ConfigError::Invalid(format!("api.{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The Unix socket path in effect.
    pub fn socket_path(&self) -> PathBuf {
        self.api.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_matches_defaults() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, Path::new("embedded")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = Config::parse("[api]\nlisten_on = []\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("listen_on"), "{e}");
    }

    #[test]
    fn vcpu_overcommit_is_bounded() {
        let cfg = Config::parse("[hypervisor]\nvcpu_overcommit = 4\n", Path::new("x")).unwrap();
        assert_eq!(cfg.hypervisor.vcpu_overcommit, 4);
        for bad in ["0", "17", "1.5"] {
            let text = format!("[hypervisor]\nvcpu_overcommit = {bad}\n");
            let e = Config::parse(&text, Path::new("x")).unwrap_err();
            assert!(
                e.to_string().contains("vcpu_overcommit") || e.to_string().contains("expected u32"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn cluster_section_is_strict_and_bounded() {
        let cfg = Config::parse(
            "[cluster]\nlisten = [\"10.0.0.1:9444\", \"192.168.9.1:9444\"]\nheartbeat_ms = 200\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(cfg.cluster.listen.len(), 2);
        assert_eq!(cfg.cluster.heartbeat_ms, 200);
        for bad in [
            "heartbeat_ms = 0",
            "heartbeat_misses = 1",
            "listen = []",
            "listen = [\"10.0.0.1:9444\", \"10.0.0.2:9445\"]",
            "port = 1",
        ] {
            let e = Config::parse(&format!("[cluster]\n{bad}\n"), Path::new("x")).unwrap_err();
            assert!(e.to_string().contains(bad.split(' ').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_domain_type_is_refused() {
        let e = Config::parse("[hypervisor]\ndomain_type = \"xen\"\n", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("domain_type"), "{e}");
    }
}
