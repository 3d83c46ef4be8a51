//! Announcement frames sent through a real Linux bridge inside a private network namespace.
//!
//! Topology, all inside one namespace created for the test (and deleted by a guard on drop,
//! panics included):
//!
//! ```text
//!   vm0 ──veth── vm0p ─┐
//!                      br0 (STP off, multicast snooping off)
//!   cap0 ──veth── cap0p┘
//! ```
//!
//! The announcer sends out of `vm0`; a raw `ETH_P_ALL` socket on `cap0` captures what the bridge
//! forwards, and every captured frame is compared byte for byte with the sans-IO builder's output.
//! Needs root (namespaces, raw sockets); prints a SKIP line and passes otherwise.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_testkit::capture::{src_mac, Capture};
use ferry_testkit::sys::{enter_netns, ip_in, is_root, run};

use ferry_host::announce::{
    announce, announce_blocking, default_schedule, frames, AnnounceError, Announcement, MacAddr,
    PacketSocket,
};

/// Source MAC of the warm-up probe frames (locally administered, distinct from the VM's).
const PROBE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// IEEE local experimental ethertype, used for the probe.
const PROBE_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

static NETNS_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace that exists for as long as this guard does.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        let name = format!(
            "ferry-ann-{}-{}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // A leftover from an earlier killed run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    /// Runs `ip -n <ns> <args>` and panics with its stderr on failure.
    fn ip(&self, args: &[&str]) {
        ip_in(&self.name, args);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: cannot run ip netns del {}: {e}", self.name),
        }
    }
}

/// Sends probe frames out of `vm0` until one arrives on `cap0`: the veths, the bridge ports and
/// the qdiscs come up asynchronously after `ip link set up`.
fn wait_for_path(capture: &Capture) {
    let sender = PacketSocket::open("vm0").expect("open vm0");
    let mut probe = vec![0xff; 6];
    probe.extend_from_slice(&PROBE_MAC);
    probe.extend_from_slice(&PROBE_ETHERTYPE);
    probe.resize(60, 0);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        // Sends can fail with ENETDOWN while the link is still coming up.
        let _ = sender.send(&probe);
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            if capture.recv().is_some_and(|f| src_mac(&f) == PROBE_MAC) {
                return;
            }
        }
    }
    panic!("bridge path vm0 -> cap0 did not come up within 3 s");
}

/// Captures frames from `mac` on a background thread until `stop` is set.
fn spawn_capture(
    capture: Capture,
    mac: MacAddr,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(Instant, Vec<u8>)>> {
    thread::spawn(move || {
        let mut got = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(frame) = capture.recv() {
                if src_mac(&frame) == mac.octets() {
                    got.push((Instant::now(), frame));
                }
            }
        }
        got
    })
}

/// Lets `settle` pass after the sender finished (delivery is near-immediate; the wait also
/// catches any extra frames), then stops the capture thread and returns what it saw.
fn collect(
    handle: thread::JoinHandle<Vec<(Instant, Vec<u8>)>>,
    stop: &AtomicBool,
    settle: Duration,
) -> Vec<(Instant, Vec<u8>)> {
    thread::sleep(settle);
    stop.store(true, Ordering::Relaxed);
    handle.join().expect("capture thread panicked")
}

/// The test body, run on a thread that has entered the namespace.
fn body(ns_name: &str) {
    enter_netns(ns_name).expect("setns into test namespace");

    let ann = Announcement {
        mac: "52:54:00:12:34:56".parse().expect("literal MAC"),
        ipv4: vec![Ipv4Addr::new(192, 0, 2, 10)],
        ipv6: vec!["2001:db8::10".parse::<Ipv6Addr>().expect("literal IPv6")],
    };
    let expected = frames(&ann);
    assert_eq!(expected.len(), 3, "RARP + GARP + NA");
    let schedule = default_schedule();

    let capture = Capture::open("cap0").expect("open capture socket on cap0");
    wait_for_path(&capture);

    // --- async sender, default QEMU schedule ---
    let stop = Arc::new(AtomicBool::new(false));
    let handle = spawn_capture(capture, ann.mac, Arc::clone(&stop));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let report = rt
        .block_on(announce("vm0", &ann, &schedule))
        .expect("announce on vm0");
    let send_time = started.elapsed();
    assert_eq!(report.rounds, 5);
    assert_eq!(report.frames_sent, 15);
    assert!(
        send_time >= Duration::from_millis(800),
        "schedule finished early: {send_time:?}"
    );
    let got = collect(handle, &stop, Duration::from_millis(200));

    assert_eq!(
        got.len(),
        schedule.len() * expected.len(),
        "expected {} rounds x {} frames",
        schedule.len(),
        expected.len()
    );
    let mut sorted_expected = expected.clone();
    sorted_expected.sort();
    let mut round_starts = Vec::new();
    for (round, chunk) in got.chunks(expected.len()).enumerate() {
        // Frames of one round are sent back to back; compare as a set in case the kernel's
        // per-CPU backlog reorders within a round, then byte for byte.
        let mut frames_of_round: Vec<Vec<u8>> = chunk.iter().map(|(_, f)| f.clone()).collect();
        frames_of_round.sort();
        for (i, (g, e)) in frames_of_round.iter().zip(&sorted_expected).enumerate() {
            assert_eq!(
                g, e,
                "round {round}, frame {i}: captured bytes differ from the builder's"
            );
        }
        round_starts.push(chunk[0].0);
    }
    // In-order delivery is the normal case; check it outright.
    let in_order: Vec<&Vec<u8>> = got.iter().map(|(_, f)| f).collect();
    let want_order: Vec<&Vec<u8>> = expected.iter().cycle().take(got.len()).collect();
    if in_order != want_order {
        eprintln!("note: frames within a round arrived reordered");
    }
    // Rounds must be spaced at least as the schedule says (sleeps never end early); allow 20 ms
    // for delivery jitter of the first frame of a round.
    for w in 1..round_starts.len() {
        let gap = round_starts[w] - round_starts[w - 1];
        let want = schedule[w] - schedule[w - 1];
        assert!(
            gap + Duration::from_millis(20) >= want,
            "round {w} came {gap:?} after round {}, schedule says {want:?}",
            w - 1
        );
    }

    // --- blocking sender, custom schedule ---
    let capture = Capture::open("cap0").expect("reopen capture socket on cap0");
    let stop = Arc::new(AtomicBool::new(false));
    let handle = spawn_capture(capture, ann.mac, Arc::clone(&stop));
    let custom = [Duration::ZERO, Duration::from_millis(30)];
    let report = announce_blocking("vm0", &ann, &custom).expect("announce_blocking on vm0");
    assert_eq!((report.rounds, report.frames_sent), (2, 6));
    let got = collect(handle, &stop, Duration::from_millis(150));
    assert_eq!(
        got.len(),
        6,
        "blocking sender: expected 2 rounds x 3 frames"
    );
    let mut all: Vec<Vec<u8>> = got.into_iter().map(|(_, f)| f).collect();
    all.sort();
    let mut want: Vec<Vec<u8>> = expected.iter().chain(&expected).cloned().collect();
    want.sort();
    assert_eq!(all, want);

    // --- errors name the interface ---
    let err = announce_blocking("nosuch0", &ann, &custom).expect_err("missing interface");
    assert_eq!(err.to_string(), "no such interface nosuch0");
    let err = announce_blocking("down0", &ann, &custom).expect_err("interface is down");
    assert!(matches!(err, AnnounceError::Send { .. }), "{err:?}");
    assert!(err.to_string().contains("down0"), "{err}");
}

#[test]
fn announcement_crosses_bridge_byte_for_byte() {
    if !is_root() {
        println!("SKIP announcement_crosses_bridge_byte_for_byte: needs root (network namespaces, raw sockets)");
        return;
    }
    let started = Instant::now();
    let ns = Netns::create();
    ns.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "mcast_snooping",
        "0",
    ]);
    ns.ip(&["link", "add", "vm0", "type", "veth", "peer", "name", "vm0p"]);
    ns.ip(&[
        "link", "add", "cap0", "type", "veth", "peer", "name", "cap0p",
    ]);
    ns.ip(&[
        "link", "add", "down0", "type", "veth", "peer", "name", "down0p",
    ]); // left down
    ns.ip(&["link", "set", "vm0p", "master", "br0"]);
    ns.ip(&["link", "set", "cap0p", "master", "br0"]);
    for dev in ["br0", "vm0p", "cap0p", "vm0", "cap0"] {
        ns.ip(&["link", "set", dev, "up"]);
    }

    let name = ns.name.clone();
    let outcome = thread::spawn(move || body(&name)).join();
    // `ns` is dropped (namespace deleted) on both paths, including the re-raised panic.
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    println!("announce netns test took {:?}", started.elapsed());
}
