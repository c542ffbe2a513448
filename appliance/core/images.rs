//! Image commands: streaming upload, import from a host folder, list,
//! delete. File handling and the safety checks live in `crate::images`.

use super::{BodyStream, Core, CoreError, Result};
use crate::images::{self as img, ImageError, Upload};
use crate::store::{now_ms, Change, ImageRecord};
use crate::types::{valid_name, Image, ImageImport, ImageList};
use crate::util::rfc3339;
use std::path::PathBuf;
use std::sync::Arc;

/// A claimed image name; released on drop, whatever the outcome.
struct PendingImage<'a> {
    core: &'a Core,
    name: String,
}

impl Drop for PendingImage<'_> {
    fn drop(&mut self) {
        self.core.images_pending.lock().unwrap().remove(&self.name);
    }
}

/// The final link found a file of that name (one put there by hand since
/// the claim): the name is taken, not a storage failure.
fn name_taken_if_exists(e: ImageError, name: &str) -> CoreError {
    match e {
        ImageError::Io(io) if io.kind() == std::io::ErrorKind::AlreadyExists => {
            CoreError::NameTaken(name.to_string())
        }
        e => e.into(),
    }
}

impl Core {
    /// Every image record (the image copy compares them with the files).
    pub fn image_records(&self) -> Vec<ImageRecord> {
        self.images.read().unwrap().values().cloned().collect()
    }

    /// Where this node keeps a record's file: its own images folder, under
    /// the file name the record's node gave it (records keep the path of
    /// the node that made them; the data dirs may differ).
    pub fn local_image_path(&self, i: &ImageRecord) -> PathBuf {
        let name =
            std::path::Path::new(&i.path).file_name().map_or_else(|| i.name.clone().into(), |n| n.to_owned());
        self.paths.images.join(name)
    }

    /// `present`, `copying` or `missing` (see [`Image::file`]).
    fn file_state(&self, i: &ImageRecord) -> &'static str {
        let view = self.image_files.read().unwrap();
        if view.status.copying.as_ref().is_some_and(|(sha, _, _)| *sha == i.sha256) {
            "copying"
        } else if view.bad.contains(&i.sha256) {
            "missing"
        } else {
            let len = std::fs::metadata(self.local_image_path(i)).map(|m| m.len());
            if len.is_ok_and(|l| l == i.file_size) {
                "present"
            } else {
                "missing"
            }
        }
    }

    fn image_view(&self, i: &ImageRecord) -> Image {
        let used_by = self
            .vms
            .read()
            .unwrap()
            .values()
            .filter(|v| v.disks.iter().any(|d| d.image.as_deref() == Some(i.path.as_str())))
            .map(|v| v.name.clone())
            .collect();
        Image {
            name: i.name.clone(),
            format: i.format.clone(),
            virtual_size: i.virtual_size,
            file_size: i.file_size,
            sha256: i.sha256.clone(),
            used_by,
            created_at: rfc3339(i.created_at),
            file: self.file_state(i).to_string(),
        }
    }

    pub(super) fn list_images(&self) -> ImageList {
        ImageList { images: self.images.read().unwrap().values().map(|i| self.image_view(i)).collect() }
    }

    pub(super) fn get_image(&self, name: &str) -> Result<Image> {
        let images = self.images.read().unwrap();
        images
            .get(name)
            .map(|i| self.image_view(i))
            .ok_or_else(|| CoreError::NotFound(format!("image {name:?}")))
    }

    /// The registered image called `name`, if any.
    pub(super) fn image_record(&self, name: &str) -> Option<ImageRecord> {
        self.images.read().unwrap().get(name).cloned()
    }

    pub fn max_image_bytes(&self) -> u64 {
        self.cfg.images.max_upload_gib.saturating_mul(1 << 30)
    }

    /// Claims `name` for a new image until the returned guard is dropped.
    /// The claim, the name checks and the final no-replace link make every
    /// loser of a race for one name a 409 `name_taken`.
    fn claim_image_name(&self, name: &str) -> Result<(PathBuf, PendingImage<'_>)> {
        valid_name(name).map_err(|m| CoreError::invalid("name", m))?;
        let path = self.paths.images.join(name);
        let mut pending = self.images_pending.lock().unwrap();
        if pending.contains(name) || self.images.read().unwrap().contains_key(name) || path.exists() {
            return Err(CoreError::NameTaken(name.to_string()));
        }
        pending.insert(name.to_string());
        Ok((path, PendingImage { core: self, name: name.to_string() }))
    }

    async fn register_image(&self, name: &str, path: PathBuf, info: img::ImageInfo) -> Result<Image> {
        let record = ImageRecord {
            name: name.to_string(),
            path: path.display().to_string(),
            format: info.format,
            virtual_size: info.virtual_size,
            file_size: info.file_size,
            sha256: info.sha256,
            created_at: now_ms(),
        };
        if let Err(e) = self.commit(Change::ImagePut(record.clone())).await {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(self.image_view(&record))
    }

    /// Receives an image from `body`. Memory stays flat whatever the size:
    /// chunks are hashed and written as they arrive. Anything short of a
    /// complete, verified image leaves no file behind.
    pub(super) async fn upload_image(
        self: &Arc<Self>,
        name: &str,
        checksum: Option<String>,
        length: Option<u64>,
        body: BodyStream,
    ) -> Result<Image> {
        let expected = checksum.map(|c| img::parse_checksum(&c)).transpose()?;
        let (dest, _claim) = self.claim_image_name(name)?;
        let max = self.max_image_bytes();
        if length.is_some_and(|l| l > max) {
            return Err(ImageError::TooLarge { max }.into());
        }
        let mut up = Upload::begin(&self.paths.images, max)?;
        body.start();
        let mut rx = body.chunks.lock().await;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.map_err(ImageError::Truncated)?;
            up.write_async(chunk).await?;
        }
        if let Some(l) = length {
            if up.written() != l {
                return Err(ImageError::Truncated(format!("got {} of {l} bytes", up.written())).into());
            }
        }
        let info = tokio::task::block_in_place(|| up.finish(expected.as_deref(), &dest))
            .map_err(|e| name_taken_if_exists(e, name))?;
        tracing::info!(IMAGE = name, format = %info.format, bytes = info.file_size, "image uploaded");
        self.register_image(name, dest, info).await
    }

    pub(super) async fn import_image(self: &Arc<Self>, req: ImageImport) -> Result<Image> {
        let (dest, _claim) = self.claim_image_name(&req.name)?;
        let dirs: Vec<&std::path::Path> = self.cfg.images.import_dirs.iter().map(|p| p.as_path()).collect();
        if dirs.is_empty() {
            return Err(CoreError::invalid("path", "no import folders are configured (images.import_dirs)"));
        }
        let src = self.resolve_host_file("path", &req.path, &dirs)?;
        let (images_dir, max) = (self.paths.images.clone(), self.max_image_bytes());
        let d = dest.clone();
        let info = tokio::task::spawn_blocking(move || img::import(&src, &images_dir, &d, max))
            .await
            .map_err(|e| CoreError::Internal(e.to_string()))?
            .map_err(|e| name_taken_if_exists(e, &req.name))?;
        self.register_image(&req.name, dest, info).await
    }

    pub(super) async fn delete_image(&self, name: &str) -> Result<()> {
        let record = self.image_record(name).ok_or_else(|| CoreError::NotFound(format!("image {name:?}")))?;
        let view = self.image_view(&record);
        if !view.used_by.is_empty() {
            return Err(CoreError::InUse { what: format!("image {name}"), users: view.used_by.join(", ") });
        }
        self.commit(Change::ImageDelete { name: name.to_string() }).await?;
        if let Err(e) = std::fs::remove_file(&record.path) {
            tracing::warn!(IMAGE = name, error = %e, "cannot remove the image file");
        }
        Ok(())
    }
}
