//! CLI subsystem: `novacron <command>`. Every command except `serve` is an
//! API client: the local socket by default, HTTPS with `--url`.
//!
//! Exit codes (stable, for scripts): 0 ok, 1 failure, 2 usage, 3 not found,
//! 4 conflict (wrong state, name taken, busy), 5 not authorized, 6 daemon
//! unreachable.

pub mod client;
mod output;

use crate::types::{DiskSpec, Role, TokenCreate, VmCreate, VmPatch};
use clap::{Args, Parser, Subcommand};
use client::{Client, ClientError};
use hyper::{Method, StatusCode};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "novacron", version = crate::VERSION_LONG, about = "NovaCron Edge: hypervisor appliance daemon and CLI")]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Daemon URL for remote use (https://HOST:8443); the local socket otherwise.
    #[arg(long, global = true, env = "NOVACRON_URL")]
    pub url: Option<String>,
    /// API token for remote use.
    #[arg(long, global = true, env = "NOVACRON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the daemon's certificate (from `novacron status`).
    #[arg(long, global = true, env = "NOVACRON_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// CA certificate (PEM) to verify the daemon's certificate instead of pinning.
    #[arg(long, global = true, env = "NOVACRON_CA")]
    pub ca: Option<PathBuf>,
    /// Local API socket.
    #[arg(long, global = true, env = "NOVACRON_SOCKET", default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Show the daemon's node, versions and certificate fingerprint.
    Status,
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Manage API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show the audit log (admin).
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Configuration helpers.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
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

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        vm: String,
    },
    /// Create a VM (stopped).
    Create(CreateArgs),
    Start {
        vm: String,
    },
    /// Force a VM off.
    Stop {
        vm: String,
    },
    /// ACPI shutdown.
    Shutdown {
        vm: String,
        /// Wait up to this many seconds for the guest to stop.
        #[arg(long)]
        wait: Option<u64>,
        /// Force the VM off if it has not stopped after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    Reboot {
        vm: String,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    /// Delete a stopped VM and its disks.
    Delete {
        vm: String,
        /// Stop it first if it is running.
        #[arg(long)]
        force: bool,
    },
    /// Change vcpus/memory (while stopped) or autostart.
    Edit {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long = "memory")]
        memory_mib: Option<u64>,
        #[arg(long)]
        autostart: Option<bool>,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory in MiB.
    #[arg(long = "memory", default_value_t = 512)]
    pub memory_mib: u64,
    /// A disk: SIZE_GIB for a blank disk, or image:NAME for an overlay on an
    /// image in the data dir's images/ (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Direct kernel boot: kernel file under the data dir's boot/.
    #[arg(long)]
    pub kernel: Option<String>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<String>,
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// libvirt network for one virtio NIC.
    #[arg(long)]
    pub network: Option<String>,
    #[arg(long)]
    pub autostart: bool,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    List,
    /// Revoke a token by id or name.
    Revoke {
        token: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the embedded default configuration.
    Default,
    /// Check a configuration file.
    Check {
        #[arg(default_value = crate::config::DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
}

pub fn exit_code_for(status: StatusCode) -> i32 {
    match status.as_u16() {
        200..=299 => 0,
        404 => 3,
        409 => 4,
        401 | 403 => 5,
        _ => 1,
    }
}

fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    if let Some(image) = s.strip_prefix("image:") {
        return Ok(DiskSpec { size_gib: None, image: Some(image.to_string()) });
    }
    let size = s
        .trim_end_matches(['G', 'g'])
        .parse::<u64>()
        .map_err(|_| format!("--disk {s:?}: use SIZE_GIB or image:NAME"))?;
    Ok(DiskSpec { size_gib: Some(size), image: None })
}

pub fn client(conn: &ConnArgs) -> Result<Client, ClientError> {
    match &conn.url {
        Some(url) => Client::https(url, conn.token.clone(), conn.fingerprint.as_deref(), conn.ca.as_deref()),
        None => Ok(Client::socket(conn.socket.clone())),
    }
}

/// Runs a client command; returns the process exit code.
pub async fn run_client(cli: Cli) -> i32 {
    let c = match client(&cli.conn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    let json = cli.json;
    let call = |method: Method, path: String, body: Option<Vec<u8>>| {
        let c = c.clone();
        async move { c.request(method, &path, body).await }
    };
    let enc = |v: &dyn erased::Json| Some(v.to_json());
    let (result, kind) = match cli.command {
        Cmd::Serve(_) | Cmd::Config(_) => unreachable!("handled by main"),
        Cmd::Status => return status(&c, json).await,
        Cmd::Vm(VmCmd::List) => (call(Method::GET, "/v1/vms".into(), None).await, output::Kind::VmList),
        Cmd::Vm(VmCmd::Show { vm }) => {
            (call(Method::GET, format!("/v1/vms/{vm}"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Create(a)) => {
            let disks = match a.disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>, _>>() {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("novacron: {e}");
                    return 2;
                }
            };
            let spec = VmCreate {
                name: a.name,
                vcpus: a.vcpus,
                memory_mib: a.memory_mib,
                disks,
                boot: a.kernel.map(|kernel| crate::types::BootSpec {
                    kernel,
                    initrd: a.initrd,
                    cmdline: a.cmdline,
                }),
                network: a.network,
                autostart: a.autostart,
            };
            (call(Method::POST, "/v1/vms".into(), enc(&spec)).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Start { vm }) => {
            (call(Method::POST, format!("/v1/vms/{vm}/start"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Stop { vm }) => {
            (call(Method::POST, format!("/v1/vms/{vm}/stop"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Reboot { vm }) => {
            (call(Method::POST, format!("/v1/vms/{vm}/reboot"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Pause { vm }) => {
            (call(Method::POST, format!("/v1/vms/{vm}/pause"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Resume { vm }) => {
            (call(Method::POST, format!("/v1/vms/{vm}/resume"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Shutdown { vm, wait, timeout }) => {
            let mut q = Vec::new();
            if let Some(w) = wait {
                q.push(format!("wait={w}"));
            }
            if let Some(t) = timeout {
                q.push(format!("timeout={t}"));
            }
            let qs = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
            (call(Method::POST, format!("/v1/vms/{vm}/shutdown{qs}"), None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Delete { vm, force }) => {
            let q = if force { "?force=true" } else { "" };
            (call(Method::DELETE, format!("/v1/vms/{vm}{q}"), None).await, output::Kind::Deleted(vm))
        }
        Cmd::Vm(VmCmd::Edit { vm, vcpus, memory_mib, autostart }) => {
            let patch = VmPatch { vcpus, memory_mib, autostart };
            (call(Method::PATCH, format!("/v1/vms/{vm}"), enc(&patch)).await, output::Kind::Vm)
        }
        Cmd::Token(TokenCmd::Create { name, role }) => {
            let req = TokenCreate { name, role: Role::parse(&role).expect("clap checked the role") };
            (call(Method::POST, "/v1/tokens".into(), enc(&req)).await, output::Kind::TokenCreated)
        }
        Cmd::Token(TokenCmd::List) => {
            (call(Method::GET, "/v1/tokens".into(), None).await, output::Kind::TokenList)
        }
        Cmd::Token(TokenCmd::Revoke { token }) => {
            (call(Method::DELETE, format!("/v1/tokens/{token}"), None).await, output::Kind::Deleted(token))
        }
        Cmd::Audit { limit } => {
            (call(Method::GET, format!("/v1/audit?limit={limit}"), None).await, output::Kind::Audit)
        }
    };
    match result {
        Ok((status, body)) => output::print(status, &body, kind, json),
        Err(e) => {
            eprintln!("novacron: {e}");
            if matches!(e, ClientError::Connect { .. }) {
                6
            } else {
                1
            }
        }
    }
}

async fn status(c: &Client, json: bool) -> i32 {
    let host = match c.request(Method::GET, "/v1/host", None).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 6;
        }
    };
    if host.0 != StatusCode::OK {
        return output::print(host.0, &host.1, output::Kind::Host, json);
    }
    let ready =
        c.request(Method::GET, "/v1/ready", None).await.map(|r| r.0 == StatusCode::OK).unwrap_or(false);
    let vms = c.request(Method::GET, "/v1/vms", None).await.ok();
    output::status(&host.1, ready, vms.as_ref().map(|v| &v.1[..]), json, &c.describe())
}

/// Tiny helper so request types can be passed as one trait object.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("request types serialize")
        }
    }
}
