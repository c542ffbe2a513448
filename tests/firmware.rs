//! `novacron firmware apply` against sushy-emulator, the OpenStack Redfish
//! BMC emulator (PyPI sushy-tools), on 127.0.0.1.
//!
//! sushy-emulator's fake driver has no BIOS resource, so the emulator runs
//! its libvirt driver on libvirt's in-process test driver (`test:///default`,
//! no libvirtd involved). That driver's state lives only while a connection
//! is open and sushy opens one per request, so the emulator's config file
//! (Python) holds one open for the emulator's lifetime. It also seeds the
//! emulated BIOS with attributes a Dell/HPE BMC has, virtualization off.
//!
//! Real emulator behaviour the test relies on: BIOS PATCHes land in
//! Attributes at once (a real BMC stages them until reboot), the emulator
//! accepts attribute names it has never seen (a real iDRAC refuses them),
//! and it reports every value as a string.
//!
//! Needs /opt/novacron-test-venv (tests/setup-host.sh) or sushy-emulator on
//! PATH, so it is ignored by plain `cargo test`; tests/run.sh runs it.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_novacron");
const VENV_SUSHY: &str = "/opt/novacron-test-venv/bin/sushy-emulator";

fn find_sushy() -> Option<PathBuf> {
    if std::path::Path::new(VENV_SUSHY).exists() {
        return Some(VENV_SUSHY.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join("sushy-emulator"))
        .find(|p| p.exists())
}

const CONFIG: &str = r#"
import libvirt
SUSHY_EMULATOR_LIBVIRT_URI = 'test:///default'
SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'
# test:///default lives while a connection is open: keep one for good.
SUSHY_NOVACRON_KEEPALIVE = libvirt.open('test:///default')
_dom = SUSHY_NOVACRON_KEEPALIVE.lookupByName('test')
_xml = _dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
assert '<metadata' not in _xml
_attrs = {'BootMode': 'Uefi', 'ProcTurboMode': 'Enabled', 'ProcVirtualization': 'Disabled',
          'SerialNumber': 'NOVA0001'}
_meta = ('<metadata><sushy:bios xmlns:sushy="http://openstack.org/xmlns/libvirt/sushy"><sushy:attributes>'
         + ''.join('<sushy:attribute name="%s" value="%s"/>' % kv for kv in sorted(_attrs.items()))
         + '</sushy:attributes></sushy:bios></metadata>')
SUSHY_NOVACRON_KEEPALIVE.defineXML(_xml.replace('</domain>', _meta + '</domain>'))
"#;

struct Sushy {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Sushy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET over HTTP/1.0 (the test's own client, independent of novacron's).
fn get(port: u16, path: &str) -> Option<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn start(sushy: &std::path::Path) -> Sushy {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("novacron-sushy-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("emulator.conf");
    std::fs::write(&config, CONFIG).unwrap();
    let log = std::fs::File::create(dir.join("sushy.log")).unwrap();
    let child = Command::new(sushy)
        .arg("--config")
        .arg(&config)
        .args(["--interface", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start sushy-emulator");
    let s = Sushy { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some((200, _)) = get(port, "/redfish/v1/Systems") {
            return s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(s.dir.join("sushy.log")).unwrap_or_default();
    panic!("sushy-emulator did not come up on 127.0.0.1:{port}:\n{log}");
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn novacron(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("NOVACRON_BMC_USER")
        .env_remove("NOVACRON_BMC_PASSWORD")
        .env_remove("NOVACRON_BMC_URL")
        .env_remove("NOVACRON_BMC_FINGERPRINT")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        // Columns collapsed to single spaces, for matching.
        stdout: String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn bios(port: u16, system: &str, which: &str) -> serde_json::Map<String, Value> {
    let (status, v) = get(port, &format!("{system}/BIOS{which}")).unwrap();
    assert_eq!(status, 200, "{v}");
    v["Attributes"].as_object().cloned().unwrap()
}

#[test]
#[ignore = "needs sushy-emulator from tests/setup-host.sh"]
fn firmware_apply_against_sushy_emulator() {
    let sushy = find_sushy().expect("sushy-emulator not found: run tests/setup-host.sh");
    let emu = start(&sushy);
    let url = format!("http://127.0.0.1:{}", emu.port);
    let (_, systems) = get(emu.port, "/redfish/v1/Systems").unwrap();
    let system = systems["Members"][0]["@odata.id"].as_str().unwrap().to_string();
    assert_eq!(bios(emu.port, &system, "")["ProcVirtualization"], "Disabled");

    // A dry run shows the diff and changes nothing.
    let r = novacron(&["firmware", "apply", "--bmc", &url, "--profile", "generic-intel", "--dry-run"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("would set ProcVirtualization: Disabled -> Enabled"), "{}", r.stdout);
    assert!(r.stdout.contains("skipped IntelProcVtd=Enabled"), "{}", r.stdout);
    assert_eq!(bios(emu.port, &system, "")["ProcVirtualization"], "Disabled");

    // The real thing: PATCHed into the SettingsObject the Bios resource names.
    let r = novacron(&["--json", "firmware", "apply", "--bmc", &url, "--profile", "generic-intel"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let plan: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(plan["applied"], true);
    assert_eq!(plan["reboot_required"], true);
    assert_eq!(plan["settings"], format!("{system}/BIOS/Settings"));
    assert_eq!(plan["changes"][0]["name"], "ProcVirtualization");
    assert_eq!(plan["changes"].as_array().unwrap().len(), 1);
    assert_eq!(plan["not_exposed"][0]["name"], "IntelProcVtd");
    let settings = bios(emu.port, &system, "/Settings");
    assert_eq!(settings["ProcVirtualization"], "Enabled");
    // The emulator would have accepted IntelProcVtd; we never send an
    // attribute the BMC does not expose (real BMCs reject the whole PATCH).
    assert!(!settings.contains_key("IntelProcVtd"));
    assert_eq!(bios(emu.port, &system, "")["ProcVirtualization"], "Enabled");
    assert_eq!(settings["ProcTurboMode"], "Enabled");

    // Idempotent: a second apply has nothing to do.
    let r = novacron(&["firmware", "apply", "--bmc", &url, "--profile", "generic-intel"]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("nothing to change"), "{}", r.stdout);
    assert!(r.stdout.contains("ok ProcVirtualization"), "{}", r.stdout);

    // A vendor profile whose required attribute this BMC lacks: reported,
    // exit 1, the unknown attribute is not created.
    let r = novacron(&["--json", "firmware", "apply", "--bmc", &url, "--profile", "dell-poweredge-r650"]);
    assert_eq!(r.code, 1, "{} {}", r.stdout, r.stderr);
    let plan: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(plan["not_exposed"][0]["name"], "SriovGlobalEnable");
    assert_eq!(plan["not_exposed"][0]["optional"], false);
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0);
    assert!(!bios(emu.port, &system, "/Settings").contains_key("SriovGlobalEnable"));

    // A custom profile file: integers and strings as the emulator stores them.
    let custom = emu.dir.join("custom.toml");
    let text = novacron(&["firmware", "show", "generic-intel"])
        .stdout
        .replace("name = \"generic-intel\"", "name = \"custom\"")
        + "\n[[bios]]\nname = \"ProcTurboMode\"\nvalue = \"Disabled\"\nprovides = \"other\"\n";
    std::fs::write(&custom, text).unwrap();
    let r = novacron(&["firmware", "apply", "--bmc", &url, "--profile-file", custom.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("set ProcTurboMode: Enabled -> Disabled"), "{}", r.stdout);
    assert_eq!(bios(emu.port, &system, "/Settings")["ProcTurboMode"], "Disabled");
}

#[test]
fn firmware_apply_reports_an_unreachable_bmc() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let r = novacron(&[
        "firmware",
        "apply",
        "--bmc",
        &format!("http://127.0.0.1:{port}"),
        "--profile",
        "generic-amd",
    ]);
    assert_eq!(r.code, 6, "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("cannot connect to the BMC"), "{}", r.stderr);
    let r = novacron(&["firmware", "apply", "--bmc", "https://127.0.0.1:1", "--profile", "generic-amd"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--insecure"), "{}", r.stderr);
}

#[test]
fn preflight_runs_on_this_host() {
    let r = novacron(&["--json", "preflight", "--profile", "generic-intel", "--data-dir", "/tmp"]);
    assert!((0..=2).contains(&r.code), "{} {}", r.stdout, r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    let ids: Vec<&str> =
        report["findings"].as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap()).collect();
    for id in ["cpu_virtualization", "kvm_device", "iommu", "kernel_cmdline", "watchdog", "memory", "disk"] {
        assert!(ids.contains(&id), "{id} missing in {ids:?}");
    }
    let expected = match report["status"].as_str().unwrap() {
        "ok" => 0,
        "warn" => 1,
        _ => 2,
    };
    assert_eq!(r.code, expected);
    for f in report["findings"].as_array().unwrap() {
        assert_eq!(f["status"] != "ok", f.get("fix").is_some(), "{f}");
    }
    let r = novacron(&["preflight", "--profile", "nope"]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("generic-intel"), "{}", r.stderr);
}
