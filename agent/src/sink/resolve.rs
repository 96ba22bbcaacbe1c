//! Where a peer's path lands: checked, below the root, through no symlink; files opened
//! through none either ([`beneath`]).

use super::*;

impl FsSink {
    /// Resolves `base/rel` below the root, creating missing directories (recorded in `created`),
    /// refusing symlinks. Returns the parent directory and the final path.
    pub(super) fn resolve(
        &self,
        base: &Path,
        rel: &Path,
        created: &mut Vec<PathBuf>,
    ) -> Result<(PathBuf, PathBuf), SinkError> {
        Ok(self
            .walk_parents(base, rel, Some(created))?
            .expect("missing directories are created"))
    }

    /// Where `rel` (below `base`) is, if every directory above it exists: the same checks as
    /// [`FsSink::resolve`], but nothing is created (a deletion has nothing to do where a
    /// parent is missing). Returns the parent directory and the path.
    pub(super) fn locate(
        &self,
        base: &Path,
        rel: &Path,
    ) -> Result<Option<(PathBuf, PathBuf)>, SinkError> {
        self.walk_parents(base, rel, None)
    }

    /// Checks every directory between the root and `base/rel`: each must be a directory (not
    /// a symlink); a missing one is created (with `created`) or ends the walk (`None`).
    fn walk_parents(
        &self,
        base: &Path,
        rel: &Path,
        mut created: Option<&mut Vec<PathBuf>>,
    ) -> Result<Option<(PathBuf, PathBuf)>, SinkError> {
        let full_rel = checked(base, rel)?;
        let comps: Vec<_> = full_rel.components().collect();
        let (last, parents) = comps.split_last().ok_or(PathError::Empty)?;
        let escape = |dir: &Path| SinkError::Escape {
            path: display(rel),
            component: dir.to_path_buf(),
        };
        let mut dir = self.root.clone();
        dir.extend(parents);
        // Usually every directory is there: one call checks the whole way.
        if beneath::open_dir(&dir).is_err() {
            dir = self.root.clone();
            for c in parents {
                dir.push(c);
                match beneath::symlink_metadata(&dir) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(escape(&dir)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let Some(created) = created.as_deref_mut() else {
                            return Ok(None);
                        };
                        match beneath::create_dir(&dir, 0o755) {
                            Ok(()) => created.push(dir.clone()),
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                                // Created concurrently by another segment; re-check what it is.
                                if !beneath::symlink_metadata(&dir)
                                    .is_ok_and(|m| m.file_type().is_dir())
                                {
                                    return Err(escape(&dir));
                                }
                            }
                            Err(e) => return Err(io_at("cannot create directory", &dir)(e)),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Err(escape(&dir)),
                    Err(e) => return Err(io_at("cannot inspect", &dir)(e)),
                }
            }
        }
        #[cfg(test)]
        if let Some(hook) = self.after_check.lock().expect("not poisoned").as_ref() {
            hook(&dir);
        }
        let path = dir.join(last);
        Ok(Some((dir, path)))
    }
}

/// The checks every path a peer names passes: valid and relative ([`validate_relative`]), its
/// last component not in ferry's own `.ferry-` namespace. Returns it below `base`.
fn checked(base: &Path, rel: &Path) -> Result<PathBuf, SinkError> {
    let full_rel = base.join(validate_relative(bytes(rel))?);
    let last = full_rel.components().next_back().ok_or(PathError::Empty)?;
    if last
        .as_os_str()
        .as_encoded_bytes()
        .starts_with(RESERVED_PREFIX.as_bytes())
    {
        return Err(SinkError::Reserved(display(rel)));
    }
    Ok(full_rel)
}

/// Opens a file below the root for reading, through no symlink ([`beneath`]).
pub(super) fn open_read_nofollow(path: &Path) -> io::Result<File> {
    beneath::open(path, rustix::fs::OFlags::RDONLY, 0)
}

/// Opens a file below the root for writing, through no symlink ([`beneath`]).
pub(super) fn open_nofollow(path: &Path) -> io::Result<File> {
    beneath::open(path, rustix::fs::OFlags::WRONLY, 0)
}

/// Opens a file below the root for reading and writing, through no symlink ([`beneath`]).
pub(super) fn open_rw_nofollow(path: &Path) -> io::Result<File> {
    beneath::open(path, rustix::fs::OFlags::RDWR, 0)
}
