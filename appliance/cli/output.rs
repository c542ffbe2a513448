//! Human output (tables) and `--json` output for the CLI.

use super::exit_code_for;
use super::upload::human_bytes;
use crate::types::{
    AuditList, ErrorBody, HostInfo, Image, ImageList, Network, NetworkKind, NetworkList, Snapshot,
    SnapshotList, TokenCreated, TokenList, Vm, VmList,
};
use hyper::StatusCode;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once stdout cannot be written (a closed pipe, a full disk): later
/// output is dropped instead of failing again.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set when that was a real failure, not the reader going away.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Writes CLI output (the `println!` of `cli/`). A reader that went away
/// (`| head -1`, `| true`) is normal for a Unix tool: nothing more is
/// written and the exit code stays what the command decided; any other
/// write error is reported once and turns success into exit 1 (see
/// [`exit_code`]).
pub fn stdout(args: std::fmt::Arguments<'_>) {
    write_stdout(|out| out.write_fmt(args));
}

/// Writes bytes to stdout as they are (console logs), like [`stdout`].
pub fn stdout_bytes(bytes: &[u8]) {
    write_stdout(|out| out.write_all(bytes));
}

fn write_stdout(f: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = f(&mut out).and_then(|()| out.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            STDOUT_FAILED.store(true, Ordering::Relaxed);
            stderr(format_args!("novacron: cannot write to stdout: {e}\n"));
        }
    }
}

/// Writes to stderr; if that fails too there is nowhere left to say so.
pub fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// The process exit code for a command that returned `code`: a command
/// that succeeded but whose output could not be written failed.
pub fn exit_code(code: i32) -> i32 {
    if code == 0 && STDOUT_FAILED.load(Ordering::Relaxed) {
        1
    } else {
        code
    }
}

pub enum Kind {
    Vm,
    VmList,
    TokenList,
    TokenCreated,
    Audit,
    Host,
    Deleted(String),
    Image,
    ImageList,
    Network,
    NetworkList,
    Snapshot,
    SnapshotList,
    /// Printed as it came (text such as the console log).
    Raw,
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn show_vm(vm: &Vm) {
    println!("id:          {}", vm.id);
    println!("name:        {}", vm.name);
    println!("state:       {}", vm.state.as_str());
    println!("vcpus:       {}", vm.vcpus);
    println!("memory:      {} MiB", vm.memory_mib);
    println!("managed:     {}", vm.managed);
    println!("autostart:   {} (priority {})", vm.autostart, vm.autostart_priority);
    println!("shutdown:    {} s before forcing off", vm.shutdown_timeout_secs);
    println!("cloud-init:  {}", if vm.cloud_init { "yes" } else { "no" });
    for n in &vm.nics {
        println!("nic:         {} on {}, ip {}", n.mac, n.network, n.ip.as_deref().unwrap_or("(no lease)"));
    }
    if let Some(b) = &vm.boot {
        println!("kernel:      {}", b.kernel);
        if let Some(i) = &b.initrd {
            println!("initrd:      {i}");
        }
        if let Some(c) = &b.cmdline {
            println!("cmdline:     {c}");
        }
    }
    for d in &vm.disks {
        let base = d.image.as_deref().map(|i| format!(" (overlay on {i})")).unwrap_or_default();
        println!("disk {}:    {} {}{base}", d.device, human_bytes(d.size_bytes), d.path);
    }
    if let Some(r) = &vm.replication {
        println!("replication: {} (max lag {} s): {}", r.mode.as_str(), r.max_lag_seconds, r.protection);
        for d in &r.disks {
            println!("  {}", replica_line(d));
        }
    }
    println!("created:     {}", vm.created_at);
}

/// One disk's replica in a line: its states, or the sync's progress bar.
pub fn replica_line(d: &crate::types::DiskReplica) -> String {
    let peer = d.peer.as_deref().map(|p| format!(", peer {p}")).unwrap_or_default();
    let link = if d.connected { "connected" } else { "not connected" };
    match &d.sync {
        Some(s) => {
            let width = 20u64;
            let filled =
                (s.bytes_done.min(s.bytes_total) * width).checked_div(s.bytes_total).unwrap_or(width);
            let pct = (s.bytes_done as u128 * 100).checked_div(s.bytes_total as u128).unwrap_or(100);
            let eta = s
                .eta_seconds
                .map_or("ETA --:--".into(), |e| format!("ETA {}", super::upload::clock(e.ceil() as u64)));
            format!(
                "{}: {} sync [{}{}] {} / {} ({pct}%)  {}/s  {eta}",
                d.device,
                s.kind,
                "#".repeat(filled as usize),
                ".".repeat((width - filled) as usize),
                human_bytes(s.bytes_done),
                human_bytes(s.bytes_total),
                human_bytes(s.rate_bytes_per_sec as u64),
            )
        }
        None => format!(
            "{}: here {}{peer}, {link}{}",
            d.device,
            d.local,
            if d.dirty_bytes > 0 {
                format!(", {} to resync", human_bytes(d.dirty_bytes))
            } else {
                String::new()
            }
        ),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn dash_join(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn kind_str(k: NetworkKind) -> &'static str {
    match k {
        NetworkKind::Nat => "nat",
        NetworkKind::Bridge => "bridge",
    }
}

fn snapshot_what(s: &Snapshot) -> String {
    let mem = match (s.memory, s.restores_memory) {
        (true, true) => "disks and memory",
        // QEMU saved the memory of the running guest anyway.
        (true, false) => "disks and memory; revert restores the disks only",
        (false, _) => "disks only",
    };
    format!("{mem}, VM {}", s.vm_state.as_str())
}

fn show_image(i: &Image) {
    println!("name:         {}", i.name);
    println!("format:       {}", i.format);
    println!("virtual size: {} ({} bytes)", human_bytes(i.virtual_size), i.virtual_size);
    println!("file size:    {} ({} bytes)", human_bytes(i.file_size), i.file_size);
    println!("sha256:       {}", i.sha256);
    println!("used by:      {}", dash_join(&i.used_by));
    println!("created:      {}", i.created_at);
}

fn show_network(n: &Network) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("name:         {}", n.name);
    println!("kind:         {}", kind_str(n.kind));
    println!("bridge:       {}", n.bridge);
    match n.kind {
        NetworkKind::Nat => {
            println!("subnet:       {}", opt(&n.subnet));
            println!("gateway:      {}", opt(&n.gateway));
            println!("dhcp:         {} - {}", opt(&n.dhcp_start), opt(&n.dhcp_end));
        }
        NetworkKind::Bridge => {
            println!("vlan:         {}", n.vlan.map(|v| v.to_string()).unwrap_or_else(|| "-".into()))
        }
    }
    println!("active:       {}", yes_no(n.active));
    println!("created:      {}", n.created_at);
}

/// Prints a response; returns the exit code.
pub fn print(status: StatusCode, body: &[u8], kind: Kind, json: bool) -> i32 {
    if !status.is_success() {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) if json => println!("{}", serde_json::to_string(&e).unwrap_or_default()),
            Ok(e) => eprintln!("novacron: {} ({})", e.error.message, e.error.code),
            Err(_) => eprintln!("novacron: HTTP {status}: {}", String::from_utf8_lossy(body)),
        }
        return exit_code_for(status);
    }
    if let Kind::Raw = kind {
        // Console output may end without a newline; keep the bytes as they are.
        stdout_bytes(body);
        return 0;
    }
    if json {
        if !body.is_empty() {
            println!("{}", String::from_utf8_lossy(body));
        }
        return 0;
    }
    if body.is_empty() {
        // 204: nothing to show but the fact that it was done.
        match kind {
            Kind::Deleted(what) => println!("deleted {what}"),
            _ => println!("done"),
        }
        return 0;
    }
    let parsed = match kind {
        Kind::Raw => unreachable!("printed above"),
        Kind::Deleted(what) => {
            println!("deleted {what}");
            Ok(())
        }
        Kind::Vm => serde_json::from_slice::<Vm>(body).map(|vm| {
            show_vm(&vm);
            if status == StatusCode::ACCEPTED {
                println!("(the guest was asked to shut down and is still running)");
            }
        }),
        Kind::VmList => serde_json::from_slice::<VmList>(body).map(|l| {
            let rows = l
                .vms
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.state.as_str().to_string(),
                        v.vcpus.to_string(),
                        format!("{} MiB", v.memory_mib),
                        v.disks.len().to_string(),
                        if v.managed { "yes".into() } else { "no (read-only)".into() },
                        v.id.to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "STATE", "VCPUS", "MEMORY", "DISKS", "MANAGED", "ID"], rows);
        }),
        Kind::TokenList => serde_json::from_slice::<TokenList>(body).map(|l| {
            let rows = l
                .tokens
                .iter()
                .map(|t| {
                    vec![t.name.clone(), t.role.as_str().to_string(), t.id.clone(), t.created_at.clone()]
                })
                .collect();
            table(&["NAME", "ROLE", "ID", "CREATED"], rows);
        }),
        Kind::TokenCreated => serde_json::from_slice::<TokenCreated>(body).map(|t| {
            println!(
                "token {} ({}) created; its secret is shown only now:",
                t.token.name,
                t.token.role.as_str()
            );
            println!("{}", t.secret);
        }),
        Kind::Audit => serde_json::from_slice::<AuditList>(body).map(|a| {
            let rows = a
                .entries
                .iter()
                .map(|e| {
                    vec![e.at.clone(), e.actor.clone(), e.action.clone(), e.target.clone(), e.result.clone()]
                })
                .collect();
            table(&["TIME", "ACTOR", "ACTION", "TARGET", "RESULT"], rows);
        }),
        Kind::Host => serde_json::from_slice::<HostInfo>(body).map(|h| println!("{h:#?}")),
        Kind::Image => serde_json::from_slice::<Image>(body).map(|i| show_image(&i)),
        Kind::ImageList => serde_json::from_slice::<ImageList>(body).map(|l| {
            let rows = l
                .images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.format.clone(),
                        human_bytes(i.virtual_size),
                        human_bytes(i.file_size),
                        dash_join(&i.used_by),
                    ]
                })
                .collect();
            table(&["NAME", "FORMAT", "VIRTUAL-SIZE", "FILE-SIZE", "USED-BY"], rows);
        }),
        Kind::Network => serde_json::from_slice::<Network>(body).map(|n| show_network(&n)),
        Kind::NetworkList => serde_json::from_slice::<NetworkList>(body).map(|l| {
            let rows = l
                .networks
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        kind_str(n.kind).to_string(),
                        n.bridge.clone(),
                        n.subnet.clone().unwrap_or_else(|| "-".into()),
                        yes_no(n.active).into(),
                    ]
                })
                .collect();
            table(&["NAME", "KIND", "BRIDGE", "SUBNET", "ACTIVE"], rows);
        }),
        Kind::Snapshot => serde_json::from_slice::<Snapshot>(body).map(|s| {
            println!("snapshot {} created ({})", s.name, snapshot_what(&s));
        }),
        Kind::SnapshotList => serde_json::from_slice::<SnapshotList>(body).map(|l| {
            let rows = l
                .snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.created_at.clone(),
                        s.vm_state.as_str().to_string(),
                        yes_no(s.memory).into(),
                        if s.restores_memory { "resume" } else { "disks" }.into(),
                        s.description.clone(),
                    ]
                })
                .collect();
            table(&["NAME", "CREATED", "VM-STATE", "MEMORY", "REVERT", "DESCRIPTION"], rows);
        }),
    };
    match parsed {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("novacron: unexpected answer from the daemon: {e}");
            1
        }
    }
}

pub fn status(
    host: &[u8],
    ready: bool,
    vms: Option<&[u8]>,
    peer: Option<&[u8]>,
    json: bool,
    target: &str,
) -> i32 {
    let Ok(h) = serde_json::from_slice::<HostInfo>(host) else {
        eprintln!("novacron: unexpected answer from the daemon");
        return 1;
    };
    let vms: Vec<Vm> =
        vms.and_then(|b| serde_json::from_slice::<VmList>(b).ok()).map(|l| l.vms).unwrap_or_default();
    if json {
        let v = serde_json::json!({ "host": h, "ready": ready, "vms": vms.len() });
        println!("{v}");
        return if ready { 0 } else { 1 };
    }
    let running = vms.iter().filter(|v| v.state.is_active()).count();
    println!("daemon:       {target} (version {})", h.version);
    println!("node:         {} ({})", h.node_name, h.node_id);
    println!("ready:        {}", if ready { "yes" } else { "NO" });
    println!(
        "libvirt:      {} {} (QEMU {}), domain type {}",
        h.libvirt_uri,
        h.libvirt_version.as_deref().unwrap_or("unreachable"),
        h.qemu_version.as_deref().unwrap_or("?"),
        h.domain_type
    );
    println!(
        "host:         {} CPUs, {} of {} MiB available, load {:.2}",
        h.cpus, h.memory_available_mib, h.memory_total_mib, h.load[0]
    );
    println!("kvm:          {}", if h.kvm_usable { "usable" } else { "not usable" });
    println!("vms:          {} ({} running)", vms.len(), running);
    println!("tls sha256:   {}", h.tls_fingerprint);
    match peer.and_then(|b| serde_json::from_slice::<crate::types::PeerView>(b).ok()) {
        Some(p) if p.paired => {
            let name = p.peer.as_ref().map_or("?", |n| n.name.as_str());
            let link = p.link.as_ref().map_or("down", |l| l.state.as_str());
            println!("peer:         {name} (link {link})");
            println!("failover:     {}", p.failover);
        }
        Some(p) => println!("peer:         {}", p.state.replace('_', " ")),
        None => {}
    }
    if ready {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod replica_line_tests {
    use super::replica_line;
    use crate::types::{DiskReplica, SyncProgress};

    fn disk() -> DiskReplica {
        DiskReplica {
            device: "vda".into(),
            local: "up_to_date".into(),
            peer: Some("syncing".into()),
            connected: true,
            sync: None,
            lag_bytes: 0,
            lag_seconds: 0.0,
            dirty_bytes: 0,
            sync_bytes_total: 0,
            detail: String::new(),
        }
    }

    #[test]
    fn a_sync_is_a_bar_and_a_steady_replica_its_states() {
        let mib = 1 << 20;
        let mut d = disk();
        d.sync = Some(SyncProgress {
            kind: "full".into(),
            bytes_done: 6 * mib,
            bytes_total: 24 * mib,
            rate_bytes_per_sec: 8.0 * mib as f64,
            eta_seconds: Some(2.2),
        });
        assert_eq!(
            replica_line(&d),
            "vda: full sync [#####...............] 6.0 MiB / 24.0 MiB (25%)  8.0 MiB/s  ETA 0:03"
        );
        d.sync = None;
        d.peer = Some("outdated".into());
        d.connected = false;
        d.dirty_bytes = 4 * mib;
        assert_eq!(replica_line(&d), "vda: here up_to_date, peer outdated, not connected, 4.0 MiB to resync");
    }
}
