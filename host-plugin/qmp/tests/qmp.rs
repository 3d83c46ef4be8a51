//! The QMP client against a real QEMU (7.2 on the project's machines), driving
//! the test guest of `ferry-netem`: status, stop/cont with their events, NIC MACs, migration
//! parameters and capabilities, and a complete local migration driven only by this client.
//!
//! Skipped (with a message) when `qemu-system-x86_64` is not installed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_qmp::{
    CapabilityState, MacAddress, MigrationCapability, MigrationParameters, MigrationStatus,
    MultifdCompression, Qmp, QmpConfig, QmpError, QmpEvent, RunState,
};
use ferry_netem::qemu::{self, GuestImage, Qemu, QemuConfig};

const VIRTIO_MAC: &str = "52:54:00:12:34:56";
const E1000_MAC: &str = "52:54:00:ab:cd:ef";
const T: Duration = Duration::from_secs(60);

/// QEMU arguments: two NICs (virtio-net and e1000, both on user networking) and a second
/// QMP socket for the client under test (`ferry_netem`'s handle owns the first one).
fn extra_args(qmp_socket: &Path) -> Vec<String> {
    [
        "-netdev".to_string(),
        "user,id=n0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={VIRTIO_MAC},id=nic0"),
        "-netdev".into(),
        "user,id=n1".into(),
        "-device".into(),
        format!("e1000,netdev=n1,mac={E1000_MAC},id=nic1"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_socket.display()),
    ]
    .into()
}

fn spawn(image: &GuestImage, name: &str, dir: &Path, incoming: bool) -> (Qemu, PathBuf) {
    let sock = dir.join(format!("{name}.qmp"));
    let mut config = QemuConfig::default().named(name);
    if incoming {
        config = config.incoming_defer();
    }
    config.extra_args = extra_args(&sock);
    // The harness's own QMP session is blocking: keep it off this test's async worker.
    let vm = tokio::task::block_in_place(|| Qemu::spawn(image, &config, None))
        .expect("starting QEMU");
    (vm, sock)
}

fn client_config() -> QmpConfig {
    QmpConfig {
        connect_timeout: Duration::from_secs(20),
        command_timeout: Duration::from_secs(20),
        ..QmpConfig::default()
    }
}

async fn wait_status(qmp: &Qmp, want: RunState) {
    let deadline = Instant::now() + T;
    loop {
        let s = qmp.query_status().await.expect("query-status");
        if s.status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "status {:?}, want {want:?}",
            s.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_client_drives_real_qemu_through_a_local_migration() {
    ferry_testkit::tracing::init_tracing();
    if !qemu::qemu_available() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)");
        return;
    }
    let image = GuestImage::build().expect("building the test guest");
    let dir = tempfile::tempdir().expect("tempdir");
    let (src_vm, src_sock) = spawn(&image, "qmp-src", dir.path(), false);
    let started = Instant::now();

    // --- handshake --------------------------------------------------------------------
    let hs = ferry_qmp::Handshake::connect_unix(&src_sock, client_config())
        .await
        .expect("connect + greeting");
    let greeting_version = hs.greeting().version.clone();
    let src = hs.negotiate().await.expect("qmp_capabilities");
    let version = src.query_version().await.expect("query-version");
    assert_eq!(version, greeting_version);
    assert!(version.qemu.major >= 7, "QEMU {}", version.qemu);
    eprintln!("QEMU {} ({})", version.qemu, version.package);
    // The harness runs TCG guests: what ferry-host's version check is fed.
    let kvm = src.query_kvm().await.expect("query-kvm");
    assert!(!kvm.enabled, "{kvm:?}");
    let issue = ferry_qmp::known_issues::migration_issue(version.qemu, kvm.enabled);
    assert_eq!(issue.is_some(), version.qemu.major < 9, "QEMU {}: {issue:?}", version.qemu);

    // --- run state, stop/cont and their events ----------------------------------------
    src_vm.serial().wait_for_tick(2, T).expect("guest ticking");
    let st = src.query_status().await.expect("query-status");
    assert_eq!(st.status, RunState::Running);
    assert!(st.running);

    src.stop().await.expect("stop");
    src.wait_event(T, |e| *e == QmpEvent::Stop)
        .await
        .expect("STOP event");
    let st = src.query_status().await.expect("query-status");
    assert_eq!((st.status, st.running), (RunState::Paused, false));
    src.cont().await.expect("cont");
    src.wait_event(T, |e| *e == QmpEvent::Resume)
        .await
        .expect("RESUME event");
    assert_eq!(
        src.query_status().await.expect("query-status").status,
        RunState::Running
    );

    // --- NIC MACs -------------------------------------------------------------------------
    let want_virtio: MacAddress = VIRTIO_MAC.parse().expect("mac");
    let want_e1000: MacAddress = E1000_MAC.parse().expect("mac");
    let rx = src.query_rx_filter().await.expect("query-rx-filter");
    assert_eq!(rx.len(), 1, "only virtio-net supports rx-filter: {rx:?}");
    assert_eq!((rx[0].name.as_str(), rx[0].main_mac), ("nic0", want_virtio));
    assert_eq!(src.nic_mac("nic0").await.expect("qom-get"), want_virtio);
    assert_eq!(src.nic_mac("nic1").await.expect("qom-get"), want_e1000);
    let err = src.nic_mac("nope").await.expect_err("no such device");
    assert_eq!(err.class(), Some("DeviceNotFound"), "{err}");

    // --- errors ---------------------------------------------------------------------------
    let err = src
        .execute_value("no-such-command", None)
        .await
        .expect_err("unknown command");
    assert!(
        matches!(&err, QmpError::Command { class, command, .. }
            if class == "CommandNotFound" && command == "no-such-command"),
        "{err}"
    );

    // --- migration parameters and capabilities ----------------------------------------
    let set = MigrationParameters {
        max_bandwidth: Some(123_456_789),
        downtime_limit: Some(250),
        multifd_channels: Some(3),
        multifd_compression: Some(MultifdCompression::Zlib),
        cpu_throttle_initial: Some(30),
        cpu_throttle_increment: Some(15),
        announce_initial: Some(60),
        announce_max: Some(600),
        announce_rounds: Some(4),
        announce_step: Some(120),
        ..Default::default()
    };
    src.migrate_set_parameters(&set)
        .await
        .expect("migrate-set-parameters");
    let got = src
        .query_migrate_parameters()
        .await
        .expect("query-migrate-parameters");
    let typed_only = MigrationParameters {
        extra: Default::default(),
        // Fields we did not set keep QEMU's values; compare only what we set.
        multifd_zlib_level: None,
        multifd_zstd_level: None,
        max_cpu_throttle: None,
        throttle_trigger_threshold: None,
        xbzrle_cache_size: None,
        ..got.clone()
    };
    assert_eq!(typed_only, set, "read back: {got:?}");
    assert!(
        got.extra.contains_key("tls-creds"),
        "untyped fields kept: {got:?}"
    );

    src.migrate_set_capabilities(&[
        CapabilityState::new(MigrationCapability::Events, true),
        CapabilityState::new(MigrationCapability::AutoConverge, true),
    ])
    .await
    .expect("migrate-set-capabilities");
    let caps = src
        .query_migrate_capabilities()
        .await
        .expect("query-migrate-capabilities");
    let state = |c: MigrationCapability| {
        caps.iter()
            .find(|s| s.capability == c)
            .map(|s| s.state)
            .unwrap_or_else(|| panic!("{c} missing in {caps:?}"))
    };
    assert!(state(MigrationCapability::Events));
    assert!(state(MigrationCapability::AutoConverge));
    assert!(!state(MigrationCapability::Multifd));
    assert!(
        caps.iter()
            .all(|c| !matches!(c.capability, MigrationCapability::Unknown(_))),
        "QEMU {} capabilities all known: {caps:?}",
        version.qemu
    );
    let before = src.query_migrate().await.expect("query-migrate");
    assert_eq!(before.status(), MigrationStatus::None);
    eprintln!("status, events, MACs, parameters: {:?}", started.elapsed());

    // --- local migration, multifd with 2 channels -----------------------------------
    let (dst_vm, dst_sock) = spawn(&image, "qmp-dst", dir.path(), true);
    let dst = Qmp::connect(&dst_sock, client_config())
        .await
        .expect("connect to destination");
    assert_eq!(
        dst.query_status().await.expect("query-status").status,
        RunState::InMigrate
    );
    let mode = [
        CapabilityState::new(MigrationCapability::Events, true),
        CapabilityState::new(MigrationCapability::Multifd, true),
    ];
    let params = MigrationParameters {
        multifd_channels: Some(2),
        multifd_compression: Some(MultifdCompression::None),
        ..Default::default()
    };
    for side in [&dst, &src] {
        side.migrate_set_capabilities(&mode).await.expect("caps");
        side.migrate_set_parameters(&params).await.expect("params");
    }
    src.migrate_set_parameters(&MigrationParameters {
        max_bandwidth: Some(1 << 30),
        downtime_limit: Some(300),
        ..Default::default()
    })
    .await
    .expect("bandwidth");
    dst.migrate_incoming("tcp:127.0.0.1:0")
        .await
        .expect("migrate-incoming");
    let listening = dst.query_migrate().await.expect("query-migrate on dst");
    let port = *listening
        .listen_ports()
        .first()
        .unwrap_or_else(|| panic!("no listening port in {listening:?}"));
    let t0 = Instant::now();
    src.drain_events();
    src.migrate(&format!("tcp:127.0.0.1:{port}"))
        .await
        .expect("migrate");

    // Poll query-migrate while collecting MIGRATION events until completed.
    let mut statuses = Vec::new();
    let mut polls = Vec::new();
    let info = loop {
        while let Some(e) = src.try_next_event() {
            if let QmpEvent::Migration { status } = e.event {
                statuses.push(status);
            }
        }
        let info = src.query_migrate().await.expect("query-migrate");
        polls.push(info.status());
        if info.status().is_terminal() {
            break info;
        }
        assert!(t0.elapsed() < T, "migration not finished: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        info.status(),
        MigrationStatus::Completed,
        "error-desc: {:?}",
        info.error_desc
    );
    if !statuses.contains(&MigrationStatus::Completed) {
        src.wait_event(Duration::from_secs(5), |e| {
            matches!(e, QmpEvent::Migration { status } if *status == MigrationStatus::Completed)
        })
        .await
        .expect("MIGRATION completed event");
        statuses.push(MigrationStatus::Completed);
    }
    assert_eq!(
        statuses.first(),
        Some(&MigrationStatus::Setup),
        "{statuses:?}"
    );
    assert!(statuses.contains(&MigrationStatus::Active), "{statuses:?}");
    assert_eq!(src.dropped_events(), 0);
    let ram = info.ram.as_ref().expect("ram stats");
    assert!(ram.transferred > 0 && ram.total >= 16 << 20, "{ram:?}");
    assert!(ram.multifd_bytes.unwrap_or(0) > 0, "multifd used: {ram:?}");
    assert!(
        info.total_time.is_some() && info.downtime.is_some(),
        "{info:?}"
    );
    eprintln!(
        "migration completed in {:?}: total-time {:?} ms, downtime {:?} ms, {} bytes, {:.0} Mbit/s, {} passes; events {statuses:?}; polls {}",
        t0.elapsed(),
        info.total_time,
        info.downtime,
        ram.transferred,
        ram.mbps,
        ram.dirty_sync_count,
        polls.len()
    );

    // Destination runs with the same NICs; source is post-migrate.
    wait_status(&dst, RunState::Running).await;
    assert_eq!(
        src.query_status().await.expect("query-status").status,
        RunState::PostMigrate
    );
    assert_eq!(dst.nic_mac("nic0").await.expect("qom-get"), want_virtio);
    assert_eq!(dst.nic_mac("nic1").await.expect("qom-get"), want_e1000);
    dst_vm
        .serial()
        .wait_for_tick(1, T)
        .expect("destination guest ticking");

    // quit ends the destination QEMU; the session then reports the lost connection.
    dst.quit().await.expect("quit");
    let deadline = Instant::now() + T;
    while !dst.is_closed() {
        assert!(
            Instant::now() < deadline,
            "connection still open after quit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = dst.query_status().await.expect_err("after quit");
    assert!(err.is_connection_lost(), "{err}");
    drop(src_vm);
    eprintln!("whole test: {:?}", started.elapsed());
}
