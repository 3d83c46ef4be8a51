//! The async QMP client: a [`Handshake`] (connected, greeting read) that becomes a negotiated
//! [`Qmp`] session after `qmp_capabilities`.
//!
//! A [`Qmp`] owns one background reader task. It frames lines (bounded, see
//! [`QmpConfig::max_line`]), hands each reply to the command waiting for its id, and puts
//! events into a bounded [`EventQueue`]. Commands take `&self`, so several tasks may issue
//! commands on one session concurrently (share it through an `Arc`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::codec::{
    encode_command, parse_server_message, ErrorBody, LineFramer, ServerMessage, DEFAULT_MAX_LINE,
};
use super::error::{QmpError, Result};
use super::events::{EventQueue, Pop};
use super::types::{
    CapabilityState, Empty, Event, Greeting, KvmInfo, MacAddress, MigrationInfo, MigrationParameters,
    QmpEvent, RunState, RxFilterInfo, StatusInfo, VersionInfo,
};

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type ReplySender = oneshot::Sender<std::result::Result<Value, ErrorBody>>;

/// Limits and timeouts of a QMP session.
#[derive(Debug, Clone)]
pub struct QmpConfig {
    /// How long [`Handshake::connect_unix`] retries a socket that does not exist yet or
    /// refuses connections, and how long to wait for the greeting.
    pub connect_timeout: Duration,
    /// Default time limit of one command (sending it and receiving its reply).
    pub command_timeout: Duration,
    /// Events buffered before the oldest is dropped.
    pub event_capacity: usize,
    /// Longest accepted line from QEMU, bytes; a longer one ends the session.
    pub max_line: usize,
}

impl Default for QmpConfig {
    fn default() -> Self {
        QmpConfig {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            event_capacity: 1024,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// A connection whose greeting has been read, before `qmp_capabilities`: only
/// [`Handshake::negotiate`] can be done with it.
pub struct Handshake {
    reader: Reader,
    writer: Writer,
    framer: LineFramer,
    greeting: Greeting,
    config: QmpConfig,
    peer_pid: Option<i32>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("greeting", &self.greeting)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Connects to QEMU's QMP unix socket (`-qmp unix:PATH,server=on,wait=off`), retrying
    /// while the socket does not exist yet or refuses connections (QEMU still starting), up to
    /// [`QmpConfig::connect_timeout`], then reads the greeting.
    pub async fn connect_unix(path: impl AsRef<Path>, config: QmpConfig) -> Result<Handshake> {
        let path = path.as_ref();
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let stream = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            command: format!("connect {} ({e})", path.display()),
                            timeout: config.connect_timeout,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(QmpError::io(
                        format!("connecting to QMP socket {}", path.display()),
                        e,
                    ))
                }
            }
        };
        // The process at the other end (SO_PEERCRED): QEMU, for whoever must make sure it is gone.
        let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
        tracing::debug!(socket = %path.display(), ?peer_pid, "QMP connected");
        let mut handshake = Self::from_stream(stream, config).await?;
        handshake.peer_pid = peer_pid;
        Ok(handshake)
    }

    /// Uses an already connected stream (a unix socket, a `tokio::io::duplex` end in tests)
    /// and reads the greeting.
    pub async fn from_stream<S>(stream: S, config: QmpConfig) -> Result<Handshake>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut reader: Reader = Box::new(r);
        let mut framer = LineFramer::new(config.max_line);
        let line = tokio::time::timeout(
            config.connect_timeout,
            read_line(&mut reader, &mut framer, "the QMP greeting"),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            command: "greeting".into(),
            timeout: config.connect_timeout,
        })??;
        let greeting = match parse_server_message(&line) {
            Ok(ServerMessage::Greeting(v)) => serde_json::from_value::<Greeting>(v)
                .map_err(|e| QmpError::protocol("the QMP greeting", e.to_string()))?,
            Ok(other) => {
                return Err(QmpError::protocol(
                    "the QMP greeting",
                    format!("expected a greeting, got {other:?}"),
                ))
            }
            Err(e) => return Err(QmpError::protocol("the QMP greeting", e)),
        };
        tracing::info!(
            qemu = %greeting.version.qemu,
            package = %greeting.version.package,
            capabilities = ?greeting.capabilities,
            "QMP greeting"
        );
        Ok(Handshake {
            reader,
            writer: Box::new(w),
            framer,
            greeting,
            config,
            peer_pid: None,
        })
    }

    /// The greeting: QEMU's version and offered capabilities.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Sends `qmp_capabilities` (enabling no optional capability) and returns the
    /// negotiated session. Events arriving meanwhile are kept.
    pub async fn negotiate(self) -> Result<Qmp> {
        let Handshake {
            mut reader,
            mut writer,
            mut framer,
            greeting,
            config,
            peer_pid,
        } = self;
        let events = EventQueue::new(config.event_capacity);
        let timeout = config.command_timeout;
        let exchange = async {
            writer
                .write_all(&encode_command(0, "qmp_capabilities", None))
                .await
                .and(writer.flush().await)
                .map_err(|e| QmpError::io("sending qmp_capabilities", e))?;
            loop {
                let line = read_line(&mut reader, &mut framer, "qmp_capabilities").await?;
                match parse_server_message(&line) {
                    Ok(ServerMessage::Reply { id, result })
                        if id.is_none() || id.as_ref().and_then(Value::as_u64) == Some(0) =>
                    {
                        return match result {
                            Ok(_) => Ok(()),
                            Err(ErrorBody { class, desc }) => Err(QmpError::Command {
                                command: "qmp_capabilities".into(),
                                class,
                                desc,
                            }),
                        };
                    }
                    Ok(ServerMessage::Event {
                        name,
                        data,
                        timestamp,
                    }) => events.push(Event {
                        event: QmpEvent::from_parts(&name, data),
                        timestamp,
                    }),
                    Ok(other) => {
                        tracing::warn!(?other, "unexpected QMP message before negotiation")
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed QMP line"),
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                command: "qmp_capabilities".into(),
                timeout,
            })??;
        tracing::debug!("QMP capabilities negotiated");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
            }),
            events,
            malformed: AtomicU64::new(0),
        });
        let task = tokio::spawn(read_loop(reader, framer, Arc::clone(&shared)));
        Ok(Qmp {
            shared,
            writer: tokio::sync::Mutex::new(writer),
            next_id: AtomicU64::new(1),
            greeting,
            config,
            peer_pid,
            reader_task: task,
        })
    }
}

/// Reads one line during the handshake (before the reader task exists).
async fn read_line(reader: &mut Reader, framer: &mut LineFramer, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 8192];
    loop {
        if let Some(line) = framer
            .next_line()
            .map_err(|e| QmpError::LineTooLong { limit: e.limit })?
        {
            return Ok(line);
        }
        match reader.read(&mut buf).await {
            Ok(0) => {
                return Err(QmpError::ConnectionLost {
                    command: Some(what.into()),
                    reason: "QEMU closed the connection".into(),
                })
            }
            Ok(n) => framer.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(QmpError::io(format!("reading {what}"), e)),
        }
    }
}

/// State shared between the session and its reader task.
struct Shared {
    state: Mutex<State>,
    events: EventQueue,
    malformed: AtomicU64,
}

struct State {
    /// Commands waiting for their reply, by id, with the command name for logs.
    pending: HashMap<u64, (String, ReplySender)>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

impl Shared {
    /// Ends the session: pending commands see their sender dropped, event waiters wake.
    fn fail(&self, reason: String) {
        let pending = {
            let mut st = self.state.lock();
            if st.closed.is_none() {
                tracing::info!(%reason, "QMP connection ended");
                st.closed = Some(reason);
            }
            std::mem::take(&mut st.pending)
        };
        drop(pending);
        self.events.close();
    }

    fn closed_reason(&self) -> String {
        self.state.lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }

    fn dispatch(&self, line: &[u8]) {
        match parse_server_message(line) {
            Ok(ServerMessage::Reply { id, result }) => {
                let waiter = {
                    let mut st = self.state.lock();
                    match id.as_ref() {
                        Some(id) => id.as_u64().and_then(|n| st.pending.remove(&n)),
                        // QEMU answers without id only when it could not read the command's
                        // id; with exactly one command in flight the reply is that command's.
                        None if st.pending.len() == 1 => {
                            let key = st.pending.keys().next().copied();
                            key.and_then(|k| st.pending.remove(&k))
                        }
                        None => None,
                    }
                };
                match waiter {
                    Some((name, tx)) => {
                        tracing::trace!(command = %name, ok = result.is_ok(), "QMP reply");
                        // The command may have timed out and gone: nothing to do then.
                        let _ = tx.send(result);
                    }
                    None => tracing::warn!(
                        ?id,
                        "QMP reply matches no command in flight (timed out?); dropped"
                    ),
                }
            }
            Ok(ServerMessage::Event {
                name,
                data,
                timestamp,
            }) => {
                tracing::debug!(event = %name, %data, "QMP event");
                self.events.push(Event {
                    event: QmpEvent::from_parts(&name, data),
                    timestamp,
                });
            }
            Ok(ServerMessage::Greeting(_)) => {
                tracing::warn!("unexpected second QMP greeting; ignored")
            }
            Err(e) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, line = %String::from_utf8_lossy(&line[..line.len().min(200)]),
                    "ignoring malformed QMP line");
            }
        }
    }
}

async fn read_loop(mut reader: Reader, mut framer: LineFramer, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 16 * 1024];
    let reason = loop {
        match framer.next_line() {
            Ok(Some(line)) => {
                shared.dispatch(&line);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(
                    limit = e.limit,
                    "QMP line too long; dropping the connection"
                );
                break format!("QEMU sent a line longer than {} bytes", e.limit);
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) => break "QEMU closed the connection".to_string(),
            Ok(n) => framer.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break format!("reading from QMP: {e}"),
        }
    };
    shared.fail(reason);
}

/// A negotiated QMP session.
///
/// Dropping it stops its reader task and closes the connection.
pub struct Qmp {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Writer>,
    next_id: AtomicU64,
    greeting: Greeting,
    config: QmpConfig,
    peer_pid: Option<i32>,
    reader_task: JoinHandle<()>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("qemu", &self.greeting.version.qemu)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

impl Qmp {
    /// Connects to a unix socket, reads the greeting and negotiates: the usual way in.
    pub async fn connect(path: impl AsRef<Path>, config: QmpConfig) -> Result<Qmp> {
        Handshake::connect_unix(path, config)
            .await?
            .negotiate()
            .await
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The pid of the process serving the socket (QEMU), when connected over a unix socket
    /// that reports its peer's credentials.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }

    /// The session's limits.
    pub fn config(&self) -> &QmpConfig {
        &self.config
    }

    /// Changes the default time limit of later commands.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.config.command_timeout = timeout;
    }

    /// True once the connection has ended (every later command fails with
    /// [`QmpError::ConnectionLost`]).
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed.is_some()
    }

    /// Lines from QEMU that were not valid QMP and were skipped.
    pub fn malformed_lines(&self) -> u64 {
        self.shared.malformed.load(Ordering::Relaxed)
    }

    // ---- raw commands ------------------------------------------------------------------

    /// Runs `command` with `arguments` under the default timeout and returns QEMU's raw
    /// `return` value.
    pub async fn execute_value(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_value_timeout(command, arguments, self.config.command_timeout)
            .await
    }

    /// Like [`Qmp::execute_value`] with an explicit time limit.
    pub async fn execute_value_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock();
            if let Some(reason) = &st.closed {
                return Err(QmpError::ConnectionLost {
                    command: Some(command.into()),
                    reason: reason.clone(),
                });
            }
            st.pending.insert(id, (command.to_owned(), tx));
        }
        tracing::debug!(command, id, args = ?arguments, "QMP execute");
        let line = encode_command(id, command, arguments);
        let exchange = async {
            {
                let mut w = self.writer.lock().await;
                let sent = async {
                    w.write_all(&line).await?;
                    w.flush().await
                }
                .await;
                if let Err(e) = sent {
                    // A half-written command would corrupt the stream: end the session.
                    self.shared.fail(format!("writing to QMP failed: {e}"));
                    self.reader_task.abort();
                    return Err(QmpError::io(format!("sending `{command}`"), e));
                }
            }
            rx.await.map_err(|_| QmpError::ConnectionLost {
                command: Some(command.into()),
                reason: self.shared.closed_reason(),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(ErrorBody { class, desc }))) => {
                tracing::debug!(command, %class, %desc, "QMP command failed");
                Err(QmpError::Command {
                    command: command.into(),
                    class,
                    desc,
                })
            }
            Ok(Err(e)) => {
                self.shared.state.lock().pending.remove(&id);
                Err(e)
            }
            Err(_) => {
                self.shared.state.lock().pending.remove(&id);
                tracing::warn!(command, id, ?timeout, "QMP command timed out");
                Err(QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })
            }
        }
    }

    /// Runs `command` and decodes its `return` value as `R`.
    pub async fn execute<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R> {
        let v = self.execute_value(command, arguments).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: command.into(),
            source,
        })
    }

    async fn execute_empty(&self, command: &str, arguments: Option<Value>) -> Result<()> {
        self.execute::<Empty>(command, arguments).await.map(|_| ())
    }

    // ---- typed commands ----------------------------------------------------------------

    /// `query-version`.
    pub async fn query_version(&self) -> Result<VersionInfo> {
        self.execute("query-version", None).await
    }

    /// `query-kvm`: whether the VM runs under KVM.
    pub async fn query_kvm(&self) -> Result<KvmInfo> {
        self.execute("query-kvm", None).await
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute("query-status", None).await
    }

    /// `stop`: pauses the vCPUs (QEMU emits `STOP`).
    pub async fn stop(&self) -> Result<()> {
        self.execute_empty("stop", None).await
    }

    /// `cont`: resumes the vCPUs (QEMU emits `RESUME`).
    pub async fn cont(&self) -> Result<()> {
        self.execute_empty("cont", None).await
    }

    /// `migrate-set-capabilities`.
    pub async fn migrate_set_capabilities(&self, capabilities: &[CapabilityState]) -> Result<()> {
        self.execute_empty(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": capabilities })),
        )
        .await
    }

    /// `query-migrate-capabilities`.
    pub async fn query_migrate_capabilities(&self) -> Result<Vec<CapabilityState>> {
        self.execute("query-migrate-capabilities", None).await
    }

    /// `migrate-set-parameters` with the fields of `params` that are `Some`.
    pub async fn migrate_set_parameters(&self, params: &MigrationParameters) -> Result<()> {
        let args = serde_json::to_value(params).map_err(|source| QmpError::Decode {
            command: "migrate-set-parameters".into(),
            source,
        })?;
        self.execute_empty("migrate-set-parameters", Some(args))
            .await
    }

    /// `query-migrate-parameters`.
    pub async fn query_migrate_parameters(&self) -> Result<MigrationParameters> {
        self.execute("query-migrate-parameters", None).await
    }

    /// `migrate` to `uri` (e.g. `tcp:10.0.0.2:4444`, `unix:/run/ferry/m.sock`). Returns once
    /// QEMU has started the migration; follow it with [`Qmp::query_migrate`] or `MIGRATION`
    /// events.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        tracing::info!(uri, "starting migration");
        self.execute_empty("migrate", Some(json!({ "uri": uri })))
            .await
    }

    /// `migrate-incoming` on a VM started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        tracing::info!(uri, "accepting incoming migration");
        self.execute_empty("migrate-incoming", Some(json!({ "uri": uri })))
            .await
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<()> {
        self.execute_empty("migrate_cancel", None).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute("query-migrate", None).await
    }

    /// Polls `query-migrate` every `poll` until the status is terminal (`completed`,
    /// `failed`, `cancelled`) and returns that last reply; a [`QmpError::Timeout`] after
    /// `timeout`.
    pub async fn wait_migration(&self, poll: Duration, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            if info.status().is_terminal() {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    command: "query-migrate (waiting for a terminal status)".into(),
                    timeout,
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Polls `query-status` every `poll` until the run state is `want` and returns that
    /// reply; a [`QmpError::Timeout`] after `timeout`.
    pub async fn wait_status(
        &self,
        want: &RunState,
        poll: Duration,
        timeout: Duration,
    ) -> Result<StatusInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.query_status().await?;
            if status.status == *want {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    command: format!(
                        "query-status (waiting for `{want}`, now `{}`)",
                        status.status
                    ),
                    timeout,
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// `dump-guest-memory` of the whole guest RAM, without paging, to `protocol` (e.g.
    /// `file:/tmp/vm.core`): an ELF core. The VM pauses for the dump and resumes if it was
    /// running; the command returns once the dump is written.
    pub async fn dump_guest_memory(&self, protocol: &str) -> Result<()> {
        self.execute_empty(
            "dump-guest-memory",
            Some(json!({ "paging": false, "protocol": protocol })),
        )
        .await
    }

    /// `query-rx-filter`: the NICs that support it (virtio-net) with their current MAC.
    pub async fn query_rx_filter(&self) -> Result<Vec<RxFilterInfo>> {
        self.execute("query-rx-filter", None).await
    }

    /// `qom-get` of `property` on the object at `path`.
    pub async fn qom_get<R: DeserializeOwned>(&self, path: &str, property: &str) -> Result<R> {
        self.execute(
            "qom-get",
            Some(json!({ "path": path, "property": property })),
        )
        .await
    }

    /// MAC address of a NIC through `qom-get` of its `mac` property; works for every NIC
    /// model (virtio-net, e1000, ...). `device` is the `-device ...,id=ID` (looked up under
    /// `/machine/peripheral/`) or an absolute QOM path.
    pub async fn nic_mac(&self, device: &str) -> Result<MacAddress> {
        let path = if device.starts_with('/') {
            device.to_owned()
        } else {
            format!("/machine/peripheral/{device}")
        };
        let s: String = self.qom_get(&path, "mac").await?;
        s.parse::<MacAddress>()
            .map_err(|e| QmpError::protocol(format!("qom-get {path} mac"), e))
    }

    /// Every NIC's QOM path and MAC: the devices under `/machine/peripheral` (with an `id=`)
    /// and `/machine/peripheral-anon` that have a `mac` property.
    pub async fn nic_macs(&self) -> Result<Vec<(String, MacAddress)>> {
        #[derive(serde::Deserialize)]
        struct Property {
            name: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let mut nics = Vec::new();
        for container in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let children: Vec<Property> =
                self.execute("qom-list", Some(json!({ "path": container }))).await?;
            for child in children.iter().filter(|p| p.kind.starts_with("child<")) {
                let path = format!("{container}/{}", child.name);
                let props: Vec<Property> =
                    self.execute("qom-list", Some(json!({ "path": path }))).await?;
                if props.iter().any(|p| p.name == "mac") {
                    nics.push((path.clone(), self.nic_mac(&path).await?));
                }
            }
        }
        Ok(nics)
    }

    /// `query-name`: the VM's `-name`, if it has one.
    pub async fn query_name(&self) -> Result<Option<String>> {
        #[derive(serde::Deserialize)]
        struct NameInfo {
            name: Option<String>,
        }
        Ok(self.execute::<NameInfo>("query-name", None).await?.name)
    }

    /// Guest RAM present at boot, bytes (`query-memory-size-summary`'s `base-memory`).
    pub async fn base_memory(&self) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Summary {
            #[serde(rename = "base-memory")]
            base_memory: u64,
        }
        Ok(self.execute::<Summary>("query-memory-size-summary", None).await?.base_memory)
    }

    /// `quit`: QEMU exits. A connection that closes before the reply counts as success.
    pub async fn quit(&self) -> Result<()> {
        match self.execute_value("quit", None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_connection_lost() => Ok(()),
            Err(e) => Err(e),
        }
    }

    // ---- events ------------------------------------------------------------------------

    /// Takes the oldest buffered event without waiting.
    pub fn try_next_event(&self) -> Option<Event> {
        match self.shared.events.pop() {
            Pop::Event(e) => Some(e),
            Pop::Empty | Pop::Closed => None,
        }
    }

    /// Takes every buffered event.
    pub fn drain_events(&self) -> Vec<Event> {
        self.shared.events.drain()
    }

    /// Events dropped because the buffer ([`QmpConfig::event_capacity`]) was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared.events.dropped()
    }

    /// Waits for the next event; [`QmpError::ConnectionLost`] once the connection has ended
    /// and every buffered event was taken.
    pub async fn next_event(&self) -> Result<Event> {
        self.shared
            .events
            .next()
            .await
            .ok_or_else(|| QmpError::ConnectionLost {
                command: None,
                reason: self.shared.closed_reason(),
            })
    }

    /// Takes events until one satisfies `pred` and returns it; the others are discarded.
    /// [`QmpError::Timeout`] after `timeout`.
    pub async fn wait_event(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&QmpEvent) -> bool,
    ) -> Result<Event> {
        let wait = async {
            loop {
                let e = self.next_event().await?;
                if pred(&e.event) {
                    return Ok(e);
                }
                tracing::trace!(event = e.event.name(), "skipping event");
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                command: "waiting for an event".into(),
                timeout,
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MigrationStatus, RunState};
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7\"}, \"capabilities\": [\"oob\"]}}\r\n";

    /// The QEMU side of a duplex pipe.
    struct Peer {
        rd: BufReader<ReadHalf<DuplexStream>>,
        wr: WriteHalf<DuplexStream>,
    }

    impl Peer {
        async fn send(&mut self, bytes: &[u8]) {
            self.wr.write_all(bytes).await.unwrap();
        }

        /// Reads one command, returns (name, id, arguments).
        async fn recv(&mut self) -> (String, u64, Value) {
            let mut line = String::new();
            self.rd.read_line(&mut line).await.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            (
                v["execute"].as_str().unwrap().to_owned(),
                v["id"].as_u64().unwrap(),
                v.get("arguments").cloned().unwrap_or(Value::Null),
            )
        }

        async fn reply(&mut self, id: u64, ret: &str) {
            let line = format!("{{\"return\": {ret}, \"id\": {id}}}\r\n");
            self.send(line.as_bytes()).await;
        }
    }

    fn config() -> QmpConfig {
        QmpConfig {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            ..QmpConfig::default()
        }
    }

    async fn pair(config: QmpConfig) -> (Qmp, Peer) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(server);
        let mut peer = Peer {
            rd: BufReader::new(r),
            wr: w,
        };
        peer.send(GREETING).await;
        let hs = Handshake::from_stream(client, config).await.unwrap();
        assert_eq!(hs.greeting().version.qemu.minor, 2);
        assert_eq!(hs.greeting().capabilities, vec!["oob".to_string()]);
        let negotiate = tokio::spawn(hs.negotiate());
        let (name, id, args) = peer.recv().await;
        assert_eq!(
            (name.as_str(), id, args),
            ("qmp_capabilities", 0, Value::Null)
        );
        peer.reply(0, "{}").await;
        (negotiate.await.unwrap().unwrap(), peer)
    }

    #[tokio::test]
    async fn handshake_and_typed_reply_with_interleaved_events() {
        let (qmp, mut peer) = pair(config()).await;
        let cmd = tokio::spawn(async move {
            let s = qmp.query_status().await;
            (qmp, s)
        });
        let (name, id, _) = peer.recv().await;
        assert_eq!(name, "query-status");
        peer.send(
            b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
        )
        .await;
        peer.send(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\r\n{\"event\": \"WEIRD\", \"data\": [1]}\r\n")
            .await;
        peer.reply(
            id,
            r#"{"status": "paused", "singlestep": false, "running": false}"#,
        )
        .await;
        let (qmp, status) = cmd.await.unwrap();
        let status = status.unwrap();
        assert_eq!(status.status, RunState::Paused);
        let e = qmp.next_event().await.unwrap();
        assert_eq!((e.event, e.timestamp), (QmpEvent::Stop, Some((1, 2))));
        assert_eq!(
            qmp.try_next_event().map(|e| e.event),
            Some(QmpEvent::Migration {
                status: MigrationStatus::Setup
            })
        );
        assert_eq!(qmp.try_next_event().unwrap().event.name(), "WEIRD");
        assert!(qmp.try_next_event().is_none());
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_out_of_order() {
        let (qmp, mut peer) = pair(config()).await;
        let qmp = Arc::new(qmp);
        let (a, b) = (qmp.clone(), qmp.clone());
        let ta = tokio::spawn(async move { a.query_version().await });
        let (n1, id1, _) = peer.recv().await;
        let tb = tokio::spawn(async move { b.query_migrate().await });
        let (n2, id2, _) = peer.recv().await;
        assert_eq!(
            (n1.as_str(), n2.as_str()),
            ("query-version", "query-migrate")
        );
        assert_ne!(id1, id2);
        peer.reply(id2, r#"{"status": "active", "total-time": 5}"#)
            .await;
        peer.reply(
            id1,
            r#"{"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}"#,
        )
        .await;
        let m = tb.await.unwrap().unwrap();
        assert_eq!(m.status(), MigrationStatus::Active);
        assert_eq!(m.total_time, Some(5));
        assert_eq!(ta.await.unwrap().unwrap().qemu.major, 7);
    }

    #[tokio::test]
    async fn malformed_lines_are_skipped_and_idless_reply_goes_to_the_single_command() {
        let (qmp, mut peer) = pair(config()).await;
        let qmp = Arc::new(qmp);
        let q = qmp.clone();
        let t = tokio::spawn(async move { q.stop().await });
        let (name, _, _) = peer.recv().await;
        assert_eq!(name, "stop");
        peer.send(b"{\"return\": \r\nnot json at all\r\n[1]\r\n{\"return\": {}}\r\n")
            .await;
        t.await.unwrap().unwrap();
        assert_eq!(qmp.malformed_lines(), 3);
    }

    #[tokio::test]
    async fn error_replies_carry_class_and_desc() {
        let (qmp, mut peer) = pair(config()).await;
        let t = tokio::spawn(async move { qmp.migrate("tcp:127.0.0.1:1").await });
        let (name, id, args) = peer.recv().await;
        assert_eq!(name, "migrate");
        assert_eq!(args, json!({"uri": "tcp:127.0.0.1:1"}));
        let line = format!("{{\"id\": {id}, \"error\": {{\"class\": \"GenericError\", \"desc\": \"Failed to connect\"}}}}\r\n");
        peer.send(line.as_bytes()).await;
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(err.class(), Some("GenericError"));
        let msg = err.to_string();
        assert!(
            msg.contains("migrate") && msg.contains("Failed to connect"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn strict_reply_shapes_are_enforced() {
        let (qmp, mut peer) = pair(config()).await;
        let t = tokio::spawn(async move { qmp.cont().await });
        let (_, id, _) = peer.recv().await;
        peer.reply(id, r#"{"unexpected": 1}"#).await;
        let err = t.await.unwrap().unwrap_err();
        assert!(
            matches!(err, QmpError::Decode { ref command, .. } if command == "cont"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn timeouts_leave_the_session_usable() {
        let (qmp, mut peer) = pair(config()).await;
        let qmp = Arc::new(qmp);
        let q = qmp.clone();
        let t = tokio::spawn(async move {
            q.execute_value_timeout("query-status", None, Duration::from_millis(100))
                .await
        });
        let (_, late_id, _) = peer.recv().await;
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        // The late reply is dropped, the next command gets its own.
        peer.reply(late_id, r#"{"status": "running", "running": true}"#)
            .await;
        let q = qmp.clone();
        let t = tokio::spawn(async move { q.query_status().await });
        let (_, id, _) = peer.recv().await;
        peer.reply(id, r#"{"status": "paused", "running": false}"#)
            .await;
        assert_eq!(t.await.unwrap().unwrap().status, RunState::Paused);
    }

    #[tokio::test]
    async fn oversized_line_ends_the_session() {
        let cfg = QmpConfig {
            max_line: 1024,
            ..config()
        };
        let (qmp, mut peer) = pair(cfg).await;
        let qmp = Arc::new(qmp);
        let q = qmp.clone();
        let t = tokio::spawn(async move { q.query_migrate().await });
        peer.recv().await;
        let mut huge = b"{\"event\": \"X\", \"data\": \"".to_vec();
        huge.extend_from_slice(&[b'a'; 4096]);
        peer.send(&huge).await;
        let err = t.await.unwrap().unwrap_err();
        match &err {
            QmpError::ConnectionLost { command, reason } => {
                assert_eq!(command.as_deref(), Some("query-migrate"));
                assert!(reason.contains("longer than 1024"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(qmp.is_closed());
        assert!(qmp.stop().await.unwrap_err().is_connection_lost());
        assert!(qmp.next_event().await.unwrap_err().is_connection_lost());
    }

    #[tokio::test]
    async fn eof_fails_pending_commands_and_quit_accepts_it() {
        let (qmp, mut peer) = pair(config()).await;
        let t = tokio::spawn(async move {
            let r = qmp.quit().await;
            (qmp, r)
        });
        let (name, _, _) = peer.recv().await;
        assert_eq!(name, "quit");
        peer.send(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n").await;
        drop(peer);
        let (qmp, r) = t.await.unwrap();
        r.unwrap();
        // Buffered events survive the close; then the end is reported.
        assert!(matches!(
            qmp.next_event().await.unwrap().event,
            QmpEvent::Shutdown { .. }
        ));
        assert!(qmp.next_event().await.unwrap_err().is_connection_lost());
        let err = qmp.query_status().await.unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[tokio::test]
    async fn event_buffer_is_bounded() {
        let cfg = QmpConfig {
            event_capacity: 2,
            ..config()
        };
        let (qmp, mut peer) = pair(cfg).await;
        for pass in 1..=5 {
            let line =
                format!("{{\"event\": \"MIGRATION_PASS\", \"data\": {{\"pass\": {pass}}}}}\r\n");
            peer.send(line.as_bytes()).await;
        }
        // A round trip makes sure the reader has seen all events.
        let qmp = Arc::new(qmp);
        let q = qmp.clone();
        let t = tokio::spawn(async move { q.query_status().await });
        let (_, id, _) = peer.recv().await;
        peer.reply(id, r#"{"status": "running", "running": true}"#)
            .await;
        t.await.unwrap().unwrap();
        assert_eq!(qmp.dropped_events(), 3);
        let passes: Vec<_> = qmp.drain_events().into_iter().map(|e| e.event).collect();
        assert_eq!(
            passes,
            vec![
                QmpEvent::MigrationPass { pass: 4 },
                QmpEvent::MigrationPass { pass: 5 }
            ]
        );
    }

    #[tokio::test]
    async fn bad_greetings_are_rejected() {
        async fn greet(bytes: &'static [u8], max_line: usize) -> QmpError {
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            server.write_all(bytes).await.unwrap();
            let cfg = QmpConfig {
                max_line,
                connect_timeout: Duration::from_millis(300),
                ..QmpConfig::default()
            };
            let r = Handshake::from_stream(client, cfg).await;
            drop(server);
            r.unwrap_err()
        }
        let e = greet(b"{\"return\": {}}\r\n", 1024).await;
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
        let e = greet(b"{\"QMP\": {\"version\": 7}}\r\n", 1024).await;
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
        let e = greet(b"{\"QMP\": {oops\r\n", 1024).await;
        assert!(matches!(e, QmpError::Protocol { .. }), "{e}");
        let e = greet(GREETING, 16).await;
        assert!(matches!(e, QmpError::LineTooLong { limit: 16 }), "{e}");
        let e = greet(b"{\"QMP\"", 1024).await;
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn capabilities_and_parameters_are_sent_typed() {
        use crate::types::{MigrationCapability, MultifdCompression};
        let (qmp, mut peer) = pair(config()).await;
        let qmp = Arc::new(qmp);
        let q = qmp.clone();
        let t = tokio::spawn(async move {
            q.migrate_set_capabilities(&[
                CapabilityState::new(MigrationCapability::Events, true),
                CapabilityState::new(MigrationCapability::Multifd, false),
            ])
            .await?;
            q.migrate_set_parameters(&MigrationParameters {
                downtime_limit: Some(50),
                multifd_compression: Some(MultifdCompression::Zstd),
                ..Default::default()
            })
            .await
        });
        let (n, id, args) = peer.recv().await;
        assert_eq!(n, "migrate-set-capabilities");
        assert_eq!(
            args,
            json!({"capabilities": [{"capability": "events", "state": true},
                                     {"capability": "multifd", "state": false}]})
        );
        peer.reply(id, "{}").await;
        let (n, id, args) = peer.recv().await;
        assert_eq!(n, "migrate-set-parameters");
        assert_eq!(
            args,
            json!({"downtime-limit": 50, "multifd-compression": "zstd"})
        );
        peer.reply(id, "{}").await;
        t.await.unwrap().unwrap();
    }
}
