//! BLAKE3 helpers.

/// Length of a BLAKE3 digest in bytes.
pub const HASH_LEN: usize = 32;

/// Lower-case hex of a digest (or any bytes), for reports and logs.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses a 32-byte digest from a message field, or `None` when it has the wrong length.
pub fn digest_from_slice(bytes: &[u8]) -> Option<[u8; HASH_LEN]> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_of_known_digest() {
        let d = blake3::hash(b"");
        assert_eq!(
            super::hex(d.as_bytes()),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert!(super::digest_from_slice(&[0u8; 31]).is_none());
    }
}
