//! QEMU refuses a ferry-native stream (the other half of "the receiver checks the idstrs": our
//! reader refuses QEMU's streams, host-plugin/src/native/stream/tests.rs). A native stream must
//! never load into a QEMU by mistake, e.g. a forward pointed at the wrong destination.

use std::time::{Duration, Instant};

use ferry_host::native::stream::{RamBlock, StreamWriter, PAGE_SIZE};

fn native_stream(mem: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = StreamWriter::new(vec![RamBlock { slot: 0, guest_addr: 0, len: mem }], &mut out).unwrap();
    for last in [false, true] {
        w.begin_pass(last, &mut out).unwrap();
        w.page(0, 0x1000, &[0x90; PAGE_SIZE], &mut out).unwrap();
        w.page(0, 0x2000, &[0; PAGE_SIZE], &mut out).unwrap();
        w.end_pass(&mut out).unwrap();
    }
    w.finish(&[1, 2, 3], &mut out).unwrap();
    out
}

/// Runs an incoming QEMU on `stream` and returns its stderr; it must exit with an error.
fn qemu_load(qemu: &std::path::Path, stream: &[u8], extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("native.stream");
    std::fs::write(&file, stream).unwrap();
    let mut child = std::process::Command::new(qemu)
        .args(["-nodefaults", "-display", "none", "-machine", "q35,accel=tcg", "-m", "16", "-S"])
        .args(extra)
        .arg("-incoming")
        .arg(format!("file:{}", file.display()))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU kept running on a native stream (it must refuse it)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "QEMU loaded a native stream: {status}, {err}");
    err
}

#[test]
fn qemu_refuses_a_native_stream() {
    let Some(qemu) = ferry_netem::qemu::qemu_binary() else {
        println!("skipping: qemu-system-x86_64 not installed");
        return;
    };
    let stream = native_stream(16 << 20);
    let err = qemu_load(&qemu, &stream, &[]);
    eprintln!("QEMU: {}", err.trim());
    assert!(err.contains("Configuration section missing"), "refused for the missing configuration section: {err}");
    // Without the configuration check, the RAM block names stop it.
    let err = qemu_load(&qemu, &stream, &["-global", "migration.send-configuration=off"]);
    eprintln!("QEMU (send-configuration=off): {}", err.trim());
    assert!(err.contains("ferry.slot0@0x0"), "refused for the unknown RAM block: {err}");
}
