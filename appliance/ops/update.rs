//! A/B updates of the appliance's root filesystem.
//!
//! A bundle is an uncompressed tar (`tar tvf` shows it): `manifest.json`
//! first (format version, image version, size and SHA-256 of each member),
//! then `root.erofs`, `vmlinuz` and `initrd.img`. The operator supplies the
//! SHA-256 of the whole bundle; `image/build.sh` writes it next to it.
//!
//! Slots are the GPT partitions labelled `root-a` and `root-b` on the disk
//! that holds the running root; their kernels live on the ESP in
//! `novacron/<slot>/`, one systemd-boot entry per slot. A fresh install gets
//! `novacron-<slot>+<tries>.conf` (boot counting) with a higher `version`
//! than every other entry, so systemd-boot tries it first.
//! systemd-bless-boot drops the counter once `boot-complete.target`, which
//! requires `novacron.service` (the daemon's READY=1), is reached; an entry
//! whose tries run out sorts last and the previous slot boots again.

use super::OpsError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const BUNDLE_FORMAT: u32 = 1;
pub const IMAGE_ID: &str = "novacron-edge";
pub const MEMBERS: [&str; 3] = ["root.erofs", "vmlinuz", "initrd.img"];
const MANIFEST_NAME: &str = "manifest.json";
const MANIFEST_MAX: u64 = 64 * 1024;
/// Boot attempts a new slot gets before systemd-boot gives up on it.
pub const DEFAULT_TRIES: u32 = 3;

type Result<T> = std::result::Result<T, OpsError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub image_id: String,
    pub version: String,
    pub arch: String,
    pub files: BTreeMap<String, Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub size: u64,
    pub sha256: String,
}

fn bad(msg: impl Into<String>) -> OpsError {
    OpsError::Bundle(msg.into())
}

impl Manifest {
    fn check(&self) -> Result<()> {
        if self.format != BUNDLE_FORMAT {
            return Err(bad(format!(
                "bundle format {} is not supported (this version reads format {BUNDLE_FORMAT})",
                self.format
            )));
        }
        if self.image_id != IMAGE_ID {
            return Err(bad(format!("the bundle is for {:?}, not {IMAGE_ID}", self.image_id)));
        }
        if self.arch != std::env::consts::ARCH {
            return Err(bad(format!(
                "the bundle is for {}, this host is {}",
                self.arch,
                std::env::consts::ARCH
            )));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || !self.version.chars().all(|c| c.is_ascii_alphanumeric() || "._+-~".contains(c))
        {
            return Err(bad("the version must be 1-64 characters of letters, digits and ._+-~"));
        }
        let names: Vec<&str> = self.files.keys().map(|k| k.as_str()).collect();
        let mut want = MEMBERS.to_vec();
        want.sort_unstable();
        if names != want {
            return Err(bad(format!("the bundle must contain exactly {MEMBERS:?}, it lists {names:?}")));
        }
        for (name, m) in &self.files {
            if m.sha256.len() != 64
                || !m.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad(format!("{name}: sha256 must be 64 lowercase hex digits")));
            }
        }
        Ok(())
    }
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Reads a bundle from start to end, checking the manifest and every
/// member's size and SHA-256. `sink` is handed each member as it streams
/// past (install writes them out); it may stop reading early, the rest is
/// hashed anyway. Nothing is trusted until the whole walk succeeds.
pub fn walk(
    path: &Path,
    mut sink: impl FnMut(&str, &Member, &mut dyn Read) -> Result<()>,
) -> Result<Manifest> {
    let file = std::fs::File::open(path)?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut entries = archive.entries().map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut first = entries
        .next()
        .ok_or_else(|| bad("the archive is empty"))?
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    if entry_name(&first)? != MANIFEST_NAME || first.size() > MANIFEST_MAX {
        return Err(bad(format!("the first member must be {MANIFEST_NAME} (at most {MANIFEST_MAX} bytes)")));
    }
    let mut text = Vec::new();
    first.read_to_end(&mut text)?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("{MANIFEST_NAME}: {e}")))?;
    manifest.check()?;
    let mut seen = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| bad(format!("broken archive: {e}")))?;
        let name = entry_name(&entry)?;
        let member = manifest
            .files
            .get(&name)
            .ok_or_else(|| bad(format!("{name} is in the archive but not in the manifest")))?;
        if seen.contains(&name) {
            return Err(bad(format!("{name} appears twice")));
        }
        if !entry.header().entry_type().is_file() || entry.size() != member.size {
            return Err(bad(format!(
                "{name}: expected a file of {} bytes, the archive has {} bytes",
                member.size,
                entry.size()
            )));
        }
        let mut r = Hashing { inner: entry, hasher: Sha256::new(), read: 0 };
        sink(&name, member, &mut r)?;
        std::io::copy(&mut r, &mut std::io::sink())?;
        let actual = hex::encode(r.hasher.finalize());
        if r.read != member.size {
            return Err(bad(format!("{name}: truncated ({} of {} bytes)", r.read, member.size)));
        }
        if actual != member.sha256 {
            return Err(OpsError::Checksum { what: name, expected: member.sha256.clone(), actual });
        }
        seen.push(name);
    }
    if seen.len() != MEMBERS.len() {
        let missing: Vec<&str> = MEMBERS.iter().copied().filter(|m| !seen.iter().any(|s| s == m)).collect();
        return Err(bad(format!("members missing: {missing:?}")));
    }
    Ok(manifest)
}

fn entry_name<R: Read>(e: &tar::Entry<R>) -> Result<String> {
    let p = e.path().map_err(|e| bad(format!("member name: {e}")))?;
    let s = p.to_string_lossy();
    Ok(s.strip_prefix("./").unwrap_or(&s).to_string())
}

/// Checks a bundle without keeping anything.
pub fn verify(path: &Path) -> Result<Manifest> {
    walk(path, |_, _, _| Ok(()))
}

/// SHA-256 of a whole file, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(crate::util::sha256_file(path, |_| {})?.1)
}

// ---- slots -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "root-a",
            Slot::B => "root-b",
        }
    }

    fn from_label(l: &str) -> Option<Slot> {
        match l {
            "root-a" => Some(Slot::A),
            "root-b" => Some(Slot::B),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub dev: PathBuf,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slots {
    pub booted: Slot,
    pub a: Partition,
    pub b: Partition,
}

impl Slots {
    pub fn get(&self, s: Slot) -> &Partition {
        match s {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

/// Finds the slots of the running system: the partition `/` is mounted
/// from, and its sibling slot on the same disk (never a slot of another
/// disk that happens to carry the same labels).
pub fn detect() -> Result<Slots> {
    let st = nix::sys::stat::stat("/").map_err(|e| OpsError::NotAppliance(format!("stat /: {e}")))?;
    detect_in(Path::new("/sys"), nix::sys::stat::major(st.st_dev), nix::sys::stat::minor(st.st_dev))
}

fn uevent(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(dir.join("uevent"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn detect_in(sys: &Path, major: u64, minor: u64) -> Result<Slots> {
    let not = |why: String| OpsError::NotAppliance(why);
    let link = sys.join(format!("dev/block/{major}:{minor}"));
    let part = std::fs::canonicalize(&link)
        .map_err(|_| not(format!("the root filesystem is not on a block device ({major}:{minor})")))?;
    let ev = uevent(&part);
    let label = ev.get("PARTNAME").cloned().unwrap_or_default();
    let dev = ev.get("DEVNAME").cloned().unwrap_or_else(|| format!("{major}:{minor}"));
    let booted = Slot::from_label(&label).ok_or_else(|| {
        not(format!(
            "the root filesystem is on {dev} (partition label {label:?}), not on a root-a/root-b slot"
        ))
    })?;
    let disk = part.parent().ok_or_else(|| not("the root partition has no disk".into()))?;
    let (mut a, mut b) = (None, None);
    for entry in std::fs::read_dir(disk)? {
        let p = entry?.path();
        if !p.join("partition").exists() {
            continue;
        }
        let ev = uevent(&p);
        let Some(slot) = ev.get("PARTNAME").and_then(|l| Slot::from_label(l)) else { continue };
        let sectors: u64 =
            std::fs::read_to_string(p.join("size")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let found = Partition {
            dev: Path::new("/dev").join(ev.get("DEVNAME").cloned().unwrap_or_default()),
            size: sectors * 512,
        };
        let place = if slot == Slot::A { &mut a } else { &mut b };
        if place.is_some() {
            return Err(not(format!("two partitions labelled {} on the boot disk", slot.label())));
        }
        *place = Some(found);
    }
    match (a, b) {
        (Some(a), Some(b)) => Ok(Slots { booted, a, b }),
        _ => Err(not("the boot disk does not have both root-a and root-b".into())),
    }
}

/// `IMAGE_VERSION` from os-release: the appliance build that is running.
pub fn image_version() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .ok()?;
    text.lines().find_map(|l| l.strip_prefix("IMAGE_VERSION=")).map(|v| v.trim_matches('"').to_string())
}

// ---- boot entries --------------------------------------------------------

/// One of our systemd-boot entries, parsed from its file name and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub file: PathBuf,
    pub slot: Slot,
    /// Install generation: systemd-boot boots the highest first.
    pub generation: u64,
    /// Boot counting: tries left, or None once blessed.
    pub tries_left: Option<u32>,
    pub title: String,
    pub options: String,
}

/// `novacron-b+2-1.conf` -> (B, Some(2)); `novacron-a.conf` -> (A, None).
fn parse_entry_name(name: &str) -> Option<(Slot, Option<u32>)> {
    let stem = name.strip_prefix("novacron-")?.strip_suffix(".conf")?;
    let (slot, counter) = match stem.split_once('+') {
        Some((s, c)) => (s, Some(c)),
        None => (stem, None),
    };
    let slot = match slot {
        "a" => Slot::A,
        "b" => Slot::B,
        _ => return None,
    };
    let tries = match counter {
        None => None,
        Some(c) => Some(c.split('-').next()?.parse().ok()?),
    };
    Some((slot, tries))
}

pub fn entries(esp: &Path) -> Result<Vec<Entry>> {
    let dir = esp.join("loader/entries");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some((slot, tries_left)) = parse_entry_name(&name) else { continue };
        let body = std::fs::read_to_string(e.path())?;
        let field = |k: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(k).filter(|r| r.starts_with([' ', '\t'])))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push(Entry {
            file: e.path(),
            slot,
            generation: field("version").parse().unwrap_or(0),
            tries_left,
            title: field("title"),
            options: field("options"),
        });
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.generation));
    Ok(out)
}

use crate::util::sync_dir;

fn write_file_synced(path: &Path, data: &[u8]) -> Result<()> {
    Ok(crate::util::write_atomic(path, data, 0o644)?)
}

/// What an installation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub manifest: Manifest,
    pub slot: Slot,
    pub entry: PathBuf,
}

/// Writes a verified bundle into the slot that is not running and adds its
/// boot entry with `tries` boot attempts. The target slot's old entry goes
/// first, so a half-written slot is never offered to the boot loader.
pub fn install(bundle: &Path, slots: &Slots, esp: &Path, tries: u32) -> Result<Installed> {
    let target = slots.booted.other();
    let part = slots.get(target).clone();
    let existing = entries(esp)?;
    let booted_entry = existing.iter().find(|e| e.slot == slots.booted).cloned();
    for e in existing.iter().filter(|e| e.slot == target) {
        std::fs::remove_file(&e.file)?;
    }
    sync_dir(&esp.join("loader/entries"));
    let kdir = esp.join("novacron").join(target.name());
    std::fs::create_dir_all(&kdir)?;
    let manifest = walk(bundle, |name, member, r| {
        match name {
            "root.erofs" => {
                if member.size > part.size {
                    return Err(bad(format!(
                        "root.erofs is {} bytes, slot {} ({}) holds {} bytes",
                        member.size,
                        target.label(),
                        part.dev.display(),
                        part.size
                    )));
                }
                let mut dev = std::fs::OpenOptions::new().write(true).open(&part.dev)?;
                copy_big(r, &mut dev)?;
                dev.sync_all()?;
            }
            _ => {
                let tmp = kdir.join(format!(".{name}.new"));
                let mut f = std::fs::File::create(&tmp)?;
                copy_big(r, &mut f)?;
                f.sync_all()?;
            }
        }
        Ok(())
    })?;
    // Every member matched its hash: put the kernel files in place.
    for name in ["vmlinuz", "initrd.img"] {
        std::fs::rename(kdir.join(format!(".{name}.new")), kdir.join(name))?;
    }
    sync_dir(&kdir);
    let generation = existing.iter().map(|e| e.generation).max().unwrap_or(0) + 1;
    let base_options = booted_entry
        .as_ref()
        .map(|e| e.options.clone())
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| "rootfstype=erofs ro console=tty0 console=ttyS0,115200 quiet panic=10".into());
    let options: Vec<String> = base_options
        .split_whitespace()
        .filter(|w| !w.starts_with("root="))
        .map(|w| w.to_string())
        .chain(std::iter::once(format!("root=PARTLABEL={}", target.label())))
        .collect();
    let body = format!(
        "title      NovaCron Edge {v} (slot {s})\nsort-key   novacron\nversion    {generation}\n\
         linux      /novacron/{n}/vmlinuz\ninitrd     /novacron/{n}/initrd.img\noptions    {o}\n",
        v = manifest.version,
        s = target.name().to_uppercase(),
        n = target.name(),
        o = options.join(" "),
    );
    let entry =
        esp.join("loader/entries").join(format!("novacron-{}+{}.conf", target.name(), tries.clamp(1, 9)));
    write_file_synced(&entry, body.as_bytes())?;
    sync_dir(&esp.join("loader/entries"));
    Ok(Installed { manifest, slot: target, entry })
}

fn copy_big(r: &mut dyn Read, w: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

// ---- daemon <-> installer -------------------------------------------------
//
// The daemon runs unprivileged and cannot write partitions or the ESP. It
// leaves `request.json` in its update folder; `novacron-update.path` starts
// `novacron-update.service` (root), which runs `novacron update install`
// and reports in `install.json`. When the daemon has shut the guests down
// it creates `reboot`, which `novacron-reboot.path` turns into a reboot.

pub const FILES_FORMAT: u32 = 1;
pub const REQUEST: &str = "request.json";
pub const INSTALL: &str = "install.json";
pub const BUNDLE: &str = "bundle.tar";
pub const REBOOT: &str = "reboot";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub format: u32,
    /// SHA-256 of `bundle.tar`, checked again by the installer.
    pub sha256: String,
    pub version: String,
    pub target: Slot,
    pub tries: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstallState {
    Installing,
    Installed,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstallReport {
    pub format: u32,
    pub state: InstallState,
    pub message: Option<String>,
}

/// Writes JSON next to its place, syncs, renames: readers never see half.
pub fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    Ok(crate::util::write_atomic(path, &data, mode)?)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| OpsError::Io(std::io::Error::other(format!("{}: {e}", path.display())))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `novacron update install` (root): carries out a pending request. The
/// request is consumed first, so a bundle that crashes the installer is
/// not retried on every boot.
pub fn run_installer(dir: &Path, esp: &Path) -> Result<Option<InstallReport>> {
    let Some(req) = read_json::<Request>(&dir.join(REQUEST))? else { return Ok(None) };
    std::fs::remove_file(dir.join(REQUEST))?;
    let report = |state, message: Option<String>| InstallReport { format: FILES_FORMAT, state, message };
    write_json(&dir.join(INSTALL), &report(InstallState::Installing, None), 0o644)?;
    let result = (|| -> Result<Installed> {
        if req.format != FILES_FORMAT {
            return Err(bad(format!("request format {} is not supported", req.format)));
        }
        let bundle = dir.join(BUNDLE);
        let actual = file_sha256(&bundle)?;
        if actual != req.sha256 {
            return Err(OpsError::Checksum { what: BUNDLE.into(), expected: req.sha256.clone(), actual });
        }
        let slots = detect()?;
        if slots.booted.other() != req.target {
            return Err(bad(format!(
                "the request targets slot {} but slot {} is running",
                req.target.name(),
                slots.booted.name()
            )));
        }
        install(&bundle, &slots, esp, req.tries)
    })();
    let done = match result {
        Ok(i) => report(
            InstallState::Installed,
            Some(format!(
                "version {} written to slot {}; boot entry {}",
                i.manifest.version,
                i.slot.name(),
                i.entry.display()
            )),
        ),
        Err(e) => report(InstallState::Failed, Some(e.to_string())),
    };
    write_json(&dir.join(INSTALL), &done, 0o644)?;
    Ok(Some(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("novacron-update-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A bundle from members; `edit` may spoil the manifest.
    fn bundle(dir: &Path, members: &[(&str, &[u8])], edit: impl FnOnce(&mut Manifest)) -> PathBuf {
        let mut m = Manifest {
            format: BUNDLE_FORMAT,
            image_id: IMAGE_ID.into(),
            version: "0.2.0".into(),
            arch: std::env::consts::ARCH.into(),
            files: members
                .iter()
                .map(|(n, d)| (n.to_string(), Member { size: d.len() as u64, sha256: sha(d) }))
                .collect(),
        };
        edit(&mut m);
        let path = dir.join("bundle.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mj = serde_json::to_vec(&m).unwrap();
        for (name, data) in std::iter::once((MANIFEST_NAME, mj.as_slice())).chain(members.iter().copied()) {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.finish().unwrap();
        path
    }

    const GOOD: [(&str, &[u8]); 3] =
        [("root.erofs", b"root filesystem bytes"), ("vmlinuz", b"kernel"), ("initrd.img", b"initrd")];

    #[test]
    fn verify_accepts_a_good_bundle_and_names_what_is_wrong_otherwise() {
        let d = tmpdir("verify");
        assert_eq!(verify(&bundle(&d, &GOOD, |_| {})).unwrap().version, "0.2.0");
        type Edit = Box<dyn FnOnce(&mut Manifest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|m| m.format = 9), "format 9"),
            (Box::new(|m| m.image_id = "other".into()), "not novacron-edge"),
            (Box::new(|m| m.arch = "riscv64".into()), "riscv64"),
            (Box::new(|m| m.version = "1.0/../x".into()), "version"),
            (Box::new(|m| m.files.get_mut("vmlinuz").unwrap().sha256 = sha(b"other")), "vmlinuz"),
            (Box::new(|m| m.files.get_mut("initrd.img").unwrap().size = 3), "initrd.img"),
            (Box::new(|m| drop(m.files.remove("initrd.img"))), "exactly"),
        ];
        for (edit, want) in cases {
            let err = verify(&bundle(&d, &GOOD, edit)).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        // A member the manifest lists but the archive lacks.
        let err = verify(&bundle(&d, &GOOD[..2], |m| {
            m.files.insert("initrd.img".into(), Member { size: 1, sha256: sha(b"x") });
        }))
        .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        // Not a tar at all.
        std::fs::write(d.join("junk"), b"junk").unwrap();
        assert!(matches!(verify(&d.join("junk")), Err(OpsError::Bundle(_))));
    }

    /// A fake sysfs: disk vda with partitions vda1..vda4 like the image's.
    fn fake_sys(d: &Path, labels: &[&str]) -> PathBuf {
        let sys = d.join("sys");
        let disk = sys.join("devices/virtual/block/vda");
        for (i, l) in labels.iter().enumerate() {
            let p = disk.join(format!("vda{}", i + 1));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("partition"), format!("{}\n", i + 1)).unwrap();
            std::fs::write(p.join("size"), "4096\n").unwrap();
            std::fs::write(
                p.join("uevent"),
                format!("MAJOR=254\nMINOR={}\nDEVNAME=vda{}\nPARTNAME={l}\n", i + 1, i + 1),
            )
            .unwrap();
            std::fs::create_dir_all(sys.join("dev/block")).unwrap();
            std::os::unix::fs::symlink(&p, sys.join(format!("dev/block/254:{}", i + 1))).unwrap();
        }
        sys
    }

    #[test]
    fn slots_are_found_next_to_the_booted_root_only() {
        let d = tmpdir("slots");
        let sys = fake_sys(&d, &["esp", "root-a", "root-b", "data"]);
        let s = detect_in(&sys, 254, 3).unwrap();
        assert_eq!(s.booted, Slot::B);
        assert_eq!(s.a, Partition { dev: "/dev/vda2".into(), size: 4096 * 512 });
        assert_eq!(s.b.dev, PathBuf::from("/dev/vda3"));
        let err = detect_in(&sys, 254, 4).unwrap_err().to_string();
        assert!(err.contains("\"data\""), "{err}");
        assert!(detect_in(&sys, 0, 31).is_err());
        let d2 = tmpdir("slots2");
        let sys = fake_sys(&d2, &["esp", "root-a", "data"]);
        assert!(detect_in(&sys, 254, 2).unwrap_err().to_string().contains("both"));
    }

    #[test]
    fn install_writes_the_other_slot_and_a_counted_entry_that_sorts_first() {
        let d = tmpdir("install");
        let esp = d.join("esp");
        std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
        std::fs::write(
            esp.join("loader/entries/novacron-a.conf"),
            "title NovaCron Edge 0.1.0 (slot A)\nsort-key novacron\nversion 1\noptions root=PARTLABEL=root-a rootfstype=erofs ro console=ttyS0,115200 panic=10\n",
        )
        .unwrap();
        // A stale entry of the target slot from an earlier install.
        std::fs::write(esp.join("loader/entries/novacron-b+0-3.conf"), "version 7\n").unwrap();
        let slot_b = d.join("slot-b");
        std::fs::write(&slot_b, vec![0u8; 64]).unwrap();
        let slots = Slots {
            booted: Slot::A,
            a: Partition { dev: d.join("slot-a"), size: 64 },
            b: Partition { dev: slot_b.clone(), size: 64 },
        };
        let b = bundle(&d, &GOOD, |_| {});
        let done = install(&b, &slots, &esp, 3).unwrap();
        assert_eq!(done.slot, Slot::B);
        assert_eq!(&std::fs::read(&slot_b).unwrap()[..GOOD[0].1.len()], GOOD[0].1);
        assert_eq!(std::fs::read(esp.join("novacron/b/vmlinuz")).unwrap(), b"kernel");
        let list = entries(&esp).unwrap();
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0].slot, Slot::B);
        assert_eq!(list[0].tries_left, Some(3));
        assert_eq!(list[0].generation, 8, "above every entry seen, stale ones included");
        assert_eq!(
            list[0].options,
            "rootfstype=erofs ro console=ttyS0,115200 panic=10 root=PARTLABEL=root-b"
        );
        assert!(list[0].file.ends_with("novacron-b+3.conf"));

        // A root image larger than the slot: refused, and no entry for it.
        let big = [("root.erofs", &[1u8; 65][..]), GOOD[1], GOOD[2]];
        let err = install(&bundle(&d, &big, |_| {}), &slots, &esp, 3).unwrap_err();
        assert!(err.to_string().contains("holds 64 bytes"), "{err}");
        assert!(entries(&esp).unwrap().iter().all(|e| e.slot == Slot::A));
    }

    #[test]
    fn entry_names_parse() {
        assert_eq!(parse_entry_name("novacron-a.conf"), Some((Slot::A, None)));
        assert_eq!(parse_entry_name("novacron-b+3.conf"), Some((Slot::B, Some(3))));
        assert_eq!(parse_entry_name("novacron-b+0-3.conf"), Some((Slot::B, Some(0))));
        assert_eq!(parse_entry_name("novacron-c.conf"), None);
        assert_eq!(parse_entry_name("other.conf"), None);
    }
}
