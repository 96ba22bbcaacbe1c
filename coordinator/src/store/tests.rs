//! openraft's storage suite on the sled store, plus ferry's own crash-recovery checks.

use openraft::testing::{StoreBuilder, Suite};

use super::*;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}

#[test]
fn refuses_other_format_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).unwrap());
    {
        let db = sled::open(dir.path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &99u64.to_be_bytes()).unwrap();
        meta.flush().unwrap();
    }
    let err = open(dir.path()).err().expect("must refuse").to_string();
    assert!(err.contains("format version 99"), "{err}");
}
