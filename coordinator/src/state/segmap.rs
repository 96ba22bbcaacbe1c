//! Compact containers for the two parts of the state that grow with the number of segments: the
//! segments themselves ([`SegmentMap`]) and the per-migration index of pending ones ([`IdSet`]).
//!
//! Both were `std` B-trees keyed by id. A source registers its segments in id order, and a
//! B-tree filled in key order leaves every node about half full: with a ~170-byte value per key
//! a `BTreeMap<(u64, u64), Segment>` cost ~370 bytes per segment, and the pending set another
//! ~20. Ten million segments did not fit in 2 GiB. Here a segment costs its own size plus ~2
//! bytes, and a run of consecutive pending ids costs one entry, whatever its length.
//!
//! Both keep one canonical shape for one content (no empty chunk, no two touching runs), so
//! the derived `PartialEq` compares contents, as the state's equality across replicas needs.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Bound, RangeBounds};

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Segment;

/// Segment ids per chunk: one bit each in [`Chunk::present`].
const CHUNK_BITS: u32 = 6;

/// Up to 64 consecutive segment ids of one migration: a bitmap of which exist and their
/// segments in id order. Filled in id order, a chunk's `Vec` grows 4, 8, 16, 32, 64: a full
/// chunk has no spare room, a migration's last chunk at most twice what it holds. A chunk with
/// one segment costs four segments' room (`Vec`'s least), so ids spread far apart (a hostile or
/// broken source) cost about what they did in a B-tree, not more.
#[derive(Clone, Default, PartialEq, Eq)]
struct Chunk {
    present: u64,
    items: Vec<Segment>,
}

impl Chunk {
    /// Position in `items` of segment bit `bit`, and whether it is there.
    fn slot(&self, bit: u32) -> (usize, bool) {
        let below = self.present & ((1u64 << bit) - 1);
        (
            below.count_ones() as usize,
            self.present & (1u64 << bit) != 0,
        )
    }

    /// Its segments with their ids, for chunk number `chunk` of migration `mid`.
    fn entries(&self, mid: u64, chunk: u64) -> impl Iterator<Item = ((u64, u64), &Segment)> {
        let mut bits = self.present;
        self.items.iter().map(move |s| {
            let bit = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            ((mid, (chunk << CHUNK_BITS) | bit), s)
        })
    }
}

/// Chunk key and bit of a segment key.
fn split((mid, id): (u64, u64)) -> ((u64, u64), u32) {
    (
        (mid, id >> CHUNK_BITS),
        (id & ((1 << CHUNK_BITS) - 1)) as u32,
    )
}

/// Segments by `(migration id, segment id)`, in key order: the subset of `BTreeMap`'s interface
/// the state uses, with keys returned by value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SegmentMap {
    chunks: BTreeMap<(u64, u64), Chunk>,
    len: usize,
}

impl SegmentMap {
    /// How many segments.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment at `key`.
    pub fn get(&self, key: &(u64, u64)) -> Option<&Segment> {
        let (c, bit) = split(*key);
        let chunk = self.chunks.get(&c)?;
        match chunk.slot(bit) {
            (i, true) => Some(&chunk.items[i]),
            _ => None,
        }
    }

    /// The segment at `key`, to change.
    pub fn get_mut(&mut self, key: &(u64, u64)) -> Option<&mut Segment> {
        let (c, bit) = split(*key);
        let chunk = self.chunks.get_mut(&c)?;
        match chunk.slot(bit) {
            (i, true) => Some(&mut chunk.items[i]),
            _ => None,
        }
    }

    /// Whether a segment is at `key`.
    pub fn contains_key(&self, key: &(u64, u64)) -> bool {
        self.get(key).is_some()
    }

    /// Puts `seg` at `key`; returns the segment it replaced.
    pub fn insert(&mut self, key: (u64, u64), seg: Segment) -> Option<Segment> {
        let (c, bit) = split(key);
        let chunk = self.chunks.entry(c).or_default();
        match chunk.slot(bit) {
            (i, true) => Some(std::mem::replace(&mut chunk.items[i], seg)),
            (i, false) => {
                chunk.items.insert(i, seg);
                chunk.present |= 1u64 << bit;
                self.len += 1;
                None
            }
        }
    }

    /// Takes out the segment at `key`.
    pub fn remove(&mut self, key: &(u64, u64)) -> Option<Segment> {
        let (c, bit) = split(*key);
        let chunk = self.chunks.get_mut(&c)?;
        let (i, true) = chunk.slot(bit) else {
            return None;
        };
        let seg = chunk.items.remove(i);
        chunk.present &= !(1u64 << bit);
        if chunk.present == 0 {
            self.chunks.remove(&c);
        } else if chunk.items.capacity() >= 2 * chunk.items.len() + 8 {
            // Segments removed one by one (a rescan's replanned tail) give their room back
            // once the chunk is less than half full.
            chunk.items.shrink_to_fit();
        }
        self.len -= 1;
        Some(seg)
    }

    /// Takes out every segment of migration `mid`; returns their ids, in order. Whole chunks
    /// are dropped: removing ten million segments one at a time in id order would shift each
    /// chunk's `Vec` once per segment.
    pub fn remove_migration(&mut self, mid: u64) -> Vec<u64> {
        let mut taken = self.chunks.split_off(&(mid, 0));
        if let Some(next) = mid.checked_add(1) {
            let mut after = taken.split_off(&(next, 0));
            self.chunks.append(&mut after);
        }
        let ids: Vec<u64> = taken
            .iter()
            .flat_map(|(&(m, c), chunk)| chunk.entries(m, c).map(|((_, id), _)| id))
            .collect();
        self.len -= ids.len();
        ids
    }

    /// Every segment with its key, in key order.
    pub fn iter(&self) -> impl Iterator<Item = ((u64, u64), &Segment)> {
        self.chunks
            .iter()
            .flat_map(|(&(mid, c), chunk)| chunk.entries(mid, c))
    }

    /// Every segment, in key order.
    pub fn values(&self) -> impl Iterator<Item = &Segment> {
        self.chunks.values().flat_map(|c| c.items.iter())
    }

    /// Every key, in order.
    pub fn keys(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// The segments whose keys are in `range`, in key order. A range that ends before it
    /// starts is empty (where `BTreeMap::range` panics).
    pub fn range<R: RangeBounds<(u64, u64)>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = ((u64, u64), &Segment)> {
        // The chunks that may hold keys of the range; their keys outside it are filtered out.
        let lo = match range.start_bound() {
            Bound::Included(k) | Bound::Excluded(k) => Bound::Included(split(*k).0),
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match range.end_bound() {
            Bound::Included(k) | Bound::Excluded(k) => Bound::Included(split(*k).0),
            Bound::Unbounded => Bound::Unbounded,
        };
        let empty = match (lo, hi) {
            (Bound::Included(a), Bound::Included(b)) => a > b,
            _ => false,
        };
        let chunks = if empty {
            None
        } else {
            Some(self.chunks.range((lo, hi)))
        };
        chunks
            .into_iter()
            .flatten()
            .flat_map(|(&(mid, c), chunk)| chunk.entries(mid, c))
            .filter(move |(k, _)| range.contains(k))
    }
}

impl std::ops::Index<&(u64, u64)> for SegmentMap {
    type Output = Segment;

    fn index(&self, key: &(u64, u64)) -> &Segment {
        self.get(key).expect("no segment at this key")
    }
}

impl FromIterator<((u64, u64), Segment)> for SegmentMap {
    fn from_iter<I: IntoIterator<Item = ((u64, u64), Segment)>>(iter: I) -> Self {
        let mut m = SegmentMap::default();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

impl fmt::Debug for SegmentMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Serialised as a sequence of `(key, segment)` pairs in key order: what the `BTreeMap` it
/// replaced was serialised as (JSON maps need string keys), so stored records and snapshots
/// read the same.
impl Serialize for SegmentMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        // The length first: postcard writes it before the elements.
        let mut seq = s.serialize_seq(Some(self.len))?;
        for pair in self.iter() {
            seq.serialize_element(&pair)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for SegmentMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = SegmentMap;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of ((migration, segment), segment) pairs")
            }

            // Inserted as they are read: a snapshot of millions of segments is never held twice.
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SegmentMap, A::Error> {
                let mut m = SegmentMap::default();
                while let Some((k, v)) = seq.next_element::<((u64, u64), Segment)>()? {
                    m.insert(k, v);
                }
                Ok(m)
            }
        }
        d.deserialize_seq(Pairs)
    }
}

/// A set of ids stored as runs of consecutive ids (first → last, inclusive): the pending
/// segments of a migration are mostly one long run, which costs one entry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IdSet {
    runs: BTreeMap<u64, u64>,
    len: u64,
}

impl IdSet {
    /// How many ids.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The run holding `id`.
    fn run_of(&self, id: u64) -> Option<(u64, u64)> {
        let (&first, &last) = self.runs.range(..=id).next_back()?;
        (last >= id).then_some((first, last))
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: &u64) -> bool {
        self.run_of(*id).is_some()
    }

    /// Adds `id`; false if it was there.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(&id) {
            return false;
        }
        // The run ending just below, the run starting just above.
        let below = id
            .checked_sub(1)
            .and_then(|b| self.run_of(b))
            .map(|(first, _)| first);
        let above = id.checked_add(1).and_then(|a| self.runs.get(&a).copied());
        match (below, above) {
            (Some(first), Some(last)) => {
                self.runs.remove(&(id + 1));
                self.runs.insert(first, last);
            }
            (Some(first), None) => {
                self.runs.insert(first, id);
            }
            (None, Some(last)) => {
                self.runs.remove(&(id + 1));
                self.runs.insert(id, last);
            }
            (None, None) => {
                self.runs.insert(id, id);
            }
        }
        self.len += 1;
        true
    }

    /// Takes `id` out; false if it was not there.
    pub fn remove(&mut self, id: &u64) -> bool {
        let id = *id;
        let Some((first, last)) = self.run_of(id) else {
            return false;
        };
        self.runs.remove(&first);
        if first < id {
            self.runs.insert(first, id - 1);
        }
        if id < last {
            self.runs.insert(id + 1, last);
        }
        self.len -= 1;
        true
    }

    /// The lowest id that is `from` or above.
    pub fn first_from(&self, from: u64) -> Option<u64> {
        if self.contains(&from) {
            return Some(from);
        }
        self.runs.range(from..).next().map(|(&first, _)| first)
    }

    /// Every id, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|(&first, &last)| first..=last)
    }
}

impl fmt::Debug for IdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.runs.iter().map(|(a, b)| a..=b))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::state::SegState;

    fn seg(bytes: u64) -> Segment {
        Segment {
            bytes,
            files: 1,
            fingerprint: [bytes as u8; 32],
            piece_index: 0,
            piece_count: 0,
            target: 0,
            state: SegState::Pending,
            leases: 0,
            attempts: 0,
            not_before_ms: 0,
            hashes: Default::default(),
            last_error: Default::default(),
        }
    }

    /// xorshift64*: a seeded sequence, so a failure replays.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Mostly small ids (dense chunks and runs), some at the edges of the id space.
        fn id(&mut self) -> u64 {
            match self.next() % 8 {
                0 => u64::MAX - self.next() % 130,
                1 => self.next(),
                _ => self.next() % 300,
            }
        }
    }

    #[test]
    fn a_segment_map_answers_as_a_btree_map_would() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut ours = SegmentMap::default();
            let mut model: BTreeMap<(u64, u64), Segment> = BTreeMap::new();
            for step in 0..3000 {
                let key = (rng.next() % 3, rng.id());
                match rng.next() % 4 {
                    0 | 1 => {
                        let s = seg(step);
                        assert_eq!(ours.insert(key, s.clone()), model.insert(key, s));
                    }
                    2 if rng.next().is_multiple_of(50) => {
                        let mid = key.0;
                        let want: Vec<u64> = model
                            .range((mid, 0)..=(mid, u64::MAX))
                            .map(|(&(_, id), _)| id)
                            .collect();
                        model.retain(|&(m, _), _| m != mid);
                        assert_eq!(ours.remove_migration(mid), want, "seed {seed}");
                    }
                    2 => assert_eq!(ours.remove(&key), model.remove(&key), "seed {seed}"),
                    _ => {
                        if let Some(s) = ours.get_mut(&key) {
                            s.attempts += 1;
                        }
                        if let Some(s) = model.get_mut(&key) {
                            s.attempts += 1;
                        }
                    }
                }
                assert_eq!(ours.get(&key), model.get(&key), "seed {seed}");
                assert_eq!(ours.len(), model.len());
                let (m, a, b) = (rng.next() % 3, rng.id(), rng.id());
                let (lo, hi) = ((m, a.min(b)), (m, a.max(b)));
                let got: Vec<_> = ours.range(lo..hi).map(|(k, s)| (k, s.bytes)).collect();
                let want: Vec<_> = model.range(lo..hi).map(|(&k, s)| (k, s.bytes)).collect();
                assert_eq!(got, want, "seed {seed}: range {lo:?}..{hi:?}");
                let got: Vec<_> = ours.range(lo..=hi).map(|(k, _)| k).collect();
                let want: Vec<_> = model.range(lo..=hi).map(|(&k, _)| k).collect();
                assert_eq!(got, want, "seed {seed}: range {lo:?}..={hi:?}");
                let (from, to) = (Bound::Excluded(lo), Bound::Included(hi));
                let got: Vec<_> = ours.range((from, to)).map(|(k, _)| k).collect();
                let want: Vec<_> = model.range((from, to)).map(|(&k, _)| k).collect();
                assert_eq!(got, want, "seed {seed}: range ({from:?}, {to:?})");
                let got: Vec<_> = ours.range(lo..).take(5).map(|(k, _)| k).collect();
                let want: Vec<_> = model.range(lo..).take(5).map(|(&k, _)| k).collect();
                assert_eq!(got, want, "seed {seed}: range {lo:?}..");
                if lo < hi {
                    assert_eq!(ours.range(hi..lo).count(), 0, "seed {seed}: reversed");
                    assert_eq!(ours.range(hi..=lo).count(), 0, "seed {seed}: reversed");
                }
            }
            let all: Vec<_> = ours.iter().map(|(k, s)| (k, s.clone())).collect();
            let want: Vec<_> = model.iter().map(|(&k, s)| (k, s.clone())).collect();
            assert_eq!(all, want, "seed {seed}");
            // One content, one shape: rebuilt in another order it is equal.
            let rebuilt: SegmentMap = model.clone().into_iter().rev().collect();
            assert_eq!(rebuilt, ours, "seed {seed}");
        }
    }

    #[test]
    fn a_segment_map_is_encoded_as_the_btree_map_it_replaced() {
        let model: BTreeMap<(u64, u64), Segment> = [(1, 0), (1, 63), (1, 64), (2, u64::MAX)]
            .into_iter()
            .map(|k| (k, seg(k.1)))
            .collect();
        let ours: SegmentMap = model.clone().into_iter().collect();
        let pairs: Vec<_> = model.iter().collect();
        let bytes = crate::codec::encode(&ours).unwrap();
        assert_eq!(bytes, crate::codec::encode(&pairs).unwrap());
        let back: SegmentMap = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back, ours);
        let json = serde_json::to_string(&ours).unwrap();
        assert_eq!(json, serde_json::to_string(&pairs).unwrap());
        assert_eq!(serde_json::from_str::<SegmentMap>(&json).unwrap(), ours);
    }

    #[test]
    fn an_id_set_answers_as_a_btree_set_would() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let mut ours = IdSet::default();
            let mut model = BTreeSet::new();
            for _ in 0..5000 {
                let id = rng.id();
                if rng.next().is_multiple_of(3) {
                    assert_eq!(ours.remove(&id), model.remove(&id), "seed {seed}");
                } else {
                    assert_eq!(ours.insert(id), model.insert(id), "seed {seed}");
                }
                assert_eq!(ours.len(), model.len());
                let from = rng.id();
                assert_eq!(
                    ours.first_from(from),
                    model.range(from..).next().copied(),
                    "seed {seed}"
                );
                // Runs never touch: the shape is canonical.
                let runs: Vec<_> = ours.runs.iter().map(|(&a, &b)| (a, b)).collect();
                for w in runs.windows(2) {
                    assert!(
                        w[0].1 < w[1].0 && w[1].0 - w[0].1 > 1,
                        "seed {seed}: {runs:?}"
                    );
                }
            }
            assert!(ours.iter().eq(model.iter().copied()), "seed {seed}");
            let mut rebuilt = IdSet::default();
            for &id in model.iter().rev() {
                rebuilt.insert(id);
            }
            assert_eq!(rebuilt, ours, "seed {seed}");
        }
    }
}
