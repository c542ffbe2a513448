//! CLI subsystem: `novacron <command>`. Every command except `serve` is an
//! API client: the local socket by default, HTTPS with `--url`.
//!
//! Exit codes (stable, for scripts): 0 ok, 1 failure, 2 usage or invalid
//! value, 3 not found, 4 conflict (wrong state, name taken, busy), 5 not
//! authorized, 6 daemon unreachable, 7 a wait timed out.

// The CLI's output goes through these instead of std's macros, which panic
// (exit 101) when stdout is a closed pipe (`novacron vm list | head -1`).
// Defined before the submodules so that they are in scope there.
macro_rules! println {
    () => {
        $crate::cli::output::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::cli::output::stdout(format_args!($($arg)*))
    };
}
macro_rules! eprintln {
    () => {
        $crate::cli::output::stderr(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! eprint {
    ($($arg:tt)*) => {
        $crate::cli::output::stderr(format_args!($($arg)*))
    };
}

pub mod backup;
pub mod client;
mod console;
mod events;
mod health;
pub mod output;
mod peer;
pub mod preflight;
mod update;
mod upload;

use crate::core::Action;
use crate::types::{
    CloudInit, DiskResize, DiskSpec, ImageImport, NetworkCreate, NetworkKind, Role, SnapshotCreate,
    TokenCreate, VmClone, VmCreate, VmPatch,
};
use clap::{ArgGroup, Args, Parser, Subcommand};
use client::{Client, ClientError};
use hyper::StatusCode;
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
    /// API token: needed over HTTPS, and on the local socket by users other
    /// than root.
    #[arg(long, global = true, env = "NOVACRON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the daemon's certificate (from `novacron status`).
    #[arg(long, global = true, env = "NOVACRON_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// CA certificate (PEM) to verify the daemon's certificate instead of pinning.
    #[arg(long, global = true, env = "NOVACRON_CA")]
    pub ca: Option<PathBuf>,
    /// Local API socket (a `serve --dev` daemon's is novacron-dev/novacron.sock).
    #[arg(long, global = true, env = "NOVACRON_SOCKET", default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Run the data plane: serve guest disks over vhost-user-blk (root;
    /// novacron-dataplane.service).
    Dataplane(DataplaneArgs),
    /// Show the daemon's node, versions and certificate fingerprint.
    Status,
    /// Check daemon, libvirt, store integrity, disk space, certificate
    /// expiry, crashed VMs and the HA peer. Exit 0 ok, 1 warning, 2
    /// critical (also when the daemon cannot be asked).
    Health,
    /// Back up or restore this node (on the host, as root).
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Manage virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Manage base images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Follow the event feed (VM states, operations, images, networks,
    /// snapshots) until Ctrl-C.
    Events {
        /// Start after this sequence number (default: every event the
        /// daemon still holds).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Manage API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Pair this node with a second one: invite, join, status, unpair.
    #[command(subcommand)]
    Peer(peer::PeerCmd),
    /// Show the audit log (admin).
    Audit {
        /// How many of the newest entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Configuration helpers.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check this host's firmware and kernel against a firmware profile
    /// (exit 0 ok, 1 warnings, 2 failures).
    Preflight(preflight::PreflightArgs),
    /// Firmware profiles; set their BIOS attributes over Redfish.
    #[command(subcommand)]
    Firmware(preflight::FirmwareCmd),
    /// A/B updates of the appliance's root filesystem.
    #[command(subcommand)]
    Update(update::UpdateCmd),
    /// Appliance boot-time setup: apply a seed from the ESP, write the
    /// default config, set the host name (root; novacron-setup.service).
    Setup(update::SetupArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DataplaneArgs {
    /// The JSON config the API daemon writes.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

// `serve`'s flags belong to the daemon; the CLI only parses them.
pub use crate::daemon::{ConfigSource, ServeArgs};

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM name or id.
        vm: String,
        /// Wait until every replica is up to date, with the sync's progress
        /// (a bar on a terminal, otherwise a line a second while it moves).
        #[arg(long)]
        wait_sync: bool,
    },
    /// Create a VM (stopped).
    Create(Box<CreateArgs>),
    /// Start a VM.
    Start {
        /// VM name or id.
        vm: String,
    },
    /// Force a VM off (like pulling the power cord).
    Stop {
        /// VM name or id.
        vm: String,
    },
    /// Ask the guest to shut down (ACPI power button).
    Shutdown {
        /// VM name or id.
        vm: String,
        /// Wait up to this many seconds for the guest to stop; exit 7 if it
        /// still runs then.
        #[arg(long)]
        wait: Option<u64>,
        /// Force the VM off if it has not stopped after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Reboot a running VM.
    Reboot {
        /// VM name or id.
        vm: String,
    },
    /// Pause a running VM (its vCPUs stop; memory stays).
    Pause {
        /// VM name or id.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name or id.
        vm: String,
    },
    /// Delete a stopped VM and its disks.
    Delete {
        /// VM name or id.
        vm: String,
        /// Stop it first if it is running.
        #[arg(long)]
        force: bool,
    },
    /// Change vcpus/memory (while stopped), autostart or its priority.
    Edit {
        /// VM name or id.
        vm: String,
        /// Number of virtual CPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long = "memory")]
        memory_mib: Option<u64>,
        /// Start the VM when the host boots (true or false).
        #[arg(long)]
        autostart: Option<bool>,
        /// Start order at boot and in a takeover, -1000 to 1000: higher
        /// starts first, ties by name.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        autostart_priority: Option<i32>,
        /// Seconds a graceful shutdown may take before it is forced.
        #[arg(long)]
        shutdown_timeout: Option<u64>,
    },
    /// Attach to the serial console (Ctrl-] leaves). With piped stdin: send
    /// it, show output for one more second, exit.
    Console {
        /// VM name or id.
        vm: String,
    },
    /// Print the newest part of the serial console log.
    ConsoleLog {
        /// VM name or id.
        vm: String,
        /// How many bytes from the end (default 64 KiB, at most 1 MiB).
        #[arg(long)]
        bytes: Option<u64>,
    },
    /// Move a replicated VM to the paired node: shut down here, wait until
    /// the peer's copy is up to date, start it there (operator).
    Move {
        /// VM name or id.
        vm: String,
    },
    /// Copy a stopped VM under a new name.
    Clone {
        /// The stopped VM to copy (name or id).
        vm: String,
        /// Name of the copy.
        new_name: String,
        /// Full copies of the disks instead of overlays on them.
        #[arg(long)]
        copy: bool,
    },
    /// Manage a VM's snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Attach, detach or resize disks.
    #[command(subcommand)]
    Disk(DiskCmd),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot.
    Create {
        /// VM name or id.
        vm: String,
        /// Snapshot name.
        name: String,
        /// Free text kept with the snapshot (at most 1024 characters).
        #[arg(long, default_value = "")]
        description: String,
        /// Include the guest's memory (running VMs): revert resumes it.
        #[arg(long)]
        memory: bool,
    },
    /// List a VM's snapshots.
    List {
        /// VM name or id.
        vm: String,
    },
    /// Return the VM to a snapshot.
    Revert {
        /// VM name or id.
        vm: String,
        /// Snapshot name.
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// VM name or id.
        vm: String,
        /// Snapshot name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Attach a new disk: blank (--size) or from an image (--image).
    #[command(group(ArgGroup::new("source").required(true).args(["size", "image"])))]
    Attach {
        /// VM name or id.
        vm: String,
        /// A blank disk of this many GiB.
        #[arg(long)]
        size: Option<u64>,
        /// An overlay on this image.
        #[arg(long)]
        image: Option<String>,
        /// With --image: a full, independent copy instead of an overlay.
        #[arg(long, conflicts_with = "size")]
        copy: bool,
    },
    /// Detach and delete a disk (vdb, ...).
    Detach {
        /// VM name or id.
        vm: String,
        /// Disk device (vdb, ...; `vm show` lists them).
        device: String,
    },
    /// Grow a disk.
    Resize {
        /// VM name or id.
        vm: String,
        /// Disk device (vda, vdb, ...).
        device: String,
        /// New size in GiB.
        #[arg(long)]
        size: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Upload a local file (raw or qcow2) as image NAME.
    Upload {
        /// Image name.
        name: String,
        /// Local raw or qcow2 file.
        file: PathBuf,
        /// Skip the SHA-256 the daemon checks the upload against.
        #[arg(long)]
        no_checksum: bool,
    },
    /// Import a file that is already on the daemon's host.
    Import {
        /// Image name.
        name: String,
        /// Path on the daemon's host.
        #[arg(long)]
        path: String,
    },
    /// List images.
    List,
    /// Show one image.
    Show {
        /// Image name.
        name: String,
    },
    /// Delete an image no disk uses.
    Delete {
        /// Image name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// List networks.
    List,
    /// Create a NAT network with DHCP, or one on an existing host bridge.
    Create(NetworkArgs),
    /// Delete a network no VM uses.
    Delete {
        /// Network name.
        name: String,
    },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("kind").required(true).args(["nat", "bridge"])))]
pub struct NetworkArgs {
    /// Network name.
    #[arg(long)]
    pub name: String,
    /// A private subnet behind NAT with DHCP.
    #[arg(long, requires = "subnet")]
    pub nat: bool,
    // The NAT options conflict with --bridge rather than require --nat:
    // a bool flag always counts as present for `requires`.
    /// NAT: the subnet, e.g. 10.20.0.0/24.
    #[arg(long, conflicts_with = "bridge")]
    pub subnet: Option<String>,
    /// NAT: the host's address in the subnet (default: the first one).
    #[arg(long, conflicts_with = "bridge")]
    pub gateway: Option<String>,
    /// NAT: first DHCP address (default: the upper half of the subnet).
    #[arg(long, conflicts_with = "bridge", requires = "dhcp_end")]
    pub dhcp_start: Option<String>,
    /// NAT: last DHCP address.
    #[arg(long, conflicts_with = "bridge", requires = "dhcp_start")]
    pub dhcp_end: Option<String>,
    /// Guests join this existing host bridge.
    #[arg(long)]
    pub bridge: Option<String>,
    /// Bridge: 802.1Q VLAN tag for the guests' ports.
    #[arg(long, requires = "bridge")]
    pub vlan: Option<u16>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// VM name.
    #[arg(long)]
    pub name: String,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory in MiB.
    #[arg(long = "memory", default_value_t = 512)]
    pub memory_mib: u64,
    /// A disk: SIZE_GIB for a blank disk, image:NAME for an overlay on an
    /// image, image:NAME:copy for a full copy of it (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Direct kernel boot: kernel file under the data dir's boot/.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Direct kernel boot: initrd file under the data dir's boot/.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<String>,
    /// Direct kernel boot: the kernel command line.
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// libvirt network for one virtio NIC.
    #[arg(long)]
    pub network: Option<String>,
    /// Start the VM when the host boots.
    #[arg(long)]
    pub autostart: bool,
    /// Start order at boot and in a takeover, -1000 to 1000: higher starts
    /// first, ties by name.
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true)]
    pub autostart_priority: i32,
    /// cloud-init user-data file (NoCloud seed on a CD-ROM).
    #[arg(long, value_name = "FILE")]
    pub cloud_init_user_data: Option<PathBuf>,
    /// cloud-init meta-data file (default: instance-id and hostname).
    #[arg(long, value_name = "FILE", requires = "cloud_init_user_data")]
    pub cloud_init_meta_data: Option<PathBuf>,
    /// cloud-init network-config file.
    #[arg(long, value_name = "FILE", requires = "cloud_init_user_data")]
    pub cloud_init_network_config: Option<PathBuf>,
    /// Seconds a graceful shutdown may take before it is forced (default:
    /// the daemon's setting).
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
    /// Disk replication to the peer: sync (RPO 0), async or off (default:
    /// sync on a paired node, plain disks on a single node).
    #[arg(long, value_name = "MODE", value_parser = ["sync", "async", "off"])]
    pub replication: Option<String>,
    /// Async replication: lag (seconds) beyond which protection is degraded.
    #[arg(long, value_name = "SECS", requires = "replication")]
    pub max_lag: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        /// Token name (for the audit log and `token list`).
        #[arg(long)]
        name: String,
        /// What the token may do: viewer reads, operator also runs VMs,
        /// admin also manages tokens and the host.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or name.
    Revoke {
        /// Token id or name.
        token: String,
        /// Also revoke the last admin token (then only root on the host's
        /// socket is admin).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the embedded default configuration.
    Default,
    /// Check a configuration file.
    Check {
        /// The file to check.
        #[arg(default_value = crate::config::DEFAULT_CONFIG_PATH)]
        path: PathBuf,
    },
}

/// A timed-out wait: `vm shutdown --wait S` and the guest still runs.
pub const EXIT_STILL_RUNNING: i32 = 7;

pub fn exit_code_for(status: StatusCode) -> i32 {
    match status.as_u16() {
        200..=299 => 0,
        // A value the daemon refused is the same mistake as one clap
        // refused (`--size 0` and `--size 0.2`).
        400 => 2,
        404 => 3,
        409 => 4,
        401 | 403 => 5,
        _ => 1,
    }
}

/// `--disk`: `SIZE_GIB` (blank), `image:NAME` (overlay) or
/// `image:NAME:copy` (full copy). Image names cannot contain ':'.
fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let usage = || format!("--disk {s:?}: use SIZE_GIB, image:NAME or image:NAME:copy");
    if let Some(rest) = s.strip_prefix("image:") {
        let (name, copy) = match rest.split_once(':') {
            None => (rest, false),
            Some((name, "copy")) => (name, true),
            Some(_) => return Err(usage()),
        };
        if name.is_empty() {
            return Err(usage());
        }
        return Ok(DiskSpec { size_gib: None, image: Some(name.to_string()), copy });
    }
    let size = s.trim_end_matches(['G', 'g']).parse::<u64>().map_err(|_| usage())?;
    Ok(DiskSpec { size_gib: Some(size), image: None, copy: false })
}

fn read_text(flag: &str, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// The cloud-init seed from the `--cloud-init-*` files, if any were given.
fn cloud_init(a: &CreateArgs) -> Result<Option<CloudInit>, String> {
    let Some(user) = &a.cloud_init_user_data else { return Ok(None) };
    let opt = |flag, p: &Option<PathBuf>| p.as_deref().map(|p| read_text(flag, p)).transpose();
    Ok(Some(CloudInit {
        user_data: read_text("--cloud-init-user-data", user)?,
        meta_data: opt("--cloud-init-meta-data", &a.cloud_init_meta_data)?,
        network_config: opt("--cloud-init-network-config", &a.cloud_init_network_config)?,
    }))
}

fn network_create(a: NetworkArgs) -> NetworkCreate {
    NetworkCreate {
        name: a.name,
        kind: if a.nat { NetworkKind::Nat } else { NetworkKind::Bridge },
        subnet: a.subnet,
        gateway: a.gateway,
        dhcp_start: a.dhcp_start,
        dhcp_end: a.dhcp_end,
        bridge: a.bridge,
        vlan: a.vlan,
    }
}

fn client_error_code(e: &ClientError) -> i32 {
    if matches!(e, ClientError::Connect { .. }) {
        6
    } else {
        1
    }
}

pub fn client(conn: &ConnArgs) -> Result<Client, ClientError> {
    match &conn.url {
        Some(url) => Client::https(url, conn.token.clone(), conn.fingerprint.as_deref(), conn.ca.as_deref()),
        None => Ok(Client::socket(conn.socket.clone()).with_token(conn.token.clone())),
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
    let enc = |v: &dyn erased::Json| Some(v.to_json());
    let (result, kind) = match cli.command {
        Cmd::Serve(_) | Cmd::Dataplane(_) | Cmd::Config(_) | Cmd::Preflight(_) | Cmd::Firmware(_) => {
            unreachable!("handled by main")
        }
        Cmd::Status => return status(&c, json).await,
        Cmd::Health => return health::run(&c, json).await,
        Cmd::Peer(cmd) => return peer::run(cmd, &c, json).await,
        Cmd::Backup(cmd) => return backup::run(cmd, &cli.conn, json).await,
        Cmd::Update(cmd) => return update::run(cmd, &c, json).await,
        Cmd::Setup(args) => return update::run_setup(args, &c).await,
        Cmd::Vm(VmCmd::List) => (c.call(Action::VmList, &[], "", None).await, output::Kind::VmList),
        Cmd::Vm(VmCmd::Show { vm, wait_sync: true }) if !json => return wait_sync(&c, &vm).await,
        Cmd::Vm(VmCmd::Show { vm, .. }) => (c.call(Action::VmGet, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Create(a)) => {
            let a = *a;
            let parsed = a.disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>, _>>();
            let (disks, cloud_init) = match parsed.and_then(|d| Ok((d, cloud_init(&a)?))) {
                Ok(v) => v,
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
                autostart_priority: a.autostart_priority,
                cloud_init,
                shutdown_timeout_secs: a.shutdown_timeout,
                replication: a.replication.as_deref().map(|m| crate::types::ReplicationSpec {
                    mode: match m {
                        "sync" => crate::types::ReplicationMode::Sync,
                        "async" => crate::types::ReplicationMode::Async,
                        _ => crate::types::ReplicationMode::Off,
                    },
                    max_lag_seconds: a.max_lag.unwrap_or(crate::types::DEFAULT_MAX_LAG_SECONDS),
                }),
            };
            (c.call(Action::VmCreate, &[], "", enc(&spec)).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Start { vm }) => (c.call(Action::VmStart, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Stop { vm }) => (c.call(Action::VmStop, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Reboot { vm }) => (c.call(Action::VmReboot, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Pause { vm }) => (c.call(Action::VmPause, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Resume { vm }) => (c.call(Action::VmResume, &[&vm], "", None).await, output::Kind::Vm),
        Cmd::Vm(VmCmd::Shutdown { vm, wait, timeout }) => {
            let mut q = Vec::new();
            if let Some(w) = wait {
                q.push(format!("wait={w}"));
            }
            if let Some(t) = timeout {
                q.push(format!("timeout={t}"));
            }
            let qs = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
            let result = c.call(Action::VmShutdown, &[&vm], &qs, None).await;
            if let (Some(w), Ok((StatusCode::ACCEPTED, body))) = (wait, &result) {
                // 202 after a wait: the guest ignored the request so far.
                output::print(StatusCode::ACCEPTED, body, output::Kind::Vm, json);
                eprintln!(
                    "novacron: {vm} is still running {w} s after the shutdown request (the guest has not \
                     powered off); force it off with `novacron vm stop {vm}`, or give --timeout S"
                );
                return EXIT_STILL_RUNNING;
            }
            (result, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Delete { vm, force }) => {
            let q = if force { "?force=true" } else { "" };
            (c.call(Action::VmDelete, &[&vm], q, None).await, output::Kind::Deleted(vm))
        }
        Cmd::Vm(VmCmd::Edit { vm, vcpus, memory_mib, autostart, autostart_priority, shutdown_timeout }) => {
            let patch = VmPatch {
                vcpus,
                memory_mib,
                autostart,
                autostart_priority,
                shutdown_timeout_secs: shutdown_timeout,
            };
            (c.call(Action::VmUpdate, &[&vm], "", enc(&patch)).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Console { vm }) => return console::run(&c, &vm, json).await,
        Cmd::Vm(VmCmd::ConsoleLog { vm, bytes }) => {
            let q = bytes.map(|b| format!("?bytes={b}")).unwrap_or_default();
            (c.call(Action::VmConsoleLog, &[&vm], &q, None).await, output::Kind::Raw)
        }
        Cmd::Vm(VmCmd::Move { vm }) => {
            let r = c.call(Action::VmMove, &[&vm], "", None).await;
            if let Ok((s, body)) = &r {
                if s.is_success() && !json {
                    return match serde_json::from_slice::<crate::types::VmMoved>(body) {
                        Ok(m) => {
                            println!("{}", m.message);
                            0
                        }
                        Err(e) => {
                            eprintln!("novacron: unreadable answer: {e}");
                            1
                        }
                    };
                }
            }
            (r, output::Kind::Raw)
        }
        Cmd::Vm(VmCmd::Clone { vm, new_name, copy }) => {
            let req = VmClone { name: new_name, copy };
            (c.call(Action::VmClone, &[&vm], "", enc(&req)).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Snapshot(SnapshotCmd::Create { vm, name, description, memory })) => {
            let req = SnapshotCreate { name, description, memory };
            (c.call(Action::VmSnapshotCreate, &[&vm], "", enc(&req)).await, output::Kind::Snapshot)
        }
        Cmd::Vm(VmCmd::Snapshot(SnapshotCmd::List { vm })) => {
            (c.call(Action::VmSnapshotList, &[&vm], "", None).await, output::Kind::SnapshotList)
        }
        Cmd::Vm(VmCmd::Snapshot(SnapshotCmd::Revert { vm, name })) => {
            (c.call(Action::VmSnapshotRevert, &[&vm, &name], "", None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Snapshot(SnapshotCmd::Delete { vm, name })) => (
            c.call(Action::VmSnapshotDelete, &[&vm, &name], "", None).await,
            output::Kind::Deleted(format!("snapshot {name} of {vm}")),
        ),
        Cmd::Vm(VmCmd::Disk(DiskCmd::Attach { vm, size, image, copy })) => {
            let spec = DiskSpec { size_gib: size, image, copy };
            (c.call(Action::VmDiskAttach, &[&vm], "", enc(&spec)).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Disk(DiskCmd::Detach { vm, device })) => {
            (c.call(Action::VmDiskDetach, &[&vm, &device], "", None).await, output::Kind::Vm)
        }
        Cmd::Vm(VmCmd::Disk(DiskCmd::Resize { vm, device, size })) => {
            let req = DiskResize { size_gib: size };
            (c.call(Action::VmDiskResize, &[&vm, &device], "", enc(&req)).await, output::Kind::Vm)
        }
        Cmd::Image(ImageCmd::Upload { name, file, no_checksum }) => {
            match upload::upload(&c, &name, &file, !no_checksum).await {
                Ok((status, body)) => return output::print(status, &body, output::Kind::Image, json),
                Err(e @ upload::UploadError::File(..)) => {
                    eprintln!("novacron: {e}");
                    return 2;
                }
                Err(e @ upload::UploadError::Exists(_)) => {
                    // Worded like the daemon's own answer to the PUT.
                    let err = crate::types::ErrorBody {
                        error: crate::types::ErrorDetail {
                            code: "name_taken".into(),
                            message: e.to_string(),
                        },
                    };
                    return output::print(
                        StatusCode::CONFLICT,
                        &enc(&err).unwrap_or_default(),
                        output::Kind::Raw,
                        json,
                    );
                }
                Err(upload::UploadError::Client(e)) => {
                    eprintln!("novacron: {e}");
                    return client_error_code(&e);
                }
            }
        }
        Cmd::Image(ImageCmd::Import { name, path }) => {
            let req = ImageImport { name, path };
            (c.call(Action::ImageImport, &[], "", enc(&req)).await, output::Kind::Image)
        }
        Cmd::Image(ImageCmd::List) => {
            (c.call(Action::ImageList, &[], "", None).await, output::Kind::ImageList)
        }
        Cmd::Image(ImageCmd::Show { name }) => {
            (c.call(Action::ImageGet, &[&name], "", None).await, output::Kind::Image)
        }
        Cmd::Image(ImageCmd::Delete { name }) => (
            c.call(Action::ImageDelete, &[&name], "", None).await,
            output::Kind::Deleted(format!("image {name}")),
        ),
        Cmd::Network(NetworkCmd::List) => {
            (c.call(Action::NetworkList, &[], "", None).await, output::Kind::NetworkList)
        }
        Cmd::Network(NetworkCmd::Create(a)) => {
            let req = network_create(a);
            (c.call(Action::NetworkCreate, &[], "", enc(&req)).await, output::Kind::Network)
        }
        Cmd::Network(NetworkCmd::Delete { name }) => (
            c.call(Action::NetworkDelete, &[&name], "", None).await,
            output::Kind::Deleted(format!("network {name}")),
        ),
        Cmd::Events { after } => return events::follow(&c, after, json).await,
        Cmd::Token(TokenCmd::Create { name, role }) => {
            let req = TokenCreate { name, role: Role::parse(&role).expect("clap checked the role") };
            (c.call(Action::TokenCreate, &[], "", enc(&req)).await, output::Kind::TokenCreated)
        }
        Cmd::Token(TokenCmd::List) => {
            (c.call(Action::TokenList, &[], "", None).await, output::Kind::TokenList)
        }
        Cmd::Token(TokenCmd::Revoke { token, force }) => {
            let q = if force { "?force=true" } else { "" };
            (c.call(Action::TokenRevoke, &[&token], q, None).await, output::Kind::Deleted(token))
        }
        Cmd::Audit { limit } => {
            (c.call(Action::AuditList, &[], &format!("?limit={limit}"), None).await, output::Kind::Audit)
        }
    };
    match result {
        Ok((status, body)) => output::print(status, &body, kind, json),
        Err(e) => {
            eprintln!("novacron: {e}");
            client_error_code(&e)
        }
    }
}

/// `vm show --wait-sync`: polls the VM until its replicas are up to date.
async fn wait_sync(c: &Client, vm: &str) -> i32 {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    // Without a terminal: a line when it changed, at most one a second.
    let mut last = (std::time::Instant::now() - std::time::Duration::from_secs(10), String::new());
    loop {
        let (status, body) = match c.call(Action::VmGet, &[vm], "", None).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("novacron: {e}");
                return client_error_code(&e);
            }
        };
        if !status.is_success() {
            return output::print(status, &body, output::Kind::Raw, false);
        }
        let Ok(v) = serde_json::from_slice::<crate::types::Vm>(&body) else {
            eprintln!("novacron: unreadable answer");
            return 1;
        };
        let Some(r) = &v.replication else {
            println!("{}: not replicated", v.name);
            return 0;
        };
        let line = r.disks.iter().map(output::replica_line).collect::<Vec<_>>().join(" | ");
        if r.protection == "protected" || r.protection == "unprotected" || r.protection == "kept_replica" {
            if tty {
                eprint!("\r\x1b[K");
            }
            println!("{}: {} ({line})", v.name, r.protection);
            return 0;
        }
        if tty {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else if line != last.1 && last.0.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("{line}");
            last = (std::time::Instant::now(), line);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

async fn status(c: &Client, json: bool) -> i32 {
    let host = match c.call(Action::HostInfo, &[], "", None).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 6;
        }
    };
    if host.0 != StatusCode::OK {
        return output::print(host.0, &host.1, output::Kind::Host, json);
    }
    let ready = c.call(Action::Ready, &[], "", None).await.map(|r| r.0 == StatusCode::OK).unwrap_or(false);
    let vms = c.call(Action::VmList, &[], "", None).await.ok();
    let peer = c.call(Action::PeerGet, &[], "", None).await.ok().filter(|p| p.0 == StatusCode::OK);
    output::status(
        &host.1,
        ready,
        vms.as_ref().map(|v| &v.1[..]),
        peer.as_ref().map(|p| &p.1[..]),
        json,
        &c.describe(),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// `--help` is the CLI's manual: every command says what it does and
    /// every flag and argument what it takes.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name()).trim().to_string();
            if cmd.get_about().is_none() {
                missing.push(format!("`{path}`: no about"));
            }
            for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if a.get_help().is_none() {
                    missing.push(format!("`{path}` {}: no help", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "without help text:\n{}", missing.join("\n"));
    }

    #[test]
    fn disk_flags_parse() {
        let d = parse_disk("10").unwrap();
        assert_eq!((d.size_gib, d.image, d.copy), (Some(10), None, false));
        assert_eq!(parse_disk("20G").unwrap().size_gib, Some(20));
        let d = parse_disk("image:base.qcow2").unwrap();
        assert_eq!((d.size_gib, d.image.as_deref(), d.copy), (None, Some("base.qcow2"), false));
        let d = parse_disk("image:base.qcow2:copy").unwrap();
        assert_eq!((d.image.as_deref(), d.copy), (Some("base.qcow2"), true));
        for bad in ["", "x", "image:", "image::copy", "image:a:clone", "-1"] {
            assert!(parse_disk(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn network_flags_build_the_request() {
        let cli = Cli::try_parse_from([
            "novacron",
            "network",
            "create",
            "--name",
            "lan",
            "--nat",
            "--subnet",
            "10.20.0.0/24",
        ])
        .unwrap();
        let Cmd::Network(NetworkCmd::Create(a)) = cli.command else { panic!("parsed {:?}", cli.command) };
        let req = network_create(a);
        assert_eq!(
            (req.kind, req.subnet.as_deref(), req.bridge),
            (NetworkKind::Nat, Some("10.20.0.0/24"), None)
        );
        let cli = Cli::try_parse_from([
            "novacron", "network", "create", "--name", "b", "--bridge", "br0", "--vlan", "7",
        ])
        .unwrap();
        let Cmd::Network(NetworkCmd::Create(a)) = cli.command else { panic!("parsed {:?}", cli.command) };
        assert_eq!(network_create(a).vlan, Some(7));
        for bad in [
            &["network", "create", "--name", "x"][..],
            &["network", "create", "--name", "x", "--nat", "--bridge", "b"],
            &["network", "create", "--name", "x", "--bridge", "b", "--subnet", "10.0.0.0/24"],
            &["network", "create", "--name", "x", "--nat", "--subnet", "s", "--dhcp-start", "a"],
            &["vm", "disk", "attach", "v", "--size", "1", "--image", "i"],
            &["vm", "disk", "attach", "v", "--size", "1", "--copy"],
            &["vm", "create", "--name", "v", "--cloud-init-meta-data", "f"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("novacron").chain(bad.iter().copied())).is_err(),
                "{bad:?}"
            );
        }
    }
}
