//! A small blocking QMP client (JSON lines over a unix socket).
//!
//! This is test support: general `execute(command, args) -> Value` plus a few
//! typed helpers. Asynchronous events interleaved with replies are kept in
//! [`QmpClient::events`].

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::{QemuError, Result};

/// Events kept at most.
const MAX_EVENTS: usize = 10_000;

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    timeout: Duration,
    events: Vec<Value>,
    greeting: Value,
}

/// `query-status` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStatus {
    /// `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, ...
    pub status: String,
    /// Whether the vCPUs run.
    pub running: bool,
}

/// RAM statistics of `query-migrate` (the `ram` object; missing fields are 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RamStats {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes of RAM still to send.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero ("duplicate") pages sent.
    pub duplicate: u64,
    /// Normal pages sent.
    pub normal: u64,
    /// Bytes of normal pages sent.
    pub normal_bytes: u64,
    /// Dirty-bitmap syncs (iterations).
    pub dirty_sync_count: u64,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: u64,
    /// Measured throughput, Mbit/s.
    pub mbps: f64,
    /// Guest dirty rate, pages/s.
    pub dirty_pages_rate: u64,
}

/// `query-migrate` result.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    /// (empty string if QEMU reported no status, e.g. before any migration).
    pub status: String,
    /// Total migration time, ms (when completed).
    pub total_time_ms: Option<u64>,
    /// Measured downtime, ms (when completed).
    pub downtime_ms: Option<u64>,
    /// RAM statistics (source side).
    pub ram: Option<RamStats>,
    /// `error-desc`, if the migration failed.
    pub error_desc: Option<String>,
    /// The full reply.
    pub raw: Value,
}

impl MigrationInfo {
    /// True for `completed`, `failed` and `cancelled`.
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// TCP ports from `socket-address` (the destination's listening sockets
    /// after `migrate-incoming`).
    pub fn listen_ports(&self) -> Vec<u16> {
        self.raw
            .get("socket-address")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.get("port")?.as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn from_value(raw: Value) -> MigrationInfo {
        let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        let ram = raw.get("ram").map(|r| RamStats {
            transferred: u(r, "transferred").unwrap_or(0),
            remaining: u(r, "remaining").unwrap_or(0),
            total: u(r, "total").unwrap_or(0),
            duplicate: u(r, "duplicate").unwrap_or(0),
            normal: u(r, "normal").unwrap_or(0),
            normal_bytes: u(r, "normal-bytes").unwrap_or(0),
            dirty_sync_count: u(r, "dirty-sync-count").unwrap_or(0),
            multifd_bytes: u(r, "multifd-bytes").unwrap_or(0),
            mbps: r.get("mbps").and_then(Value::as_f64).unwrap_or(0.0),
            dirty_pages_rate: u(r, "dirty-pages-rate").unwrap_or(0),
        });
        MigrationInfo {
            status: raw
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            total_time_ms: u(&raw, "total-time"),
            downtime_ms: u(&raw, "downtime"),
            ram,
            error_desc: raw
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        }
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket, retrying until it exists, reads the
    /// greeting and negotiates capabilities. `timeout` bounds the connect and
    /// each later reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            ErrorKind::NotFound | ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(QemuError::io(
                        format!("connecting to QMP socket {}", path.display()),
                        e,
                    ))
                }
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| QemuError::io("setting the QMP read timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| QemuError::io("cloning the QMP socket", e))?;
        let mut c = QmpClient {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            timeout,
            events: Vec::new(),
            greeting: Value::Null,
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        c.greeting = greeting;
        c.execute("qmp_capabilities", None)?;
        tracing::debug!(path = %path.display(), "QMP connected");
        Ok(c)
    }

    /// The greeting QEMU sent (contains its version).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Changes how long to wait for each reply.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| QemuError::io("setting the QMP read timeout", e))
    }

    /// Events received so far (`{"event": ..., "data": ..., "timestamp": ...}`).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Removes and returns the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QemuError::Protocol("QMP socket closed by QEMU".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| QemuError::Protocol(format!("bad QMP JSON {line:?}: {e}"))),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(QemuError::timeout("a QMP message", self.timeout))
            }
            Err(e) => Err(QemuError::io("reading from QMP", e)),
        }
    }

    /// Sends `{"execute": command, "arguments": args}` and returns the whole
    /// reply object (`{"return": ...}` or `{"error": ...}`), skipping events.
    pub fn execute_raw(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), json!(id));
        let mut text = Value::Object(msg).to_string();
        tracing::debug!(qmp = %text, "QMP ->");
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| QemuError::io(format!("sending QMP command {command}"), e))?;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                tracing::debug!(event = %m, "QMP event");
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                tracing::debug!(reply = %m, "QMP <-");
                return Ok(m);
            }
            tracing::debug!(msg = %m, "QMP: ignoring unrelated message");
        }
    }

    /// Executes a command and returns its `return` value, or
    /// [`QemuError::Qmp`] if QEMU answered with an error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut reply = self.execute_raw(command, arguments)?;
        if let Some(err) = reply.get("error") {
            let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(QemuError::Qmp {
                command: command.into(),
                class: s("class"),
                desc: s("desc"),
            });
        }
        match reply.get_mut("return") {
            Some(v) => Ok(v.take()),
            None => Err(QemuError::Protocol(format!(
                "QMP reply without return or error: {reply}"
            ))),
        }
    }

    /// `migrate-set-capabilities` with `(name, state)` pairs.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )?;
        Ok(())
    }

    /// `migrate-set-parameters`; `params` is an object such as
    /// `json!({"multifd-channels": 4, "max-bandwidth": 1u64 << 30})`.
    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<()> {
        self.execute("migrate-set-parameters", Some(params))?;
        Ok(())
    }

    /// `query-migrate-parameters`.
    pub fn query_migrate_parameters(&mut self) -> Result<Value> {
        self.execute("query-migrate-parameters", None)
    }

    /// `query-migrate-capabilities`, as `(name, state)` pairs.
    pub fn query_migrate_capabilities(&mut self) -> Result<Vec<(String, bool)>> {
        let v = self.execute("query-migrate-capabilities", None)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        Some((
                            c.get("capability")?.as_str()?.to_string(),
                            c.get("state")?.as_bool()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Starts an outgoing migration (`migrate`), e.g. `tcp:127.0.0.1:4444`.
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// Starts listening for an incoming migration (`migrate-incoming`; the VM
    /// must have been started with `-incoming defer`). `tcp:127.0.0.1:0` picks
    /// a free port: read it from [`MigrationInfo::listen_ports`].
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&mut self) -> Result<()> {
        self.execute("migrate_cancel", None)?;
        Ok(())
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo> {
        Ok(MigrationInfo::from_value(
            self.execute("query-migrate", None)?,
        ))
    }

    /// Polls `query-migrate` until the migration is completed, failed or
    /// cancelled. Returns the final info (also when it failed; check `status`).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if info.is_finished() {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::timeout(
                    format!("migration to finish (status {:?})", info.status),
                    timeout,
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunStatus> {
        let v = self.execute("query-status", None)?;
        Ok(RunStatus {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// Polls `query-status` until it reports `status`.
    pub fn wait_status(&mut self, status: &str, timeout: Duration) -> Result<RunStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.query_status()?;
            if s.status == status {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::timeout(
                    format!("VM status {status:?} (now {:?})", s.status),
                    timeout,
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pauses the vCPUs (`stop`).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None)?;
        Ok(())
    }

    /// Resumes the vCPUs (`cont`).
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None)?;
        Ok(())
    }

    /// Asks QEMU to exit (`quit`). The socket closes afterwards.
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None) {
            Ok(_) | Err(QemuError::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// MAC addresses of the guest NICs from `query-rx-filter`, as
    /// `(nic name, "52:54:00:..")`. Only NICs that support rx-filter queries
    /// (virtio-net) are listed; a VM without NICs gives an empty list.
    pub fn nic_macs(&mut self) -> Result<Vec<(String, String)>> {
        let v = match self.execute("query-rx-filter", None) {
            Ok(v) => v,
            Err(QemuError::Qmp { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| {
                        Some((
                            f.get("name")?.as_str()?.to_string(),
                            f.get("main-mac")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_info_parses_qemu_reply() {
        let v = json!({"status": "completed", "total-time": 812, "downtime": 12,
            "ram": {"transferred": 1000, "total": 67108864, "duplicate": 5, "normal": 7, "mbps": 880.5},
            "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "40123"}]});
        let i = MigrationInfo::from_value(v);
        assert_eq!(i.status, "completed");
        assert!(i.is_finished());
        assert_eq!(i.total_time_ms, Some(812));
        let ram = i.ram.clone().unwrap_or_default();
        assert_eq!(ram.transferred, 1000);
        assert_eq!(ram.normal, 7);
        assert_eq!(i.listen_ports(), vec![40123]);
    }
}
