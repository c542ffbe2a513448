//! `novacron backup create|restore`: runs on the host, as root, against the
//! data dir (see `store::backup` for the archive). The database copy is
//! consistent while the daemon runs; disk copies are only consistent for
//! guests that do not run, so running guests are refused unless
//! `--pause-running` pauses them (through the API) for the copy.

use super::client::Client;
use super::ConnArgs;
use crate::cli::{ConfigSource, ServeArgs};
use crate::core::Action;
use crate::store::backup::{self, BackupError, CreateOptions, RestoreOptions};
use crate::types::{VmList, VmState};
use clap::{Args, Subcommand};
use hyper::StatusCode;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Write a backup of this node to FILE: the database (SQLite online
    /// backup, consistent while the daemon runs), TLS certificate and key,
    /// the configuration file and, with --include-disks, disks, images and
    /// boot files.
    Create(CreateArgs),
    /// Restore a backup into an empty data dir (stop the daemon first).
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The archive to write (a tar file).
    pub file: PathBuf,
    #[command(flatten)]
    pub source: ConfigSource,
    /// Also copy disks/, images/ and boot/.
    #[arg(long)]
    pub include_disks: bool,
    /// Pause running VMs (via the API) while their disks are copied, then
    /// resume them. Without it, running VMs make --include-disks fail.
    #[arg(long, requires = "include_disks")]
    pub pause_running: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The archive to restore.
    pub file: PathBuf,
    #[command(flatten)]
    pub source: ConfigSource,
    /// Restore over a data dir that is not empty.
    #[arg(long)]
    pub force: bool,
}

fn config_of(s: &ConfigSource) -> Result<crate::config::Config, String> {
    let args = ServeArgs {
        source: s.clone(),
        listen: Vec::new(),
        socket_path: None,
        libvirt_uri: None,
        domain_type: None,
    };
    crate::daemon::effective_config(&args).map_err(|e| e.to_string())
}

/// The API client: `--url` if given, else the socket of the configured
/// daemon unless `--socket` names another.
fn api(conn: &ConnArgs, cfg: &crate::config::Config) -> Result<Client, String> {
    if conn.url.is_none() && conn.socket.as_os_str() == crate::config::DEFAULT_SOCKET {
        return Ok(Client::socket(cfg.socket_path()));
    }
    super::client(conn).map_err(|e| e.to_string())
}

fn exit_for(e: &BackupError) -> i32 {
    match e {
        BackupError::NotEmpty(_) | BackupError::Store(crate::store::StoreError::Locked { .. }) => 4,
        _ => 1,
    }
}

pub async fn run(cmd: BackupCmd, conn: &ConnArgs, json: bool) -> i32 {
    match cmd {
        BackupCmd::Create(a) => create(a, conn, json).await,
        BackupCmd::Restore(a) => restore(a, conn, json).await,
    }
}

/// Managed VMs whose disks may be written to right now (the disks of
/// unmanaged domains are not in the data dir).
fn active(vms: &VmList) -> Vec<(String, String)> {
    vms.vms
        .iter()
        .filter(|v| v.managed)
        .filter(|v| {
            !matches!(v.state, VmState::Stopped | VmState::Crashed | VmState::Missing | VmState::Paused)
        })
        .map(|v| (v.id.to_string(), v.name.clone()))
        .collect()
}

async fn create(a: CreateArgs, conn: &ConnArgs, json: bool) -> i32 {
    let cfg = match config_of(&a.source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    let mut paused: Vec<(String, String)> = Vec::new();
    let mut client = None;
    if a.include_disks {
        let c = match api(conn, &cfg) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("novacron: {e}");
                return 2;
            }
        };
        match c.call(Action::VmList, &[], "", None).await {
            Ok((StatusCode::OK, body)) => {
                let vms: VmList = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("novacron: unreadable VM list: {e}");
                        return 1;
                    }
                };
                let running = active(&vms);
                if !running.is_empty() && !a.pause_running {
                    let names: Vec<&str> = running.iter().map(|r| r.1.as_str()).collect();
                    eprintln!(
                        "novacron: VMs running: {}; copies of their disks would not be consistent. \
                         Stop them or pass --pause-running.",
                        names.join(", ")
                    );
                    return 4;
                }
                for (id, name) in running {
                    match c.call(Action::VmPause, &[id.as_str()], "", None).await {
                        Ok((StatusCode::OK, _)) => paused.push((id, name)),
                        Ok((status, body)) => {
                            eprintln!(
                                "novacron: cannot pause {name}: HTTP {status} {}",
                                String::from_utf8_lossy(&body)
                            );
                            resume(&c, &paused).await;
                            return super::exit_code_for(status).max(1);
                        }
                        Err(e) => {
                            eprintln!("novacron: cannot pause {name}: {e}");
                            resume(&c, &paused).await;
                            return 1;
                        }
                    }
                }
            }
            Ok((status, body)) => {
                eprintln!("novacron: cannot list VMs: HTTP {status} {}", String::from_utf8_lossy(&body));
                return super::exit_code_for(status).max(1);
            }
            Err(e) => eprintln!(
                "novacron: warning: cannot ask the daemon which VMs run ({e}); \
                 disks of guests running outside its control are copied as they are"
            ),
        }
        client = Some(c);
    }
    let opts = CreateOptions {
        data_dir: cfg.data_dir.clone(),
        config: Some(a.source.config.clone()).filter(|c| c.is_file()),
        include_disks: a.include_disks,
    };
    let out = a.file.clone();
    let result = tokio::task::spawn_blocking(move || backup::create(&opts, &out))
        .await
        .unwrap_or_else(|e| Err(BackupError::Invalid(e.to_string())));
    if let Some(c) = &client {
        resume(c, &paused).await;
    }
    match result {
        Ok(m) => {
            if json {
                println!("{}", serde_json::to_string(&m).unwrap_or_default());
            } else {
                let bytes: u64 = m.files.iter().map(|f| f.size).sum();
                println!(
                    "backup of node {} ({}) written to {}: {} files, {} bytes",
                    m.node_name,
                    m.node_id,
                    a.file.display(),
                    m.files.len() + 1,
                    bytes
                );
            }
            0
        }
        Err(e) => {
            eprintln!("novacron: backup failed: {e}");
            exit_for(&e)
        }
    }
}

async fn resume(c: &Client, vms: &[(String, String)]) {
    for (id, name) in vms {
        match c.call(Action::VmResume, &[id.as_str()], "", None).await {
            Ok((StatusCode::OK, _)) => {}
            Ok((status, _)) => eprintln!("novacron: warning: cannot resume {name}: HTTP {status}"),
            Err(e) => eprintln!("novacron: warning: cannot resume {name}: {e}"),
        }
    }
}

async fn restore(a: RestoreArgs, conn: &ConnArgs, json: bool) -> i32 {
    let cfg = match config_of(&a.source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    // Never under a running daemon: it would keep serving the old state.
    if let Ok(c) = api(conn, &cfg) {
        if let Ok((StatusCode::OK, _)) = c.call(Action::Health, &[], "", None).await {
            eprintln!("novacron: a daemon answers on {}; stop it before restoring", c.describe());
            return 4;
        }
    }
    let opts = RestoreOptions {
        data_dir: cfg.data_dir.clone(),
        config: Some(a.source.config.clone()),
        force: a.force,
    };
    let file = a.file.clone();
    let result = tokio::task::spawn_blocking(move || backup::restore(&file, &opts))
        .await
        .unwrap_or_else(|e| Err(BackupError::Invalid(e.to_string())));
    match result {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r.manifest).unwrap_or_default());
            } else {
                println!(
                    "restored node {} ({}) from the backup of {} into {}",
                    r.manifest.node_name,
                    r.manifest.node_id,
                    r.manifest.created_at,
                    cfg.data_dir.display()
                );
                if r.relocated > 0 {
                    println!(
                        "paths of {} VMs and images now point into {} (the backup came from {})",
                        r.relocated,
                        cfg.data_dir.display(),
                        r.manifest.data_dirs.first().map_or("another data dir", String::as_str)
                    );
                }
                if let Some(c) = r.config_written {
                    println!("configuration written to {}", c.display());
                }
            }
            0
        }
        Err(e) => {
            eprintln!("novacron: restore failed: {e}");
            exit_for(&e)
        }
    }
}
