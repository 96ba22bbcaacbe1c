//! Random ids (cluster ids, migration uuids, process sessions): 128 bits from the kernel's
//! random source, mixed with the time and process id so that a machine without `/dev/urandom`
//! still gets distinct ids.

/// A random 128-bit id as 32 lowercase hex digits.
pub fn random_id() -> String {
    crate::hash::hex(&random_bytes::<16>())
}

/// Whether `id` is usable as an id from a peer (a cluster id, a migration uuid) where it
/// becomes part of a local path: not empty, ASCII letters, digits and `-` only.
pub fn is_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
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
    fn ids_from_peers_cannot_name_other_paths() {
        assert!(super::is_id(&super::random_id()));
        assert!(super::is_id("cluster-1"));
        for bad in ["", "..", "a/b", "a b", "a\0"] {
            assert!(!super::is_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_distinct_hex() {
        let (a, b) = (super::random_id(), super::random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
