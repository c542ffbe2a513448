//! Appliance boot-time setup (`novacron setup`, root, before the daemon).
//!
//! The root filesystem is read-only, so everything a node learns after
//! flashing lives on the data partition in `/var/lib/novacron-etc`, which
//! the image links in: `/etc/novacron` (config, seeded networkd files) and
//! sshd's `AuthorizedKeysFile`. networkd does not follow a linked
//! `/etc/systemd/network`, so the network files are copied to
//! `/run/systemd/network` at every boot, before networkd starts.
//!
//! An operator seeds a node by putting files into `seed/` on the ESP (FAT,
//! writable from any OS after `dd`): `novacron.toml`, `authorized_keys`,
//! `network/*.network`. Setup checks all of them first and applies all or
//! nothing, then renames the folder to `seed.applied`, so a later seed can
//! be dropped in the same way.

use super::OpsError;
use crate::config::Config;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const ESP: &str = "/efi";
/// Where `/etc/novacron` points on the appliance.
pub const ETC: &str = "/var/lib/novacron-etc";
/// networkd's runtime folder: read at its start, above `/usr/lib`.
pub const RUN_NETWORK: &str = "/run/systemd/network";
const SEED: &str = "seed";
const SEED_APPLIED: &str = "seed.applied";
const MAX_SEED_FILE: u64 = 64 * 1024;

type Result<T> = std::result::Result<T, OpsError>;

fn seed_err(msg: impl Into<String>) -> OpsError {
    OpsError::Seed(msg.into())
}

/// What `run` did, for the log and the console.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub seeded: Vec<String>,
    pub default_config: bool,
    pub hostname: Option<String>,
}

/// Paths setup works on; tests point them at temporary folders.
pub struct Setup {
    /// On the appliance image: seed, networkd and SSH folders, host name.
    /// Elsewhere only the default config is written.
    pub appliance: bool,
    pub esp: PathBuf,
    pub etc: PathBuf,
    /// Where the seeded network files are put for networkd.
    pub run_network: PathBuf,
    /// Set the kernel host name (false in tests).
    pub set_hostname: bool,
    /// Group that may read the config (the daemon's).
    pub group: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            appliance: false,
            esp: ESP.into(),
            etc: crate::config::DEFAULT_CONFIG_PATH.trim_end_matches("/novacron.toml").into(),
            run_network: RUN_NETWORK.into(),
            set_hostname: true,
            group: Some("novacron".into()),
        }
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len();
    if len > MAX_SEED_FILE {
        return Err(seed_err(format!("{} is {len} bytes; at most {MAX_SEED_FILE}", path.display())));
    }
    Ok(std::fs::read(path)?)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    Ok(crate::util::write_atomic(path, data, mode)?)
}

/// A host name systemd and DNS accept: labels of letters, digits and `-`.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The seed, read and checked in full before anything is written.
struct Seed {
    config: Option<Vec<u8>>,
    keys: Option<Vec<u8>>,
    network: Vec<(String, Vec<u8>)>,
}

fn read_seed(dir: &Path) -> Result<Seed> {
    let mut seed = Seed { config: None, keys: None, network: Vec::new() };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        match name.as_str() {
            "novacron.toml" => {
                let data = read_limited(&path)?;
                let text = String::from_utf8(data.clone())
                    .map_err(|_| seed_err("seed/novacron.toml is not UTF-8"))?;
                let cfg = Config::parse(&text, &path).map_err(|e| seed_err(e.to_string()))?;
                if let Some(n) = &cfg.node.name {
                    if !valid_hostname(n) {
                        return Err(seed_err(format!(
                            "seed/novacron.toml: node.name {n:?} is not a valid host name \
                             (letters, digits and '-', dot-separated)"
                        )));
                    }
                }
                seed.config = Some(data);
            }
            "authorized_keys" => {
                let data = read_limited(&path)?;
                let text = String::from_utf8(data.clone())
                    .map_err(|_| seed_err("seed/authorized_keys is not UTF-8"))?;
                for (i, line) in text.lines().enumerate() {
                    let l = line.trim();
                    if l.is_empty() || l.starts_with('#') {
                        continue;
                    }
                    if !l.split_whitespace().any(|w| {
                        w.starts_with("ssh-") || w.starts_with("ecdsa-sha2-") || w.starts_with("sk-")
                    }) {
                        return Err(seed_err(format!(
                            "seed/authorized_keys line {}: no SSH key type",
                            i + 1
                        )));
                    }
                }
                seed.keys = Some(data);
            }
            "network" if path.is_dir() => {
                for f in std::fs::read_dir(&path)? {
                    let f = f?;
                    let n = f.file_name().to_string_lossy().to_string();
                    let ok_name = n.len() <= 64
                        && [".network", ".netdev", ".link"].iter().any(|s| n.ends_with(s))
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                    if !ok_name {
                        return Err(seed_err(format!(
                            "seed/network/{n}: only *.network, *.netdev and *.link files \
                             (letters, digits, '.', '_', '-') are accepted"
                        )));
                    }
                    seed.network.push((n, read_limited(&f.path())?));
                }
            }
            // FAT leaves these behind; they are not ours to refuse.
            n if n.starts_with('.') || n.eq_ignore_ascii_case("System Volume Information") => {}
            other => {
                return Err(seed_err(format!(
                    "seed/{other}: unknown file (expected novacron.toml, authorized_keys, network/)"
                )))
            }
        }
    }
    Ok(seed)
}

fn chgrp(path: &Path, group: Option<&str>) -> Result<()> {
    if let Some(g) = group {
        let gid = nix::unistd::Group::from_name(g)
            .map_err(|e| OpsError::Io(std::io::Error::other(e)))?
            .ok_or_else(|| seed_err(format!("group {g} does not exist")))?
            .gid;
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| OpsError::Io(std::io::Error::other(e)))?;
    }
    Ok(())
}

impl Setup {
    /// Runs at every boot: applies a new seed, makes sure a config exists,
    /// sets the host name from `node.name`.
    pub fn run(&self) -> Result<Report> {
        let mut report = Report::default();
        // On the appliance /etc/novacron is a link into the data partition,
        // which is empty on first boot.
        let etc = match std::fs::read_link(&self.etc) {
            Ok(t) if t.is_absolute() => t,
            Ok(t) => self.etc.parent().unwrap_or(Path::new("/")).join(t),
            Err(_) => self.etc.clone(),
        };
        let etc = &etc;
        std::fs::create_dir_all(etc)?;
        std::fs::set_permissions(etc, std::fs::Permissions::from_mode(0o750))?;
        chgrp(etc, self.group.as_deref())?;
        if self.appliance {
            std::fs::create_dir_all(etc.join("network"))?;
            std::fs::create_dir_all(etc.join("ssh"))?;
            std::fs::set_permissions(etc.join("network"), std::fs::Permissions::from_mode(0o755))?;
            std::fs::set_permissions(etc.join("ssh"), std::fs::Permissions::from_mode(0o700))?;
        }

        let seed_dir = self.esp.join(SEED);
        if self.appliance && seed_dir.is_dir() {
            let seed = read_seed(&seed_dir)?;
            let config = etc.join("novacron.toml");
            if let Some(c) = &seed.config {
                write_atomic(&config, c, 0o640)?;
                chgrp(&config, self.group.as_deref())?;
                report.seeded.push("novacron.toml".into());
            }
            if let Some(k) = &seed.keys {
                write_atomic(&etc.join("ssh/authorized_keys"), k, 0o600)?;
                report.seeded.push("authorized_keys".into());
            }
            if !seed.network.is_empty() {
                // The seeded set replaces the previous one.
                for old in std::fs::read_dir(etc.join("network"))? {
                    std::fs::remove_file(old?.path())?;
                }
                for (n, data) in &seed.network {
                    write_atomic(&etc.join("network").join(n), data, 0o644)?;
                    report.seeded.push(format!("network/{n}"));
                }
            }
            let applied = self.esp.join(SEED_APPLIED);
            if applied.exists() {
                std::fs::remove_dir_all(&applied)?;
            }
            std::fs::rename(&seed_dir, &applied)?;
        }

        let config = etc.join("novacron.toml");
        if !config.exists() {
            // The commented example, so an operator sees every setting.
            write_atomic(&config, crate::config::EMBEDDED_DEFAULT.as_bytes(), 0o640)?;
            chgrp(&config, self.group.as_deref())?;
            report.default_config = true;
        }
        if self.appliance {
            std::fs::create_dir_all(&self.run_network)?;
            for f in std::fs::read_dir(etc.join("network"))? {
                let f = f?;
                let dest = self.run_network.join(f.file_name());
                std::fs::copy(f.path(), &dest)?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
            }
        }
        let cfg = Config::load(&config, true).map_err(|e| seed_err(e.to_string()))?;
        if let Some(name) = cfg.node.name.filter(|n| self.appliance && valid_hostname(n)) {
            if self.set_hostname {
                nix::unistd::sethostname(&name).map_err(|e| OpsError::Io(std::io::Error::other(e)))?;
            }
            report.hostname = Some(name);
        }
        Ok(report)
    }
}

/// The first-boot banner: where the API is, how to pin its certificate,
/// and the one admin token (shown once; the file holding it is removed).
pub fn banner(urls: &[String], fingerprint: &str, token: &str) -> String {
    let mut s = String::from("\n==================== NovaCron Edge is ready ====================\n");
    for u in urls {
        s.push_str(&format!("  API:          {u}\n"));
    }
    s.push_str(&format!("  fingerprint:  {fingerprint}\n"));
    s.push_str(&format!("  admin token:  {token}\n"));
    s.push_str("  This token is shown once. Create your own tokens with it and revoke it:\n");
    s.push_str(
        "    novacron --url URL --fingerprint FP --token TOKEN token create --name NAME --role admin\n",
    );
    s.push_str("================================================================\n");
    s
}

/// `https://ADDR:PORT` for every listen address; an unspecified address
/// (0.0.0.0, ::) expands to the host's global addresses.
pub fn api_urls(listen: &[std::net::SocketAddr], host_addrs: &[std::net::IpAddr]) -> Vec<String> {
    let mut out = Vec::new();
    for l in listen {
        let ips: Vec<std::net::IpAddr> = if l.ip().is_unspecified() {
            host_addrs.iter().copied().filter(|a| !a.is_loopback() && a.is_ipv4() == l.is_ipv4()).collect()
        } else {
            vec![l.ip()]
        };
        for ip in ips {
            let u = std::net::SocketAddr::new(ip, l.port());
            out.push(format!("https://{u}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(tag: &str) -> Setup {
        let d = std::env::temp_dir().join(format!("novacron-setup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("esp")).unwrap();
        Setup {
            appliance: true,
            esp: d.join("esp"),
            etc: d.join("etc"),
            run_network: d.join("run-network"),
            set_hostname: false,
            group: None,
        }
    }

    #[test]
    fn a_seed_is_applied_once_and_a_bad_one_changes_nothing() {
        let s = dirs("seed");
        let r = s.run().unwrap();
        assert!(r.default_config && r.seeded.is_empty() && r.hostname.is_none());

        let seed = s.esp.join("seed");
        std::fs::create_dir_all(seed.join("network")).unwrap();
        std::fs::write(seed.join("novacron.toml"), "[node]\nname = \"shop-1\"\n").unwrap();
        std::fs::write(seed.join("authorized_keys"), "# ops\nssh-ed25519 AAAAC3Nz ops@site\n").unwrap();
        std::fs::write(seed.join("network/10-lan.network"), "[Match]\nName=en*\n").unwrap();
        let r = s.run().unwrap();
        assert_eq!(r.seeded, ["novacron.toml", "authorized_keys", "network/10-lan.network"]);
        assert_eq!(r.hostname.as_deref(), Some("shop-1"));
        assert!(!seed.exists() && s.esp.join("seed.applied/novacron.toml").exists());
        assert!(std::fs::read_to_string(s.etc.join("novacron.toml")).unwrap().contains("shop-1"));
        assert!(s.run_network.join("10-lan.network").exists(), "handed to networkd");
        let mode = std::fs::metadata(s.etc.join("ssh/authorized_keys")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Each bad seed: refused with a message naming the problem, nothing changed.
        let before = std::fs::read(s.etc.join("novacron.toml")).unwrap();
        for (file, body, want) in [
            ("novacron.toml", "[node]\nname = \"-bad-\"\n", "host name"),
            ("novacron.toml", "[api]\nlisten_on = []\n", "listen_on"),
            ("authorized_keys", "hello world\n", "line 1"),
            ("notes.txt", "x", "unknown file"),
            ("network/x.sh", "x", "only *.network"),
        ] {
            let _ = std::fs::remove_dir_all(&seed);
            std::fs::create_dir_all(seed.join("network")).unwrap();
            std::fs::write(seed.join("novacron.toml"), "[node]\nname = \"shop-2\"\n").unwrap();
            std::fs::write(seed.join(file), body).unwrap();
            let err = s.run().unwrap_err().to_string();
            assert!(err.contains(want), "{file}: {err:?} should mention {want:?}");
            assert_eq!(std::fs::read(s.etc.join("novacron.toml")).unwrap(), before);
            assert!(seed.exists(), "a refused seed stays for the operator to fix");
        }
    }

    #[test]
    fn urls_expand_unspecified_addresses() {
        let listen = ["0.0.0.0:8443".parse().unwrap(), "[::1]:9443".parse().unwrap()];
        let addrs = ["127.0.0.1".parse().unwrap(), "10.0.2.15".parse().unwrap(), "fe80::1".parse().unwrap()];
        assert_eq!(api_urls(&listen, &addrs), ["https://10.0.2.15:8443", "https://[::1]:9443"]);
        assert!(valid_hostname("edge-1.shop") && !valid_hostname("a_b") && !valid_hostname(""));
    }
}
