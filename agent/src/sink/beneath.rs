//! File system calls on paths below the target root that follow no symlink anywhere in the path.
//!
//! Checking a path and then using it by name leaves a window: between the two, a directory on
//! the way can be swapped for a symlink that leads out of the root — by a local process, or by
//! a hostile peer's own concurrent segment that deletes the directory and puts a symlink in its
//! place. So no call the sink makes on a peer's path goes through the whole path by name: each
//! opens the path's parent directory with `openat2(RESOLVE_NO_SYMLINKS)`, which the kernel
//! refuses if any component is a symlink, and acts on the last name relative to that handle
//! (`openat` with `O_NOFOLLOW`, `renameat`, `linkat`, `unlinkat`, `mkdirat`, `symlinkat`, and
//! `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`). The root is canonical (no symlink in
//! it), so a symlink refused is always one below it. On kernels without `openat2` (before
//! Linux 5.6) the parent is opened one directory at a time with `O_NOFOLLOW|O_DIRECTORY`.
//!
//! Every function takes an absolute path and mirrors the `std::fs` call of the same name.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps, CWD};
use rustix::io::Errno;

/// Flags every directory handle is opened with.
const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

/// Opens the directory at `path`, refusing a symlink anywhere in it (the last component too).
pub(super) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    match rustix::fs::openat2(CWD, path, DIR, Mode::empty(), ResolveFlags::NO_SYMLINKS) {
        Err(Errno::NOSYS) => walk(path),
        r => r.map_err(|e| refused(e, path)),
    }
}

/// [`open_dir`] without `openat2`: one directory at a time, none of them a symlink.
fn walk(path: &Path) -> io::Result<OwnedFd> {
    let mut fd = rustix::fs::openat(CWD, "/", DIR, Mode::empty())?;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => {
                fd = rustix::fs::openat(&fd, name, DIR | OFlags::NOFOLLOW, Mode::empty())
                    .map_err(|e| refused(e, path))?;
            }
            _ => {
                return Err(io::Error::other(format!(
                    "{} is not canonical",
                    path.display()
                )))
            }
        }
    }
    Ok(fd)
}

/// Says plainly why a path with a symlink (or a file) on the way was refused.
fn refused(e: Errno, path: &Path) -> io::Error {
    match e {
        Errno::LOOP | Errno::NOTDIR => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a component of {} is a symlink or not a directory: ferry follows no symlink \
                 below the target root",
                path.display()
            ),
        ),
        e => e.into(),
    }
}

/// The handle of `path`'s parent directory and `path`'s last name.
fn at(path: &Path) -> io::Result<(OwnedFd, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if path.is_absolute() => Ok((open_dir(parent)?, name)),
        _ => Err(io::Error::other(format!(
            "{} is not an absolute path to a name",
            path.display()
        ))),
    }
}

/// Opens the file at `path` with `flags` (`O_NOFOLLOW` and `O_CLOEXEC` are added).
pub(super) fn open(path: &Path, flags: OFlags, mode: u32) -> io::Result<File> {
    let (dir, name) = at(path)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::openat(
        &dir,
        name,
        flags,
        Mode::from_raw_mode(mode),
    )?))
}

/// What is at `path` itself (a symlink is described, not followed).
pub(super) fn symlink_metadata(path: &Path) -> io::Result<Metadata> {
    open(path, OFlags::PATH, 0)?.metadata()
}

/// Creates the directory `path` (its parent must exist).
pub(super) fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    let (dir, name) = at(path)?;
    Ok(rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode))?)
}

/// Removes the non-directory at `path` (a symlink itself, never what it points to).
pub(super) fn remove_file(path: &Path) -> io::Result<()> {
    let (dir, name) = at(path)?;
    Ok(rustix::fs::unlinkat(&dir, name, AtFlags::empty())?)
}

/// Removes the directory at `path` and everything in it, following no symlink in it.
pub(super) fn remove_dir_all(path: &Path) -> io::Result<()> {
    let (dir, name) = at(path)?;
    remove_tree(&dir, name)
}

fn remove_tree(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let fd = rustix::fs::openat(parent, name, DIR | OFlags::NOFOLLOW, Mode::empty())?;
    for (child, kind) in entries(&fd)? {
        let kind = match kind {
            FileType::Unknown => FileType::from_raw_mode(
                rustix::fs::statat(&fd, &child, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
            ),
            kind => kind,
        };
        match kind {
            FileType::Directory => remove_tree(&fd, &child)?,
            _ => rustix::fs::unlinkat(&fd, &child, AtFlags::empty())?,
        }
    }
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

/// The names in the open directory `fd` (without `.` and `..`) and their types as listed.
fn entries(fd: &OwnedFd) -> io::Result<Vec<(OsString, FileType)>> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    let mut out = Vec::new();
    while let Some(e) = dir.read() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push((OsString::from_vec(name.to_vec()), e.file_type()));
        }
    }
    Ok(out)
}

/// The names in the directory at `path` (without `.` and `..`).
pub(super) fn read_dir(path: &Path) -> io::Result<Vec<OsString>> {
    let fd = open_dir(path)?;
    Ok(entries(&fd)?.into_iter().map(|(n, _)| n).collect())
}

/// Renames `from` to `to`, replacing what is at `to` (as rename(2) does).
pub(super) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    let (fdir, fname) = at(from)?;
    let (tdir, tname) = at(to)?;
    Ok(rustix::fs::renameat(&fdir, fname, &tdir, tname)?)
}

/// Makes `link` a new name of the file at `original` (never following a symlink at it).
pub(super) fn hard_link(original: &Path, link: &Path) -> io::Result<()> {
    let (odir, oname) = at(original)?;
    let (ldir, lname) = at(link)?;
    Ok(rustix::fs::linkat(
        &odir,
        oname,
        &ldir,
        lname,
        AtFlags::empty(),
    )?)
}

/// Creates a symlink at `link` that points to `target`.
pub(super) fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    let (dir, name) = at(link)?;
    Ok(rustix::fs::symlinkat(target, &dir, name)?)
}

/// Sets the owner of `path` itself (a symlink's own owner, not its target's).
pub(super) fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let (dir, name) = at(path)?;
    Ok(rustix::fs::chownat(
        &dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets the access and modification times of `path` itself to `t`.
pub(super) fn set_symlink_file_times(path: &Path, t: FileTime) -> io::Result<()> {
    let (dir, name) = at(path)?;
    let ts = rustix::fs::Timespec {
        tv_sec: t.unix_seconds(),
        tv_nsec: t.nanoseconds().into(),
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    Ok(rustix::fs::utimensat(
        &dir,
        name,
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Sets extended attributes on `path` itself (a symlink, which cannot be opened for them).
/// There is no `lsetxattr` relative to a directory handle, so the name is reached through the
/// handle's entry in `/proc/self/fd`, which the kernel resolves to the directory it holds.
pub(super) fn set_xattrs_nofollow(path: &Path, attrs: &crate::xattr::Xattrs) -> io::Result<()> {
    if attrs.is_empty() {
        return Ok(());
    }
    let (dir, name) = at(path)?;
    let anchored = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    crate::xattr::apply_nofollow(&anchored, attrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_openat2_the_walk_refuses_a_symlink_on_the_way_too() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();
        for path in [root.join("a/b"), root.join("a")] {
            let (walked, direct) = (walk(&path).unwrap(), open_dir(&path).unwrap());
            let (w, o) = (
                File::from(walked).metadata().unwrap(),
                File::from(direct).metadata().unwrap(),
            );
            use std::os::unix::fs::MetadataExt;
            assert_eq!((w.dev(), w.ino()), (o.dev(), o.ino()));
        }
        for path in [root.join("link/b"), root.join("link")] {
            for e in [walk(&path).unwrap_err(), open_dir(&path).unwrap_err()] {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
                assert!(e.to_string().contains("is a symlink"), "{e}");
            }
        }
        std::fs::write(root.join("a/file"), b"x").unwrap();
        assert!(walk(&root.join("a/file/x")).is_err());
    }
}
