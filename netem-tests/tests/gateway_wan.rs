//! The gateway pair across an emulated long fat lossy WAN: bytes arrive byte-identical.
//! Needs root (network namespaces); skips with a message otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_netem::bulk::{self, Receiver};
use ferry_netem::gateway_pair::{GatewayPair, PairLink};
use ferry_netem::Wan;

#[test]
fn bulk_256mib_crosses_150ms_1pct_loss_byte_identical() {
    if !ferry_testkit::sys::is_root() {
        println!("skipping: needs root");
        return;
    }
    let wan = Wan::builder()
        .rtt(Duration::from_millis(150))
        .rate_bps(1_000_000_000)
        .loss(0.01)
        .up()
        .expect("WAN up");
    let target = SocketAddr::from((wan.site_b().addr(), 5003));
    let pair = GatewayPair::start(&wan, PairLink { bandwidth: "1gbit".into(), rtt: "150ms".into(), codec: false }, target).expect("gateways");
    let len = 256u64 << 20;
    let receiver = Receiver::start(wan.site_b(), target, Duration::ZERO, Duration::from_secs(240), true).expect("receiver");
    let started = std::time::Instant::now();
    let sent = bulk::send(wan.site_a(), pair.forward_addr, 42, len, Duration::from_secs(240)).expect("send");
    let got = receiver.finish().expect("receive");
    let secs = started.elapsed().as_secs_f64();
    println!("256 MiB over 150 ms / 1 % loss via gateways in {secs:.1} s ({:.0} Mbit/s), backend {:?}", len as f64 * 8.0 / secs / 1e6, wan.backend());
    assert_eq!(sent, len);
    assert_eq!(got.bytes, len);
    assert_eq!(got.digest, Some(bulk::payload_digest(42, len)), "bytes differ after crossing the WAN");
    drop(pair);
}
