//! Hostile bytes into the vCPU state decoder: never a panic; what decodes re-encodes to a
//! decodable state.
#![no_main]

use ferry_host::native::vcpu_state::VcpuState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = VcpuState::decode(data) {
        let again = VcpuState::decode(&state.encode()).expect("a decoded state re-encodes");
        assert_eq!(again.encode(), state.encode());
    }
});
