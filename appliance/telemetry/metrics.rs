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
}
