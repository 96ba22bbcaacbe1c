//! Any bytes a peer names as a path: a path that passes `validate_relative` names exactly one
//! place strictly below the root (no `..`, `.`, empty or absolute component, no NUL, within
//! PATH_MAX and NAME_MAX) and keeps its bytes; `validate_subdir` the same or the root itself.
//! Showing a path to a person never panics.
#![no_main]

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use ferry_common::path::{
    display, escape, validate_relative, validate_subdir, MAX_NAME_LEN, MAX_PATH_LEN,
};
use libfuzzer_sys::fuzz_target;

fn strictly_below(p: &Path, input: &[u8]) {
    assert!(p.as_os_str().len() <= MAX_PATH_LEN);
    assert!(!p.as_os_str().as_bytes().contains(&0), "NUL passed");
    for c in p.components() {
        match c {
            Component::Normal(n) => assert!(n.len() <= MAX_NAME_LEN, "overlong name passed"),
            other => panic!("{other:?} passed in {:?}", escape(input)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = escape(data);
    if let Ok(p) = validate_relative(data) {
        assert!(p.components().next().is_some(), "an empty path passed");
        strictly_below(&p, data);
        // The bytes that passed are the bytes that will be used.
        assert_eq!(p.as_os_str().as_bytes(), data);
        let _ = display(&p);
    }
    if let Ok(p) = validate_subdir(data) {
        strictly_below(&p, data);
    }
});
