//! Prometheus metrics: plain counters and fixed-bucket histograms, rendered
//! in the text exposition format. Hot-path updates take one short lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency bucket upper bounds, seconds.
const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (route template, method, status) -> latency histogram.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), Histogram>>,
    /// (operation, result) -> count.
    operations: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub libvirt_connected: AtomicBool,
    /// This node has a peer (pairing finished on both sides).
    pub peer_paired: AtomicBool,
    pub libvirt_reconnects: AtomicU64,
    pub rate_limited: AtomicU64,
    pub auth_failures: AtomicU64,
    pub connections_refused: AtomicU64,
    pub lifecycle_events: AtomicU64,
}

/// Values sampled at scrape time by the core.
pub struct Snapshot<'a> {
    pub vms_by_state: &'a [(&'static str, u64)],
    pub unmanaged_domains: u64,
    pub host_memory_total_bytes: u64,
    pub host_memory_available_bytes: u64,
    pub host_load1: f64,
    pub host_cpus: u32,
    pub change_seq: i64,
    pub tls_cert_not_after: Option<i64>,
    /// (free bytes, size bytes) of the data dir's file system.
    pub data_dir_space: Option<(u64, u64)>,
    /// Unix seconds of the last `novacron backup create`.
    pub last_backup: Option<i64>,
    /// The peer link, when one runs (this node is paired).
    pub peer_link: Option<PeerLinkSample>,
    /// State replication's lag: this node's changes the peer has not
    /// acknowledged, and the age of the oldest (None: not known).
    pub replication_lag: (Option<u64>, Option<f64>),
    /// Bytes of image files copied from the peer and verified.
    pub image_bytes_copied: u64,
    /// Replicated disks (this node's and the replicas it holds), as the
    /// data plane reported them at its last status.
    pub replica_disks: &'a [ReplicaDiskSample],
    /// Protection of each replicated VM (mode sync or async).
    pub vm_protection: &'a [VmProtectionSample],
}

/// States of a disk copy, exported as a state set (one series each, 1 for
/// the current one). `unknown`: the data plane did not say.
pub const REPLICA_STATES: [&str; 5] = ["up_to_date", "syncing", "outdated", "inconsistent", "unknown"];
/// A replicated VM's protection, as `GET /v1/vms/{id}` shows it.
pub const PROTECTION_STATES: [&str; 4] = ["protected", "degraded", "unprotected", "unknown"];

/// One replicated disk at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaDiskSample {
    pub vm_id: String,
    pub vm_name: String,
    pub device: String,
    /// `primary` (this node's VM) or `secondary` (a replica of the peer's).
    pub role: &'static str,
    /// This node's copy (one of [`REPLICA_STATES`]).
    pub local: String,
    /// The peer's copy as a primary knows it; None on a secondary.
    pub peer: Option<String>,
    pub connected: bool,
    /// The running sync: bytes done, bytes planned, bytes per second.
    pub sync: Option<(u64, u64, f64)>,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub dirty_bytes: u64,
    pub synced_bytes: u64,
    pub max_lag_seconds: u64,
    pub write_wait: Option<crate::types::WaitHistogram>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmProtectionSample {
    pub vm_id: String,
    pub vm_name: String,
    pub protection: String,
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The replicated disks' families, each with its HELP and TYPE once.
fn render_replicas(out: &mut String, disks: &[ReplicaDiskSample], vms: &[VmProtectionSample]) {
    let labels = |d: &ReplicaDiskSample| {
        format!(
            "vm_id=\"{}\",vm_name=\"{}\",device=\"{}\",role=\"{}\"",
            label(&d.vm_id),
            label(&d.vm_name),
            label(&d.device),
            d.role
        )
    };
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    let state_set = |out: &mut String, name: &str, labels: &str, current: &str, states: &[&str]| {
        for st in states {
            let _ = writeln!(out, "{name}{{{labels},state=\"{st}\"}} {}", u8::from(*st == current));
        }
    };
    // Declared even with no replicated disk, so rules and dashboards can
    // be checked against any node's scrape.
    head(
        out,
        "novacron_disk_replica_state",
        "gauge",
        "This node's copy of a replicated disk: 1 for its current state.",
    );
    for d in disks {
        let current = if REPLICA_STATES.contains(&d.local.as_str()) { d.local.as_str() } else { "unknown" };
        state_set(out, "novacron_disk_replica_state", &labels(d), current, &REPLICA_STATES);
    }
    head(
        out,
        "novacron_disk_replica_peer_state",
        "gauge",
        "The peer's copy of this node's replicated disk, as this node knows it: 1 for its current state.",
    );
    for d in disks {
        if let Some(p) = &d.peer {
            let current = if REPLICA_STATES.contains(&p.as_str()) { p.as_str() } else { "unknown" };
            state_set(out, "novacron_disk_replica_peer_state", &labels(d), current, &REPLICA_STATES);
        }
    }
    type Field = fn(&ReplicaDiskSample) -> String;
    let gauges: [(&str, &str, &str, Field); 9] = [
        (
            "novacron_disk_replica_connected",
            "gauge",
            "1 when the data plane holds a connection to the peer's for this disk.",
            |d| u8::from(d.connected).to_string(),
        ),
        (
            "novacron_disk_replica_sync_done_bytes",
            "gauge",
            "Bytes the running initial sync or resync has sent (0: none runs).",
            |d| d.sync.map_or(0, |s| s.0).to_string(),
        ),
        (
            "novacron_disk_replica_sync_size_bytes",
            "gauge",
            "Bytes the running initial sync or resync sends in all (0: none runs).",
            |d| d.sync.map_or(0, |s| s.1).to_string(),
        ),
        (
            "novacron_disk_replica_sync_rate_bytes_per_second",
            "gauge",
            "Mean rate of the running sync since it began (0: none runs).",
            |d| format!("{:.0}", d.sync.map_or(0.0, |s| s.2)),
        ),
        (
            "novacron_disk_replica_synced_bytes_total",
            "counter",
            "Bytes sent by syncs (initial and delta) since the data plane started.",
            |d| d.synced_bytes.to_string(),
        ),
        (
            "novacron_disk_replica_lag_bytes",
            "gauge",
            "Bytes shipped to the peer and not yet acknowledged durable there.",
            |d| d.lag_bytes.to_string(),
        ),
        (
            "novacron_disk_replica_lag_seconds",
            "gauge",
            "Age of the oldest write the peer has not acknowledged durable.",
            |d| format!("{:.3}", d.lag_seconds),
        ),
        (
            "novacron_disk_replica_dirty_bytes",
            "gauge",
            "Bytes changed since the peer last held them (what a resync sends).",
            |d| d.dirty_bytes.to_string(),
        ),
        (
            "novacron_disk_replica_max_lag_seconds",
            "gauge",
            "The VM's replication.max_lag_seconds (the lag async mode allows).",
            |d| d.max_lag_seconds.to_string(),
        ),
    ];
    for (name, kind, help, value) in gauges {
        head(out, name, kind, help);
        for d in disks {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(d), value(d));
        }
    }
    let name = "novacron_disk_replica_write_wait_seconds";
    head(
        out,
        name,
        "histogram",
        "Sync mode: what waiting for the peer added to guest writes, from the local write's completion to the peer's acknowledgement.",
    );
    for d in disks {
        let Some(h) = &d.write_wait else { continue };
        let l = labels(d);
        let mut cumulative = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum_seconds);
        let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
    }
    head(
        out,
        "novacron_vm_replication_protection",
        "gauge",
        "A replicated VM's protection (GET /v1/vms/{id} replication.protection): 1 for the current one.",
    );
    for v in vms {
        let l = format!("vm_id=\"{}\",vm_name=\"{}\"", label(&v.vm_id), label(&v.vm_name));
        let current = if PROTECTION_STATES.contains(&v.protection.as_str()) {
            v.protection.as_str()
        } else {
            "unknown"
        };
        state_set(out, "novacron_vm_replication_protection", &l, current, &PROTECTION_STATES);
    }
}

/// The peer link at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLinkSample {
    pub up: bool,
    /// The bulk connection (image files) is up.
    pub bulk_up: bool,
    /// Smoothed heartbeat RTT, while up.
    pub rtt_seconds: Option<f64>,
    /// Since the peer was last heard (a heartbeat or its answer).
    pub heartbeat_age_seconds: Option<f64>,
    /// Times the link went down since the daemon started.
    pub downs: u64,
    /// Connections to the link's port refused in TLS (not the pinned peer).
    pub refused: u64,
    /// Peer-link handshakes that failed (refused either way, timed out).
    pub handshake_failures: u64,
}

impl Metrics {
    pub fn observe_request(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((route, method, status)).or_default().observe(took.as_secs_f64());
    }

    pub fn count_operation(&self, op: &'static str, ok: bool) {
        let mut map = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((op, if ok { "ok" } else { "error" })).or_default() += 1;
    }

    pub fn render(&self, snap: &Snapshot<'_>) -> String {
        let mut out = String::with_capacity(8192);
        let version = crate::VERSION;
        let commit = crate::GIT_COMMIT;
        let _ = writeln!(out, "# HELP novacron_build_info Build of the running daemon.");
        let _ = writeln!(out, "# TYPE novacron_build_info gauge");
        let _ = writeln!(out, "novacron_build_info{{version=\"{version}\",commit=\"{commit}\"}} 1");

        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP novacron_http_requests_total API requests by route and status.");
        let _ = writeln!(out, "# TYPE novacron_http_requests_total counter");
        for ((route, method, status), h) in &requests {
            let _ = writeln!(
                out,
                "novacron_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
                h.count
            );
        }
        let _ = writeln!(out, "# HELP novacron_http_request_duration_seconds API request latency.");
        let _ = writeln!(out, "# TYPE novacron_http_request_duration_seconds histogram");
        for ((route, method, status), h) in &requests {
            let labels = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "novacron_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "novacron_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "novacron_http_request_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "novacron_http_request_duration_seconds_count{{{labels}}} {}", h.count);
        }

        let ops = self.operations.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP novacron_operations_total VM and token operations by result.");
        let _ = writeln!(out, "# TYPE novacron_operations_total counter");
        for ((op, result), n) in &ops {
            let _ = writeln!(out, "novacron_operations_total{{op=\"{op}\",result=\"{result}\"}} {n}");
        }

        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        let _ = writeln!(out, "# HELP novacron_vms VMs managed by this node, by state.");
        let _ = writeln!(out, "# TYPE novacron_vms gauge");
        for (state, n) in snap.vms_by_state {
            let _ = writeln!(out, "novacron_vms{{state=\"{state}\"}} {n}");
        }
        gauge(
            &mut out,
            "novacron_unmanaged_domains",
            "libvirt domains not created by NovaCron.",
            "gauge",
            snap.unmanaged_domains.to_string(),
        );
        gauge(
            &mut out,
            "novacron_libvirt_connected",
            "1 when the libvirt connection is usable.",
            "gauge",
            u8::from(self.libvirt_connected.load(Ordering::Relaxed)).to_string(),
        );
        gauge(
            &mut out,
            "novacron_peer_paired",
            "1 when this node is paired with a peer.",
            "gauge",
            u8::from(self.peer_paired.load(Ordering::Relaxed)).to_string(),
        );
        let link = snap.peer_link.unwrap_or_default();
        gauge(
            &mut out,
            "novacron_peer_link_up",
            "1 when the link to the paired peer is up.",
            "gauge",
            u8::from(link.up).to_string(),
        );
        gauge(
            &mut out,
            "novacron_peer_bulk_up",
            "1 when the peer link's bulk connection (image files) is up.",
            "gauge",
            u8::from(link.bulk_up).to_string(),
        );
        // Absent, not 0, when nothing was measured: a 0 s RTT or heartbeat
        // age would look healthy.
        if let Some(rtt) = link.rtt_seconds {
            gauge(
                &mut out,
                "novacron_peer_rtt_seconds",
                "Smoothed round-trip time of the peer link's heartbeats.",
                "gauge",
                format!("{rtt:.6}"),
            );
        }
        if let Some(age) = link.heartbeat_age_seconds {
            gauge(
                &mut out,
                "novacron_peer_heartbeat_age_seconds",
                "Since a heartbeat (or its answer) last came from the peer.",
                "gauge",
                format!("{age:.3}"),
            );
        }
        // Always exported (the alert rule needs the series); NaN while
        // unknown: not paired, or the peer has not told its mark yet.
        let (records, seconds) = snap.replication_lag;
        gauge(
            &mut out,
            "novacron_peer_replication_lag_records",
            "This node's changes the peer has not acknowledged (NaN: unknown).",
            "gauge",
            records.map_or("NaN".into(), |n| n.to_string()),
        );
        gauge(
            &mut out,
            "novacron_peer_replication_lag_seconds",
            "Age of the oldest change the peer has not acknowledged (NaN: unknown).",
            "gauge",
            seconds.map_or("NaN".into(), |s| format!("{s:.3}")),
        );
        gauge(
            &mut out,
            "novacron_peer_image_bytes_copied_total",
            "Bytes of base image files copied from the peer and verified since the daemon started.",
            "counter",
            snap.image_bytes_copied.to_string(),
        );
        if snap.peer_link.is_some() {
            gauge(
                &mut out,
                "novacron_peer_link_downs_total",
                "Times the peer link went down since the daemon started.",
                "counter",
                link.downs.to_string(),
            );
            gauge(
                &mut out,
                "novacron_peer_link_refused_total",
                "Connections to the peer-link port refused in TLS (not the pinned peer) since the daemon started.",
                "counter",
                link.refused.to_string(),
            );
            gauge(
                &mut out,
                "novacron_peer_link_handshake_failures_total",
                "Peer-link handshakes that failed since the daemon started (refused either way: another protocol or node, not a hello; or timed out).",
                "counter",
                link.handshake_failures.to_string(),
            );
        }
        gauge(
            &mut out,
            "novacron_libvirt_reconnects_total",
            "Times the libvirt connection was re-established.",
            "counter",
            self.libvirt_reconnects.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "novacron_libvirt_events_total",
            "Lifecycle events received from libvirt.",
            "counter",
            self.lifecycle_events.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "novacron_rate_limited_total",
            "Requests refused with 429.",
            "counter",
            self.rate_limited.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "novacron_auth_failures_total",
            "Requests with no, an unknown, a malformed or a revoked token (401, or 429 past the per-address limit).",
            "counter",
            self.auth_failures.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "novacron_connections_refused_total",
            "Connections closed at the connection limit.",
            "counter",
            self.connections_refused.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "novacron_change_seq",
            "Sequence number of the newest committed change.",
            "gauge",
            snap.change_seq.to_string(),
        );
        gauge(&mut out, "novacron_host_cpus", "CPUs on this host.", "gauge", snap.host_cpus.to_string());
        gauge(
            &mut out,
            "novacron_host_memory_total_bytes",
            "Host memory.",
            "gauge",
            snap.host_memory_total_bytes.to_string(),
        );
        gauge(
            &mut out,
            "novacron_host_memory_available_bytes",
            "Host memory available (MemAvailable).",
            "gauge",
            snap.host_memory_available_bytes.to_string(),
        );
        gauge(
            &mut out,
            "novacron_host_load1",
            "1-minute load average.",
            "gauge",
            snap.host_load1.to_string(),
        );
        if let Some(t) = snap.tls_cert_not_after {
            gauge(
                &mut out,
                "novacron_tls_cert_expiry_timestamp_seconds",
                "When the API certificate expires.",
                "gauge",
                t.to_string(),
            );
        }
        if let Some((free, size)) = snap.data_dir_space {
            gauge(
                &mut out,
                "novacron_data_dir_free_bytes",
                "Bytes available to the daemon in the data dir's file system.",
                "gauge",
                free.to_string(),
            );
            gauge(
                &mut out,
                "novacron_data_dir_size_bytes",
                "Size of the data dir's file system.",
                "gauge",
                size.to_string(),
            );
        }
        // Always exported (0 = never) so "no backup yet" can alert too.
        gauge(
            &mut out,
            "novacron_last_backup_timestamp_seconds",
            "When `novacron backup create` last succeeded for this data dir; 0 if never.",
            "gauge",
            snap.last_backup.unwrap_or(0).to_string(),
        );
        render_replicas(&mut out, snap.replica_disks, snap.vm_protection);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_request("/v1/vms", "GET", 200, Duration::from_micros(50));
        m.observe_request("/v1/vms", "GET", 200, Duration::from_millis(3));
        m.count_operation("vm.start", true);
        let snap = Snapshot {
            vms_by_state: &[("running", 2)],
            unmanaged_domains: 0,
            host_memory_total_bytes: 1,
            host_memory_available_bytes: 1,
            host_load1: 0.5,
            host_cpus: 2,
            change_seq: 9,
            tls_cert_not_after: None,
            data_dir_space: Some((10, 100)),
            last_backup: Some(1_700_000_000),
            peer_link: Some(PeerLinkSample {
                up: true,
                bulk_up: true,
                rtt_seconds: Some(0.00042),
                heartbeat_age_seconds: Some(0.25),
                downs: 2,
                refused: 0,
                handshake_failures: 3,
            }),
            replication_lag: (Some(12), Some(1.5)),
            image_bytes_copied: 3 << 20,
            replica_disks: &[],
            vm_protection: &[],
        };
        let text = m.render(&snap);
        assert!(text.contains(r#"novacron_http_requests_total{route="/v1/vms",method="GET",status="200"} 2"#));
        assert!(text.contains(r#"status="200",le="0.0001"} 1"#));
        assert!(text.contains(r#"status="200",le="0.005"} 2"#));
        assert!(text.contains(r#"novacron_operations_total{op="vm.start",result="ok"} 1"#));
        assert!(text.contains(r#"novacron_vms{state="running"} 2"#));
        assert!(text.contains("novacron_data_dir_free_bytes 10\n"));
        assert!(text.contains("novacron_data_dir_size_bytes 100\n"));
        assert!(text.contains("novacron_last_backup_timestamp_seconds 1700000000\n"));
        assert!(text.contains("novacron_peer_link_up 1\n"));
        assert!(text.contains("novacron_peer_bulk_up 1\n"));
        assert!(text.contains("novacron_peer_rtt_seconds 0.000420\n"));
        assert!(text.contains("novacron_peer_heartbeat_age_seconds 0.250\n"));
        assert!(text.contains("novacron_peer_link_downs_total 2\n"));
        assert!(text.contains("novacron_peer_link_handshake_failures_total 3\n"));
        assert!(text.contains("novacron_peer_replication_lag_records 12\n"));
        assert!(text.contains("novacron_peer_replication_lag_seconds 1.500\n"));
        assert!(text.contains("novacron_peer_image_bytes_copied_total 3145728\n"));
        // Not paired: link down, nothing measured is exported as if it were.
        let text = m.render(&Snapshot { peer_link: None, replication_lag: (None, None), ..snap });
        assert!(text.contains("novacron_peer_replication_lag_records NaN\n"));
        assert!(text.contains("novacron_peer_replication_lag_seconds NaN\n"));
        assert!(text.contains("novacron_peer_link_up 0\n"));
        assert!(!text.contains("novacron_peer_rtt_seconds"));
        assert!(!text.contains("novacron_peer_heartbeat_age_seconds"));
    }

    #[test]
    fn replicated_disks_are_state_sets_and_a_histogram() {
        let disk = ReplicaDiskSample {
            vm_id: "6ba7b810-9dad-11d1-80b4-00c04fd430c8".into(),
            vm_name: "we\"b".into(),
            device: "vda".into(),
            role: "primary",
            local: "up_to_date".into(),
            peer: Some("syncing".into()),
            connected: true,
            sync: Some((4096, 1 << 20, 2048.4)),
            lag_bytes: 8192,
            lag_seconds: 0.25,
            dirty_bytes: 12288,
            synced_bytes: 3 << 20,
            max_lag_seconds: 30,
            write_wait: Some(crate::types::WaitHistogram {
                bounds: vec![0.001, 0.01],
                counts: vec![3, 1],
                count: 5,
                sum_seconds: 2.5,
            }),
        };
        let replica = ReplicaDiskSample {
            vm_id: "11111111-2222-3333-4444-555555555555".into(),
            vm_name: "db".into(),
            role: "secondary",
            local: "outdated".into(),
            peer: None,
            connected: false,
            sync: None,
            write_wait: None,
            ..disk.clone()
        };
        let vms = [VmProtectionSample {
            vm_id: disk.vm_id.clone(),
            vm_name: disk.vm_name.clone(),
            protection: "degraded".into(),
        }];
        let mut out = String::new();
        render_replicas(&mut out, &[disk, replica], &vms);
        let a = r#"vm_id="6ba7b810-9dad-11d1-80b4-00c04fd430c8",vm_name="we\"b",device="vda",role="primary""#;
        let b = r#"vm_id="11111111-2222-3333-4444-555555555555",vm_name="db",device="vda",role="secondary""#;
        let has = |line: String| assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        for (st, v) in
            [("up_to_date", 1), ("syncing", 0), ("outdated", 0), ("inconsistent", 0), ("unknown", 0)]
        {
            has(format!("novacron_disk_replica_state{{{a},state=\"{st}\"}} {v}"));
        }
        has(format!("novacron_disk_replica_state{{{b},state=\"outdated\"}} 1"));
        has(format!("novacron_disk_replica_peer_state{{{a},state=\"syncing\"}} 1"));
        has(format!("novacron_disk_replica_peer_state{{{a},state=\"up_to_date\"}} 0"));
        // A secondary has no view of its peer's copy.
        assert!(!out.contains(&format!("novacron_disk_replica_peer_state{{{b}")));
        has(format!("novacron_disk_replica_connected{{{a}}} 1"));
        has(format!("novacron_disk_replica_connected{{{b}}} 0"));
        has(format!("novacron_disk_replica_sync_done_bytes{{{a}}} 4096"));
        has(format!("novacron_disk_replica_sync_size_bytes{{{a}}} 1048576"));
        has(format!("novacron_disk_replica_sync_size_bytes{{{b}}} 0"));
        has(format!("novacron_disk_replica_sync_rate_bytes_per_second{{{a}}} 2048"));
        has(format!("novacron_disk_replica_synced_bytes_total{{{a}}} 3145728"));
        has(format!("novacron_disk_replica_lag_bytes{{{a}}} 8192"));
        has(format!("novacron_disk_replica_lag_seconds{{{a}}} 0.250"));
        has(format!("novacron_disk_replica_dirty_bytes{{{a}}} 12288"));
        has(format!("novacron_disk_replica_max_lag_seconds{{{a}}} 30"));
        // Cumulative buckets; one write took longer than the last bound.
        has(format!("novacron_disk_replica_write_wait_seconds_bucket{{{a},le=\"0.001\"}} 3"));
        has(format!("novacron_disk_replica_write_wait_seconds_bucket{{{a},le=\"0.01\"}} 4"));
        has(format!("novacron_disk_replica_write_wait_seconds_bucket{{{a},le=\"+Inf\"}} 5"));
        has(format!("novacron_disk_replica_write_wait_seconds_sum{{{a}}} 2.5"));
        has(format!("novacron_disk_replica_write_wait_seconds_count{{{a}}} 5"));
        assert!(!out.contains(&format!("novacron_disk_replica_write_wait_seconds_count{{{b}")));
        has(r#"novacron_vm_replication_protection{vm_id="6ba7b810-9dad-11d1-80b4-00c04fd430c8",vm_name="we\"b",state="degraded"} 1"#.into());
        has(r#"novacron_vm_replication_protection{vm_id="6ba7b810-9dad-11d1-80b4-00c04fd430c8",vm_name="we\"b",state="protected"} 0"#.into());
        // One HELP and TYPE per family.
        assert_eq!(out.matches("# TYPE novacron_disk_replica_state gauge").count(), 1);
        assert_eq!(out.matches("# TYPE novacron_disk_replica_write_wait_seconds histogram").count(), 1);
        // Nothing replicated: the families are declared, without a sample.
        let mut none = String::new();
        render_replicas(&mut none, &[], &[]);
        assert!(none.contains("# TYPE novacron_disk_replica_connected gauge\n"), "{none}");
        assert!(none.lines().all(|l| l.starts_with('#')), "{none}");
    }
}
