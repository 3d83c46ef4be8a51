//! The `ferry-gateway` binary: start-up errors are clear and name the key.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry-gateway"))
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("gw.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"
site = "site-a"
listen = "127.0.0.1:0"
[tls]
ca = "ca.pem"
cert = "site-a.pem"
key = "site-a.key"
[link]
bandwidth = "1gbit"
rtt = "150ms"
[[peer]]
site = "site-b"
addr = "127.0.0.1:9"
[[forward]]
listen = "127.0.0.1:0"
peer = "site-b"
connect = "127.0.0.1:9"
"#;

/// A folder with certificates for site-a and site-b.
fn dir_with_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = gateway()
        .args(["certs", "--out"])
        .arg(dir.path())
        .args(["--site", "site-a", "--site", "site-b"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    dir
}

fn run_with(text: &str) -> (bool, String) {
    run_in(&dir_with_certs(), text)
}

/// Runs the gateway on `text` in `dir`: (started, its stderr or "still running").
fn run_in(dir: &tempfile::TempDir, text: &str) -> (bool, String) {
    let path = write_config(dir.path(), text);
    let mut child = gateway().arg("run").arg("--config").arg(&path).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // A valid config keeps running; an invalid one exits at once.
    for _ in 0..30 {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    (true, String::from("still running"))
}

#[test]
fn valid_config_starts() {
    let (ok, out) = run_with(GOOD);
    assert!(ok && out == "still running", "{out}");
}

#[test]
fn typo_in_a_key_is_named() {
    let (ok, err) = run_with(&GOOD.replace("bandwidth", "bandwidht"));
    assert!(!ok);
    assert!(err.contains("bandwidht"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_values_and_references_are_named() {
    for (text, key) in [
        (GOOD.replace("\"150ms\"", "\"150\""), "rtt"),
        (GOOD.replace("peer = \"site-b\"", "peer = \"site-x\""), "forward[0].peer"),
        (GOOD.replace("site-a.key", "missing.key"), "tls.key"),
        (GOOD.replace("listen = \"127.0.0.1:0\"\n[tls]", "listen = \"localhost\"\n[tls]"), "listen"),
        (format!("{GOOD}[limits]\ndecoder_output = \"0\"\n"), "limits.decoder_output"),
        (format!("{GOOD}[limits]\ndecoder_output = \"lots\"\n"), "decoder_output"),
        (format!("{GOOD}[shutdown]\ngrace = \"2h\"\n"), "shutdown.grace"),
        (format!("{GOOD}[shutdown]\ngrace = \"soon\"\n"), "grace"),
    ] {
        let (ok, err) = run_with(&text);
        assert!(!ok, "{key}: should fail");
        assert!(err.contains(key), "{key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn readable_secrets_are_refused_at_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &std::path::Path, mode| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let dir = dir_with_certs();
    chmod(&dir.path().join("site-a.key"), 0o644);
    let (ok, err) = run_in(&dir, GOOD);
    assert!(!ok && err.contains("tls.key") && err.contains("chmod 600"), "{err}");

    let dir = dir_with_certs();
    let tcp_api = format!("{GOOD}[api]\nlisten = \"127.0.0.1:0\"\n");
    let (ok, err) = run_in(&dir, &tcp_api);
    assert!(!ok && err.contains("api.token_file") && err.contains("required"), "{err}");
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    chmod(&token, 0o644);
    let with_token = format!("{tcp_api}token_file = \"api.token\"\n");
    let (ok, err) = run_in(&dir, &with_token);
    assert!(!ok && err.contains("api.token_file") && err.contains("chmod 600"), "{err}");
    chmod(&token, 0o600);
    let (ok, out) = run_in(&dir, &with_token);
    assert!(ok && out == "still running", "{out}");
}

#[test]
fn certs_refuses_bad_site_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway().args(["certs", "--out"]).arg(dir.path()).args(["--site", "Bad_Name"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid site name"));
}

#[test]
fn check_config_validates_prints_and_names_the_key() {
    let dir = dir_with_certs();
    let check = |text: &str| {
        let path = write_config(dir.path(), text);
        gateway().arg("check-config").arg(&path).output().unwrap()
    };

    // A good config: exit 0, the effective values printed, defaults included.
    let out = check(GOOD);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("site-a") && stdout.contains("idle_timeout") && stdout.ends_with(": ok\n"), "{stdout}");

    // A bad key: non-zero, the key named, nothing printed as ok.
    let out = check(&GOOD.replace("bandwidth", "bandwidht"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bandwidht"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(": ok"));

    // Certificates are loaded too: a CA file that holds no certificate is refused, naming it.
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let out = check(&GOOD.replace("ca = \"ca.pem\"", "ca = \"empty.pem\""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("tls.ca"), "{stderr}");

    // And the TCP API's token stays secret in the printout.
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = check(&format!("{GOOD}[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("0123456789abcdef"), "{stdout}");
}
