//! Directory metadata: modes, owners and mtimes of directories, restored once the files
//! below them are in place (writing a file changes its directory's mtime).

use super::*;

pub(super) struct DirTimes {
    /// Per (migration key, directory).
    pub(super) known: HashMap<(String, PathBuf), (i64, u32)>,
    pub(super) log: File,
    pub(super) log_path: PathBuf,
}

/// Sets a directory's owner (if given) and mode through a handle opened through no symlink
/// ([`beneath`]): if something swapped the directory (or one above it) for a symlink after it
/// was checked, the open fails instead of changing whatever the link points to.
pub(super) fn set_dir_meta(
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    xattrs: &crate::xattr::Xattrs,
) -> Result<(), SinkError> {
    let dir = beneath::open_dir(path)
        .map(File::from)
        .map_err(io_at("cannot open directory (is it a symlink?)", path))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
            .map_err(io_at("cannot set owner of", path))?;
    }
    crate::xattr::apply_to(&dir, xattrs).map_err(io_at("cannot set attributes of", path))?;
    dir.set_permissions(Permissions::from_mode(mode))
        .map_err(io_at("cannot set mode of", path))
}

impl FsSink {
    /// Records the directory mtimes a segment carries (durably), then sets the source mtime back
    /// on every directory in `touched` that has one, and on the others the mtime they had before
    /// the segment wrote into them (`before`; a directory this sink never received).
    pub(super) fn restore_dir_times(
        &self,
        migration: &str,
        received: &[(PathBuf, (i64, u32))],
        touched: &[PathBuf],
        before: &HashMap<PathBuf, (i64, u32)>,
    ) -> Result<(), SinkError> {
        let mut dt = self.dir_times.lock().expect("not poisoned");
        if !received.is_empty() {
            let mut lines = Vec::new();
            for (d, t) in received {
                lines.extend(
                    serde_json::to_vec(&(migration, bytes(d), t))
                        .expect("strings, bytes and numbers serialise"),
                );
                lines.push(b'\n');
                dt.known.insert((migration.to_string(), d.clone()), *t);
            }
            use std::io::Write;
            let DirTimes { log, log_path, .. } = &mut *dt;
            log.write_all(&lines)
                .and_then(|()| log.sync_data())
                .map_err(io_at("cannot append to", log_path))?;
        }
        for d in touched {
            let known = dt.known.get(&(migration.to_string(), d.clone()));
            if let Some(&(sec, nsec)) = known.or_else(|| before.get(d)) {
                let t = FileTime::from_unix_time(sec, nsec);
                beneath::set_symlink_file_times(d, t).map_err(io_at("cannot set mtime of", d))?;
            }
        }
        Ok(())
    }
}
