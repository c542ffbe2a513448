//! Host updates, daemon side: receive and verify a bundle, hand it to the
//! root installer, shut the guests down cleanly once the new slot is
//! written, ask for the reboot, and after it tell success from rollback and
//! start the guests again. The protocol with the installer is in
//! `ops::update`; the record of the latest update is `update/status.json`.

use super::{BodyStream, Core, CoreError, Result};
use crate::ops::update::{self as hu, InstallReport, InstallState, Slot};
use crate::ops::OpsError;
use crate::types::{UpdateRecord, UpdateState, UpdateView, VmState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const RECORD: &str = "status.json";
const RECORD_FORMAT: u32 = 1;
/// Bundles are a root image plus a kernel: a few hundred MiB.
const MAX_BUNDLE: u64 = 4 << 30;
/// How long the root installer may take to pick up and finish a request.
const INSTALL_DEADLINE: Duration = Duration::from_secs(30 * 60);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CoreError::Internal(e.to_string()))
}

impl Core {
    fn update_dir(&self) -> PathBuf {
        self.paths.data_dir.join("update")
    }

    pub(super) fn update_record(&self) -> Option<UpdateRecord> {
        match hu::read_json::<UpdateRecord>(&self.update_dir().join(RECORD)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the update record");
                None
            }
        }
    }

    fn save_update_record(&self, r: &UpdateRecord) -> Result<()> {
        hu::write_json(&self.update_dir().join(RECORD), r, 0o600).map_err(CoreError::Ops)
    }

    pub(super) async fn update_view(&self) -> UpdateView {
        let slots = blocking(hu::detect).await.and_then(|r| r.map_err(CoreError::Ops));
        let (appliance, reason, booted) = match &slots {
            Ok(s) => (true, None, Some(s.booted.name().to_string())),
            Err(e) => (false, Some(e.to_string()), None),
        };
        UpdateView {
            appliance,
            reason,
            booted_slot: booted,
            booted_version: hu::image_version(),
            update: self.update_record(),
        }
    }

    /// `POST /v1/host/update`: streams the bundle in, verifies it, and
    /// hands it to the installer. Answers once the installer has the
    /// request; the rest (install, guest shutdown, reboot) follows in the
    /// background and shows in `GET /v1/host/update`.
    pub(super) async fn apply_update(
        self: &Arc<Self>,
        checksum: Option<String>,
        length: Option<u64>,
        tries: u32,
        body: BodyStream,
    ) -> Result<UpdateView> {
        // The request first, then the host: a malformed request is 400 on
        // any host, as the OpenAPI document says.
        let Some(checksum) = checksum else {
            return Err(CoreError::invalid(
                "X-Checksum-Sha256",
                "an update must name the SHA-256 of its bundle (the .sha256 file next to it)",
            ));
        };
        let expected = crate::images::parse_checksum(&checksum)?;
        if !(1..=9).contains(&tries) {
            return Err(CoreError::invalid("tries", "must be from 1 to 9"));
        }
        let slots = blocking(hu::detect).await?.map_err(CoreError::Ops)?;
        let _guard = self
            .update_lock
            .try_lock()
            .map_err(|_| CoreError::UpdateInProgress("an update is being received".into()))?;
        if let Some(r) = self.update_record().filter(|r| r.state.in_progress()) {
            return Err(CoreError::UpdateInProgress(format!("the update to {} is {:?}", r.version, r.state)));
        }
        if length.is_some_and(|l| l > MAX_BUNDLE) {
            return Err(crate::images::ImageError::TooLarge { max: MAX_BUNDLE }.into());
        }
        let dir = self.update_dir();
        std::fs::create_dir_all(&dir).map_err(|e| CoreError::Ops(e.into()))?;
        for f in [hu::REQUEST, hu::INSTALL, hu::REBOOT, hu::BUNDLE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let bundle = dir.join(hu::BUNDLE);
        let mut up = crate::images::Upload::begin(&dir, MAX_BUNDLE)?;
        body.start();
        let mut rx = body.chunks.lock().await;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(crate::images::ImageError::Truncated)?;
            up.write_async(chunk).await?;
        }
        if let Some(l) = length {
            if up.written() != l {
                return Err(crate::images::ImageError::Truncated(format!(
                    "got {} of {l} bytes",
                    up.written()
                ))
                .into());
            }
        }
        let b = bundle.clone();
        tokio::task::block_in_place(|| up.finish_file(&expected, &b))?;
        let b = bundle.clone();
        let manifest = match blocking(move || hu::verify(&b)).await? {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&bundle);
                return Err(CoreError::Ops(e));
            }
        };
        let target = slots.booted.other();
        let root = manifest.files.get("root.erofs").map(|m| m.size).unwrap_or(0);
        if root > slots.get(target).size {
            let _ = std::fs::remove_file(&bundle);
            return Err(CoreError::Ops(OpsError::Bundle(format!(
                "root.erofs is {root} bytes; slot {} holds {} bytes",
                target.label(),
                slots.get(target).size
            ))));
        }
        let record = UpdateRecord {
            format: RECORD_FORMAT,
            state: UpdateState::Installing,
            version: manifest.version.clone(),
            from_slot: slots.booted.name().into(),
            from_version: hu::image_version(),
            target_slot: target.name().into(),
            tries,
            message: None,
            started_at: now(),
            finished_at: None,
            boot_id: None,
            resume_vms: Vec::new(),
        };
        self.save_update_record(&record)?;
        let req = hu::Request {
            format: hu::FILES_FORMAT,
            sha256: expected,
            version: manifest.version,
            target,
            tries,
        };
        hu::write_json(&dir.join(hu::REQUEST), &req, 0o600).map_err(CoreError::Ops)?;
        tracing::info!(OP = "host.update", version = %record.version, slot = %record.target_slot, "update verified; waiting for the installer");
        self.events.publish("update", serde_json::json!({"state": record.state, "version": record.version}));
        tokio::spawn(self.clone().follow_update());
        Ok(self.update_view().await)
    }

    fn set_update_state(&self, r: &mut UpdateRecord, state: UpdateState, message: Option<String>) {
        r.state = state;
        if message.is_some() {
            r.message = message;
        }
        if !state.in_progress() {
            r.finished_at = Some(now());
        }
        match state {
            UpdateState::Failed | UpdateState::RolledBack => {
                tracing::error!(OP = "host.update", version = %r.version, state = ?state, message = r.message.as_deref().unwrap_or(""), "host update")
            }
            _ => {
                tracing::info!(OP = "host.update", version = %r.version, state = ?state, message = r.message.as_deref().unwrap_or(""), "host update")
            }
        }
        if let Err(e) = self.save_update_record(r) {
            tracing::error!(error = %e, "cannot save the update record");
        }
        self.events.publish("update", serde_json::json!({"state": state, "version": r.version}));
    }

    /// Waits for the installer, then stops the guests and asks for the
    /// reboot. Also resumes an update a daemon restart interrupted.
    ///
    /// Boxed with an explicit `Send`: it runs VM commands through
    /// `execute`, which can lead back here, and the compiler cannot infer
    /// `Send` through that cycle.
    fn follow_update(self: Arc<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.follow_update_inner().await })
    }

    async fn follow_update_inner(self: Arc<Self>) {
        let Some(mut r) = self.update_record() else { return };
        let dir = self.update_dir();
        if r.state == UpdateState::Installing {
            let deadline = tokio::time::Instant::now() + INSTALL_DEADLINE;
            let outcome = loop {
                match hu::read_json::<InstallReport>(&dir.join(hu::INSTALL)) {
                    Ok(Some(rep)) if rep.state == InstallState::Installed => break Ok(rep.message),
                    Ok(Some(rep)) if rep.state == InstallState::Failed => {
                        break Err(rep.message.unwrap_or_else(|| "the installer failed".into()))
                    }
                    Err(e) => break Err(e.to_string()),
                    _ => {}
                }
                if tokio::time::Instant::now() > deadline {
                    break Err(format!(
                        "the installer did not finish within {} minutes (is novacron-update.path enabled?)",
                        INSTALL_DEADLINE.as_secs() / 60
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            let _ = std::fs::remove_file(dir.join(hu::BUNDLE));
            match outcome {
                Ok(msg) => self.set_update_state(&mut r, UpdateState::StoppingGuests, msg),
                Err(msg) => {
                    let _ = std::fs::remove_file(dir.join(hu::REQUEST));
                    self.set_update_state(&mut r, UpdateState::Failed, Some(msg));
                    return;
                }
            }
        }
        if r.state == UpdateState::StoppingGuests {
            r.resume_vms = self.stop_guests_for_update(&r.resume_vms).await;
            r.boot_id = boot_id();
            self.set_update_state(&mut r, UpdateState::Rebooting, None);
            if let Err(e) = std::fs::write(dir.join(hu::REBOOT), b"") {
                tracing::error!(error = %e, "cannot ask for the reboot");
            }
        }
    }

    /// Shuts every running or paused guest down (ACPI, forced after its
    /// graceful-shutdown limit), all at once. Returns them, plus `already`
    /// (guests an interrupted earlier attempt stopped), to start later.
    async fn stop_guests_for_update(self: &Arc<Self>, already: &[uuid::Uuid]) -> Vec<uuid::Uuid> {
        let running: Vec<(uuid::Uuid, u64)> = self
            .vms
            .read()
            .unwrap()
            .values()
            // The peer's VMs run there, whatever their replica says.
            .filter(|v| self.owns(v) && matches!(v.state, VmState::Running | VmState::Paused))
            .map(|v| (v.id, self.shutdown_timeout(v)))
            .collect();
        let caller = Core::local_admin(0);
        let stops = running.iter().map(|&(id, t)| {
            let core = self.clone();
            let caller = caller.clone();
            async move {
                let action = super::VmAction::Shutdown { wait: Some(t + 5), timeout: Some(t) };
                let cmd = super::Command::VmAction { vm: id.to_string(), action };
                if let Err(e) = core.execute(&caller, cmd).await {
                    tracing::warn!(VM_ID = %id, error = %e, "shutdown before the update failed; forcing it off");
                    let cmd = super::Command::VmAction { vm: id.to_string(), action: super::VmAction::Stop };
                    let _ = core.execute(&caller, cmd).await;
                }
            }
        });
        futures_util::future::join_all(stops).await;
        let mut all: Vec<uuid::Uuid> = already.to_vec();
        all.extend(running.iter().map(|(id, _)| *id).filter(|id| !already.contains(id)));
        all
    }

    /// At daemon start: finishes what an update left. After its reboot,
    /// decides success (running from the new slot) or rollback, and starts
    /// the guests that were running before; an update a daemon restart
    /// interrupted is followed again.
    pub async fn recover_update(self: &Arc<Self>) {
        let Some(mut r) = self.update_record() else { return };
        match r.state {
            UpdateState::Installing | UpdateState::StoppingGuests => {
                tokio::spawn(self.clone().follow_update());
            }
            UpdateState::Rebooting if r.boot_id.is_some() && r.boot_id == boot_id() => {
                // Same boot: the reboot is still to come. Ask again.
                let _ = std::fs::write(self.update_dir().join(hu::REBOOT), b"");
            }
            UpdateState::Rebooting => {
                let booted = blocking(hu::detect).await.ok().and_then(|s| s.ok()).map(|s| s.booted);
                let target = if r.target_slot == "a" { Slot::A } else { Slot::B };
                if booted == Some(target) {
                    let msg = format!("running version {} from slot {}", r.version, r.target_slot);
                    self.set_update_state(&mut r, UpdateState::Succeeded, Some(msg));
                } else {
                    let msg = format!(
                        "slot {} (version {}) did not come up within {} boot attempts; \
                         systemd-boot went back to slot {}",
                        r.target_slot,
                        r.version,
                        r.tries,
                        booted.map(|s| s.name()).unwrap_or("?")
                    );
                    self.set_update_state(&mut r, UpdateState::RolledBack, Some(msg));
                }
                let _ = std::fs::remove_file(self.update_dir().join(hu::INSTALL));
                let caller = Core::local_admin(0);
                for id in std::mem::take(&mut r.resume_vms) {
                    let cmd = super::Command::VmAction { vm: id.to_string(), action: super::VmAction::Start };
                    match self.execute(&caller, cmd).await {
                        Ok(_) => tracing::info!(VM_ID = %id, "started again after the host update"),
                        Err(e) => {
                            tracing::warn!(VM_ID = %id, error = %e, "cannot start after the host update")
                        }
                    }
                }
                let _ = self.save_update_record(&r);
            }
            _ => {}
        }
    }
}
