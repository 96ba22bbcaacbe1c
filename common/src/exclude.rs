//! A migration's excludes: glob patterns the operator names (`--exclude`), matched against each
//! path relative to the source root, as bytes (names need not be UTF-8). `*` and `?` match any
//! bytes including `/`, `**` too; `[...]` classes as in shells. A matching directory is skipped
//! with everything below it. Excluded paths are the operator's choice: counted, not failures.

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Most patterns one migration may name.
pub const MAX_PATTERNS: usize = 256;
/// Longest pattern.
pub const MAX_PATTERN_LEN: usize = 1024;

/// A pattern cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExcludeError {
    /// Too many patterns.
    #[error("{0} exclude patterns given; at most {MAX_PATTERNS} are allowed")]
    TooMany(usize),
    /// A pattern is empty, too long or not a valid glob.
    #[error("exclude pattern {pattern:?} is not usable: {reason}")]
    Bad {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
}

/// Compiled excludes.
#[derive(Debug, Clone)]
pub struct Excludes {
    set: GlobSet,
}

impl Excludes {
    /// Compiles `patterns` (none: nothing is excluded).
    pub fn new(patterns: &[String]) -> Result<Self, ExcludeError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(ExcludeError::TooMany(patterns.len()));
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let bad = |reason: String| ExcludeError::Bad {
                pattern: p.clone(),
                reason,
            };
            if p.is_empty() || p.len() > MAX_PATTERN_LEN {
                return Err(bad(format!("must be 1 to {MAX_PATTERN_LEN} bytes")));
            }
            if p.starts_with('/') {
                return Err(bad(
                    "patterns match paths relative to the source root; drop the leading '/'".into(),
                ));
            }
            let g = GlobBuilder::new(p)
                .backslash_escape(true)
                .build()
                .map_err(|e| bad(e.kind().to_string()))?;
            b.add(g);
        }
        let set = b.build().map_err(|e| ExcludeError::Bad {
            pattern: patterns.join(" "),
            reason: e.to_string(),
        })?;
        Ok(Excludes { set })
    }

    /// Whether `rel` (relative to the source root) is excluded.
    pub fn matches(&self, rel: &Path) -> bool {
        !self.set.is_empty() && self.set.is_match(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn patterns_match_relative_paths_as_bytes() {
        let e = ex(&["*.tmp", "cache", "logs/2026/**"]);
        assert!(e.matches(Path::new("a.tmp")));
        assert!(e.matches(Path::new("deep/dir/b.tmp")), "* crosses /");
        assert!(e.matches(Path::new("cache")));
        assert!(!e.matches(Path::new("data/cache.db")));
        assert!(e.matches(Path::new("logs/2026/11/x")));
        assert!(!e.matches(Path::new("logs/2025/x")));
        assert!(e.matches(Path::new(OsStr::from_bytes(b"caf\xe9.tmp"))));
        assert!(!ex(&[]).matches(Path::new("anything")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Excludes::new(&["a[".into()]).is_err());
        assert!(Excludes::new(&["".into()]).is_err());
        assert!(Excludes::new(&["/abs".into()]).is_err());
        assert!(matches!(
            Excludes::new(&vec!["x".to_string(); MAX_PATTERNS + 1]),
            Err(ExcludeError::TooMany(_))
        ));
    }
}
