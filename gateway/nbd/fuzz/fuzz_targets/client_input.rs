//! Hostile server bytes into the client core, in pieces whose sizes the input picks; once the
//! handshake ends the client queues `loopback::queue_fuzz_requests`. Must never panic and never
//! take more input than offered.
#![no_main]

use ferry_nbd::loopback::queue_fuzz_requests;
use ferry_nbd::{Client, ClientConfig, ClientEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, mut input)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let mut config = ClientConfig::new("disk");
    config.limits.max_payload = 1 << 20;
    let mut client = Client::new(config);
    while !input.is_empty() {
        let offered = &input[..input.len().min(piece)];
        let Ok(used) = client.handle_input(offered) else { return };
        assert!(used <= offered.len());
        input = &input[used..];
        let mut events = 0;
        while let Some(event) = client.poll_event() {
            events += 1;
            if let ClientEvent::Ready(_) = event {
                // A hostile server may announce a tiny export; then the requests are refused.
                let _ = queue_fuzz_requests(&mut client);
            }
        }
        let _ = client.poll_transmit();
        if used == 0 && events == 0 {
            return; // closed (disconnect never happens here) or waiting: nothing more to do
        }
    }
});
