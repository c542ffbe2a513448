//! `novacron update` (A/B host updates) and `novacron setup` (appliance
//! boot-time setup and the first-boot banner).

use super::client::Client;
use super::output;
use crate::core::Action;
use crate::ops::{setup, update as hu};
use crate::types::{ErrorBody, UpdateState, UpdateView};
use clap::Subcommand;
use hyper::StatusCode;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum UpdateCmd {
    /// Install an update bundle into the other root slot and reboot into it
    /// (admin). Running guests are shut down cleanly first and started again
    /// after the reboot; if the new slot does not come up, the host goes
    /// back to the current one by itself.
    Apply {
        /// The bundle (novacron-update-VERSION-x86_64.tar).
        file: PathBuf,
        /// Its SHA-256 (default: from FILE.sha256 next to it).
        #[arg(long)]
        sha256: Option<String>,
        /// Boot attempts of the new slot before falling back (1-9).
        #[arg(long, default_value_t = hu::DEFAULT_TRIES)]
        tries: u32,
        /// Return once the daemon has verified the bundle.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the slots, the running version and the latest update.
    Status,
    /// Carry out a pending update request (root; novacron-update.service).
    Install {
        /// Folder holding the update request and the verified bundle.
        #[arg(long, default_value = "/var/lib/novacron/update")]
        dir: PathBuf,
        /// Where the ESP is mounted (boot entries are written there).
        #[arg(long, default_value = setup::ESP)]
        esp: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    #[command(subcommand)]
    pub announce: Option<SetupCmd>,
    /// Where the ESP is mounted (the seed is read from its seed/ folder).
    #[arg(long, default_value = setup::ESP)]
    pub esp: PathBuf,
    /// Configuration folder (on the appliance a link into the data
    /// partition).
    #[arg(long, default_value = "/etc/novacron")]
    pub etc: PathBuf,
    /// Appliance image: also apply the ESP seed, prepare the networkd and
    /// SSH folders, set the host name from `node.name`.
    #[arg(long)]
    pub appliance: bool,
}

#[derive(Subcommand, Debug)]
pub enum SetupCmd {
    /// Print the API address, certificate fingerprint and first admin token
    /// to the console and the journal, once (novacron-firstboot.service).
    Announce {
        /// Data directory holding initial-admin-token.
        #[arg(long, default_value = "/var/lib/novacron")]
        data_dir: PathBuf,
        /// Configuration file (for the API's listen addresses).
        #[arg(long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

/// `FILE.sha256` in `sha256sum` format: the first word.
fn sidecar_sha256(file: &Path) -> Option<String> {
    let mut p = file.as_os_str().to_owned();
    p.push(".sha256");
    let text = std::fs::read_to_string(PathBuf::from(p)).ok()?;
    text.split_whitespace().next().map(|s| s.to_ascii_lowercase())
}

fn print_view(v: &UpdateView) {
    match (&v.booted_slot, v.appliance) {
        (Some(s), true) => {
            println!("running:  slot {s}, version {}", v.booted_version.as_deref().unwrap_or("unknown"))
        }
        _ => println!("running:  not an appliance image ({})", v.reason.as_deref().unwrap_or("?")),
    }
    match &v.update {
        None => println!("update:   none so far"),
        Some(u) => {
            println!("update:   {} -> slot {}: {}", u.version, u.target_slot, state_word(u.state));
            if let Some(m) = &u.message {
                println!("          {m}");
            }
        }
    }
}

fn state_word(s: UpdateState) -> &'static str {
    match s {
        UpdateState::Installing => "installing",
        UpdateState::StoppingGuests => "shutting guests down",
        UpdateState::Rebooting => "rebooting",
        UpdateState::Succeeded => "succeeded",
        UpdateState::RolledBack => "ROLLED BACK",
        UpdateState::Failed => "FAILED",
    }
}

async fn get_view(c: &Client) -> Result<(StatusCode, bytes::Bytes), super::client::ClientError> {
    c.call(Action::HostUpdateStatus, &[], "", None).await
}

pub async fn run(cmd: UpdateCmd, c: &Client, json: bool) -> i32 {
    match cmd {
        UpdateCmd::Install { dir, esp } => match hu::run_installer(&dir, &esp) {
            Ok(None) => {
                println!("no update request in {}", dir.display());
                0
            }
            Ok(Some(r)) => {
                println!("{:?}: {}", r.state, r.message.unwrap_or_default());
                i32::from(r.state != hu::InstallState::Installed)
            }
            Err(e) => {
                eprintln!("novacron: {e}");
                1
            }
        },
        UpdateCmd::Status => match get_view(c).await {
            Ok((status, body)) if status == StatusCode::OK && !json => {
                match serde_json::from_slice::<UpdateView>(&body) {
                    Ok(v) => {
                        print_view(&v);
                        match v.update.map(|u| u.state) {
                            Some(UpdateState::Failed | UpdateState::RolledBack) => 1,
                            _ => 0,
                        }
                    }
                    Err(e) => {
                        eprintln!("novacron: unexpected answer: {e}");
                        1
                    }
                }
            }
            Ok((status, body)) => output::print(status, &body, output::Kind::Raw, json),
            Err(e) => {
                eprintln!("novacron: {e}");
                super::client_error_code(&e)
            }
        },
        UpdateCmd::Apply { file, sha256, tries, no_wait } => {
            let Some(sha) = sha256.map(|s| s.to_ascii_lowercase()).or_else(|| sidecar_sha256(&file)) else {
                eprintln!(
                    "novacron: no SHA-256 for {}: pass --sha256 or put {}.sha256 next to it",
                    file.display(),
                    file.display()
                );
                return 2;
            };
            let (status, body) = match super::upload::send_file(
                c,
                (Action::HostUpdate, &[], &format!("?tries={tries}")),
                &file,
                Some(sha),
            )
            .await
            {
                Ok(r) => r,
                Err(super::upload::UploadError::Client(e)) => {
                    eprintln!("novacron: {e}");
                    return super::client_error_code(&e);
                }
                Err(e) => {
                    eprintln!("novacron: {e}");
                    return 2;
                }
            };
            if status != StatusCode::ACCEPTED {
                return output::print(status, &body, output::Kind::Raw, json);
            }
            if no_wait {
                return output::print(status, &body, output::Kind::Raw, true);
            }
            follow(c, json).await
        }
    }
}

/// Shows the update's progress until the host reboots or it fails.
async fn follow(c: &Client, json: bool) -> i32 {
    let mut last = None;
    loop {
        let view = match get_view(c).await {
            Ok((StatusCode::OK, body)) => serde_json::from_slice::<UpdateView>(&body).ok(),
            // The daemon going away once the slot is written is the reboot
            // (guests can be down and the host gone between two polls).
            _ if matches!(last, Some(UpdateState::StoppingGuests | UpdateState::Rebooting)) => {
                println!("the host is rebooting; `novacron update status` tells the outcome once it is back");
                return 0;
            }
            Ok((status, body)) => return output::print(status, &body, output::Kind::Raw, json),
            Err(e) => {
                eprintln!("novacron: {e}");
                return super::client_error_code(&e);
            }
        };
        let Some(u) = view.as_ref().and_then(|v| v.update.clone()) else { return 1 };
        if last != Some(u.state) {
            if json {
                println!("{}", serde_json::to_string(&view).unwrap_or_default());
            } else {
                println!("{}: {}", state_word(u.state), u.message.as_deref().unwrap_or(&u.version));
            }
            last = Some(u.state);
        }
        match u.state {
            UpdateState::Failed | UpdateState::RolledBack => return 1,
            UpdateState::Succeeded => return 0,
            UpdateState::Rebooting => {
                println!("the host is rebooting into slot {}", u.target_slot);
                return 0;
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

pub async fn run_setup(args: SetupArgs, c: &Client) -> i32 {
    match args.announce {
        None => {
            let s = setup::Setup {
                appliance: args.appliance,
                esp: args.esp,
                etc: args.etc,
                ..Default::default()
            };
            match s.run() {
                Ok(r) => {
                    if !r.seeded.is_empty() {
                        println!("novacron setup: applied the seed from the ESP: {}", r.seeded.join(", "));
                    }
                    if r.default_config {
                        println!("novacron setup: wrote the default configuration");
                    }
                    if let Some(h) = r.hostname {
                        println!("novacron setup: host name {h}");
                    }
                    0
                }
                Err(e) => {
                    eprintln!("novacron setup: {e}");
                    1
                }
            }
        }
        Some(SetupCmd::Announce { data_dir, config }) => announce(c, &data_dir, &config).await,
    }
}

async fn announce(c: &Client, data_dir: &Path, config: &Path) -> i32 {
    let token_file = data_dir.join("initial-admin-token");
    let Ok(token) = std::fs::read_to_string(&token_file) else {
        println!("novacron: no first admin token to show ({} is gone)", token_file.display());
        return 0;
    };
    let cfg = match crate::config::Config::load(config, false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 1;
        }
    };
    let host = match c.call(Action::HostInfo, &[], "", None).await {
        Ok((StatusCode::OK, body)) => serde_json::from_slice::<crate::types::HostInfo>(&body).ok(),
        Ok((_, body)) => {
            let msg = serde_json::from_slice::<ErrorBody>(&body).map(|e| e.error.message).unwrap_or_default();
            eprintln!("novacron: the daemon refused: {msg}");
            return 1;
        }
        Err(e) => {
            eprintln!("novacron: {e}");
            return 6;
        }
    };
    let Some(host) = host else { return 1 };
    let addrs: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|s| std::net::IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
            })
            .filter(|ip| !matches!(ip, std::net::IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
            .collect()
        })
        .unwrap_or_default();
    let urls = setup::api_urls(&cfg.api.listen, &addrs);
    let text = setup::banner(&urls, &host.tls_fingerprint, token.trim());
    // stdout is the journal and the console (StandardOutput=journal+console).
    println!("{text}");
    if let Err(e) = std::fs::remove_file(&token_file) {
        eprintln!("novacron: cannot remove {}: {e}", token_file.display());
    }
    0
}
