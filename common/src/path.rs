//! Relative paths that cross the wire. A target writes only below its root, so every path a peer
//! names is checked here before it touches the file system (invariant 4).
//!
//! Names are bytes, as on Unix: a name that is not UTF-8 (a Latin-1 file from an old Samba share)
//! is as valid as any other, crosses the wire as protobuf `bytes` and is checked byte by byte.
//! Only when a name is shown to a person is it turned into text, by [`escape`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Longest path accepted from a peer, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest path component accepted, in bytes (Linux's NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// Why a peer-supplied path was refused. Paths in messages are [`escape`]d.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// The path is absolute.
    #[error(
        "absolute path \"{0}\" refused: peers may only name paths relative to the target root"
    )]
    Absolute(String),
    /// The path has a `..` component.
    #[error("path \"{0}\" refused: it contains '..'")]
    ParentDir(String),
    /// The path has an empty or `.` component, or a NUL byte.
    #[error("path \"{0}\" refused: empty, '.' or NUL component")]
    Malformed(String),
    /// The path is longer than [`MAX_PATH_LEN`] or a component is longer than [`MAX_NAME_LEN`].
    #[error("path of {0} bytes refused: too long")]
    TooLong(usize),
}

/// Checks a '/'-separated relative path from a peer (any bytes but NUL) and returns it as a
/// [`PathBuf`].
///
/// Refuses absolute paths, `..`, `.` and empty components (so `a//b` and `a/` are refused too):
/// a path that passes names exactly one place strictly below the root, before symlinks.
pub fn validate_relative(p: impl AsRef<[u8]>) -> Result<PathBuf, PathError> {
    let p = p.as_ref();
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(p.len()));
    }
    if p[0] == b'/' {
        return Err(PathError::Absolute(escape(p)));
    }
    if p.contains(&0) {
        return Err(PathError::Malformed(escape(p)));
    }
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => return Err(PathError::Malformed(escape(p))),
            b".." => return Err(PathError::ParentDir(escape(p))),
            c if c.len() > MAX_NAME_LEN => return Err(PathError::TooLong(c.len())),
            _ => {}
        }
    }
    Ok(PathBuf::from(OsStr::from_bytes(p)))
}

/// Same checks as [`validate_relative`] but an empty path means "the root itself".
pub fn validate_subdir(p: impl AsRef<[u8]>) -> Result<PathBuf, PathError> {
    if p.as_ref().is_empty() {
        Ok(PathBuf::new())
    } else {
        validate_relative(p)
    }
}

/// Converts a path found by the scanner (relative to the scan root) to its wire form, the same
/// bytes. Returns `None` for paths holding components the wire cannot express (`..`, a root, a
/// component over [`MAX_NAME_LEN`] bytes).
pub fn to_wire(rel: &Path) -> Option<PathBuf> {
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    validate_relative(rel.as_os_str().as_bytes()).ok()
}

/// The bytes of a path, as they cross the wire.
pub fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// A path's bytes as text for people (reports, logs, `-o json`): UTF-8 is shown as it is, a byte
/// that is not part of valid UTF-8 as `\xHH`, a control character as `\xHH` too, and a backslash
/// as `\\`, so that the text names exactly one byte string.
pub fn escape(p: impl AsRef<[u8]>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for chunk in p.as_ref().utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() && (c as u32) < 0x100 => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`escape`] of a path.
pub fn display(p: &Path) -> String {
    escape(bytes(p))
}

/// Whether a migration's source path or a target's registered root names an object store
/// (`s3://bucket/prefix`, `gs://…`, `az://…`) rather than a directory (always absolute).
pub fn is_store_url(path: &str) -> bool {
    path.contains("://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(
            validate_relative("a/b.txt").unwrap(),
            PathBuf::from("a/b.txt")
        );
        assert_eq!(
            validate_relative("..a/b..").unwrap(),
            PathBuf::from("..a/b..")
        );
        // A backslash is an ordinary byte in a Unix name.
        assert_eq!(
            validate_relative("dos\\name").unwrap(),
            PathBuf::from("dos\\name")
        );
        assert_eq!(validate_subdir("").unwrap(), PathBuf::new());
    }

    #[test]
    fn accepts_names_that_are_not_utf8() {
        let latin1 = b"dir/latin1-\xe9.bin";
        let p = validate_relative(latin1).unwrap();
        assert_eq!(bytes(&p), latin1);
        assert_eq!(to_wire(&p).as_deref(), Some(p.as_path()));
    }

    #[test]
    fn refuses_escapes() {
        assert_eq!(
            validate_relative("../x"),
            Err(PathError::ParentDir("../x".into()))
        );
        assert_eq!(
            validate_relative("a/../../x"),
            Err(PathError::ParentDir("a/../../x".into()))
        );
        assert_eq!(
            validate_relative("/etc/passwd"),
            Err(PathError::Absolute("/etc/passwd".into()))
        );
        assert!(matches!(
            validate_relative("a//b"),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            validate_relative("a/./b"),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            validate_relative("a/"),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            validate_relative("a\0b"),
            Err(PathError::Malformed(_))
        ));
        assert_eq!(validate_relative(""), Err(PathError::Empty));
        assert!(matches!(
            validate_relative("a/".repeat(3000)),
            Err(PathError::TooLong(_))
        ));
        assert!(matches!(
            validate_relative("x".repeat(256)),
            Err(PathError::TooLong(256))
        ));
    }

    #[test]
    fn checks_hold_on_bytes_that_are_not_utf8() {
        assert_eq!(
            validate_relative(b"\xff/../x"),
            Err(PathError::ParentDir("\\xff/../x".into()))
        );
        assert_eq!(
            validate_relative(b"/\xe9"),
            Err(PathError::Absolute("/\\xe9".into()))
        );
        assert!(matches!(
            validate_relative(b"\xe9\0"),
            Err(PathError::Malformed(_))
        ));
        let mut long = b"\xe9".repeat(256);
        assert!(matches!(
            validate_relative(&long),
            Err(PathError::TooLong(256))
        ));
        long.truncate(255);
        assert!(validate_relative(&long).is_ok());
    }

    #[test]
    fn escaping_names_exactly_one_byte_string() {
        assert_eq!(escape("café/x.txt"), "café/x.txt");
        assert_eq!(escape(b"latin1-\xe9.bin"), "latin1-\\xe9.bin");
        assert_eq!(escape("a\\xe9"), "a\\\\xe9");
        assert_eq!(escape("tab\there\n"), "tab\\x09here\\x0a");
    }

    #[test]
    fn wire_form_round_trips() {
        assert_eq!(
            to_wire(Path::new("a/b/c")).as_deref(),
            Some(Path::new("a/b/c"))
        );
        assert_eq!(to_wire(Path::new("../a")), None);
        assert_eq!(to_wire(Path::new("")), None);
        assert_eq!(to_wire(Path::new("./a")), None);
    }
}
