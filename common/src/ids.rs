//! Random ids (cluster ids, migration uuids, process sessions): 128 bits from the kernel's
//! random source, mixed with the time and process id so that a machine without `/dev/urandom`
//! still gets distinct ids.

/// A random 128-bit id as 32 lowercase hex digits.
pub fn random_id() -> String {
    crate::hash::hex(&random_bytes::<16>())
}

/// `N` random bytes (at most 32).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    let mut h = blake3::Hasher::new();
    h.update(&seed);
    h.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    let mut out = [0u8; N];
    out.copy_from_slice(&h.finalize().as_bytes()[..N]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_distinct_hex() {
        let (a, b) = (super::random_id(), super::random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
