//! A migration's excludes, matched against each path relative to the source root, as bytes
//! (names need not be UTF-8). Two kinds of entry in one list (the spec's `excludes`):
//!
//! - a glob the operator names (`--exclude`): `*` and `?` match any bytes including `/`, `**`
//!   too; `[...]` classes as in shells;
//! - a line of a gitignore-style file (`--exclude-from`), kept as `rule:<line>`: gitignore's
//!   rules (matched by the `ignore` crate) — `*` stops at `/`, a pattern without a `/` matches at
//!   any depth, a trailing `/` only directories, a leading `!` takes a name back that an earlier
//!   rule of the file excluded, the last matching rule wins.
//!
//! A path is excluded when a glob matches it or the rules exclude it. A matching directory is
//! skipped with everything below it. Excluded paths are the operator's choice: counted, not
//! failures.

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Most entries one migration may name.
pub const MAX_PATTERNS: usize = 1024;
/// Longest entry.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Most bytes of all entries together (the spec travels in every heartbeat of its source).
pub const MAX_TOTAL_LEN: usize = 64 << 10;
/// The prefix that marks an entry as a gitignore rule.
pub const RULE: &str = "rule:";

/// A pattern cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExcludeError {
    /// Too many patterns.
    #[error("{0} exclude patterns given; at most {MAX_PATTERNS} are allowed")]
    TooMany(usize),
    /// The patterns are too long together.
    #[error("the exclude patterns take {0} bytes together; at most {MAX_TOTAL_LEN} are allowed")]
    TooLong(usize),
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
    /// The gitignore rules, if any.
    rules: Option<Gitignore>,
}

/// The entries for the lines of a gitignore-style file `text`: blank lines and comments left
/// out, each rule marked [`RULE`].
pub fn rules_from(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| format!("{RULE}{l}"))
        .collect()
}

impl Excludes {
    /// Compiles `patterns` (none: nothing is excluded).
    pub fn new(patterns: &[String]) -> Result<Self, ExcludeError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(ExcludeError::TooMany(patterns.len()));
        }
        let total: usize = patterns.iter().map(String::len).sum();
        if total > MAX_TOTAL_LEN {
            return Err(ExcludeError::TooLong(total));
        }
        let mut b = GlobSetBuilder::new();
        let mut rules: Option<GitignoreBuilder> = None;
        for p in patterns {
            let bad = |reason: String| ExcludeError::Bad {
                pattern: p.clone(),
                reason,
            };
            if p.is_empty() || p.len() > MAX_PATTERN_LEN {
                return Err(bad(format!("must be 1 to {MAX_PATTERN_LEN} bytes")));
            }
            if let Some(line) = p.strip_prefix(RULE) {
                rules
                    .get_or_insert_with(|| GitignoreBuilder::new(""))
                    .add_line(None, line)
                    .map_err(|e| bad(e.to_string()))?;
                continue;
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
        let rules = match rules {
            None => None,
            Some(r) => Some(r.build().map_err(|e| ExcludeError::Bad {
                pattern: "the exclude file's rules".into(),
                reason: e.to_string(),
            })?),
        };
        Ok(Excludes { set, rules })
    }

    /// Whether a rule can tell a directory from other names (a rule ending in `/`): then the
    /// walk must know what `rel` is before asking [`Excludes::matches_kind`].
    pub fn needs_kind(&self) -> bool {
        self.rules.is_some()
    }

    /// Whether `rel` (relative to the source root), not a directory, is excluded.
    pub fn matches(&self, rel: &Path) -> bool {
        self.matches_kind(rel, false)
    }

    /// Whether `rel` (relative to the source root), a directory when `is_dir`, is excluded.
    pub fn matches_kind(&self, rel: &Path, is_dir: bool) -> bool {
        (!self.set.is_empty() && self.set.is_match(rel))
            || self
                .rules
                .as_ref()
                .is_some_and(|r| r.matched(rel, is_dir).is_ignore())
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
    fn a_gitignore_file_excludes_as_git_would_and_takes_names_back_with_a_bang() {
        let text = "# build output\n\nbuild/\n*.tmp\n/top-only.log\nlogs/*.log\n!logs/keep.log\ncaf\\xe9\n";
        let rules = rules_from(text);
        assert_eq!(
            rules.len(),
            6,
            "comments and blank lines left out: {rules:?}"
        );
        let mut entries = rules;
        entries.push("*.bak".into());
        let e = Excludes::new(&entries).unwrap();
        assert!(e.needs_kind());
        let (dir, file) = (true, false);
        assert!(e.matches_kind(Path::new("build"), dir));
        assert!(
            e.matches_kind(Path::new("src/build"), dir),
            "no '/' inside: any depth"
        );
        assert!(
            !e.matches_kind(Path::new("build"), file),
            "a trailing '/' is for directories"
        );
        assert!(e.matches_kind(Path::new("a/b/c.tmp"), file));
        assert!(e.matches_kind(Path::new("top-only.log"), file));
        assert!(
            !e.matches_kind(Path::new("sub/top-only.log"), file),
            "a leading '/' anchors"
        );
        assert!(e.matches_kind(Path::new("logs/app.log"), file));
        assert!(
            !e.matches_kind(Path::new("logs/deep/app.log"), file),
            "'*' stops at '/'"
        );
        assert!(
            !e.matches_kind(Path::new("logs/keep.log"), file),
            "'!' takes it back"
        );
        assert!(
            e.matches_kind(Path::new("x/y.bak"), file),
            "globs apply beside the rules"
        );
        assert!(!e.matches_kind(Path::new("data/model.bin"), file));
        let latin1 = Path::new(OsStr::from_bytes(b"dir/x.tmp\xff"));
        assert!(!e.matches_kind(latin1, file));
        assert!(!ex(&["*.tmp"]).needs_kind());
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(matches!(
            Excludes::new(&vec!["x".repeat(1000); 70]),
            Err(ExcludeError::TooLong(_))
        ));
        assert!(Excludes::new(&["a[".into()]).is_err());
        assert!(Excludes::new(&["".into()]).is_err());
        assert!(Excludes::new(&["/abs".into()]).is_err());
        assert!(matches!(
            Excludes::new(&vec!["x".to_string(); MAX_PATTERNS + 1]),
            Err(ExcludeError::TooMany(_))
        ));
    }
}
