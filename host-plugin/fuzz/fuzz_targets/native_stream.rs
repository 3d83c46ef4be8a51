//! Hostile bytes into the native stream reader, offered in growing pieces whose size the input
//! picks (as a socket delivers them). Must never panic, never use more than offered, and always
//! make progress or ask for more.
#![no_main]

use ferry_host::native::stream::{ReaderLimits, Step, StreamReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, input)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let mut reader = StreamReader::new(ReaderLimits { max_state: 64 << 10, max_memory: 1 << 30 });
    let (mut pos, mut avail) = (0, input.len().min(piece));
    loop {
        match reader.next(&input[pos..avail]) {
            Err(_) => return,
            Ok(Step::Event { consumed, .. }) => {
                assert!(consumed > 0 && consumed <= avail - pos);
                pos += consumed;
                if reader.is_done() {
                    return;
                }
            }
            Ok(Step::NeedMore(n)) => {
                assert!(n > avail - pos, "asks for more than it was offered");
                if avail == input.len() {
                    return;
                }
                avail = (avail + piece).min(input.len());
            }
        }
    }
});
