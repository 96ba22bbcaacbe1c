//! An in-memory [`Sink`] for tests of the target's logic: regular files as byte vectors, made
//! visible only by [`SegmentWrite::commit`], with a write failure on demand (a full disk).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{SegmentWrite, Sink, SinkError};
use crate::segment::{Entry, EntryKind};

/// Files by path (relative to the root), and the failure to inject.
#[derive(Default)]
pub struct MemSink {
    /// Committed files.
    pub files: Mutex<BTreeMap<PathBuf, Vec<u8>>>,
    /// Fail the write after this many more successful writes (`ENOSPC`), if set.
    pub fail_after_writes: Mutex<Option<usize>>,
}

impl MemSink {
    /// A committed file's bytes.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.files
            .lock()
            .expect("not poisoned")
            .get(&PathBuf::from(path))
            .cloned()
    }
}

/// One segment being written into a [`MemSink`].
pub struct MemWriter<'a> {
    sink: &'a MemSink,
    base: PathBuf,
    staged: Vec<(PathBuf, Vec<u8>)>,
    /// Names deleted (with everything below them), before the staged files land.
    deleted: Vec<PathBuf>,
    left: u64,
    hasher: blake3::Hasher,
}

impl Sink for MemSink {
    type Writer<'a> = MemWriter<'a>;

    fn begin(
        &self,
        target_path: &str,
        _migration: &str,
        _segment_id: u64,
        _epoch: u64,
    ) -> Result<MemWriter<'_>, SinkError> {
        Ok(MemWriter {
            sink: self,
            base: ferry_common::path::validate_subdir(target_path)?,
            staged: Vec::new(),
            deleted: Vec::new(),
            left: 0,
            hasher: blake3::Hasher::new(),
        })
    }
}

impl SegmentWrite for MemWriter<'_> {
    fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError> {
        let rel = ferry_common::path::validate_relative(ferry_common::path::bytes(&entry.path))?;
        if self.left > 0 {
            return Err(bad("the previous file is not complete"));
        }
        match entry.kind {
            EntryKind::File => {
                self.staged.push((self.base.join(rel), Vec::new()));
                self.left = entry.wire_len();
            }
            EntryKind::Delete => self.deleted.push(self.base.join(rel)),
            _ => {}
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let Some((path, bytes)) = self.staged.last_mut() else {
            return Err(bad("bytes arrived for no file"));
        };
        if data.len() as u64 > self.left {
            return Err(bad("more bytes than the entry announced"));
        }
        let mut fail = self.sink.fail_after_writes.lock().expect("not poisoned");
        match *fail {
            Some(0) => {
                return Err(SinkError::Io {
                    op: "write",
                    path: path.clone(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                })
            }
            Some(n) => *fail = Some(n - 1),
            None => {}
        }
        bytes.extend_from_slice(data);
        self.hasher.update(data);
        self.left -= data.len() as u64;
        Ok(())
    }

    fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        if self.left > 0 {
            return Err(bad("the last file is not complete"));
        }
        Ok(*self.hasher.finalize().as_bytes())
    }

    fn commit(self) -> Result<(), SinkError> {
        let mut files = self.sink.files.lock().expect("not poisoned");
        for gone in &self.deleted {
            files.retain(|p, _| !p.starts_with(gone));
        }
        files.extend(self.staged);
        Ok(())
    }
}

fn bad(reason: &str) -> SinkError {
    SinkError::BadEntry {
        path: String::new(),
        reason: reason.into(),
    }
}
