//! Extended attributes (when a migration asks for them): read at the source without following
//! symlinks, applied at the target through the handle or the not-followed path of what is
//! written.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{fsetxattr, lgetxattr, llistxattr, lsetxattr, XattrFlags};
use rustix::io::Errno;

/// Largest value Linux stores (XATTR_SIZE_MAX), and so the read buffer.
const MAX_VALUE: usize = 64 * 1024;
/// Most bytes (names and values) of one entry's attributes: keeps a segment header bounded.
pub const MAX_PER_ENTRY: usize = 256 * 1024;
/// Most bytes of attributes in one segment's header (whose frame limit is 4 MiB, of which
/// paths may take 2 MiB).
pub const MAX_PER_SEGMENT: usize = 1024 * 1024;

/// An entry's attributes: `(name, value)` pairs, in name order.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Reads the extended attributes of `path` itself (never of what a symlink points to).
/// A file system without them gives none.
pub fn read(path: &Path) -> io::Result<Xattrs> {
    // Most files have no attributes or a few short ones: start small, grow on ERANGE.
    let mut names = vec![0u8; 1024];
    let n = loop {
        match llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(e) if e == Errno::NOTSUP => return Ok(Vec::new()),
            Err(e) if e == Errno::RANGE && names.len() < MAX_VALUE => names.resize(MAX_VALUE, 0),
            Err(e) if e == Errno::RANGE => {
                return Err(io::Error::other(format!(
                    "{}: the list of extended attribute names is over {MAX_VALUE} bytes",
                    path.display()
                )))
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let mut value = vec![0u8; MAX_VALUE];
    let mut total = 0;
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let len = match lgetxattr(path, OsStr::from_bytes(name), &mut value[..]) {
            Ok(len) => len,
            // Removed between the list and the read.
            Err(e) if e == Errno::NODATA => continue,
            Err(e) => return Err(e.into()),
        };
        total += name.len() + len;
        if total > MAX_PER_ENTRY {
            return Err(io::Error::other(format!(
                "{}: extended attributes over {MAX_PER_ENTRY} bytes are not carried",
                path.display()
            )));
        }
        out.push((name.to_vec(), value[..len].to_vec()));
    }
    out.sort();
    Ok(out)
}

/// Sets `attrs` on an open file or directory.
pub fn apply_to(file: &File, attrs: &Xattrs) -> io::Result<()> {
    for (name, value) in attrs {
        fsetxattr(file, OsStr::from_bytes(name), value, XattrFlags::empty())
            .map_err(|e| named(name, e))?;
    }
    Ok(())
}

/// Sets `attrs` on `path` itself (a symlink is not followed).
pub fn apply_nofollow(path: &Path, attrs: &Xattrs) -> io::Result<()> {
    for (name, value) in attrs {
        lsetxattr(path, OsStr::from_bytes(name), value, XattrFlags::empty())
            .map_err(|e| named(name, e))?;
    }
    Ok(())
}

fn named(name: &[u8], e: Errno) -> io::Error {
    io::Error::new(
        io::Error::from(e).kind(),
        format!(
            "extended attribute {}: {}",
            ferry_common::path::escape(name),
            io::Error::from(e)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_through_a_handle_and_a_path() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let attrs: Xattrs = vec![
            (b"user.ferry.one".to_vec(), b"1".to_vec()),
            (b"user.ferry.two".to_vec(), vec![0, 255, 7]),
        ];
        if let Err(e) = apply_nofollow(&a, &attrs) {
            // Some file systems (tmpfs before Linux 6.6) keep no user attributes.
            crate::skip(&format!(
                "this file system keeps no user extended attributes: {e}"
            ));
            return;
        }
        assert_eq!(read(&a).unwrap(), attrs);
        let b = d.path().join("b");
        let f = File::create(&b).unwrap();
        apply_to(&f, &attrs).unwrap();
        assert_eq!(read(&b).unwrap(), attrs);
        // A symlink's own attributes are read, not its target's.
        std::os::unix::fs::symlink(&a, d.path().join("l")).unwrap();
        assert!(read(&d.path().join("l")).unwrap().is_empty());
    }
}
