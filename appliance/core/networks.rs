//! Network commands: NAT networks (a libvirt bridge with dnsmasq DHCP) and
//! bridge networks (guests join an existing host bridge).

use super::{Core, CoreError, Result};
use crate::hypervisor::xml::{bridge_vlan_filtering, network_xml, NetworkSpec};
use crate::store::{now_ms, Change, NetworkRecord};
use crate::types::{valid_name, Network, NetworkCreate, NetworkKind, NetworkList};
use crate::util::rfc3339;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// A parsed IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Subnet {
    pub net: u32,
    pub prefix: u8,
}

/// Prefix lengths of a NAT network: libvirt's dnsmasq serves at most 65535
/// addresses, so /16 is the largest; /30 is the smallest with a gateway and
/// a guest.
pub const NAT_PREFIXES: std::ops::RangeInclusive<u8> = 16..=30;

impl Subnet {
    pub fn parse(s: &str) -> Option<Subnet> {
        let (addr, prefix) = s.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        if !NAT_PREFIXES.contains(&prefix) {
            return None;
        }
        let sub = Subnet { net: u32::from(addr) & Self::mask_of(prefix), prefix };
        // Refuse host bits: "10.0.0.5/24" is probably a typo for a gateway.
        (u32::from(addr) == sub.net).then_some(sub)
    }

    fn mask_of(prefix: u8) -> u32 {
        u32::MAX << (32 - prefix as u32)
    }

    pub fn mask(&self) -> u32 {
        Self::mask_of(self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.net
    }

    /// Usable host addresses exclude the network and broadcast addresses.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        self.contains(ip) && v != self.net && v != self.net | !self.mask()
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        let m = self.mask() & other.mask();
        self.net & m == other.net & m
    }

    fn broadcast(&self) -> u32 {
        self.net | !self.mask()
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.net), self.prefix)
    }
}

/// IPv4 routes of the host (`/proc/net/route`), so a NAT network never
/// shadows a network the host already reaches.
fn host_subnets() -> Vec<(String, Subnet)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Addresses are printed as the hex of their in-memory (network
            // order) bytes read as a little-endian number.
            let addr = |i: usize| -> Option<u32> {
                let raw = u32::from_str_radix(f.get(i)?, 16).ok()?;
                Some(u32::from(Ipv4Addr::from(raw.to_le_bytes())))
            };
            let (dest, mask) = (addr(1)?, addr(7)?);
            if mask == 0 {
                return None; // the default route overlaps everything
            }
            Some((f[0].to_string(), Subnet { net: dest & mask, prefix: mask.leading_ones() as u8 }))
        })
        .collect()
}

fn parse_ip(field: &str, v: &str) -> Result<Ipv4Addr> {
    v.parse().map_err(|_| CoreError::invalid(field, format!("{v:?} is not an IPv4 address")))
}

impl Core {
    fn network_view(&self, n: &NetworkRecord, active: bool) -> Network {
        let subnet = (n.kind == NetworkKind::Nat)
            .then(|| n.gateway.as_ref().and_then(|g| g.parse::<Ipv4Addr>().ok()))
            .flatten()
            .map(|g| Subnet { net: u32::from(g) & Subnet::mask_of(n.prefix), prefix: n.prefix }.to_string());
        Network {
            name: n.name.clone(),
            kind: n.kind,
            bridge: n.bridge.clone(),
            subnet,
            gateway: n.gateway.clone(),
            dhcp_start: n.dhcp_start.clone(),
            dhcp_end: n.dhcp_end.clone(),
            vlan: n.vlan,
            active,
            created_at: rfc3339(n.created_at),
        }
    }

    pub(super) async fn list_networks(&self) -> Result<NetworkList> {
        let live = self.hv_call(|hv| hv.network_list()).await.unwrap_or_default();
        let networks = self.networks.read().unwrap();
        Ok(NetworkList {
            networks: networks
                .values()
                .map(|n| self.network_view(n, live.iter().any(|l| l.name == n.name && l.active)))
                .collect(),
        })
    }

    /// Checks a request completely and turns it into a record and a libvirt
    /// definition.
    fn plan_network(&self, req: &NetworkCreate) -> Result<(NetworkRecord, NetworkSpec)> {
        valid_name(&req.name).map_err(|m| CoreError::invalid("name", m))?;
        if self.networks.read().unwrap().contains_key(&req.name) {
            return Err(CoreError::NameTaken(req.name.clone()));
        }
        let nat_only = [
            ("subnet", req.subnet.is_some()),
            ("gateway", req.gateway.is_some()),
            ("dhcp_start", req.dhcp_start.is_some()),
            ("dhcp_end", req.dhcp_end.is_some()),
        ];
        let bridge_only = [("bridge", req.bridge.is_some()), ("vlan", req.vlan.is_some())];
        match req.kind {
            NetworkKind::Nat => {
                if let Some((f, _)) = bridge_only.iter().find(|f| f.1) {
                    return Err(CoreError::invalid(*f, "only applies to bridge networks"));
                }
                let text = req
                    .subnet
                    .as_deref()
                    .ok_or_else(|| CoreError::invalid("subnet", "is required for a NAT network"))?;
                let subnet = Subnet::parse(text).ok_or_else(|| {
                    CoreError::invalid(
                        "subnet",
                        format!(
                            "{text:?} is not a network address with a /{} to /{} prefix, like 10.20.0.0/24",
                            NAT_PREFIXES.start(),
                            NAT_PREFIXES.end()
                        ),
                    )
                })?;
                for other in self.networks.read().unwrap().values() {
                    if let Some(g) = other.gateway.as_ref().and_then(|g| g.parse::<Ipv4Addr>().ok()) {
                        let theirs = Subnet {
                            net: u32::from(g) & Subnet::mask_of(other.prefix),
                            prefix: other.prefix,
                        };
                        if theirs.overlaps(&subnet) {
                            return Err(CoreError::Overlap(format!(
                                "{subnet} overlaps network {} ({theirs})",
                                other.name
                            )));
                        }
                    }
                }
                if let Some((dev, theirs)) = host_subnets().into_iter().find(|(_, s)| s.overlaps(&subnet)) {
                    return Err(CoreError::Overlap(format!(
                        "{subnet} overlaps {theirs}, routed via {dev} on this host"
                    )));
                }
                let gateway = match &req.gateway {
                    Some(g) => parse_ip("gateway", g)?,
                    None => Ipv4Addr::from(subnet.net + 1),
                };
                let half = (subnet.broadcast() - subnet.net) / 2;
                let start = match &req.dhcp_start {
                    Some(s) => parse_ip("dhcp_start", s)?,
                    None => Ipv4Addr::from(subnet.net + half.max(2)),
                };
                let end = match &req.dhcp_end {
                    Some(s) => parse_ip("dhcp_end", s)?,
                    None => Ipv4Addr::from(subnet.broadcast() - 1),
                };
                for (field, ip) in [("gateway", gateway), ("dhcp_start", start), ("dhcp_end", end)] {
                    if !subnet.is_host(ip) {
                        return Err(CoreError::invalid(
                            field,
                            format!("{ip} is not a host address in {subnet}"),
                        ));
                    }
                }
                if u32::from(start) > u32::from(end) {
                    return Err(CoreError::invalid("dhcp_end", "must not come before dhcp_start"));
                }
                if (u32::from(start)..=u32::from(end)).contains(&u32::from(gateway)) {
                    return Err(CoreError::invalid("gateway", "must lie outside the DHCP range"));
                }
                // Linux interface names have at most 15 bytes.
                let bridge: String = format!("nc-{}", req.name).chars().take(15).collect();
                if self.networks.read().unwrap().values().any(|n| n.bridge == bridge) {
                    return Err(CoreError::NameTaken(format!("bridge {bridge}")));
                }
                let record = NetworkRecord {
                    name: req.name.clone(),
                    kind: NetworkKind::Nat,
                    bridge: bridge.clone(),
                    prefix: subnet.prefix,
                    gateway: Some(gateway.to_string()),
                    dhcp_start: Some(start.to_string()),
                    dhcp_end: Some(end.to_string()),
                    vlan: None,
                    created_at: now_ms(),
                };
                let spec = NetworkSpec::Nat {
                    name: req.name.clone(),
                    bridge,
                    gateway,
                    prefix: subnet.prefix,
                    dhcp_start: start,
                    dhcp_end: end,
                };
                Ok((record, spec))
            }
            NetworkKind::Bridge => {
                if let Some((f, _)) = nat_only.iter().find(|f| f.1) {
                    return Err(CoreError::invalid(*f, "only applies to NAT networks"));
                }
                let bridge = req
                    .bridge
                    .clone()
                    .ok_or_else(|| CoreError::invalid("bridge", "is required for a bridge network"))?;
                valid_name(&bridge).map_err(|m| CoreError::invalid("bridge", m))?;
                let is_bridge = std::path::Path::new("/sys/class/net").join(&bridge).join("bridge").is_dir();
                if !is_bridge {
                    return Err(CoreError::invalid(
                        "bridge",
                        format!("{bridge:?} is not a bridge on this host"),
                    ));
                }
                if let Some(tag) = req.vlan {
                    if !(1..=4094).contains(&tag) {
                        return Err(CoreError::invalid("vlan", "must be between 1 and 4094"));
                    }
                    // A tag on a bridge that does not filter VLANs would be
                    // silently ignored: refuse rather than pretend.
                    if bridge_vlan_filtering(&bridge) != Some(true) {
                        return Err(CoreError::invalid(
                            "vlan",
                            format!("bridge {bridge} does not filter VLANs; enable it with `ip link set {bridge} type bridge vlan_filtering 1`"),
                        ));
                    }
                }
                let record = NetworkRecord {
                    name: req.name.clone(),
                    kind: NetworkKind::Bridge,
                    bridge: bridge.clone(),
                    prefix: 0,
                    gateway: None,
                    dhcp_start: None,
                    dhcp_end: None,
                    vlan: req.vlan,
                    created_at: now_ms(),
                };
                let spec = NetworkSpec::Bridge {
                    name: req.name.clone(),
                    bridge,
                    vlan: req.vlan,
                    openvswitch: false,
                };
                Ok((record, spec))
            }
        }
    }

    pub(super) fn network_spec(record: &NetworkRecord) -> Option<NetworkSpec> {
        Some(match record.kind {
            NetworkKind::Nat => {
                let gateway: Ipv4Addr = record.gateway.as_ref()?.parse().ok()?;
                NetworkSpec::Nat {
                    name: record.name.clone(),
                    bridge: record.bridge.clone(),
                    gateway,
                    prefix: record.prefix,
                    dhcp_start: record.dhcp_start.as_ref()?.parse().ok()?,
                    dhcp_end: record.dhcp_end.as_ref()?.parse().ok()?,
                }
            }
            NetworkKind::Bridge => NetworkSpec::Bridge {
                name: record.name.clone(),
                bridge: record.bridge.clone(),
                vlan: record.vlan,
                openvswitch: false,
            },
        })
    }

    pub(super) async fn create_network(self: &Arc<Self>, req: NetworkCreate) -> Result<Network> {
        let _lock = self.create_lock.lock().await;
        let (record, spec) = self.plan_network(&req)?;
        let exists = self.hv_call(|hv| hv.network_list()).await?.into_iter().any(|n| n.name == req.name);
        if exists {
            return Err(CoreError::NameTaken(format!("libvirt network {}", req.name)));
        }
        let xml = network_xml(&spec);
        self.hv_call(move |hv| hv.network_define(&xml)).await?;
        if let Err(e) = self.commit(Change::NetworkPut(record.clone())).await {
            let name = record.name.clone();
            let _ = self.hv_call(move |hv| hv.network_remove(&name)).await;
            return Err(e);
        }
        Ok(self.network_view(&record, true))
    }

    pub(super) async fn delete_network(self: &Arc<Self>, name: &str) -> Result<()> {
        let _lock = self.create_lock.lock().await;
        if !self.networks.read().unwrap().contains_key(name) {
            return Err(CoreError::NotFound(format!("network {name:?}")));
        }
        let users: Vec<String> = self
            .vms
            .read()
            .unwrap()
            .values()
            .filter(|v| v.nics.iter().any(|n| n.network == name))
            .map(|v| v.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(CoreError::InUse { what: format!("network {name}"), users: users.join(", ") });
        }
        let n = name.to_string();
        match self.hv_call(move |hv| hv.network_remove(&n)).await {
            Ok(()) | Err(CoreError::Hypervisor(crate::hypervisor::HypervisorError::NoNetwork(_))) => {}
            Err(e) => return Err(e),
        }
        self.commit(Change::NetworkDelete { name: name.to_string() }).await
    }

    /// Whether `name` is a network a NIC may join: one of ours, or one
    /// libvirt already has (like its `default`).
    pub(super) async fn network_exists(&self, name: &str) -> Result<bool> {
        if self.networks.read().unwrap().contains_key(name) {
            return Ok(true);
        }
        Ok(self.hv_call(|hv| hv.network_list()).await?.iter().any(|n| n.name == name))
    }

    /// Reads DHCP leases of our NAT networks into the MAC -> address map.
    pub(super) async fn refresh_leases(&self) {
        let nets: Vec<String> = self
            .networks
            .read()
            .unwrap()
            .values()
            .filter(|n| n.kind == NetworkKind::Nat)
            .map(|n| n.name.clone())
            .collect();
        let mut map = std::collections::HashMap::new();
        for net in nets {
            if let Ok(leases) = self.hv_call(move |hv| hv.dhcp_leases(&net)).await {
                for l in leases {
                    map.insert(l.mac.to_ascii_lowercase(), l.ip);
                }
            }
        }
        let changed = *self.leases.read().unwrap() != map;
        if changed {
            *self.leases.write().unwrap() = map;
            self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// Defines networks that are in the store but missing from libvirt.
    pub(super) async fn reconcile_networks(&self) {
        let Ok(live) = self.hv_call(|hv| hv.network_list()).await else { return };
        let missing: Vec<NetworkRecord> = self
            .networks
            .read()
            .unwrap()
            .values()
            .filter(|n| !live.iter().any(|l| l.name == n.name))
            .cloned()
            .collect();
        for n in missing {
            let Some(spec) = Self::network_spec(&n) else { continue };
            let xml = network_xml(&spec);
            match self.hv_call(move |hv| hv.network_define(&xml)).await {
                Ok(()) => tracing::warn!(NETWORK = %n.name, "network was missing from libvirt; redefined it"),
                Err(e) => tracing::error!(NETWORK = %n.name, error = %e, "cannot redefine network"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.20.0.0/24").unwrap();
        assert!(s.is_host("10.20.0.1".parse().unwrap()));
        assert!(!s.is_host("10.20.0.255".parse().unwrap()));
        assert!(!s.is_host("10.20.1.1".parse().unwrap()));
        assert!(Subnet::parse("10.20.0.5/24").is_none(), "host bits set");
        assert!(Subnet::parse("10.20.0.0/31").is_none());
        assert!(Subnet::parse("nonsense").is_none());
        assert!(s.overlaps(&Subnet::parse("10.20.0.128/25").unwrap()));
        assert!(!s.overlaps(&Subnet::parse("10.0.0.0/16").unwrap()));
        assert!(s.overlaps(&Subnet::parse("10.20.0.0/16").unwrap()));
        assert!(Subnet::parse("10.0.0.0/8").is_none(), "too large for dnsmasq");
        assert!(!s.overlaps(&Subnet::parse("10.21.0.0/24").unwrap()));
        assert_eq!(s.to_string(), "10.20.0.0/24");
    }

    #[test]
    fn host_routes_parse() {
        // Loopback is not in /proc/net/route, but any listed route must be a
        // proper subnet with a non-zero mask.
        for (_, s) in host_subnets() {
            assert!(s.prefix > 0 && s.prefix <= 32);
        }
    }
}
