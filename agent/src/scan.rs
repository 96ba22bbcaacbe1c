//! Walks a source tree as a stream: one directory listing in memory per level of depth, never the
//! whole tree. Children are visited in name order so that a rescan plans the same segments; a
//! tree compared with an object store's listing is walked in the store's order instead
//! ([`Order::Key`]). Names are looked at through their directory's handle (one held per level
//! of depth), not by their whole path.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::segment::Entry;
use ferry_common::exclude::Excludes;
use ferry_common::path::{display, to_wire};

/// What the walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walked {
    /// Something to copy.
    Entry(Entry),
    /// A path the migration's excludes name: not copied, and nothing below it visited.
    Excluded,
    /// Something that cannot be copied, and why. It is reported, never skipped silently.
    Issue {
        /// Path relative to the root, escaped for display ([`ferry_common::path::escape`]).
        path: String,
        /// The same path as it is (a sync round leaves what the target has there alone).
        at: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The source root cannot be scanned at all.
#[derive(Debug, thiserror::Error)]
#[error("source path {path} cannot be scanned: {reason}")]
pub struct RootError {
    /// The root.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The order a walk visits names in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// [`Path`]'s order: component by component, a directory right before its contents (what
    /// catalogs, rounds and the hash cache use).
    #[default]
    Name,
    /// An object store's listing order: the relative path's bytes, with `/` between
    /// components, compared as one string. `a.b` comes before `a/x` here (`.` < `/`), after it
    /// in [`Order::Name`]. Directories are still visited before their contents.
    Key,
}

impl Order {
    /// How `a` and `b` (paths relative to the root) compare in this order.
    pub fn cmp(self, a: &Path, b: &Path) -> std::cmp::Ordering {
        match self {
            Order::Name => a.cmp(b),
            Order::Key => a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()),
        }
    }
}

/// The names in the open directory `dir` (without `.` and `..`), sorted in `order`.
fn sorted_children(dir: &OwnedFd, order: Order) -> io::Result<Vec<OsString>> {
    // A duplicate of the handle, not `Dir::read_from`, which reopens "." through it and so
    // needs search permission on the directory, which listing it does not (an agent that is
    // not root lists a directory it may read but not search, and reports its names).
    let mut listing = rustix::fs::Dir::new(rustix::io::fcntl_dupfd_cloexec(dir, 0)?)?;
    let mut named = Vec::new();
    while let Some(e) = listing.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        // Only the store's order sorts by a key of its own; names sort by themselves.
        let mut sort_key = Vec::new();
        if order == Order::Key {
            sort_key.extend_from_slice(name);
            // Every key below a directory `d` starts `d/`: sorting siblings by their name with
            // a `/` after each directory's gives the order of the whole keys.
            let is_dir = match e.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    match rustix::fs::statat(dir, e.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => FileType::from_raw_mode(st.st_mode) == FileType::Directory,
                        Err(Errno::NOENT) => false,
                        Err(err) => return Err(err.into()),
                    }
                }
                _ => false,
            };
            if is_dir {
                sort_key.push(b'/');
            }
        }
        named.push((sort_key, OsString::from_vec(name.to_vec())));
    }
    match order {
        // Path order of siblings is the order of their names' bytes.
        Order::Name => named.sort_by(|a, b| a.1.cmp(&b.1)),
        Order::Key => named.sort(),
    }
    Ok(named.into_iter().map(|(_, n)| n).collect())
}

/// What the walk needs of a name's `stat`.
struct Meta {
    kind: FileType,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
    dev: u64,
    ino: u64,
    nlink: u64,
}

impl Meta {
    /// What `name` in the directory `dir` is (a symlink is described, not followed): one
    /// `fstatat` relative to the directory's handle, not a walk of the whole path.
    // The fields' integer types differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    fn at(dir: &OwnedFd, name: &OsStr) -> Result<Meta, Errno> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(Meta {
            kind: FileType::from_raw_mode(st.st_mode),
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
        })
    }
}

/// The longest path, with its terminating NUL, a path-based call accepts.
const PATH_MAX: usize = 4096;

/// Flags of the directory handles the walk holds, one per level of depth. A directory renamed
/// while the walk is inside it is walked to its end under the name it was listed by (its
/// handle follows it); the next round sees it where it went.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Walks `root`, calling `f` for each item in depth-first name order (a directory before its
/// contents). Stops early if `f` returns an error.
///
/// A regular file with several names inside the tree (hardlinks: the same device and inode) is
/// reported once as a file, under the first name the walk meets, and then as a
/// [`EntryKind::Hardlink`](crate::segment::EntryKind::Hardlink) to that name for every
/// further one, so its bytes travel once. Only files with a link count above one are
/// remembered, so memory grows with the hardlinks in the tree, not with its size.
pub fn walk<E>(
    root: &Path,
    excludes: &Excludes,
    f: impl FnMut(Walked) -> Result<(), E>,
) -> Result<Result<(), E>, RootError> {
    walk_in(Order::Name, root, excludes, f)
}

/// [`walk`], visiting names in `order`.
pub fn walk_in<E>(
    order: Order,
    root: &Path,
    excludes: &Excludes,
    mut f: impl FnMut(Walked) -> Result<(), E>,
) -> Result<Result<(), E>, RootError> {
    let root_err = |reason: String| RootError {
        path: root.to_path_buf(),
        reason,
    };
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(root_err("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(root_err("it does not exist".into()))
        }
        Err(e) => return Err(root_err(e.to_string())),
    }
    // The root itself may be reached through a symlink (`/data` → `/mnt/data`): only the
    // names below it are not followed.
    let root_fd = rustix::fs::open(root, DIR.difference(OFlags::NOFOLLOW), Mode::empty())
        .map_err(|e| root_err(io::Error::from(e).to_string()))?;
    let top = sorted_children(&root_fd, order).map_err(|e| root_err(e.to_string()))?;
    // Each level's directory handle: every name is looked at relative to its directory's
    // handle (`fstatat`, `openat`), not by a walk of its whole path from `/`, which cost a
    // tree of millions of small files most of its scan.
    let mut stack: Vec<(PathBuf, OwnedFd, std::vec::IntoIter<OsString>)> =
        vec![(PathBuf::new(), root_fd, top.into_iter())];
    // (device, inode) of files with several names → the first name met.
    let mut first_names: HashMap<(u64, u64), PathBuf> = HashMap::new();
    while let Some((dir, dir_fd, names)) = stack.last_mut() {
        let Some(name) = names.next() else {
            stack.pop();
            continue;
        };
        let rel = dir.join(&name);
        // Taken before the excludes are asked: a rule for directories only (`build/` in an
        // exclude file) must know what `rel` is, and the entry below is made from it.
        // Looked at by its handle a name has no length limit, but every later call on it (the
        // send) goes by its whole path: one of PATH_MAX or more is the issue it was when the
        // scan went by path too.
        let meta = if root.as_os_str().len() + 1 + rel.as_os_str().len() >= PATH_MAX {
            Err(Errno::NAMETOOLONG)
        } else {
            Meta::at(dir_fd, &name)
        };
        let is_dir =
            excludes.needs_kind() && meta.as_ref().is_ok_and(|m| m.kind == FileType::Directory);
        if excludes.matches_kind(&rel, is_dir) {
            if let Err(e) = f(Walked::Excluded) {
                return Ok(Err(e));
            }
            continue;
        }
        let shown = display(&rel);
        let issue = |reason: String| Walked::Issue {
            path: shown.clone(),
            at: rel.clone(),
            reason,
        };
        let Some(wire) = to_wire(&rel) else {
            if let Err(e) = f(issue(
                "name cannot be represented (a component longer than 255 bytes)".into(),
            )) {
                return Ok(Err(e));
            }
            continue;
        };
        let item = match meta {
            // Removed between the listing of its directory and now: a live tree changes while
            // it is scanned, and a name that is gone is not there to copy.
            Err(Errno::NOENT) => continue,
            Err(e) => issue(format!("cannot stat: {}", io::Error::from(e))),
            Ok(m) => match m.kind {
                FileType::Directory => {
                    let listed = rustix::fs::openat(&*dir_fd, &name, DIR, Mode::empty())
                        .map_err(io::Error::from)
                        .and_then(|fd| Ok((sorted_children(&fd, order)?, fd)));
                    match listed {
                        Ok((children, fd)) => {
                            stack.push((rel.clone(), fd, children.into_iter()));
                            Walked::Entry(
                                Entry::dir(&wire, m.mode, m.mtime)
                                    .owned_by(m.uid, m.gid)
                                    .changed_at(m.ctime),
                            )
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => issue(format!("cannot read directory: {e}")),
                    }
                }
                FileType::RegularFile => {
                    let key = (m.dev, m.ino);
                    // Opened (and closed) to find an unreadable file now, not when it is sent;
                    // non-blocking, in case a FIFO took its place since the stat.
                    let flags =
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
                    let opened = match rustix::fs::openat(
                        &*dir_fd,
                        &name,
                        flags | OFlags::NONBLOCK,
                        Mode::empty(),
                    ) {
                        // Another holds a write lease on it (Samba oplocks, NFS delegations):
                        // a non-blocking open is refused; wait for the lease to be broken,
                        // as a plain open does.
                        Err(Errno::AGAIN) => {
                            rustix::fs::openat(&*dir_fd, &name, flags, Mode::empty())
                        }
                        r => r,
                    };
                    match opened {
                        Err(Errno::NOENT) => continue,
                        Err(e) => issue(format!("cannot read: {}", io::Error::from(e))),
                        Ok(_) if m.nlink > 1 && first_names.contains_key(&key) => Walked::Entry(
                            Entry::hardlink(&wire, &first_names[&key], m.size, m.mtime)
                                .changed_at(m.ctime),
                        ),
                        Ok(_) => {
                            if m.nlink > 1 {
                                first_names.insert(key, wire.clone());
                            }
                            Walked::Entry(
                                Entry::file(&wire, m.size, m.mode, m.mtime, m.ino)
                                    .owned_by(m.uid, m.gid)
                                    .changed_at(m.ctime),
                            )
                        }
                    }
                }
                FileType::Symlink => match rustix::fs::readlinkat(&*dir_fd, &name, Vec::new()) {
                    Ok(t) if !t.as_bytes().is_empty() => Walked::Entry(
                        Entry::symlink(
                            &wire,
                            PathBuf::from(OsString::from_vec(t.into_bytes())),
                            m.mtime,
                        )
                        .owned_by(m.uid, m.gid)
                        .changed_at(m.ctime),
                    ),
                    Ok(_) => issue("symlink has an empty target".into()),
                    Err(e) => issue(format!("cannot read symlink: {}", io::Error::from(e))),
                },
                other => {
                    let kind = match other {
                        FileType::Socket => "socket",
                        FileType::Fifo => "named pipe",
                        FileType::BlockDevice => "block device",
                        FileType::CharacterDevice => "character device",
                        _ => "unknown file type",
                    };
                    issue(format!("unsupported file type: {kind}"))
                }
            },
        };
        if let Err(e) = f(item) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::EntryKind;

    fn none() -> Excludes {
        Excludes::new(&[]).unwrap()
    }

    #[test]
    fn a_walk_in_key_order_visits_names_as_a_store_lists_their_keys() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("model/x")).unwrap();
        fs::write(r.join("model/x/w"), b"1").unwrap();
        fs::write(r.join("model.bin"), b"2").unwrap();
        fs::write(r.join("model-a"), b"3").unwrap();
        fs::write(r.join("modelz"), b"4").unwrap();
        fs::write(r.join("model/a b"), b"5").unwrap();
        let paths = |order| {
            let mut seen = Vec::new();
            walk_in::<()>(order, r, &none(), |w| {
                if let Walked::Entry(e) = w {
                    if e.kind != EntryKind::Dir {
                        seen.push(display(&e.path));
                    }
                }
                Ok(())
            })
            .unwrap()
            .unwrap();
            seen
        };
        let by_key = paths(Order::Key);
        let mut keys = by_key.clone();
        keys.sort();
        assert_eq!(by_key, keys, "the files' keys come in byte order");
        assert_eq!(
            by_key,
            ["model-a", "model.bin", "model/a b", "model/x/w", "modelz"]
        );
        assert_eq!(
            paths(Order::Name),
            ["model/a b", "model/x/w", "model-a", "model.bin", "modelz"]
        );
    }

    /// A name whose whole path (root included) is PATH_MAX or longer is an issue at scan time,
    /// as when the scan went by path: looked at through its directory's handle it could be
    /// planned, and every send of its segment would then fail on the path.
    #[test]
    fn a_path_too_long_for_the_system_is_an_issue_not_an_entry() {
        let d = tempfile::tempdir().unwrap();
        let name = "d".repeat(250);
        let mut root = d.path().to_path_buf();
        for _ in 0..4 {
            root.push(&name);
        }
        std::fs::create_dir_all(&root).unwrap();
        // Levels below the root until root/rel reaches PATH_MAX (made through handles: the
        // deepest cannot be named by path).
        let levels = (PATH_MAX - root.as_os_str().len()).div_ceil(name.len() + 1);
        let mut fd = rustix::fs::open(&root, DIR, Mode::empty()).unwrap();
        for _ in 0..levels {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, name.as_str(), DIR, Mode::empty()).unwrap();
        }
        let (mut entries, mut issues) = (Vec::new(), Vec::new());
        walk(&root, &none(), |w| {
            match w {
                Walked::Entry(e) => entries.push(e.path),
                Walked::Issue { at, reason, .. } => issues.push((at, reason)),
                Walked::Excluded => {}
            }
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(entries.len(), levels - 1, "every level but the last");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].0.components().count(), levels);
        assert!(issues[0].1.contains("too long"), "{issues:?}");
    }

    /// A source root reached through a symlink is walked (the operator named it); a symlink
    /// below it is an entry, never followed.
    #[test]
    fn a_root_reached_through_a_symlink_is_walked() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir_all(real.join("sub")).unwrap();
        std::fs::write(real.join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        std::os::unix::fs::symlink("sub", real.join("alias")).unwrap();
        let mut seen = Vec::new();
        walk(&d.path().join("link"), &none(), |w| {
            if let Walked::Entry(e) = w {
                seen.push((e.path, e.kind));
            }
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (PathBuf::from("alias"), EntryKind::Symlink),
                (PathBuf::from("sub"), EntryKind::Dir),
                (PathBuf::from("sub/f"), EntryKind::File),
            ]
        );
    }

    #[test]
    fn walks_in_name_order_and_reports_what_it_cannot_copy() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("b/inner")).unwrap();
        fs::create_dir(r.join("a-empty")).unwrap();
        fs::write(r.join("b/inner/x"), b"12345").unwrap();
        fs::write(r.join("c"), b"").unwrap();
        std::os::unix::fs::symlink("c", r.join("d-link")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(r.join("e.sock")).unwrap();
        let mut seen = Vec::new();
        walk::<()>(r, &none(), |w| {
            seen.push(w);
            Ok(())
        })
        .unwrap()
        .unwrap();
        let paths: Vec<String> = seen
            .iter()
            .map(|w| match w {
                Walked::Entry(e) => display(&e.path),
                Walked::Issue { path, .. } => format!("!{path}"),
                Walked::Excluded => panic!("nothing is excluded"),
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                "a-empty",
                "b",
                "b/inner",
                "b/inner/x",
                "c",
                "d-link",
                "!e.sock"
            ]
        );
        let Walked::Issue { reason, .. } = &seen[6] else {
            panic!()
        };
        assert!(reason.contains("socket"), "{reason}");
        let Walked::Entry(x) = &seen[3] else { panic!() };
        assert_eq!(x.file_size, 5);
    }

    fn collect(root: &Path) -> Vec<Walked> {
        let mut seen = Vec::new();
        walk::<()>(root, &none(), |w| {
            seen.push(w);
            Ok(())
        })
        .unwrap()
        .unwrap();
        seen
    }

    #[test]
    fn names_that_are_not_utf8_are_entries_with_their_own_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"latin1-\xe9.bin");
        fs::create_dir(d.path().join(name)).unwrap();
        fs::write(d.path().join(name).join(name), b"x").unwrap();
        std::os::unix::fs::symlink(name, d.path().join("link")).unwrap();
        let seen = collect(d.path());
        let entries: Vec<&Entry> = seen
            .iter()
            .map(|w| match w {
                Walked::Entry(e) => e,
                Walked::Issue { path, reason, .. } => panic!("{path}: {reason}"),
                Walked::Excluded => panic!("nothing is excluded"),
            })
            .collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].path.as_os_str().as_bytes(), b"latin1-\xe9.bin");
        assert_eq!(
            entries[1].path.as_os_str().as_bytes(),
            b"latin1-\xe9.bin/latin1-\xe9.bin"
        );
        assert_eq!(
            entries[2].link_target.as_os_str().as_bytes(),
            b"latin1-\xe9.bin"
        );
    }

    #[test]
    fn hardlinks_are_one_file_and_links_to_its_first_name() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::write(r.join("a"), b"shared").unwrap();
        fs::hard_link(r.join("a"), r.join("b")).unwrap();
        fs::create_dir(r.join("c")).unwrap();
        fs::hard_link(r.join("a"), r.join("c/d")).unwrap();
        fs::write(r.join("e"), b"alone").unwrap();
        let seen = collect(r);
        let kinds: Vec<(String, EntryKind, String)> = seen
            .iter()
            .map(|w| match w {
                Walked::Entry(e) => (display(&e.path), e.kind, display(&e.link_target)),
                Walked::Issue { path, reason, .. } => panic!("{path}: {reason}"),
                Walked::Excluded => panic!("nothing is excluded"),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("a".into(), EntryKind::File, "".into()),
                ("b".into(), EntryKind::Hardlink, "a".into()),
                ("c".into(), EntryKind::Dir, "".into()),
                ("c/d".into(), EntryKind::Hardlink, "a".into()),
                ("e".into(), EntryKind::File, "".into()),
            ]
        );
        let Walked::Entry(link) = &seen[1] else {
            panic!()
        };
        assert_eq!(
            (link.len, link.file_size),
            (0, 6),
            "a link carries no bytes"
        );
    }

    #[test]
    fn excluded_paths_are_skipped_whole_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("keep/cache/deep")).unwrap();
        fs::write(r.join("keep/cache/deep/x"), b"x").unwrap();
        fs::write(r.join("keep/a.tmp"), b"x").unwrap();
        fs::write(r.join("keep/b"), b"x").unwrap();
        let ex = Excludes::new(&["*.tmp".into(), "keep/cache".into()]).unwrap();
        let mut seen = Vec::new();
        walk::<()>(r, &ex, |w| {
            seen.push(match w {
                Walked::Entry(e) => display(&e.path),
                Walked::Excluded => "-".into(),
                Walked::Issue { path, .. } => panic!("{path}"),
            });
            Ok(())
        })
        .unwrap()
        .unwrap();
        // keep/a.tmp and keep/cache (with all below it) are excluded.
        assert_eq!(seen, vec!["keep", "-", "keep/b", "-"]);
    }

    #[test]
    fn missing_root_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let err = walk::<()>(&d.path().join("nope"), &none(), |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
