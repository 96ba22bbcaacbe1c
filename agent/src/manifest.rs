//! A source agent's local manifest of one migration: which entries each segment carries. The
//! coordinator holds only segment ids, sizes and states; this file says what they mean. It is
//! written once by the scan (fsynced before segments are registered) and read by every send.
//!
//! Layout: records of `u32-BE length + ManifestRecord (protobuf)`, segment ids dense from 0.
//! `scan.json` beside it marks the scan complete and keeps its issues.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::segment::{Entry, PlannedSegment};
use ferry_proto::data as pb;
use prost::Message;
use serde::{Deserialize, Serialize};

/// A manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// I/O on the manifest failed.
    #[error("manifest {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The manifest is damaged.
    #[error(
        "manifest {path} is damaged: {reason}; delete the migration's state directory to rescan"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A segment id that the manifest does not hold.
    #[error("segment {0} is not in the manifest")]
    Unknown(u64),
}

/// The scan's conclusion, written after the manifest is complete and durable.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScanSummary {
    /// Segments the scan produced.
    pub segments_total: u64,
    /// Paths that could not be copied, with the reason (at most 1000 kept).
    pub issues: Vec<(String, String)>,
    /// Number of such paths.
    pub issues_total: u64,
    /// Names that are further names of a file the scan carries (hardlinks), sent as links.
    #[serde(default)]
    pub hardlinks: u64,
    /// Paths skipped because they match the migration's excludes.
    #[serde(default)]
    pub excluded: u64,
    /// Why the source root itself could not be scanned (empty: it was).
    #[serde(default)]
    pub root_error: String,
    /// The round's first segment id.
    #[serde(default)]
    pub first_segment: u64,
    /// Names the round deletes at the target.
    #[serde(default)]
    pub deleted: u64,
}

/// What the coordinator is told about a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Segment id.
    pub id: u64,
    /// File bytes.
    pub bytes: u64,
    /// Files accounted for.
    pub files: u32,
    /// BLAKE3 of the encoded manifest record: changes whenever any path, offset, size, mtime or
    /// inode of the segment does.
    pub fingerprint: [u8; 32],
    /// Which piece of a split file it is and of how many (0, 0 for anything else): the
    /// coordinator sends every piece of a file to one target.
    pub piece: (u32, u32),
}

/// Most issues kept in the summary (all are counted).
pub const MAX_ISSUES_KEPT: usize = 1000;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Appends segments to a new manifest. Segments become readable through the shared [`Manifest`]
/// once [`ManifestWriter::sync`] has made them durable, so sends can start while the scan goes on.
pub struct ManifestWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// The id the next appended segment must have.
    next_id: u64,
    pos: u64,
    unsynced: Vec<u64>,
    shared: Arc<Manifest>,
}

impl ManifestWriter {
    /// Creates (or truncates) the manifest at `path` of segments with ids from `first_id` (a
    /// round's first segment); returns the writer and the reader it feeds.
    pub fn create(path: &Path, first_id: u64) -> Result<(Self, Arc<Manifest>), ManifestError> {
        let f = File::create(path).map_err(io(path))?;
        let reader = OpenOptions::new().read(true).open(path).map_err(io(path))?;
        let shared = Arc::new(Manifest {
            path: path.to_path_buf(),
            file: reader,
            first_id,
            offsets: RwLock::new(Vec::new()),
        });
        let w = ManifestWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
            next_id: first_id,
            pos: 0,
            unsynced: Vec::new(),
            shared: shared.clone(),
        };
        Ok((w, shared))
    }

    /// Appends one segment; ids must arrive dense from the first.
    pub fn append(&mut self, seg: &PlannedSegment) -> Result<SegmentSummary, ManifestError> {
        if seg.id != self.next_id {
            return Err(ManifestError::Damaged {
                path: self.path.clone(),
                reason: format!(
                    "segment {} appended where {} was expected",
                    seg.id, self.next_id
                ),
            });
        }
        let rec = pb::ManifestRecord {
            segment_id: seg.id,
            entries: seg.entries.iter().map(pb::Entry::from).collect(),
            inodes: seg.entries.iter().map(|e| e.inode).collect(),
        };
        let body = rec.encode_to_vec();
        self.out
            .write_all(&(body.len() as u32).to_be_bytes())
            .and_then(|_| self.out.write_all(&body))
            .map_err(io(&self.path))?;
        self.unsynced.push(self.pos);
        self.pos += 4 + body.len() as u64;
        self.next_id += 1;
        Ok(SegmentSummary {
            id: seg.id,
            bytes: seg.bytes(),
            files: seg.files(),
            fingerprint: *blake3::hash(&body).as_bytes(),
            piece: seg.piece(),
        })
    }

    /// Makes everything appended so far durable and readable.
    pub fn sync(&mut self) -> Result<(), ManifestError> {
        self.out.flush().map_err(io(&self.path))?;
        self.out.get_ref().sync_data().map_err(io(&self.path))?;
        self.shared
            .offsets
            .write()
            .expect("not poisoned")
            .append(&mut self.unsynced);
        Ok(())
    }
}

/// A complete manifest, open for reading segments.
pub struct Manifest {
    path: PathBuf,
    file: File,
    /// The id of its first segment (its round's first).
    first_id: u64,
    /// Offset of each segment's record; index = segment id - `first_id`. 8 bytes per segment.
    offsets: RwLock<Vec<u64>>,
}

impl Manifest {
    /// Opens a manifest of segments with ids from `first_id` and indexes its records.
    pub fn open(path: &Path, first_id: u64) -> Result<Self, ManifestError> {
        let file = OpenOptions::new().read(true).open(path).map_err(io(path))?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, &file);
        let mut offsets = Vec::new();
        let mut pos = 0u64;
        let mut len = [0u8; 4];
        loop {
            match r.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io(path)(e)),
            }
            let n = u32::from_be_bytes(len) as u64;
            offsets.push(pos);
            std::io::copy(&mut (&mut r).take(n), &mut std::io::sink()).map_err(io(path))?;
            pos += 4 + n;
        }
        if file.metadata().map_err(io(path))?.len() != pos {
            return Err(ManifestError::Damaged {
                path: path.to_path_buf(),
                reason: "truncated record at the end".into(),
            });
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            file,
            first_id,
            offsets: RwLock::new(offsets),
        })
    }

    /// Number of segments.
    pub fn len(&self) -> u64 {
        self.offsets.read().expect("not poisoned").len() as u64
    }

    /// Whether there are no segments.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_raw(&self, id: u64) -> Result<Vec<u8>, ManifestError> {
        let index = id
            .checked_sub(self.first_id)
            .ok_or(ManifestError::Unknown(id))?;
        let off = *self
            .offsets
            .read()
            .expect("not poisoned")
            .get(usize::try_from(index).unwrap_or(usize::MAX))
            .ok_or(ManifestError::Unknown(id))?;
        let mut len = [0u8; 4];
        self.file
            .read_exact_at(&mut len, off)
            .map_err(io(&self.path))?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.file
            .read_exact_at(&mut body, off + 4)
            .map_err(io(&self.path))?;
        Ok(body)
    }

    /// Reads segment `id`'s entries.
    pub fn read(&self, id: u64) -> Result<Vec<Entry>, ManifestError> {
        self.decode(id, &self.read_raw(id)?)
    }

    fn decode(&self, id: u64, body: &[u8]) -> Result<Vec<Entry>, ManifestError> {
        let damaged = |reason: String| ManifestError::Damaged {
            path: self.path.clone(),
            reason,
        };
        let rec = pb::ManifestRecord::decode(body).map_err(|e| damaged(e.to_string()))?;
        if rec.segment_id != id || rec.inodes.len() != rec.entries.len() {
            return Err(damaged(format!("record for segment {id} is inconsistent")));
        }
        rec.entries
            .into_iter()
            .zip(rec.inodes)
            .map(|(e, ino)| {
                let mut e = Entry::try_from(e).map_err(|e| damaged(e.to_string()))?;
                e.inode = ino;
                Ok(e)
            })
            .collect()
    }

    /// Each segment's summary, for (re-)registration with the coordinator.
    pub fn summaries(&self) -> Result<Vec<SegmentSummary>, ManifestError> {
        (self.first_id..self.first_id + self.len())
            .map(|id| {
                let body = self.read_raw(id)?;
                let seg = PlannedSegment {
                    id,
                    entries: self.decode(id, &body)?,
                };
                Ok(SegmentSummary {
                    id,
                    bytes: seg.bytes(),
                    files: seg.files(),
                    fingerprint: *blake3::hash(&body).as_bytes(),
                    piece: seg.piece(),
                })
            })
            .collect()
    }
}

/// Writes `scan.json` atomically.
pub fn write_summary(path: &Path, s: &ScanSummary) -> Result<(), ManifestError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(s).expect("plain struct serialises");
    let f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all_at(&bytes, 0).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Reads `scan.json`, or `None` when the scan has not completed.
pub fn read_summary(path: &Path) -> Result<Option<ScanSummary>, ManifestError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ManifestError::Damaged {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::SegmentPlanner;

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest");
        let mut planner = SegmentPlanner::new(10);
        let (mut w, live) = ManifestWriter::create(&p, 0).unwrap();
        let mut segs = Vec::new();
        for i in 0..5 {
            segs.extend(planner.push(Entry::file(format!("f{i}"), 6, 0o644, (1, 2), 100 + i)));
        }
        segs.extend(planner.finish());
        let appended: Vec<_> = segs.iter().map(|s| w.append(s).unwrap()).collect();
        assert!(live.is_empty(), "readable before it is durable");
        w.sync().unwrap();
        assert_eq!(live.read(1).unwrap(), segs[1].entries);
        let m = Manifest::open(&p, 0).unwrap();
        assert_eq!(m.len(), segs.len() as u64);
        for s in &segs {
            assert_eq!(m.read(s.id).unwrap(), s.entries);
        }
        assert!(matches!(m.read(99), Err(ManifestError::Unknown(99))));
        assert_eq!(
            m.summaries().unwrap(),
            appended,
            "re-read summaries match the scan's"
        );
        // A torn tail is detected.
        let len = fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(matches!(
            Manifest::open(&p, 0),
            Err(ManifestError::Damaged { .. })
        ));
    }

    #[test]
    fn summary_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scan.json");
        assert_eq!(read_summary(&p).unwrap(), None);
        let s = ScanSummary {
            segments_total: 3,
            issues: vec![("a".into(), "b".into())],
            issues_total: 1,
            hardlinks: 2,
            excluded: 1,
            root_error: String::new(),
            first_segment: 7,
            deleted: 2,
        };
        write_summary(&p, &s).unwrap();
        assert_eq!(read_summary(&p).unwrap(), Some(s));
    }
}
