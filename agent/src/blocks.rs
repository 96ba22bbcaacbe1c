//! Block hashes of the large files a source sent: BLAKE3 of each block (1 MiB, or the segment
//! size when that is not a multiple of it) of every piece of a split file, recorded when the
//! piece was sent and acknowledged. A later round that finds the file changed reads it, hashes
//! its blocks and sends only those whose hash differs — the target is never asked to read its
//! copy to find out. One file per large file in `<migration dir>/blocks/`, named by the BLAKE3
//! of its path: a 32-byte header (the version the hashes describe: size, mtime, block size)
//! then 32 bytes per block, written in place by each piece.
//!
//! The record is only trusted for a file whose every piece of the last round that carried it
//! was verified: a file in a segment that was not is sent whole by the next round.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The block size for pieces of `segment_size` bytes: 1 MiB when it divides the segment size
/// (pieces start at multiples of the segment size, so blocks never straddle two pieces).
pub fn block_size(segment_size: u64) -> u64 {
    const BLOCK: u64 = 1 << 20;
    if segment_size.is_multiple_of(BLOCK) {
        BLOCK
    } else {
        segment_size.max(1)
    }
}

/// Whether a file of `file_size` bytes is sent as a delta when it changed (and its blocks are
/// recorded when it is sent): at least two blocks, whether it travels whole or in pieces.
pub fn worth_a_delta(file_size: u64, block_size: u64) -> bool {
    block_size > 0 && file_size >= 2 * block_size
}

const HEADER: u64 = 32;

/// A version of a file: size and mtime.
pub type Version = (u64, i64, u32);

/// The block hashes of one migration's large files.
#[derive(Debug, Clone)]
pub struct BlockStore {
    dir: PathBuf,
}

impl BlockStore {
    /// The store in `<migration dir>/blocks`.
    pub fn new(migration_dir: &Path) -> Self {
        BlockStore {
            dir: migration_dir.join("blocks"),
        }
    }

    fn path(&self, rel: &Path) -> PathBuf {
        let h = blake3::hash(ferry_common::path::bytes(rel));
        self.dir.join(ferry_common::hash::hex(h.as_bytes()))
    }

    /// Records the hashes of the blocks from `first_block` on of version `v` of `rel`.
    pub fn record(
        &self,
        rel: &Path,
        v: Version,
        block_size: u64,
        first_block: u64,
        hashes: &[[u8; 32]],
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(rel))?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(&v.0.to_le_bytes());
        header[8..16].copy_from_slice(&v.1.to_le_bytes());
        header[16..20].copy_from_slice(&v.2.to_le_bytes());
        header[24..32].copy_from_slice(&block_size.to_le_bytes());
        f.write_all_at(&header, 0)?;
        let body: Vec<u8> = hashes.iter().flatten().copied().collect();
        f.write_all_at(&body, HEADER + first_block * 32)
    }

    /// Drops the record of `rel` (its next change is sent whole).
    pub fn forget(&self, rel: &Path) {
        let _ = std::fs::remove_file(self.path(rel));
    }

    /// The version recorded for `rel` and its block size, if any.
    pub fn version(&self, rel: &Path) -> Option<(Version, u64)> {
        let f = File::open(self.path(rel)).ok()?;
        let mut h = [0u8; HEADER as usize];
        f.read_exact_at(&mut h, 0).ok()?;
        let eight = |at: usize| -> [u8; 8] { h[at..at + 8].try_into().expect("8 bytes") };
        let four: [u8; 4] = h[16..20].try_into().expect("4 bytes");
        Some((
            (
                u64::from_le_bytes(eight(0)),
                i64::from_le_bytes(eight(8)),
                u32::from_le_bytes(four),
            ),
            u64::from_le_bytes(eight(24)),
        ))
    }

    /// The recorded hashes of blocks `first..first + n` of `rel` (`None` for those not
    /// recorded).
    pub fn hashes(&self, rel: &Path, first: u64, n: usize) -> Vec<Option<[u8; 32]>> {
        let Ok(f) = File::open(self.path(rel)) else {
            return vec![None; n];
        };
        (0..n as u64)
            .map(|i| {
                let mut h = [0u8; 32];
                f.read_exact_at(&mut h, HEADER + (first + i) * 32)
                    .ok()
                    .map(|()| h)
            })
            .collect()
    }
}

/// The runs of a piece (`offset`, `len`) whose blocks' hashes differ from the recorded ones
/// (adjacent blocks merged), given the piece's block hashes now.
pub fn changed_runs(
    offset: u64,
    len: u64,
    block_size: u64,
    now: &[[u8; 32]],
    recorded: &[Option<[u8; 32]>],
) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, h) in now.iter().enumerate() {
        if recorded.get(i).copied().flatten() == Some(*h) {
            continue;
        }
        let start = offset + i as u64 * block_size;
        let end = (start + block_size).min(offset + len);
        match runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += end - start,
            _ => runs.push((start, end - start)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocks_whose_hash_changed_are_sent_adjacent_ones_together() {
        let h = |b: u8| [b; 32];
        let now = [h(1), h(2), h(3), h(4), h(5)];
        let recorded = [Some(h(1)), Some(h(9)), None, Some(h(4)), Some(h(0))];
        // A piece at 10 MiB of 4.5 blocks of 1 MiB: the last block is short.
        let mib = 1 << 20;
        let runs = changed_runs(10 * mib, 4 * mib + mib / 2, mib, &now, &recorded);
        assert_eq!(runs, vec![(11 * mib, 2 * mib), (14 * mib, mib / 2)]);
        assert!(changed_runs(0, 2, 1, &[h(1), h(2)], &[Some(h(1)), Some(h(2))]).is_empty());
    }

    #[test]
    fn a_record_reads_back_and_pieces_fill_it_in_place() {
        let d = tempfile::tempdir().unwrap();
        let s = BlockStore::new(d.path());
        let rel = Path::new("models/ckpt.bin");
        assert_eq!(s.version(rel), None);
        s.record(rel, (3 << 20, 5, 6), 1 << 20, 2, &[[2; 32]])
            .unwrap();
        s.record(rel, (3 << 20, 5, 6), 1 << 20, 0, &[[0; 32], [1; 32]])
            .unwrap();
        assert_eq!(s.version(rel), Some(((3 << 20, 5, 6), 1 << 20)));
        assert_eq!(
            s.hashes(rel, 1, 3),
            vec![Some([1; 32]), Some([2; 32]), None]
        );
        assert_eq!(block_size(64 << 20), 1 << 20);
        assert_eq!(block_size(1_500_000), 1_500_000);
    }
}
