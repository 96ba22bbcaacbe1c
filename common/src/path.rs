//! Relative paths that cross the wire. A target writes only below its root, so every path a peer
//! names is checked here before it touches the file system (invariant 4).

use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Longest path accepted from a peer, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// Why a peer-supplied path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// The path is absolute.
    #[error("absolute path {0:?} refused: peers may only name paths relative to the target root")]
    Absolute(String),
    /// The path has a `..` component.
    #[error("path {0:?} refused: it contains '..'")]
    ParentDir(String),
    /// The path has an empty or `.` component, a NUL or a backslash.
    #[error("path {0:?} refused: empty, '.' or NUL component")]
    Malformed(String),
    /// The path is longer than [`MAX_PATH_LEN`] or a component is longer than 255 bytes.
    #[error("path of {0} bytes refused: too long")]
    TooLong(usize),
}

/// Checks a '/'-separated relative path from a peer and returns it as a [`PathBuf`].
///
/// Refuses absolute paths, `..`, `.` and empty components (so `a//b` and `a/` are refused too):
/// a path that passes names exactly one place strictly below the root, before symlinks.
pub fn validate_relative(p: &str) -> Result<PathBuf, PathError> {
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(p.len()));
    }
    if p.starts_with('/') {
        return Err(PathError::Absolute(p.to_string()));
    }
    if p.contains('\0') || p.contains('\\') {
        return Err(PathError::Malformed(p.to_string()));
    }
    for comp in p.split('/') {
        match comp {
            "" | "." => return Err(PathError::Malformed(p.to_string())),
            ".." => return Err(PathError::ParentDir(p.to_string())),
            c if c.len() > 255 => return Err(PathError::TooLong(c.len())),
            _ => {}
        }
    }
    Ok(PathBuf::from(p))
}

/// Same checks as [`validate_relative`] but an empty string means "the root itself".
pub fn validate_subdir(p: &str) -> Result<PathBuf, PathError> {
    if p.is_empty() {
        Ok(PathBuf::new())
    } else {
        validate_relative(p)
    }
}

/// Converts a path found by the scanner (relative to the scan root) to its wire form.
/// Returns `None` for paths that are not valid UTF-8 or hold components the wire cannot express.
pub fn to_wire(rel: &Path) -> Option<String> {
    let mut out = String::new();
    for comp in rel.components() {
        match comp {
            Component::Normal(c) => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c.to_str()?);
            }
            _ => return None,
        }
    }
    validate_relative(&out).ok()?;
    Some(out)
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
        assert_eq!(validate_subdir("").unwrap(), PathBuf::new());
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
            validate_relative(&"a/".repeat(3000)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn wire_form_round_trips() {
        assert_eq!(to_wire(Path::new("a/b/c")).as_deref(), Some("a/b/c"));
        assert_eq!(to_wire(Path::new("../a")), None);
        assert_eq!(to_wire(Path::new("")), None);
    }
}
