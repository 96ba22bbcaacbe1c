//! The binary encoding of everything the coordinator stores or sends between nodes: Raft log
//! entries, state machine records, snapshots and Raft RPCs. postcard (serde, varint integers,
//! raw byte arrays) is several times smaller and faster than JSON for these records — a segment
//! record is ~100 bytes instead of ~400 — which is what lets a node hold millions of segments.
//!
//! Not self-describing: a record can only be read by the type that wrote it, so any change to a
//! stored type must bump [`crate::store::FORMAT_VERSION`].

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("binary record: {0}")]
pub struct CodecError(#[from] postcard::Error);

/// Encodes `v`.
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_stdvec(v)?)
}

/// Appends the encoding of `v` to `out`, which grows once, to the size the encoding is measured
/// at first: a snapshot of millions of segments is hundreds of MiB, and a buffer grown by
/// doubling holds up to twice that, or (where the allocator copies on `realloc`) the old and the
/// new buffer at once.
pub fn encode_into<T: Serialize + ?Sized>(v: &T, mut out: Vec<u8>) -> Result<Vec<u8>, CodecError> {
    let size = postcard::serialize_with_flavor(v, postcard::ser_flavors::Size::default())?;
    out.reserve_exact(size);
    Ok(postcard::to_extend(v, out)?)
}

/// Decodes a `T` that must fill `bytes` exactly.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (v, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(CodecError(postcard::Error::DeserializeBadEncoding));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_into_appends_the_encoding_after_one_exact_growth() {
        let v: Vec<(u64, String)> = (0..10_000u64).map(|i| (i << 40, i.to_string())).collect();
        let out = encode_into(&v, vec![7; 32]).unwrap();
        assert_eq!(&out[..32], &[7; 32]);
        assert_eq!(out[32..], encode(&v).unwrap());
        assert_eq!(decode::<Vec<(u64, String)>>(&out[32..]).unwrap(), v);
        // Grown once, to the measured size: no doubling left unused room.
        assert_eq!(out.capacity(), out.len());
    }
}
