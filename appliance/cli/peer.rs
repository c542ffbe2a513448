//! `novacron peer`: pair this node with a second one, show and end the pairing.

use super::client::Client;
use super::erased::Json;
use super::output;
use crate::core::Action;
use crate::types::{
    PeerInvitation, PeerInvite, PeerJoin, PeerTakeover, PeerUnpaired, PeerView, TakeoverReport,
};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Make a one-time join code for the other node (admin). It is shown
    /// once and works once.
    Invite {
        /// How long the code works: 90s, 10m, 1h or seconds (at most 24h).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        expires: u64,
    },
    /// Pair with the node that made CODE (`novacron peer invite` there).
    Join {
        /// The join code, as `peer invite` printed it.
        code: String,
    },
    /// Show the peer, the link and replication.
    Status,
    /// Unpair on both nodes.
    Unpair {
        /// Unpair this node alone when the peer does not answer (the peer
        /// then still lists this node until it is unpaired there too).
        #[arg(long)]
        force: bool,
    },
    /// Take the peer's VMs over here after you confirmed the peer is off
    /// (admin). Up-to-date replicas are promoted and autostart VMs started,
    /// one after the other, by autostart priority (higher first), then name.
    Takeover {
        /// Required: your confirmation that the peer is off (there is no
        /// automatic failover or witness to tell).
        #[arg(long)]
        force: bool,
        /// Also promote this VM although its replica is not up to date
        /// (repeat for several; name or id).
        #[arg(long, value_name = "VM")]
        include: Vec<String>,
    },
}

/// `90s`, `10m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.trim().char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a duration: use 90s, 10m, 1h or seconds"))
}

pub async fn run(cmd: PeerCmd, c: &Client, json: bool) -> i32 {
    let json_body = |v: &dyn Json| Some(v.to_json());
    let (action, query, body) = match &cmd {
        PeerCmd::Invite { expires } => {
            (Action::PeerInvite, "", json_body(&PeerInvite { expires_secs: Some(*expires) }))
        }
        PeerCmd::Join { code } => (Action::PeerJoin, "", json_body(&PeerJoin { code: code.clone() })),
        PeerCmd::Status => (Action::PeerGet, "", None),
        PeerCmd::Unpair { force } => (Action::PeerUnpair, if *force { "?force=true" } else { "" }, None),
        PeerCmd::Takeover { force, include } => {
            (Action::PeerTakeover, "", json_body(&PeerTakeover { force: *force, include: include.clone() }))
        }
    };
    let (status, body) = match c.call(action, &[], query, body).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("novacron: {e}");
            return super::client_error_code(&e);
        }
    };
    if !status.is_success() {
        return output::print(status, &body, output::Kind::Raw, json);
    }
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return output::exit_code(0);
    }
    let shown = match cmd {
        PeerCmd::Invite { .. } => serde_json::from_slice::<PeerInvitation>(&body).map(|i| {
            println!("{}", i.code);
            eprintln!(
                "one-time join code, valid until {} for one use; on the other node run:\n  novacron peer join {}\n(it connects to {} and pins {})",
                i.expires_at,
                i.code,
                i.addresses.join(", "),
                i.fingerprint
            );
        }),
        PeerCmd::Join { .. } | PeerCmd::Status => {
            serde_json::from_slice::<PeerView>(&body).map(|v| show(&v))
        }
        PeerCmd::Unpair { .. } => serde_json::from_slice::<PeerUnpaired>(&body).map(|u| {
            println!("{}", u.message);
        }),
        PeerCmd::Takeover { .. } => serde_json::from_slice::<TakeoverReport>(&body).map(|r| {
            // In start order: the VMs started one after the other, as listed.
            for v in &r.vms {
                println!(
                    "{:<20} {:<11} priority {:<5} replica {:<13} epoch {:<4} {}",
                    v.name, v.result, v.autostart_priority, v.replica, v.epoch, v.detail
                );
            }
            println!("{}", r.message);
        }),
    };
    match shown {
        Ok(()) => output::exit_code(0),
        Err(e) => {
            eprintln!("novacron: unreadable answer: {e}");
            1
        }
    }
}

fn show(v: &PeerView) {
    let Some(p) = &v.peer else {
        println!("not paired");
        return;
    };
    println!("state:       {}", v.state);
    println!("peer:        {} ({})", p.name, p.node_id);
    println!("addresses:   {} (API port {}, link port {})", p.addresses.join(", "), p.api_port, p.link_port);
    println!("failover:    {}", v.failover);
    println!("fingerprint: {}", p.fingerprint);
    println!("paired at:   {}", p.paired_at);
    if let Some(l) = &v.link {
        println!("link:        {} ({})", l.state, l.detail);
        println!("address:     {}", l.address.as_deref().unwrap_or("-"));
        println!("heartbeat:   {}", l.last_heartbeat.as_deref().unwrap_or("none"));
        println!("rtt:         {}", l.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into()));
        println!("bulk:        {}", l.bulk);
    }
    if let Some(r) = &v.replication {
        let recs = r.lag_records.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
        let secs = r.lag_seconds.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "unknown".into());
        println!("lag:         {recs} records, {secs}");
    }
    println!(
        "disks:       {}",
        if v.disks.is_empty() {
            "none replicated".to_string()
        } else {
            v.disks
                .iter()
                .map(|d| format!("{}/{} {}", d.vm, d.device, d.state))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("10m"), Ok(600));
        assert_eq!(super::parse_duration("1s"), Ok(1));
        assert_eq!(super::parse_duration("2h"), Ok(7200));
        assert_eq!(super::parse_duration("45"), Ok(45));
        assert!(super::parse_duration("0s").is_err());
        assert!(super::parse_duration("soon").is_err());
    }
}
