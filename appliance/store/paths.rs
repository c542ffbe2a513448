//! The data dir's layout: the database and the folders beside it. The
//! store, its backups and the core all find their files through it.

use std::path::PathBuf;

/// Folders under the data dir.
#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub db: PathBuf,
    pub disks: PathBuf,
    pub boot: PathBuf,
    pub images: PathBuf,
    pub logs: PathBuf,
    pub tls: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &std::path::Path) -> Paths {
        Paths {
            data_dir: data_dir.into(),
            db: data_dir.join("state.db"),
            disks: data_dir.join("disks"),
            boot: data_dir.join("boot"),
            images: data_dir.join("images"),
            logs: data_dir.join("logs"),
            tls: data_dir.join("tls"),
        }
    }

    /// Creates the folders. Disks, images and logs must be reachable by QEMU, which
    /// may run as another user, so they are traversable but not listable.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (dir, mode) in [
            (&self.data_dir, 0o711),
            (&self.disks, 0o711),
            (&self.boot, 0o755),
            (&self.images, 0o711),
            (&self.logs, 0o711),
            (&self.tls, 0o700),
        ] {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}
