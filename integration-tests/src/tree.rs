//! The one independent check that a copy equals its source, used by the tests (every detail ferry
//! promises) and by `wan-bench` (what each peer tool promises): a tree is described by `stat`,
//! `readlink`, xattrs and a BLAKE3 of every regular file, never by ferry's own code paths, then
//! two descriptions are compared at a [`Fidelity`].

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One node of a tree, as seen by `stat` and an independent BLAKE3 of the contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    File {
        /// BLAKE3 of the contents.
        hash: String,
        /// Size.
        size: u64,
        /// Permission bits.
        mode: u32,
        /// mtime (s, ns).
        mtime: (i64, i64),
        /// Numeric owner and group.
        owner: (u32, u32),
        /// Every name of this file inside the tree (more than one for hardlinks), sorted.
        names: Vec<PathBuf>,
        /// Bytes allocated on disk (`st_blocks * 512`): compared within a tolerance, as file
        /// systems allocate at their own granularity.
        allocated: u64,
        /// Extended attributes.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
        /// mtime (s, ns).
        mtime: (i64, i64),
        /// Numeric owner and group.
        owner: (u32, u32),
        /// Extended attributes.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// A symlink.
    Symlink {
        /// Where it points.
        target: PathBuf,
        /// mtime (s, ns).
        mtime: (i64, i64),
        /// Numeric owner and group.
        owner: (u32, u32),
    },
}

/// How far the allocated sizes of a file and its copy may differ: a few file system blocks.
pub const ALLOCATION_SLACK: u64 = 16 * 4096;

/// How much of the tree a copy is expected to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fidelity {
    /// File contents only: symlinks may be followed or skipped, directories without files may
    /// be missing, modes and times are not kept (scp, rclone).
    Contents,
    /// Contents, permission bits, file mtimes to the second, symlinks as symlinks, empty
    /// directories (`rsync -a`).
    Full,
    /// Everything [`Node`] holds (nanosecond mtimes of every node, owners, hardlink groups,
    /// xattrs, allocated size within [`ALLOCATION_SLACK`]), and nothing more in the copy: what
    /// ferry promises.
    Exact,
}

/// Describes every node below `root` (not `root` itself), keyed by relative path.
pub fn describe(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, Node>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let m = std::fs::symlink_metadata(&p)?;
            let rel = p.strip_prefix(root)?.to_path_buf();
            let owner = (m.uid(), m.gid());
            let mtime = (m.mtime(), m.mtime_nsec());
            let node = if m.file_type().is_symlink() {
                Node::Symlink {
                    target: std::fs::read_link(&p)?,
                    mtime,
                    owner,
                }
            } else if m.is_dir() {
                stack.push(p.clone());
                Node::Dir {
                    mode: m.mode() & 0o7777,
                    mtime,
                    owner,
                    xattrs: ferry_agent::xattr::read(&p)?,
                }
            } else if m.is_file() {
                inodes
                    .entry((m.dev(), m.ino()))
                    .or_default()
                    .push(rel.clone());
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(&p)?)?;
                Node::File {
                    hash: h.finalize().to_hex().to_string(),
                    size: m.len(),
                    mode: m.mode() & 0o7777,
                    mtime,
                    owner,
                    names: Vec::new(),
                    allocated: m.blocks() * 512,
                    xattrs: ferry_agent::xattr::read(&p)?,
                }
            } else {
                anyhow::bail!("{} is neither file, directory nor symlink", p.display());
            };
            out.insert(rel, node);
        }
    }
    for mut group in inodes.into_values() {
        group.sort();
        for p in &group {
            if let Some(Node::File { names, .. }) = out.get_mut(p) {
                *names = group.clone();
            }
        }
    }
    Ok(out)
}

/// What of `n` a copy at `fidelity` must reproduce exactly, or `None` if it need not be there
/// at all. Allocated sizes are compared apart, within a tolerance.
fn promised(n: &Node, fidelity: Fidelity) -> Option<Node> {
    let mut n = n.clone();
    match (&mut n, fidelity) {
        (Node::File { allocated, .. }, Fidelity::Exact) => *allocated = 0,
        (_, Fidelity::Exact) => {}
        (Node::Symlink { .. } | Node::Dir { .. }, Fidelity::Contents) => return None,
        (
            Node::File {
                mode,
                mtime,
                owner,
                names,
                allocated,
                xattrs,
                ..
            },
            f,
        ) => {
            if f == Fidelity::Contents {
                *mode = 0;
                mtime.0 = 0;
            }
            mtime.1 = 0;
            (*owner, *allocated) = ((0, 0), 0);
            names.clear();
            xattrs.clear();
        }
        (
            Node::Dir {
                mtime,
                owner,
                xattrs,
                ..
            },
            _,
        ) => {
            (*mtime, *owner) = ((0, 0), (0, 0));
            xattrs.clear();
        }
        (Node::Symlink { mtime, owner, .. }, _) => (*mtime, *owner) = ((0, 0), (0, 0)),
    }
    Some(n)
}

/// Compares the tree at `copy` with the one at `src`; the first difference, named, if any.
pub fn compare(src: &Path, copy: &Path, fidelity: Fidelity) -> Result<(), String> {
    let describe = |p: &Path| describe(p).map_err(|e| format!("{}: {e:#}", p.display()));
    let (a, b) = (describe(src)?, describe(copy)?);
    for (p, n) in &a {
        let Some(want) = promised(n, fidelity) else {
            continue;
        };
        let Some(m) = b.get(p) else {
            return Err(format!("{} missing in the copy", p.display()));
        };
        let got = promised(m, fidelity);
        if got.as_ref() != Some(&want) {
            return Err(format!(
                "{} differs:\n source {want:?}\n copy   {got:?}",
                p.display()
            ));
        }
        if let (Fidelity::Exact, Node::File { allocated: s, .. }, Node::File { allocated: t, .. }) =
            (fidelity, n, m)
        {
            if t.abs_diff(*s) > ALLOCATION_SLACK {
                return Err(format!(
                    "{}: {s} bytes allocated in the source, {t} in the copy",
                    p.display()
                ));
            }
        }
    }
    if fidelity == Fidelity::Exact {
        if let Some(p) = b.keys().find(|p| !a.contains_key(*p)) {
            return Err(format!("{} exists only in the copy", p.display()));
        }
    }
    Ok(())
}

/// Panics, naming the first difference, unless `copy` holds exactly what `src` holds.
pub fn assert_same(src: &Path, copy: &Path) {
    if let Err(e) = compare(src, copy, Fidelity::Exact) {
        panic!("{} and {} differ: {e}", src.display(), copy.display());
    }
}

/// The regular files below `dir` with their sizes (no hashing: for choosing files to change).
pub fn files(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let (mut out, mut stack) = (Vec::new(), vec![dir.to_path_buf()]);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), e.metadata()?.len()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_a_changed_byte_a_missing_file_and_a_wrong_mode() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::create_dir_all(d.join("x")).unwrap();
            fs::write(d.join("x/f"), b"hello").unwrap();
        }
        assert_eq!(compare(a.path(), b.path(), Fidelity::Contents), Ok(()));
        fs::write(b.path().join("x/f"), b"hellp").unwrap();
        assert!(compare(a.path(), b.path(), Fidelity::Contents)
            .unwrap_err()
            .contains("x/f differs"));
        fs::write(a.path().join("g"), b"").unwrap();
        fs::write(b.path().join("x/f"), b"hello").unwrap();
        assert!(compare(a.path(), b.path(), Fidelity::Contents)
            .unwrap_err()
            .contains("missing"));
        fs::write(b.path().join("g"), b"").unwrap();
        fs::set_permissions(b.path().join("g"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(a.path().join("g"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(compare(a.path(), b.path(), Fidelity::Contents), Ok(()));
        assert!(compare(a.path(), b.path(), Fidelity::Full).is_err());
    }

    #[test]
    fn contents_skips_symlinks_and_empty_directories_full_does_not() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::create_dir(a.path().join("empty")).unwrap();
        std::os::unix::fs::symlink("nowhere", a.path().join("link")).unwrap();
        assert_eq!(compare(a.path(), b.path(), Fidelity::Contents), Ok(()));
        assert!(compare(a.path(), b.path(), Fidelity::Full)
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn exact_sees_what_full_forgives_and_what_only_the_copy_has() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::write(d.join("f"), b"same").unwrap();
        }
        let t = filetime::FileTime::from_unix_time(1_700_000_000, 5);
        filetime::set_file_mtime(a.path().join("f"), t).unwrap();
        let t = filetime::FileTime::from_unix_time(1_700_000_000, 6);
        filetime::set_file_mtime(b.path().join("f"), t).unwrap();
        assert_eq!(compare(a.path(), b.path(), Fidelity::Full), Ok(()));
        assert!(compare(a.path(), b.path(), Fidelity::Exact)
            .unwrap_err()
            .contains("f differs"));
        filetime::set_file_mtime(a.path().join("f"), t).unwrap();
        fs::create_dir_all(a.path().join("d")).unwrap();
        fs::create_dir_all(b.path().join("d")).unwrap();
        filetime::set_file_mtime(a.path().join("d"), t).unwrap();
        filetime::set_file_mtime(b.path().join("d"), t).unwrap();
        assert_eq!(compare(a.path(), b.path(), Fidelity::Exact), Ok(()));
        fs::write(b.path().join("extra"), b"").unwrap();
        assert_eq!(compare(a.path(), b.path(), Fidelity::Full), Ok(()));
        assert!(compare(a.path(), b.path(), Fidelity::Exact)
            .unwrap_err()
            .contains("extra exists only in the copy"));
    }
}
