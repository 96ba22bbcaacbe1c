//! Checks that a tool's copy equals the source, independently of the tool: every regular file's
//! bytes (BLAKE3), and for tools that promise them, modes, modification times and symlinks.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How much of the tree a tool is expected to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fidelity {
    /// File contents only (symlinks may be followed or skipped; modes and times not kept).
    Contents,
    /// Contents, modes, mtimes (seconds), symlinks as symlinks, empty directories.
    Full,
}

/// Lists the regular files under `dir` with their sizes.
pub fn walk_files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk_files(&e.path(), out)?;
        } else if ft.is_file() {
            out.push((e.path(), e.metadata()?.len()));
        }
    }
    Ok(())
}

fn hash_file(p: &Path) -> std::io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p)?)?;
    Ok(h.finalize())
}

/// Compares `copy` with `src`; the first difference found, if any.
pub fn compare(src: &Path, copy: &Path, fidelity: Fidelity) -> Result<(), String> {
    compare_dir(src, copy, Path::new(""), fidelity)
}

fn compare_dir(src: &Path, copy: &Path, rel: &Path, fidelity: Fidelity) -> Result<(), String> {
    let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut names: Vec<_> = fs::read_dir(src)
        .map_err(|e| io(src, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| io(src, e))?;
    names.sort();
    for name in names {
        let (s, c, r) = (src.join(&name), copy.join(&name), rel.join(&name));
        let sm = fs::symlink_metadata(&s).map_err(|e| io(&s, e))?;
        if sm.file_type().is_symlink() {
            if fidelity == Fidelity::Full {
                let want = fs::read_link(&s).map_err(|e| io(&s, e))?;
                let got = fs::read_link(&c)
                    .map_err(|e| format!("{}: not a symlink in the copy: {e}", r.display()))?;
                if want != got {
                    return Err(format!("{}: symlink target differs", r.display()));
                }
            }
            continue;
        }
        let cm = match fs::metadata(&c) {
            Ok(m) => m,
            Err(_) if sm.is_dir() && fidelity == Fidelity::Contents => {
                // A tool may skip directories without files; any file below is still checked.
                let mut files = Vec::new();
                walk_files(&s, &mut files).map_err(|e| io(&s, e))?;
                if files.is_empty() {
                    continue;
                }
                return Err(format!("{}: missing in the copy", r.display()));
            }
            Err(e) => return Err(format!("{}: missing in the copy: {e}", r.display())),
        };
        if fidelity == Fidelity::Full {
            if sm.permissions().mode() & 0o7777 != cm.permissions().mode() & 0o7777 {
                return Err(format!("{}: mode differs", r.display()));
            }
            if sm.is_file() && sm.mtime() != cm.mtime() {
                return Err(format!("{}: mtime differs", r.display()));
            }
        }
        if sm.is_dir() {
            if !cm.is_dir() {
                return Err(format!("{}: not a directory in the copy", r.display()));
            }
            compare_dir(&s, &c, &r, fidelity)?;
        } else if sm.is_file() {
            if !cm.is_file() || cm.len() != sm.len() {
                return Err(format!(
                    "{}: size {} in the copy, {} in the source",
                    r.display(),
                    cm.len(),
                    sm.len()
                ));
            }
            if hash_file(&s).map_err(|e| io(&s, e))? != hash_file(&c).map_err(|e| io(&c, e))? {
                return Err(format!("{}: contents differ", r.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .contains("contents differ"));
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
}
