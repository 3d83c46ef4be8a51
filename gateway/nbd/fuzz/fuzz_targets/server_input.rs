//! Hostile client bytes into the server core, in pieces whose sizes the input picks; requests
//! are answered as `loopback::answer_for_fuzz` does. Must never panic and never take more
//! input than offered.
#![no_main]

use ferry_nbd::loopback::{answer_for_fuzz, EXPORT_SIZE};
use ferry_nbd::{Server, ServerConfig, ServerEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, mut input)) = data.split_first() else { return };
    let piece = usize::from(piece).max(1);
    let mut config = ServerConfig::new("disk", EXPORT_SIZE);
    config.limits.max_payload = 1 << 20;
    let mut server = Server::new(config);
    while !input.is_empty() {
        let offered = &input[..input.len().min(piece)];
        let Ok(used) = server.handle_input(offered) else { return };
        assert!(used <= offered.len());
        input = &input[used..];
        let mut events = 0;
        while let Some(event) = server.poll_event() {
            events += 1;
            if let ServerEvent::Request(request) = event {
                answer_for_fuzz(&mut server, &request).expect("answering a request the core handed out");
            }
        }
        let _ = server.poll_transmit();
        if used == 0 && events == 0 {
            assert!(server.is_closed(), "no progress on an open connection");
            return;
        }
    }
});
