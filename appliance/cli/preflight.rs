//! `novacron preflight` and `novacron firmware ...`: local commands that do
//! not talk to the daemon (main.rs runs them directly).
//!
//! Exit codes: preflight is Nagios-like (0 all ok, 1 warnings, 2 failures,
//! 3 the profile could not be loaded); `firmware apply` returns 0 when the
//! BIOS matches or was changed, 1 on an error or when the BMC lacks a
//! required attribute, 2 on bad arguments, 6 when the BMC is unreachable.

use crate::ops::firmware::{self, Profile};
use crate::ops::preflight::{self, Root, Status};
use crate::ops::redfish::{self, Bmc, Plan};
use crate::ops::OpsError;
use clap::{ArgGroup, Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct PreflightArgs {
    /// Firmware profile (default: generic-intel or generic-amd, from the
    /// CPU vendor). `novacron firmware profiles` lists them.
    #[arg(long)]
    pub profile: Option<String>,
    /// Load the profile from a TOML file instead.
    #[arg(long, conflicts_with = "profile")]
    pub profile_file: Option<PathBuf>,
    /// Data directory whose file system must have the free space (default:
    /// the profile's, /var/lib/novacron).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum FirmwareCmd {
    /// Set a profile's BIOS attributes through the BMC's Redfish API; they
    /// take effect at the next reboot.
    Apply(ApplyArgs),
    /// List the built-in firmware profiles.
    Profiles,
    /// Print a built-in profile (TOML), e.g. to start a custom one.
    Show {
        /// Profile name (`novacron firmware profiles`).
        profile: String,
    },
}

#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("which").required(true).args(["profile", "profile_file"])))]
pub struct ApplyArgs {
    /// BMC address: http://HOST[:PORT] or https://HOST[:PORT].
    #[arg(long, env = "NOVACRON_BMC_URL")]
    pub bmc: String,
    /// Built-in firmware profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// Profile from a TOML file.
    #[arg(long)]
    pub profile_file: Option<PathBuf>,
    /// BMC user (HTTP Basic auth).
    #[arg(long, env = "NOVACRON_BMC_USER")]
    pub user: Option<String>,
    /// BMC password.
    #[arg(long, env = "NOVACRON_BMC_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Accept any certificate from an https BMC (BMCs ship self-signed ones).
    #[arg(long)]
    pub insecure: bool,
    /// Pin the https BMC's certificate by its SHA-256 fingerprint instead.
    #[arg(long, env = "NOVACRON_BMC_FINGERPRINT")]
    pub bmc_fingerprint: Option<String>,
    /// Show what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `novacron preflight`.
pub fn run_preflight(args: &PreflightArgs, json: bool) -> i32 {
    let root = Root::host();
    let cpuinfo = std::fs::read_to_string(root.proc.join("cpuinfo")).ok();
    let profile =
        match firmware::resolve(args.profile.as_deref(), args.profile_file.as_deref(), cpuinfo.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("novacron: {e}");
                return 3;
            }
        };
    let data_dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from(&profile.disk.data_dir));
    let report = preflight::run(&profile, &root, &data_dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        println!("profile {}: {}", profile.name, profile.description);
        for f in &report.findings {
            println!("[{:<4}] {:<22} {}", f.status.as_str(), f.id, f.detail);
            if let Some(fix) = &f.fix {
                println!("       {:<22} fix: {fix}", "");
            }
        }
        let (warns, fails) = report.findings.iter().fold((0, 0), |(w, f), x| match x.status {
            Status::Warn => (w + 1, f),
            Status::Fail => (w, f + 1),
            Status::Ok => (w, f),
        });
        println!("preflight {}: {fails} failure(s), {warns} warning(s)", report.status.as_str());
    }
    report.exit_code()
}

fn load(profile: Option<&str>, file: Option<&Path>) -> Result<Profile, OpsError> {
    match file {
        Some(path) => firmware::load_file(path),
        None => firmware::embedded(profile.unwrap_or_default()),
    }
}

/// `novacron firmware ...`.
pub fn run_firmware(cmd: &FirmwareCmd, json: bool) -> i32 {
    match cmd {
        FirmwareCmd::Profiles => {
            let profiles: Vec<Profile> = firmware::names()
                .into_iter()
                .map(|n| firmware::embedded(n).expect("embedded profiles are valid"))
                .collect();
            if json {
                let list: Vec<_> = profiles
                    .iter()
                    .map(|p| serde_json::json!({"name": p.name, "vendor": p.vendor, "description": p.description}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list).expect("json"));
            } else {
                for p in profiles {
                    println!("{:<26} {}", p.name, p.description);
                }
            }
            0
        }
        FirmwareCmd::Show { profile } => match firmware::EMBEDDED.iter().find(|(n, _)| n == profile) {
            Some((_, text)) => {
                print!("{text}");
                0
            }
            None => {
                eprintln!("novacron: {}", OpsError::UnknownProfile(profile.clone()));
                2
            }
        },
        FirmwareCmd::Apply(args) => {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(apply(args, json))
        }
    }
}

async fn apply(args: &ApplyArgs, json: bool) -> i32 {
    let profile = match load(args.profile.as_deref(), args.profile_file.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    let bmc = match Bmc::new(
        &args.bmc,
        args.user.as_deref(),
        args.password.as_deref(),
        args.insecure,
        args.bmc_fingerprint.as_deref(),
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("novacron: {e}");
            return 2;
        }
    };
    let fail = |e: OpsError| {
        eprintln!("novacron: {e}");
        if e.is_connect() {
            6
        } else {
            1
        }
    };
    let mut plan = match redfish::plan(&bmc, &profile).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    plan.dry_run = args.dry_run;
    if !args.dry_run {
        if let Err(e) = redfish::apply(&bmc, &mut plan).await {
            return fail(e);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&plan).expect("plan serializes"));
    } else {
        print_plan(&plan);
    }
    if plan.incomplete() {
        1
    } else {
        0
    }
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_plan(plan: &Plan) {
    println!("BMC {} system {} profile {}", plan.bmc, plan.system, plan.profile);
    let verb = if plan.applied { "set" } else { "would set" };
    for c in &plan.changes {
        println!("  {verb:<10} {}: {} -> {}", c.name, show(&c.from), show(&c.to));
    }
    for n in &plan.pending {
        println!("  {:<10} {n}: already staged, waits for a reboot", "pending");
    }
    for n in &plan.unchanged {
        println!("  {:<10} {n}", "ok");
    }
    for n in &plan.not_exposed {
        let what = if n.optional { "skipped" } else { "MISSING" };
        println!("  {what:<10} {}={}: this BMC's BIOS has no such attribute", n.name, show(&n.value));
    }
    if plan.changes.is_empty() && plan.pending.is_empty() {
        println!("nothing to change");
    } else if plan.dry_run {
        println!("dry run: {} attribute(s) would be written to {}", plan.changes.len(), plan.settings);
    } else if plan.applied {
        println!(
            "wrote {} attribute(s) to {}; reboot the host for them to take effect",
            plan.changes.len(),
            plan.settings
        );
    } else {
        println!("settings are staged; reboot the host for them to take effect");
    }
    if plan.incomplete() {
        println!(
            "warning: the BMC does not expose every attribute of profile {}; set those in firmware setup \
             or use a profile for this server model",
            plan.profile
        );
    }
}
