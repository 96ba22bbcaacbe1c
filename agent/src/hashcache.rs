//! Content hashes a full verification computed, kept so that the next one reads only what
//! changed.
//!
//! A full verification (a cutover's, or `ferryctl migration verify NAME --mode full`) reads
//! every file of a tree. Reading 50 TB inside a cutover's freeze would stop the application's
//! writes for hours, so each agent keeps, per migration and side, the BLAKE3 of every file it
//! read together with what identified that version: size, mtime, ctime and inode. The next
//! verification takes the recorded hash of a file whose identity is unchanged and reads the
//! rest; a verification run before the cutover leaves only the final round's changes to read
//! while writes are frozen.
//!
//! ctime cannot be set from user space: a write, truncate, chmod, xattr change or a file renamed
//! over the name gives a new one (and a new inode). A hash is kept only when the file's ctime
//! and mtime are older than the moment its read started by at least [`SETTLE_NS`]: a write in
//! the same clock tick as the read could otherwise leave the identity as recorded with other
//! bytes behind it (git's "racily clean" files).
//!
//! The cache is an optimisation: a missing or damaged file is an empty cache (everything is read).
//!
//! Layout: `FERRYHC1`, then one record per file in walk order: u32 path length, path bytes,
//! size u64, mtime i64 + u32, ctime i64 + u32, inode u64, BLAKE3 (32 bytes); integers big-endian.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::scan::Order;

const MAGIC: &[u8; 8] = b"FERRYHC1";
/// How much older than a read a file's ctime and mtime must be for its hash to be kept.
pub const SETTLE_NS: i128 = 1_000_000_000;
/// Longest path accepted from a cache file (a longer length means the file is damaged).
const MAX_PATH: usize = 64 * 1024;

/// What identifies a version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Status change time (seconds, nanoseconds).
    pub ctime: (i64, u32),
    /// Inode.
    pub inode: u64,
}

fn ns(t: (i64, u32)) -> i128 {
    i128::from(t.0) * 1_000_000_000 + i128::from(t.1)
}

impl Identity {
    /// Whether a hash read of this version, starting at `read_started_ns` (unix ns), may be
    /// kept: its ctime and mtime are older than the read by `settle_ns` ([`SETTLE_NS`]), so
    /// nothing can have changed the file since without changing its ctime.
    pub fn settled(&self, read_started_ns: i128, settle_ns: i128) -> bool {
        ns(self.ctime) + settle_ns <= read_started_ns
            && ns(self.mtime) + settle_ns <= read_started_ns
    }
}

struct Record {
    path: PathBuf,
    id: Identity,
    hash: [u8; 32],
}

/// Reads a cache while a walk goes through the tree in the same order.
pub struct HashCache {
    input: Option<BufReader<File>>,
    next: Option<Record>,
    order: Order,
}

impl HashCache {
    /// The cache at `path`, written by a walk in [`Order::Name`]; empty when there is none or
    /// it cannot be read.
    pub fn open(path: &Path) -> Self {
        Self::open_in(Order::Name, path)
    }

    /// The cache at `path`, written (and now looked up) in `order`.
    pub fn open_in(order: Order, path: &Path) -> Self {
        let mut cache = HashCache {
            input: None,
            next: None,
            order,
        };
        let Ok(f) = File::open(path) else {
            return cache;
        };
        let mut input = BufReader::with_capacity(1 << 20, f);
        let mut magic = [0u8; 8];
        if input.read_exact(&mut magic).is_err() || &magic != MAGIC {
            tracing::warn!(message = "Ignoring a verification hash cache that is not one; every file is read.", path = %path.display());
            return cache;
        }
        cache.input = Some(input);
        cache.advance();
        cache
    }

    fn advance(&mut self) {
        self.next = None;
        let Some(input) = &mut self.input else { return };
        match read_record(input) {
            Ok(Some(r)) => self.next = Some(r),
            Ok(None) => self.input = None,
            Err(e) => {
                tracing::warn!(message = "The verification hash cache is damaged; the rest of the tree is read.", error = %e);
                self.input = None;
            }
        }
    }

    /// The recorded hash of `path` if it was recorded for this very version. Calls must come in
    /// the cache's walk order.
    pub fn lookup(&mut self, path: &Path, id: &Identity) -> Option<[u8; 32]> {
        while let Some(r) = &self.next {
            match self.order.cmp(&r.path, path) {
                std::cmp::Ordering::Less => self.advance(),
                std::cmp::Ordering::Equal => {
                    let hit = (r.id == *id).then_some(r.hash);
                    self.advance();
                    return hit;
                }
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
}

fn read_record(input: &mut impl Read) -> std::io::Result<Option<Record>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_PATH {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a path of {len} bytes"),
        ));
    }
    let mut path = vec![0u8; len];
    input.read_exact(&mut path)?;
    let mut fixed = [0u8; 8 + 12 + 12 + 8 + 32];
    input.read_exact(&mut fixed)?;
    let u64_at = |i: usize| u64::from_be_bytes(fixed[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_be_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
    Ok(Some(Record {
        path: PathBuf::from(std::ffi::OsStr::from_bytes(&path)),
        id: Identity {
            size: u64_at(0),
            mtime: (u64_at(8) as i64, u32_at(16)),
            ctime: (u64_at(20) as i64, u32_at(28)),
            inode: u64_at(32),
        },
        hash: fixed[40..72].try_into().expect("32 bytes"),
    }))
}

/// Writes the cache of a verification as it reads the tree; replaces the old one only when
/// [`finish`](Self::finish) is called (a verification that stopped half way keeps the old).
pub struct HashCacheWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
}

impl HashCacheWriter {
    /// Starts a new cache for `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        out.write_all(MAGIC)?;
        Ok(HashCacheWriter {
            path: path.to_path_buf(),
            tmp,
            out,
        })
    }

    /// Records `hash` for this version of `path` (in walk order).
    pub fn append(&mut self, path: &Path, id: &Identity, hash: &[u8; 32]) -> std::io::Result<()> {
        let p = path.as_os_str().as_bytes();
        self.out.write_all(&(p.len() as u32).to_be_bytes())?;
        self.out.write_all(p)?;
        self.out.write_all(&id.size.to_be_bytes())?;
        self.out.write_all(&id.mtime.0.to_be_bytes())?;
        self.out.write_all(&id.mtime.1.to_be_bytes())?;
        self.out.write_all(&id.ctime.0.to_be_bytes())?;
        self.out.write_all(&id.ctime.1.to_be_bytes())?;
        self.out.write_all(&id.inode.to_be_bytes())?;
        self.out.write_all(hash)
    }

    /// Puts the new cache in place of the old.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(size: u64, ctime: i64) -> Identity {
        Identity {
            size,
            mtime: (1, 0),
            ctime: (ctime, 5),
            inode: 9,
        }
    }

    #[test]
    fn a_hash_is_found_only_for_the_version_it_was_recorded_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/hashes");
        let mut w = HashCacheWriter::create(&path).unwrap();
        w.append(Path::new("a"), &id(1, 10), &[1; 32]).unwrap();
        w.append(Path::new("a/b"), &id(2, 10), &[2; 32]).unwrap();
        w.append(Path::new("a.txt"), &id(3, 10), &[3; 32]).unwrap();
        w.append(Path::new("z"), &id(4, 10), &[4; 32]).unwrap();
        w.finish().unwrap();

        let mut c = HashCache::open(&path);
        assert_eq!(c.lookup(Path::new("a"), &id(1, 10)), Some([1; 32]));
        // The ctime moved: another version.
        assert_eq!(c.lookup(Path::new("a/b"), &id(2, 11)), None);
        // A name not recorded, between two that are.
        assert_eq!(c.lookup(Path::new("a/c"), &id(2, 10)), None);
        assert_eq!(c.lookup(Path::new("a.txt"), &id(3, 10)), Some([3; 32]));
        // "y" was not recorded; "z" after it still is found.
        assert_eq!(c.lookup(Path::new("y"), &id(4, 10)), None);
        assert_eq!(c.lookup(Path::new("z"), &id(4, 10)), Some([4; 32]));
        assert_eq!(c.lookup(Path::new("zz"), &id(4, 10)), None);
    }

    #[test]
    fn no_cache_or_a_damaged_one_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hashes");
        assert_eq!(
            HashCache::open(&path).lookup(Path::new("a"), &id(1, 1)),
            None
        );
        std::fs::write(&path, b"not a cache").unwrap();
        assert_eq!(
            HashCache::open(&path).lookup(Path::new("a"), &id(1, 1)),
            None
        );
        // A truncated last record: the records before it still count.
        let mut w = HashCacheWriter::create(&path).unwrap();
        w.append(Path::new("a"), &id(1, 1), &[7; 32]).unwrap();
        w.append(Path::new("b"), &id(1, 1), &[8; 32]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let mut c = HashCache::open(&path);
        assert_eq!(c.lookup(Path::new("a"), &id(1, 1)), Some([7; 32]));
        assert_eq!(c.lookup(Path::new("b"), &id(1, 1)), None);
    }

    #[test]
    fn a_file_changed_within_a_second_of_its_read_is_not_settled() {
        let v = Identity {
            size: 1,
            mtime: (100, 0),
            ctime: (100, 500_000_000),
            inode: 1,
        };
        let at = |s: i128, n: i128| s * 1_000_000_000 + n;
        assert!(!v.settled(at(101, 0), SETTLE_NS));
        assert!(!v.settled(at(101, 499_999_999), SETTLE_NS));
        assert!(v.settled(at(101, 500_000_000), SETTLE_NS));
    }
}
