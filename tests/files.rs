//! Files the daemon keeps and the host files requests may name: who can
//! read images and cloud-init seeds, races for one image name, paths outside
//! the allowed folders, what counts as a disk image, and admission limits.

mod common;

use common::{call, error_code, virsh, wait_for, Daemon, Opts};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// The gid QEMU's files get: Debian's `libvirt-qemu` group.
fn qemu_gid() -> u32 {
    let out = Command::new("getent").args(["group", "libvirt-qemu"]).output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2).and_then(|g| g.parse().ok()).expect("group libvirt-qemu (tests/setup-host.sh)")
}

/// Runs `cat path` as user nobody with no groups; returns its stderr if it
/// was refused, or panics if it could read the file.
fn nobody_cannot_read(path: &Path) {
    assert!(path.exists(), "{} does not exist", path.display());
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
        .arg(path)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Permission denied"),
        "user nobody could read {} ({}: {stderr})",
        path.display(),
        out.status
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Uploads `file` as image `name` with curl over the local socket (as root:
/// no token). `Expect: 100-continue` as the CLI sends it, so an upload
/// refused up front sends no body.
fn spawn_upload(d: &Daemon, name: &str, file: &Path) -> std::process::Child {
    Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&d.socket)
        .args(["-X", "PUT", "-H", "Content-Type: application/octet-stream", "-H", "Expect: 100-continue"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("http://localhost/v1/images/{name}"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl")
}

fn upload_answer(child: std::process::Child) -> (u16, Value) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

fn upload(d: &Daemon, name: &str, file: &Path) -> (u16, Value) {
    upload_answer(spawn_upload(d, name, file))
}

/// Twenty uploads of one name at once: one wins, every other one is told
/// the name is taken (never a 500), and nothing is left behind.
#[test]
fn parallel_uploads_of_one_name_lose_with_name_taken() {
    let d = Daemon::start("files-race", Opts::test_driver(91));
    let file = d.dir.join("disk.raw");
    std::fs::write(&file, vec![0u8; 16 << 20]).unwrap();
    let children: Vec<_> = (0..20).map(|_| spawn_upload(&d, "x", &file)).collect();
    let answers: Vec<(u16, Value)> = children.into_iter().map(upload_answer).collect();
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let taken = answers.iter().filter(|(s, v)| *s == 409 && error_code(v) == "name_taken").count();
    assert_eq!((created, taken), (1, 19), "answers: {answers:?}");
    let files: Vec<String> = std::fs::read_dir(d.data().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, vec!["x".to_string()], "leftovers in images/");
}

/// Builds (API path, body) for a request naming a host path.
type Request<'a> = dyn Fn(&str) -> (&'static str, Value) + 'a;

/// A refusal of a host path outside the allowed folders is the same whether
/// the file exists, is missing, is a folder, or is reached through a link
/// or `..` from inside: nothing about the host's files leaks.
#[tokio::test(flavor = "multi_thread")]
async fn paths_outside_the_folders_all_get_one_answer() {
    let d = Daemon::start("files-oracle", Opts::test_driver(92));
    let c = d.admin();
    let outside = d.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("id_rsa");
    std::fs::write(&secret, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
    let missing = outside.join("missing");
    let import = d.dir.join("import");
    std::fs::create_dir_all(&import).unwrap();
    let (boot, images) = (d.data().join("boot"), d.data().join("images"));
    for dir in [&import, &boot, &images] {
        std::os::unix::fs::symlink(&secret, dir.join("to-secret")).unwrap();
        std::os::unix::fs::symlink(&missing, dir.join("to-missing")).unwrap();
    }
    let paths = |dir: &Path| -> Vec<String> {
        let up = format!("../../{}", secret.strip_prefix(&d.dir).unwrap().display());
        [
            secret.display().to_string(),
            missing.display().to_string(),
            outside.display().to_string(),
            "/root/.ssh/id_rsa".to_string(),
            "/etc/passwd".to_string(),
            dir.join("to-secret").display().to_string(),
            dir.join("to-missing").display().to_string(),
            dir.join(&up).display().to_string(),
            up,
        ]
        .into()
    };
    let vm = |extra: Value| {
        let mut v = json!({"name": "v", "vcpus": 1, "memory_mib": 64});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let fields: [(&str, &Path, &Request<'_>); 3] = [
        ("path", &import, &|p: &str| ("/v1/images", json!({"name": "i", "path": p}))),
        ("boot.kernel", &boot, &|p: &str| ("/v1/vms", vm(json!({"boot": {"kernel": p}})))),
        ("disks[0].image", &images, &|p: &str| ("/v1/vms", vm(json!({"disks": [{"image": p}]})))),
    ];
    for (field, dir, request) in fields {
        let mut answers = Vec::new();
        for p in paths(dir) {
            let (path, body) = request(&p);
            let (s, v) = call(&c, Method::POST, path, Some(body)).await;
            assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{field} {p}: {v}");
            answers.push((p, v["error"]["message"].as_str().unwrap_or_default().to_string()));
        }
        let first = answers[0].1.clone();
        assert!(first.starts_with(field), "{first}");
        for (p, message) in &answers {
            assert_eq!(message, &first, "{field}: {p} is answered differently");
        }
    }
    let (_, vms) = call(&c, Method::GET, "/v1/vms", None).await;
    assert!(!vms["vms"].as_array().unwrap().iter().any(|v| v["managed"] == true), "{vms}");
}

/// A raw image must look like a disk (at least 1 MiB, whole sectors): a
/// text file is refused by upload and by import.
#[tokio::test(flavor = "multi_thread")]
async fn raw_images_must_look_like_disks() {
    let d = Daemon::start("files-raw", Opts::test_driver(93));
    let c = d.admin();
    let dir = d.dir.join("import");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("hello.txt");
    std::fs::write(&text, "hello\n").unwrap();
    let odd = dir.join("odd.raw");
    std::fs::write(&odd, vec![0u8; (1 << 20) + 100]).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    for (name, file) in [("text", &text), ("odd", &odd)] {
        let (s, v) = upload(&d, name, file);
        assert_eq!((s, error_code(&v)), (400, "invalid_image"), "{name}: {v}");
        let (s, v) = call(&c, Method::POST, "/v1/images", Some(json!({"name": name, "path": file}))).await;
        assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_image"), "{name}: {v}");
    }
    let (s, v) = upload(&d, "disk", &disk);
    assert_eq!(s, 201, "{v}");
    assert_eq!((v["format"].as_str(), v["virtual_size"].as_u64()), (Some("raw"), Some(1 << 20)));
    let (_, list) = call(&c, Method::GET, "/v1/images", None).await;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1), "{list}");
}

fn host_cpus() -> u64 {
    let out = Command::new("getconf").arg("_NPROCESSORS_ONLN").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// More vCPUs than host CPUs are refused at create and edit, unless
/// `hypervisor.vcpu_overcommit` allows them.
#[tokio::test(flavor = "multi_thread")]
async fn vcpus_beyond_the_host_need_overcommit() {
    let mut d = Daemon::start("files-vcpus", Opts::test_driver(94));
    let cpus = host_cpus();
    let create = |name: &str, vcpus: u64| json!({"name": name, "vcpus": vcpus, "memory_mib": 64});
    let c = d.admin();
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(create("big", cpus + 1))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("vcpu_overcommit"), "{v}");
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(create("fits", cpus))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(&c, Method::PATCH, "/v1/vms/fits", Some(json!({"vcpus": cpus + 1}))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
    drop(c);

    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, config.replace("[hypervisor]\n", "[hypervisor]\nvcpu_overcommit = 2\n"))
        .unwrap();
    d.restart();
    let c = d.admin();
    let (s, v) = call(&c, Method::PATCH, "/v1/vms/fits", Some(json!({"vcpus": 2 * cpus}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(&c, Method::POST, "/v1/vms", Some(create("big", 2 * cpus + 1))).await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, "invalid_value"), "{v}");
}

/// The last admin token goes only with force (`?force=true`, CLI
/// `--force`): without one, only root on the host is admin.
#[tokio::test(flavor = "multi_thread")]
async fn last_admin_token_needs_force() {
    let d = Daemon::start("files-admin", Opts::test_driver(97));
    let c = d.local();
    let (s, v) = call(&c, Method::DELETE, "/v1/tokens/admin", None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "last_admin"), "{v}");
    for (name, role) in [("ops", "operator"), ("admin2", "admin")] {
        let (s, v) = call(&c, Method::POST, "/v1/tokens", Some(json!({"name": name, "role": role}))).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        if role == "operator" {
            // An operator token does not make an admin token dispensable.
            let (s, v) = call(&c, Method::DELETE, "/v1/tokens/admin", None).await;
            assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "last_admin"), "{v}");
        }
    }
    let (s, v) = call(&c, Method::DELETE, "/v1/tokens/admin", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let run = common::cli(&d, &["token", "revoke", "admin2"]);
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("last admin token"), "{}", run.stderr);
    let run = common::cli(&d, &["token", "revoke", "admin2", "--force"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (_, v) = call(&c, Method::GET, "/v1/tokens", None).await;
    let names: Vec<&str> =
        v["tokens"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ops"]);
}

/// Images and seeds stay private when the daemon is not root (as under
/// systemd, user novacron in QEMU's group): it gives them QEMU's group, and
/// still reads an image after libvirt handed it to QEMU's user.
#[tokio::test(flavor = "multi_thread")]
async fn unprivileged_daemon_keeps_images_and_seeds_private() {
    const UID: u32 = 61_234;
    let gid = qemu_gid();
    let dir = common::scratch_dir("files-unpriv");
    nix::unistd::chown(&dir, Some(UID.into()), Some(UID.into())).unwrap();
    let mut opts = Opts::test_driver(95);
    opts.data_dir = Some(dir);
    opts.wrapper =
        ["setpriv", &format!("--reuid={UID}"), &format!("--regid={UID}"), &format!("--groups={gid}")]
            .map(String::from)
            .into();
    let d = Daemon::start("files-unpriv", opts);
    let c = d.admin();
    let file = d.dir.join("disk.raw");
    std::fs::write(&file, vec![0u8; 2 << 20]).unwrap();
    let (s, v) = upload(&d, "base", &file);
    assert_eq!(s, 201, "{v}");
    let spec = json!({"name": "ci", "vcpus": 1, "memory_mib": 64, "disks": [{"image": "base"}],
        "cloud_init": {"user_data": "#cloud-config\npassword: hunter2\n"}});
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let image = d.data().join("images/base");
    let seed = d.data().join("disks").join(vm["id"].as_str().unwrap()).join("cidata.iso");
    for f in [&image, &seed] {
        let meta = std::fs::metadata(f).unwrap();
        assert_eq!((meta.uid(), meta.gid(), mode(f)), (UID, gid, 0o640), "{}", f.display());
        nobody_cannot_read(f);
    }
    assert_eq!(mode(&d.data().join("images")), 0o711);

    // What libvirt leaves behind after a guest used the image read-only.
    nix::unistd::chown(&image, Some(gid.into()), Some(gid.into())).unwrap();
    let (s, v) = call(
        &c,
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "again", "vcpus": 1, "memory_mib": 64, "disks": [{"image": "base"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    nobody_cannot_read(&image);
}

/// A real TCG guest boots with its private seed and an overlay on a private
/// image; after it ran (libvirt relabels both) they are still private. Its
/// console log is `logs/NAME.UUID.console.log`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "boots a real TCG guest: needs libvirtd and QEMU from tests/setup-host.sh"]
async fn real_guest_boots_from_private_seed_and_image() {
    let mut opts = Opts::test_driver(96);
    opts.uri = "qemu:///system".into();
    let d = Daemon::start("files-guest", opts);
    let c = d.admin();
    let (kernel, initrd) = common::install_guest(&d.data().join("boot"));
    let base = d.dir.join("base.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .unwrap()
        .success());
    let (s, v) = upload(&d, "base", &base);
    assert_eq!(s, 201, "{v}");
    let name = format!("files-{}", std::process::id());
    let _cleanup = Guard(name.clone());
    let marker = format!("secret-{}", std::process::id());
    let spec = json!({
        "name": name, "vcpus": 1, "memory_mib": 128, "disks": [{"image": "base"}],
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=-1 quiet"},
        "cloud_init": {"user_data": format!("#{marker}\n")}
    });
    let (s, vm) = call(&c, Method::POST, "/v1/vms", Some(spec)).await;
    assert_eq!(s, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().unwrap().to_string();
    let image = d.data().join("images/base");
    let seed = d.data().join("disks").join(&id).join("cidata.iso");
    for f in [&image, &seed] {
        assert_eq!((mode(f), std::fs::metadata(f).unwrap().gid()), (0o640, qemu_gid()), "{}", f.display());
        nobody_cannot_read(f);
    }

    let (s, v) = call(&c, Method::POST, &format!("/v1/vms/{id}/start"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let log = d.data().join("logs").join(format!("{name}.{id}.console.log"));
    wait_for("the seed's first line and the disk on the console", 90, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains(&format!("NOVACRON-CIDATA=#{marker}")) && text.contains("NOVACRON-DISK=vda")
    });
    assert_eq!(call(&c, Method::POST, &format!("/v1/vms/{id}/stop"), None).await.0, StatusCode::OK);
    for f in [&image, &seed] {
        nobody_cannot_read(f);
    }
    assert_eq!(call(&c, Method::DELETE, &format!("/v1/vms/{id}"), None).await.0, StatusCode::NO_CONTENT);
    assert!(!log.exists(), "the console log outlived its VM");
}

/// Removes the test's domain from libvirt even when an assertion fails.
struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        virsh(&["destroy", &self.0]);
        virsh(&["undefine", &self.0]);
    }
}
