//! The destination file system: a fresh ext4 (or XFS, `--fs xfs`) made for one `wan-bench`
//! invocation.
//!
//! Every tool writes its copies into `<work>/dst`. On a long-lived file system, creating files
//! costs more and more as earlier runs' copies are deleted (ext4 passes over recently freed
//! inodes when it allocates new ones), so the same tool is slower in a later run than in an
//! earlier one. A fresh ext4 (on a sparse image, through a loop device with direct I/O so its
//! pages are not cached twice) makes the runs comparable, and looks like the new cloud volume a
//! migration writes to. Unmounted and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted fresh file system, removed on drop.
pub struct FreshFs {
    image: PathBuf,
    device: String,
    mount: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl FreshFs {
    /// Makes a fresh file system of `size` bytes (sparse) and mounts it at `mount` (emptied
    /// first): `ext4`, or `xfs` (with reflinks: `copy_file_range` then shares blocks, as on
    /// the XFS volumes many cloud images use).
    pub fn create(work: &Path, mount: &Path, size: u64, kind: &str) -> Result<FreshFs, String> {
        Self::create_with(work, mount, size, kind, None)
    }

    /// [`FreshFs::create`], an ext4 with room for `inodes` files when given (256-byte inodes
    /// with `inline_data`, so a file of up to ~150 bytes lives in its inode and takes no block:
    /// a tree of ten million tiny files then fits in a few GB).
    pub fn create_with(
        work: &Path,
        mount: &Path,
        size: u64,
        kind: &str,
        inodes: Option<u64>,
    ) -> Result<FreshFs, String> {
        let image = work.join("dst.img");
        let _ = Command::new("umount").arg(mount).output();
        let _ = std::fs::remove_file(&image);
        let f = std::fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", image.display()))?;
        drop(f);
        match kind {
            // Inode tables and journal initialised now, not by a kernel thread during the runs.
            "ext4" => {
                let mut mkfs = Command::new("mkfs.ext4");
                mkfs.args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]);
                if let Some(n) = inodes {
                    mkfs.args(["-I", "256", "-O", "inline_data", "-N"])
                        .arg(n.to_string());
                }
                run(mkfs.arg(&image))?
            }
            "xfs" => run(Command::new("mkfs.xfs")
                .args(["-q", "-f", "-m", "reflink=1"])
                .arg(&image))
            .map_err(|e| format!("{e} (Debian: apt-get install xfsprogs)"))?,
            other => return Err(format!("file system {other:?}: use ext4 or xfs")),
        };
        let device = run(Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(&image))?;
        let _ = std::fs::remove_dir_all(mount);
        std::fs::create_dir_all(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
        let fs = FreshFs {
            image,
            device,
            mount: mount.to_path_buf(),
        };
        run(Command::new("mount").arg(&fs.device).arg(mount))?;
        Ok(fs)
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
        let _ = std::fs::remove_file(&self.image);
    }
}
