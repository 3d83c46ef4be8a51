//! The `ferry-host` binary's handling of bad input: clear messages, non-zero exits, no panics.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-host");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).env("RUST_LOG", "off").output().expect("run ferry-host");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn dest_host_must_be_an_address() {
    let (ok, _, err) = run(&["migrate", "--qmp", "/nonexistent", "--to", "site-b", "--dest-host", "hv7.example"]);
    assert!(!ok);
    assert!(err.contains("--dest-host `hv7.example`: give an IP address"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_vm_fails_with_a_report_and_touches_nothing() {
    let (ok, out, err) = run(&["migrate", "--qmp", "/nonexistent/vm.qmp", "--to", "site-b", "--dest-host", "10.0.0.2", "--json", "--progress", "none"]);
    assert!(!ok, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["outcome"], "failed");
    assert_eq!(report["source_vm"], "running");
    assert!(report["error"].as_str().unwrap().contains("cannot open the source VM's QMP socket /nonexistent/vm.qmp"), "{report}");
}

#[test]
fn serve_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serve.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:7800\"\nmigration_adress = \"127.0.0.1\"\n[incoming]\nqmp = \"/run/{vm}.qmp\"\n").unwrap();
    let (ok, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("migration_adress"), "{err}");
    std::fs::write(&path, "listen = \"127.0.0.1:7800\"\nmigration_address = \"127.0.0.1\"\n[incoming]\nqmp = \"/run/vm.qmp\"\n").unwrap();
    let (ok, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("incoming.qmp") && err.contains("{vm}"), "{err}");
    let (ok, _, err) = run(&["serve", "--config", "/nonexistent/serve.toml"]);
    assert!(!ok);
    assert!(err.contains("cannot read config file /nonexistent/serve.toml"), "{err}");
}
