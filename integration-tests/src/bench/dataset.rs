//! Benchmark data sets, generated deterministically from a seed (no downloads). Contents are
//! BLAKE3 XOF output: incompressible, so no tool gains from compression.
//!
//! - `checkpoint`: three large files (¼, ¼ and ½ of the size), like model checkpoint shards.
//! - `dataset`: many files of 1–256 KiB (log-uniform) in a two-level tree, like an image corpus.
//! - `mixed`: half a checkpoint, half a dataset, plus empty files, symlinks and a sparse file.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::wan::link::SplitMix64;

/// Which shape of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A few large files.
    Checkpoint,
    /// Many small files.
    Dataset,
    /// Both, plus empty files, symlinks and a sparse file.
    Mixed,
}

impl Kind {
    /// Parses `checkpoint`, `dataset` or `mixed`.
    pub fn parse(s: &str) -> Result<Kind, String> {
        match s {
            "checkpoint" => Ok(Kind::Checkpoint),
            "dataset" => Ok(Kind::Dataset),
            "mixed" => Ok(Kind::Mixed),
            _ => Err(format!(
                "unknown data set {s:?}; one of checkpoint, dataset, mixed"
            )),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Checkpoint => "checkpoint",
            Kind::Dataset => "dataset",
            Kind::Mixed => "mixed",
        }
    }
}

/// How big: the checkpoint's total bytes and the dataset's file count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Bytes of the large files in total.
    pub checkpoint_bytes: u64,
    /// Number of small files.
    pub small_files: u32,
}

impl Size {
    /// `quick` (512 MiB / 5,000 files: a run of every tool in a few minutes), `full` (6 GiB in
    /// files of 1.5–3 GiB / 50,000 files), or `<MiB>x<files>` (e.g. `2048x20000`).
    pub fn parse(s: &str) -> Result<Size, String> {
        match s {
            "quick" => Ok(Size {
                checkpoint_bytes: 512 << 20,
                small_files: 5_000,
            }),
            "full" => Ok(Size {
                checkpoint_bytes: 6 << 30,
                small_files: 50_000,
            }),
            other => {
                let bad = || format!("bad size {other:?}: quick, full or <MiB>x<files>");
                let (mib, files) = other.split_once('x').ok_or_else(bad)?;
                Ok(Size {
                    checkpoint_bytes: mib.parse::<u64>().map_err(|_| bad())? << 20,
                    small_files: files.parse().map_err(|_| bad())?,
                })
            }
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Regular files (including empty ones).
    pub files: u64,
    /// Bytes in regular files (apparent size).
    pub bytes: u64,
}

/// Fills `f` with `len` bytes of the stream named by `key`.
fn write_stream(f: &mut File, key: &[u8; 32], len: u64) -> std::io::Result<()> {
    let mut xof = blake3::Hasher::new_keyed(key).finalize_xof();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn key(seed: u64, what: &str, i: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(what.as_bytes());
    h.update(&i.to_le_bytes());
    *h.finalize().as_bytes()
}

fn big_files(dir: &Path, seed: u64, total: u64, parts: &[u64]) -> std::io::Result<Summary> {
    let mut s = Summary::default();
    let sum: u64 = parts.iter().sum();
    for (i, p) in parts.iter().enumerate() {
        let len = total * p / sum;
        let mut f = File::create(dir.join(format!("shard-{i:02}.bin")))?;
        write_stream(&mut f, &key(seed, "shard", i as u64), len)?;
        s.files += 1;
        s.bytes += len;
    }
    Ok(s)
}

fn small_files(dir: &Path, seed: u64, count: u32) -> std::io::Result<Summary> {
    let mut s = Summary::default();
    let mut rng = SplitMix64(seed ^ 0xda7a);
    for i in 0..count as u64 {
        // 50 top-level directories of 20 subdirectories, files spread over them.
        let sub = dir.join(format!("d{:02}/e{:02}", i % 50, (i / 50) % 20));
        if i < 1000 {
            fs::create_dir_all(&sub)?;
        }
        // log-uniform in [1 KiB, 256 KiB]
        let len = (1024.0 * 256f64.powf(rng.next_f64())) as u64;
        let mut f = File::create(sub.join(format!("img-{i:06}.jpg")))?;
        write_stream(&mut f, &key(seed, "small", i), len)?;
        s.files += 1;
        s.bytes += len;
    }
    Ok(s)
}

/// Generates data set `kind` of `size` into `dir` (which must not exist).
pub fn generate(kind: Kind, size: Size, seed: u64, dir: &Path) -> std::io::Result<Summary> {
    fs::create_dir_all(dir)?;
    match kind {
        Kind::Checkpoint => big_files(dir, seed, size.checkpoint_bytes, &[1, 1, 2]),
        Kind::Dataset => small_files(dir, seed, size.small_files),
        Kind::Mixed => {
            let ck = dir.join("checkpoint");
            let ds = dir.join("dataset");
            let misc = dir.join("misc");
            for d in [&ck, &ds, &misc] {
                fs::create_dir_all(d)?;
            }
            let a = big_files(&ck, seed, size.checkpoint_bytes / 2, &[1])?;
            let b = small_files(&ds, seed, (size.small_files / 2).max(1))?;
            let mut s = Summary {
                files: a.files + b.files,
                bytes: a.bytes + b.bytes,
            };
            for i in 0..100 {
                File::create(misc.join(format!("empty-{i:03}")))?;
                s.files += 1;
            }
            for i in 0..50u64 {
                std::os::unix::fs::symlink(
                    format!("../dataset/d{:02}/e00/img-{:06}.jpg", i % 50, i % 50),
                    misc.join(format!("link-{i:02}")),
                )?;
            }
            // A 256 MiB file with three 1 MiB extents of data and holes between them.
            let mut f = File::create(misc.join("sparse.img"))?;
            let sparse_len = 256u64 << 20;
            for (j, at) in [0u64, 100 << 20, (256 << 20) - (1 << 20)]
                .iter()
                .enumerate()
            {
                f.seek(SeekFrom::Start(*at))?;
                write_stream(&mut f, &key(seed, "sparse", j as u64), 1 << 20)?;
            }
            f.set_len(sparse_len)?;
            s.files += 1;
            s.bytes += sparse_len;
            Ok(s)
        }
    }
}

/// Changes the data set in place for the incremental scenario: rewrites 1 % of the small files
/// (same size, new bytes) and 1 % of each large file's bytes in scattered 1 MiB blocks. Returns
/// the bytes changed.
pub fn mutate(kind: Kind, dir: &Path, seed: u64) -> std::io::Result<u64> {
    let mut changed = 0u64;
    let mut rng = SplitMix64(seed ^ 0x1c4e);
    let mut files = crate::tree::files(dir)?;
    files.sort();
    let (big, small): (Vec<_>, Vec<_>) = files
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .partition(|(_, len)| *len > 8 << 20);
    let _ = kind;
    for (i, (p, len)) in small.iter().enumerate() {
        if i % 100 == 0 {
            let mut f = fs::OpenOptions::new().write(true).open(p)?;
            write_stream(&mut f, &key(seed, "mutate-small", i as u64), *len)?;
            changed += len;
        }
    }
    for (i, (p, len)) in big.iter().enumerate() {
        let blocks = len >> 20;
        let mut f = fs::OpenOptions::new().write(true).open(p)?;
        for b in 0..(blocks / 100).max(1) {
            let at = (rng.next_u64() % blocks) << 20;
            f.seek(SeekFrom::Start(at))?;
            write_stream(
                &mut f,
                &key(seed, "mutate-big", (i as u64) << 32 | b),
                1 << 20,
            )?;
            changed += 1 << 20;
        }
    }
    Ok(changed)
}
