//! A data stream as a hostile source sends it to a target: the length-prefixed segment header
//! (at most `MAX_HEADER` bytes, however long the prefix says), its entries turned into the
//! target's own, the trailer, and on the source's side the ack. Nothing panics, nothing
//! allocates more than the limits allow (libFuzzer's -malloc_limit_mb catches that), and every
//! entry that converts keeps within the target's bounds or is refused by them.
#![no_main]

use ferry_agent::frame::{self, MAX_HEADER, MAX_SMALL_FRAME};
use ferry_agent::segment::{Entry, MAX_BUNDLE_ENTRIES};
use ferry_proto::data as pb;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut stream = data;
        let Ok(header) = frame::read::<pb::SegmentHeader, _>(&mut stream, MAX_HEADER).await else {
            return;
        };
        let entries: Result<Vec<Entry>, _> =
            header.entries.into_iter().map(Entry::try_from).collect();
        if let Ok(entries) = entries {
            if entries.len() <= MAX_BUNDLE_ENTRIES {
                // What the target sums before it reads a byte: never overflows.
                let _total = entries
                    .iter()
                    .map(Entry::wire_len)
                    .fold(0u64, u64::saturating_add);
                for e in &entries {
                    let _ =
                        ferry_common::path::validate_relative(ferry_common::path::bytes(&e.path));
                }
            }
        }
        let _ = frame::read::<pb::SegmentTrailer, _>(&mut stream, MAX_SMALL_FRAME).await;
        let mut again = data;
        let _ = frame::read::<pb::SegmentAck, _>(&mut again, MAX_SMALL_FRAME).await;
    });
});
