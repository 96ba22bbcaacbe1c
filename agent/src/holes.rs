//! Sparse files: where a file's data lies (SEEK_DATA / SEEK_HOLE) at the source, and holes made
//! again at the target (`fallocate` punch) where a file is written into an existing part.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use rustix::fs::{fallocate, seek, FallocateFlags, SeekFrom};

/// The data runs `(offset, len)` of `file` inside `offset..offset + len`, or `None` when that
/// range is all data (the usual, dense case; decided from the allocated size without seeking
/// when the file has no holes at all).
pub fn data_runs(file: &File, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let m = file.metadata()?;
    // st_blocks counts 512-byte units whatever the file system's block size.
    if len == 0 || m.blocks().saturating_mul(512) >= m.len() {
        return Ok(None);
    }
    let end = offset + len;
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data at or after `pos`: the rest is a hole.
            Err(e) if e == rustix::io::Errno::NXIO => break,
            // The file system cannot tell: treat the range as data.
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::OPNOTSUPP => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        if start >= end {
            break;
        }
        let stop = match seek(file, SeekFrom::Hole(start)) {
            Ok(h) => h.min(end),
            Err(e) => return Err(e.into()),
        };
        runs.push((start, stop - start));
        pos = stop;
    }
    if runs.len() == 1 && runs[0] == (offset, len) {
        return Ok(None);
    }
    Ok(Some(runs))
}

/// Makes `offset..offset + len` of `file` read as zeros without allocating it: punches a hole,
/// or, where the file system cannot, writes zeros.
pub fn make_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let zeros = vec![0u8; 1 << 20];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the current user is root (ownership can be applied).
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn sparse_file(dir: &std::path::Path) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("s"))
            .unwrap();
        f.set_len(64 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 8 * MIB).unwrap();
        f.write_all_at(&[2u8; 4096], 40 * MIB).unwrap();
        f
    }

    #[test]
    fn finds_the_data_of_a_sparse_file_and_nothing_of_a_dense_one() {
        let d = tempfile::tempdir().unwrap();
        let f = sparse_file(d.path());
        let runs = data_runs(&f, 0, 64 * MIB).unwrap().expect("sparse");
        // File systems report data at their own granularity: each run holds the written block.
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(runs[0].0 <= 8 * MIB && runs[0].0 + runs[0].1 >= 8 * MIB + 4096);
        assert!(runs[1].0 <= 40 * MIB && runs[1].0 + runs[1].1 >= 40 * MIB + 4096);
        assert!(runs.iter().map(|r| r.1).sum::<u64>() < MIB);
        // A piece covering only a hole carries nothing; one inside a run is clipped to it.
        assert_eq!(data_runs(&f, 16 * MIB, 16 * MIB).unwrap(), Some(vec![]));
        let piece = data_runs(&f, 32 * MIB, 32 * MIB).unwrap().unwrap();
        assert_eq!(piece.len(), 1);
        assert!(piece[0].0 >= 32 * MIB && piece[0].0 + piece[0].1 <= 64 * MIB);

        std::fs::write(d.path().join("dense"), vec![3u8; 100_000]).unwrap();
        let dense = File::open(d.path().join("dense")).unwrap();
        assert_eq!(data_runs(&dense, 0, 100_000).unwrap(), None);
    }

    #[test]
    fn a_punched_range_reads_as_zeros_and_frees_its_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, vec![7u8; 4 * MIB as usize]).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        let before = f.metadata().unwrap().blocks();
        make_hole(&f, MIB, 2 * MIB).unwrap();
        let mut buf = vec![1u8; 2 * MIB as usize];
        f.read_exact_at(&mut buf, MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(f.metadata().unwrap().len(), 4 * MIB);
        assert!(f.metadata().unwrap().blocks() < before);
    }
}
