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

/// The length of the encoding of `v`, measured without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(v: &T) -> Result<usize, CodecError> {
    Ok(postcard::serialize_with_flavor(
        v,
        postcard::ser_flavors::Size::default(),
    )?)
}

/// Writes the encoding of `v` to `w` and hands `w` back: a snapshot of millions of segments
/// goes to its file without ever being whole in memory. postcard writes a few bytes at a time,
/// so `w` should be buffered.
pub fn encode_to<T: Serialize + ?Sized, W: std::io::Write>(v: &T, w: W) -> Result<W, CodecError> {
    Ok(postcard::to_io(v, w)?)
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
    fn a_value_written_to_a_writer_is_its_encoding_of_the_measured_length() {
        let v: Vec<(u64, String)> = (0..10_000u64).map(|i| (i << 40, i.to_string())).collect();
        let out = encode_to(&v, vec![7; 32]).unwrap();
        assert_eq!(&out[..32], &[7; 32]);
        assert_eq!(out[32..], encode(&v).unwrap());
        assert_eq!(out.len() - 32, encoded_len(&v).unwrap());
        assert_eq!(decode::<Vec<(u64, String)>>(&out[32..]).unwrap(), v);
    }
}
