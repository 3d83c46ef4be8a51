//! Test support: a scripted QMP server on a unix socket standing in for QEMU, so the blocking
//! wrapper and the migration orchestrator are tested without a QEMU binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Value};

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"fake\"}, \"capabilities\": [\"oob\"]}}\r\n";

/// What the fake answers to a command: its `return` value, or an error `(class, desc)`.
pub(crate) type Responder = Box<dyn FnMut(&str, &Value) -> Result<Value, (String, String)> + Send>;

/// A fake QEMU serving one QMP client; records every command after `qmp_capabilities`.
pub(crate) struct FakeQemu {
    /// The socket to connect to.
    pub(crate) path: PathBuf,
    commands: Arc<Mutex<Vec<(String, Value)>>>,
    _dir: tempfile::TempDir,
}

impl FakeQemu {
    /// Listens on a fresh socket and serves the first client from a thread.
    pub(crate) fn start(mut respond: Responder) -> FakeQemu {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let commands = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&commands);
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else { return };
            let mut writer = stream.try_clone().expect("clone");
            if writer.write_all(GREETING.as_bytes()).is_err() {
                return;
            }
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                let msg: Value = serde_json::from_str(&line).expect("client sends JSON");
                let name = msg["execute"].as_str().unwrap_or_default().to_owned();
                let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
                let reply = if name == "qmp_capabilities" {
                    json!({"return": {}})
                } else {
                    log.lock().push((name.clone(), args.clone()));
                    match respond(&name, &args) {
                        Ok(v) => json!({"return": v}),
                        Err((class, desc)) => json!({"error": {"class": class, "desc": desc}}),
                    }
                };
                let mut reply = reply;
                if let Some(id) = msg.get("id") {
                    reply["id"] = id.clone();
                }
                if writer.write_all(format!("{reply}\r\n").as_bytes()).is_err() || name == "quit" {
                    return;
                }
            }
        });
        FakeQemu {
            path,
            commands,
            _dir: dir,
        }
    }

    /// The commands received so far, with their arguments (`null` when none).
    pub(crate) fn commands(&self) -> Vec<(String, Value)> {
        self.commands.lock().clone()
    }
}
