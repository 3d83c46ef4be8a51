//! The native path against the real KVM: dirty log, vCPU kick, save/restore, local pre-copy.
//!
//! KVM here may emulate every guest instruction (~1 µs each), so guests are tiny, the work is
//! sized in guest instructions from a calibration at start, and every test is capped at 30 s.
//! Where `/dev/kvm` cannot be opened or a vCPU cannot run, each test prints why and passes
//! as skipped.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_host::native::microvm::{calibrate, Calibration, GuestParams, MicroVm, MicroVmConfig, DATA_ADDR};
use ferry_host::native::precopy::{self, PrecopyPolicy};
use ferry_host::native::stream::{ReaderLimits, PAGE_SIZE};
use ferry_host::native::vcpu_state::VcpuState;
use vm_memory::{Bytes, GuestAddress};

const TEST_CAP: Duration = Duration::from_secs(30);

/// The calibration (once per test binary), or why KVM is unusable.
fn kvm(test: &str) -> Option<Calibration> {
    static CAL: OnceLock<Result<Calibration, String>> = OnceLock::new();
    let cal = CAL.get_or_init(|| {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return Err(format!("/dev/kvm cannot be opened: {e}"));
        }
        let c = calibrate(Duration::from_millis(300)).map_err(|e| format!("a vCPU cannot run: {e}"))?;
        eprintln!("calibration: {:.3} µs per guest instruction ({} reports, {} instructions per exit)", c.us_per_instruction, c.reports, c.instructions_per_exit);
        Ok(c)
    });
    match cal {
        Ok(c) => Some(*c),
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// Runs `body` on its own thread and fails the test if it takes longer than [`TEST_CAP`].
fn capped(body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(TEST_CAP) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(t.join().unwrap_err()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("test exceeded {TEST_CAP:?}"),
    }
}

/// Waits until the guest has reported `n` times.
fn wait_reports(vm: &MicroVm, n: u64, limit: Duration) {
    let t0 = Instant::now();
    while vm.reports().count < n {
        assert!(t0.elapsed() < limit, "guest reported {} of {n} times in {limit:?} (vCPU: {:?})", vm.reports().count, vm.vcpu_error());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn k_pages_written_give_exactly_k_dirty_bits_and_vmm_writes_only_the_bitmap() {
    let Some(_) = kvm("dirty bits") else { return };
    capped(|| {
        let k = 37u32;
        let mut vm = MicroVm::new(MicroVmConfig { mem_size: 2 << 20, guest: GuestParams { pages: k, delay: 0, report_every_log2: 0 } }).unwrap();
        vm.start_dirty_log().unwrap();
        vm.resume().unwrap();
        wait_reports(&vm, 3, Duration::from_secs(10)); // two whole rounds since the log started
        vm.pause().unwrap();
        let log = vm.kvm_dirty_log().unwrap();
        let first = DATA_ADDR / PAGE_SIZE as u64;
        assert_eq!(log.ranges(), vec![first..first + u64::from(k)], "exactly the {k} data pages (the code page is only read)");
        assert_eq!(vm.kvm_dirty_log().unwrap().count(), 0, "reading the log reset it");
        assert_eq!(vm.vmm_dirty_bitmap().count(), 0, "the VMM wrote nothing since the log started");
        // A VMM write through vm-memory: only in vm-memory's bitmap.
        vm.memory().write_obj(0xfeed_u64, GuestAddress(300 * 4096 + 8)).unwrap();
        assert_eq!(vm.kvm_dirty_log().unwrap().count(), 0, "KVM's log does not see VMM writes");
        assert_eq!(vm.vmm_dirty_bitmap().ranges(), vec![300..301]);
        // The union sees both.
        vm.resume().unwrap();
        wait_reports(&vm, vm.reports().count + 2, Duration::from_secs(10));
        vm.pause().unwrap();
        vm.memory().write_obj(1u8, GuestAddress(400 * 4096)).unwrap();
        assert_eq!(vm.dirty_pages().unwrap().ranges(), vec![first..first + u64::from(k), 400..401]);
    });
}

#[test]
fn a_kick_stops_the_vcpu_between_exits() {
    let Some(cal) = kvm("vCPU kick") else { return };
    capped(move || {
        // One exit every 2^20 rounds of ~140 instructions: minutes apart at ~1 µs each.
        let guest = GuestParams { pages: 8, delay: 50, report_every_log2: 20 };
        let exit_every = Duration::from_secs_f64(guest.instructions_per_report() as f64 * cal.us_per_instruction / 1e6);
        let vm = MicroVm::new(MicroVmConfig { mem_size: 1 << 20, guest }).unwrap();
        let mut latencies = Vec::new();
        for _ in 0..10 {
            vm.resume().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            latencies.push(vm.pause().unwrap());
        }
        latencies.sort();
        eprintln!("pause latency with a kick: min {:?} median {:?} max {:?} (exits {exit_every:?} apart)", latencies[0], latencies[5], latencies[9]);
        assert_eq!(vm.reports().count, 0, "no exit happened: the kick alone stopped the vCPU");
        // Without the kick, pause() would wait for the next exit, minutes away, and time out.
        assert!(latencies[9] < Duration::from_millis(500), "a kick stops the vCPU at once, not at its next exit: {latencies:?}");
        // The guest did run between the pauses.
        let before = vm.save_state().unwrap().regs.rax;
        assert!(before > 0, "the counter advanced");
        // A second resume of a running vCPU is a no-op: it must not resume the next pause.
        vm.resume().unwrap();
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        vm.pause().unwrap();
        let paused_at = vm.save_state().unwrap().regs.rax;
        assert!(paused_at > before);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!vm.is_running());
        assert_eq!(vm.save_state().unwrap().regs.rax, paused_at, "paused means paused");
    });
}

#[test]
fn save_and_restore_into_a_fresh_vm_continues_the_counter() {
    let Some(_) = kvm("save/restore") else { return };
    capped(|| {
        let guest = GuestParams { pages: 16, delay: 20, report_every_log2: 3 };
        let mem_size = 1 << 20;
        let src = MicroVm::new(MicroVmConfig { mem_size, guest }).unwrap();
        src.resume().unwrap();
        wait_reports(&src, 5, Duration::from_secs(10));
        src.pause().unwrap();
        let last_src = src.reports().last.unwrap().0;
        let state = src.save_state().unwrap();
        let counter = state.regs.rax as u32;
        assert!(counter >= last_src);
        let encoded = state.encode();
        eprintln!("vCPU state: {} bytes encoded, {} MSRs, xsave {}", encoded.len(), state.msrs.len(), state.xsave.is_some());

        let dst = MicroVm::incoming(mem_size).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..mem_size / PAGE_SIZE as u64 {
            src.read_page(p * 4096, &mut page).unwrap();
            dst.write_page(p * 4096, &page).unwrap();
        }
        assert_eq!(src.memory_digest().unwrap(), dst.memory_digest().unwrap());
        dst.restore_state(VcpuState::decode(&encoded).unwrap()).unwrap();
        dst.resume().unwrap();
        wait_reports(&dst, 3, Duration::from_secs(10));
        dst.pause().unwrap();
        let first_dst = dst.reports().first.unwrap().0;
        let step = 1u32 << guest.report_every_log2;
        assert!(first_dst >= counter && first_dst <= counter + step, "the destination's first report {first_dst} continues from the source's counter {counter} (source's last report {last_src})");
        let r = dst.reports();
        assert_eq!(r.last.unwrap().0, first_dst + (r.count as u32 - 1) * step, "and goes on counting, report after report");
    });
}

#[test]
fn local_precopy_over_a_socketpair_resumes_the_guest_with_equal_memory() {
    let Some(cal) = kvm("local pre-copy") else { return };
    capped(move || {
        let guest = GuestParams { pages: 64, delay: 200, report_every_log2: 4 };
        let mem_size = 4 << 20;
        let mut src = MicroVm::new(MicroVmConfig { mem_size, guest }).unwrap();
        src.resume().unwrap();
        wait_reports(&src, 2, Duration::from_secs(10));
        let round = Duration::from_secs_f64(guest.instructions_per_round() as f64 * cal.us_per_instruction / 1e6);
        // A pass lasts at least 30 rounds, so every pass finds the whole working set dirty
        // and the pre-copy runs its minimum of passes.
        let policy = PrecopyPolicy { min_passes: 4, max_passes: 8, stop_below_pages: 64, min_pass_time: round * 30 };
        let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let receiver = std::thread::spawn(move || precopy::receive(&mut rx, ReaderLimits::default()));
        let report = precopy::send(&mut src, &mut tx, policy).unwrap();
        drop(tx);
        let (dst, received) = receiver.join().unwrap().unwrap();
        let pages_per_pass: Vec<u64> = report.passes.iter().map(|p| p.pages + p.zero_pages).collect();
        eprintln!(
            "pre-copy: round {round:?}; pages per pass {pages_per_pass:?} (zero in pass 0: {}); {} bytes; state {} bytes; pause latency {:?}; paused for {:?} (source side)",
            report.passes[0].zero_pages, report.total_bytes, report.state_bytes, report.pause_latency, report.paused_for
        );
        assert!(report.passes.len() >= 4, "≥ 3 iterations and the final pass: {pages_per_pass:?}");
        assert_eq!(pages_per_pass[0], mem_size / 4096, "pass 0 sends every page");
        // Later passes send what the guest dirtied: its data pages only, the whole working set
        // when the guest ran whole rounds during the pass (a loaded machine may starve it).
        assert!(pages_per_pass[1..].iter().all(|&n| n > 0 && n <= u64::from(guest.pages)), "later passes send only the working set: {pages_per_pass:?}");
        assert!(pages_per_pass[1..].contains(&u64::from(guest.pages)), "a pass of a whole working set: {pages_per_pass:?}");
        assert_eq!(received.pages_per_pass, pages_per_pass);
        assert_eq!(received.total_bytes, report.total_bytes);
        assert_eq!(received.memory_digest, report.memory_digest, "memory equal at the pause");
        assert_eq!(dst.memory_digest().unwrap(), src.memory_digest().unwrap());

        let counter = src.save_state().unwrap().regs.rax as u32;
        let src_reports = src.reports().count;
        drop(src);
        dst.resume().unwrap();
        wait_reports(&dst, 2, Duration::from_secs(10));
        dst.pause().unwrap();
        let first = dst.reports().first.unwrap().0;
        assert!(first >= counter && first <= counter + (1 << guest.report_every_log2), "destination continues: first report {first}, source stopped at {counter} after {src_reports} reports");
    });
}

#[test]
fn microvm_run_answers_on_its_control_socket() {
    use std::io::{BufRead, BufReader, Write};
    let Some(_) = kvm("microvm run") else { return };
    capped(|| {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("vm1.sock");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry-host"))
            .args(["microvm", "run", "--name", "vm1", "--mem", "2MiB", "--pages", "16", "--delay", "100", "--report-every-log2", "2", "--control"])
            .arg(&control)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&control) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    let _ = child.kill();
                    panic!("no control socket: {e}");
                }
            }
        };
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut ask = |cmd: &str| -> serde_json::Value {
            writeln!(&stream, "{{\"cmd\":\"{cmd}\"}}").unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        };
        std::thread::sleep(Duration::from_millis(100));
        let status = ask("status");
        assert_eq!(status["reply"], "status", "{status}");
        assert_eq!(status["running"], true);
        let paused = ask("pause");
        assert_eq!(paused["reply"], "paused", "{paused}");
        let counter = ask("status")["counter"].as_u64().expect("the guest reported");
        let d1 = ask("digest");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ask("digest"), d1, "a paused guest writes nothing");
        assert_eq!(ask("status")["counter"].as_u64(), Some(counter));
        assert_eq!(ask("resume")["reply"], "resumed");
        std::thread::sleep(Duration::from_millis(100));
        assert!(ask("status")["counter"].as_u64().unwrap() > counter, "it counts on after resume");
        assert_eq!(ask("quit")["reply"], "quitting");
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        assert!(!control.exists(), "the socket is removed");
        eprintln!("microvm run: pause latency {} µs over the control socket", paused["latency_us"]);
    });
}

/// Needs no KVM: the refusal comes before any VM is built.
#[test]
fn receive_refuses_a_qemu_stream_before_building_a_vm() {
    let qemu = ferry_testkit::qemu_stream::sample_main_stream(1, 20).bytes;
    let err = precopy::receive(&mut &qemu[..], ReaderLimits::default()).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("not a ferry-native migration stream") && text.contains("configuration"), "{text}");
    let err = precopy::receive(&mut &b"QEVM\0\0\0\x03\x01"[..], ReaderLimits::default()).err().expect("refused");
    assert!(err.to_string().contains("stream ended after 9 bytes"), "{err}");
}

/// A pause that lands on a report exit must complete that `out` before the state is saved
/// (stock KVM advances rip past it only on the next KVM_RUN): else the destination runs the
/// `out` again and repeats the source's last report. (Under PVM, as on this machine, rip is
/// already past the `out` at the exit, so here this passes with or without the completion.)
#[test]
fn a_state_saved_after_a_report_exit_does_not_repeat_the_report() {
    let Some(_) = kvm("pending I/O at save") else { return };
    capped(|| {
        // A report every round of 12 instructions: the vCPU is at an exit most of the time.
        let guest = GuestParams { pages: 1, delay: 0, report_every_log2: 0 };
        let mem_size = 1 << 20;
        for _ in 0..5 {
            let src = MicroVm::new(MicroVmConfig { mem_size, guest }).unwrap();
            src.resume().unwrap();
            wait_reports(&src, 20, Duration::from_secs(10));
            src.pause().unwrap();
            let last = src.reports().last.unwrap().0;
            let state = src.save_state().unwrap();
            let dst = MicroVm::incoming(mem_size).unwrap();
            let mut page = vec![0u8; PAGE_SIZE];
            for p in 0..mem_size / PAGE_SIZE as u64 {
                src.read_page(p * 4096, &mut page).unwrap();
                dst.write_page(p * 4096, &page).unwrap();
            }
            dst.restore_state(state).unwrap();
            dst.resume().unwrap();
            wait_reports(&dst, 1, Duration::from_secs(10));
            dst.pause().unwrap();
            assert_eq!(dst.reports().first.unwrap().0, last + 1, "the destination's first report follows the source's last");
        }
    });
}
