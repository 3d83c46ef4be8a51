//! A QEMU process running the test guest.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::serial::SerialLog;
use ferry_qmp::BlockingQmp;

use super::{qemu_binary, GuestConfig, GuestImage, QemuError, Result, VerifyReport};

/// Where [`QemuConfig::ram_in_file`] puts RAM files (tmpfs).
const RAM_FILE_DIR: &str = "/dev/shm";
/// Their directories are `ferry-ram-<pid of the test process>-XXXX`.
const RAM_DIR_PREFIX: &str = "ferry-ram-";

/// Removes the RAM directories of test processes that are gone (killed before their `Qemu`
/// handles were dropped), so that guest RAM never piles up in tmpfs.
fn sweep_stale_ram_dirs() {
    let Ok(entries) = std::fs::read_dir(RAM_FILE_DIR) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RAM_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = %e.path().display(), "removing the RAM files of a gone test process");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// How the VM waits for an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming defer`: start listening later with
    /// [`BlockingQmp::migrate_incoming`] (lets you set capabilities first).
    Defer,
    /// `-incoming URI`, e.g. `tcp:127.0.0.1:4444`.
    Uri(String),
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Name, used in logs and `-name`.
    pub name: String,
    /// Guest RAM, MiB (`-m`).
    pub memory_mib: u32,
    /// Machine type (`-machine`), `pc` by default.
    pub machine: String,
    /// What the guest does (its multiboot command line).
    pub guest: GuestConfig,
    /// Wait for an incoming migration instead of booting.
    pub incoming: Option<Incoming>,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// Timeout for QMP connect and each QMP reply.
    pub qmp_timeout: Duration,
    /// If set, a second serial port (the guest's COM2) on a unix socket QEMU
    /// listens on at this path (`-chardev socket,id=hb0,path=..,server=on,wait=off
    /// -serial chardev:hb0`): the guest writes every `tick N` line there too, for
    /// a host program to timestamp. QEMU drops the output while no client is
    /// connected and serves one client at a time. The source and destination of
    /// a migration must agree on whether they have it (COM2 is a device).
    pub heartbeat_socket: Option<PathBuf>,
    /// If set, a second QMP monitor on a unix socket at this path
    /// (`-chardev socket,id=qmp1,path=..,server=on,wait=off -mon
    /// chardev=qmp1,mode=control`). The harness keeps its own QMP session
    /// ([`Qemu::qmp`], on [`Qemu::qmp_path`]) connected for the VM's whole
    /// life, and QEMU serves one client per monitor socket, so this is the one
    /// another program (e.g. the host-plugin) connects to.
    ///
    /// For both sockets: QEMU creates them (replacing a stale file) and, being
    /// killed on drop, leaves the files behind, so put them in a directory you
    /// remove (e.g. a `tempfile::TempDir`); unix socket paths are limited to
    /// 107 bytes.
    pub extra_qmp_socket: Option<PathBuf>,
    /// `-S`: do not run the guest until `cont`. For a migration's destination this holds it
    /// paused once the incoming state is loaded (QEMU then goes to `paused`, not `running`),
    /// which is when the harness compares both guests' RAM ([`super::ram_check`]); the
    /// harness's migrations require it ([`QemuConfig::held_at_cutover`]).
    pub start_paused: bool,
    /// Keep the guest's RAM in a file the harness can read ([`Qemu::ram_file`]): a
    /// `memory-backend-file` with `share=on` in a fresh directory under `/dev/shm`, which is
    /// the machine's RAM (`-machine ...,memory-backend=ram0`). QEMU migrates it like any
    /// RAM (the RAMBlock is called `ram0` instead of `pc.ram`). On by default.
    pub ram_in_file: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            name: "guest".into(),
            memory_mib: 64,
            machine: "pc".into(),
            guest: GuestConfig::default(),
            incoming: None,
            extra_args: Vec::new(),
            qmp_timeout: Duration::from_secs(30),
            heartbeat_socket: None,
            extra_qmp_socket: None,
            start_paused: false,
            ram_in_file: true,
        }
    }
}

impl QemuConfig {
    /// Sets the name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// Sets `-incoming defer`.
    pub fn incoming_defer(mut self) -> Self {
        self.incoming = Some(Incoming::Defer);
        self
    }

    /// A migration destination the harness can check: `-incoming defer` and
    /// [`QemuConfig::start_paused`], so that it stays paused after loading until the harness
    /// compared its RAM with the source's and resumed it.
    pub fn held_at_cutover(mut self) -> Self {
        self.start_paused = true;
        self.incoming_defer()
    }

    /// Sets [`QemuConfig::heartbeat_socket`].
    pub fn with_heartbeat_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.heartbeat_socket = Some(path.into());
        self
    }

    /// Sets [`QemuConfig::extra_qmp_socket`].
    pub fn with_extra_qmp_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.extra_qmp_socket = Some(path.into());
        self
    }

    /// The QEMU command line (without the binary and netns prefix); `ram_file` is where the
    /// RAM file goes if [`QemuConfig::ram_in_file`].
    pub fn args(&self, image: &GuestImage, qmp_socket: &Path, ram_file: Option<&Path>) -> Vec<String> {
        let machine = match ram_file {
            Some(_) => format!("{},memory-backend={RAM_BACKEND_ID}", self.machine),
            None => self.machine.clone(),
        };
        let mut a: Vec<String> = [
            "-name",
            &self.name,
            "-accel",
            "tcg",
            "-machine",
            &machine,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["-m".into(), format!("{}M", self.memory_mib)]);
        if let Some(f) = ram_file {
            a.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id={RAM_BACKEND_ID},size={}M,mem-path={},share=on",
                    self.memory_mib,
                    opt_path(f)
                ),
            ]);
        }
        if self.start_paused {
            a.push("-S".into());
        }
        a.extend([
            "-chardev".into(),
            "stdio,id=ser0,signal=off".into(),
            "-serial".into(),
            "chardev:ser0".into(),
        ]);
        if let Some(hb) = &self.heartbeat_socket {
            // After COM1's -serial, so it is COM2.
            a.extend([
                "-chardev".into(),
                format!("socket,id=hb0,path={},server=on,wait=off", opt_path(hb)),
                "-serial".into(),
                "chardev:hb0".into(),
            ]);
        }
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_socket.display()),
        ]);
        if let Some(q) = &self.extra_qmp_socket {
            a.extend([
                "-chardev".into(),
                format!("socket,id=qmp1,path={},server=on,wait=off", opt_path(q)),
                "-mon".into(),
                "chardev=qmp1,mode=control".into(),
            ]);
        }
        a.extend(["-kernel".into(), image.path().display().to_string()]);
        if let Some(initrd) = image.initrd() {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        a.extend([
            "-append".into(),
            image
                .append()
                .map_or_else(|| self.guest.cmdline(), str::to_string),
        ]);
        match &self.incoming {
            None => {}
            Some(Incoming::Defer) => a.extend(["-incoming".into(), "defer".into()]),
            Some(Incoming::Uri(u)) => a.extend(["-incoming".into(), u.clone()]),
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// The id of the memory backend holding the guest's RAM ([`QemuConfig::ram_in_file`]).
const RAM_BACKEND_ID: &str = "ram0";

/// A path as the value of a QEMU `key=value,...` option (commas doubled).
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A running QEMU with the test guest. Dropping it kills QEMU (SIGKILL) and
/// removes its temporary directory, also during a panic.
#[derive(Debug)]
pub struct Qemu {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    serial: SerialLog,
    stderr: Arc<Mutex<Vec<String>>>,
    qmp: BlockingQmp,
    qmp_path: PathBuf,
    heartbeat_path: Option<PathBuf>,
    extra_qmp_path: Option<PathBuf>,
    ram: RamInfo,
    start_paused: bool,
    // Dropped after `child` is killed (see Drop).
    dir: tempfile::TempDir,
    // Holds the RAM file (removed with it, after `child` is killed).
    _ram_dir: Option<tempfile::TempDir>,
}

/// What the harness knows of a VM's main RAM.
#[derive(Debug, Clone)]
pub(crate) struct RamInfo {
    /// The file holding it ([`QemuConfig::ram_in_file`]), if any.
    pub file: Option<PathBuf>,
    /// Its size, bytes (`-m`).
    pub bytes: u64,
    /// The machine type (`pc`, `q35`): where RAM sits in the guest-physical address space.
    pub machine: String,
}

impl Qemu {
    /// Starts QEMU (in network namespace `netns` if given, through
    /// `ip netns exec NS`) and connects QMP. Does not wait for the guest to
    /// boot: use [`SerialLog::wait_for_tick`] on [`Qemu::serial`].
    pub fn spawn(image: &GuestImage, config: &QemuConfig, netns: Option<&str>) -> Result<Qemu> {
        let bin = qemu_binary().ok_or_else(|| QemuError::ToolMissing {
            tool: "qemu-system-x86_64".into(),
            reason: "not on PATH (install Debian package qemu-system-x86, or set FERRY_QEMU)"
                .into(),
        })?;
        if image.append().is_none()
            && u64::from(config.memory_mib) << 20 < config.guest.min_ram_bytes()
        {
            return Err(QemuError::Protocol(format!(
                "guest layout needs {} MiB of RAM but the VM has {} MiB",
                config.guest.min_ram_bytes() >> 20,
                config.memory_mib
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("ferry-qemu-")
            .tempdir()
            .map_err(|e| QemuError::io("creating a temp dir for QEMU", e))?;
        let qmp_path = dir.path().join("qmp.sock");
        // The RAM file lives in tmpfs: reading it at cutover costs no disk I/O.
        let ram_dir = if config.ram_in_file {
            sweep_stale_ram_dirs();
            Some(
                tempfile::Builder::new()
                    .prefix(&format!("{RAM_DIR_PREFIX}{}-", std::process::id()))
                    .tempdir_in(RAM_FILE_DIR)
                    .map_err(|e| QemuError::io(format!("creating a directory in {RAM_FILE_DIR}"), e))?,
            )
        } else {
            None
        };
        let ram_file = ram_dir.as_ref().map(|d| d.path().join("ram"));
        let args = config.args(image, &qmp_path, ram_file.as_deref());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tracing::info!(vm = %config.name, netns = ?netns, "starting {} {}", bin.display(), args.join(" "));
        let mut child = cmd
            .spawn()
            .map_err(|e| QemuError::io(format!("spawning {}", bin.display()), e))?;
        match attach(&mut child, config, &qmp_path) {
            Ok((stdin, serial, stderr, qmp)) => Ok(Qemu {
                name: config.name.clone(),
                child,
                stdin,
                serial,
                stderr,
                qmp,
                qmp_path,
                heartbeat_path: config.heartbeat_socket.clone(),
                extra_qmp_path: config.extra_qmp_socket.clone(),
                ram: RamInfo {
                    file: ram_file,
                    bytes: u64::from(config.memory_mib) << 20,
                    machine: config.machine.clone(),
                },
                start_paused: config.start_paused,
                dir,
                _ram_dir: ram_dir,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The harness's QMP session (the typed `ferry-qmp` client, blocking).
    pub fn qmp(&self) -> &BlockingQmp {
        &self.qmp
    }

    /// Path of the harness's QMP socket. [`Qemu::qmp`] stays connected to it
    /// while the VM lives and QEMU serves one QMP client per socket, so
    /// another client cannot use it: start the VM with
    /// [`QemuConfig::extra_qmp_socket`] and use [`Qemu::extra_qmp_path`].
    pub fn qmp_path(&self) -> &Path {
        &self.qmp_path
    }

    /// Path of the second QMP monitor socket ([`QemuConfig::extra_qmp_socket`]),
    /// free for another program's QMP client; `None` if not configured. QEMU
    /// listens on it once [`Qemu::spawn`] returned (the harness's own QMP
    /// session is connected by then, and the monitors are set up together).
    pub fn extra_qmp_path(&self) -> Option<&Path> {
        self.extra_qmp_path.as_deref()
    }

    /// Connects a new [`BlockingQmp`] to the second QMP monitor
    /// ([`QemuConfig::extra_qmp_socket`]), e.g. to watch or steer a
    /// migration from another thread while the harness's session is busy.
    pub fn connect_extra_qmp(&self, timeout: Duration) -> Result<BlockingQmp> {
        let path = self.extra_qmp_path.as_deref().ok_or_else(|| {
            QemuError::Protocol(format!("VM {} has no extra_qmp_socket", self.name))
        })?;
        Ok(BlockingQmp::connect(path, timeout)?)
    }

    /// Path of the heartbeat socket (the guest's COM2,
    /// [`QemuConfig::heartbeat_socket`]); `None` if not configured.
    pub fn heartbeat_path(&self) -> Option<&Path> {
        self.heartbeat_path.as_deref()
    }

    /// The file holding the guest's main RAM ([`QemuConfig::ram_in_file`]; removed on drop),
    /// byte `i` being RAM offset `i`; `None` if the VM keeps its RAM anonymous.
    pub fn ram_file(&self) -> Option<&Path> {
        self.ram.file.as_deref()
    }

    pub(crate) fn ram_info(&self) -> &RamInfo {
        &self.ram
    }

    /// True if started with `-S` ([`QemuConfig::start_paused`]).
    pub fn started_paused(&self) -> bool {
        self.start_paused
    }

    /// This VM's temporary directory (removed on drop).
    pub fn workdir(&self) -> &Path {
        self.dir.path()
    }

    /// The guest's serial console output.
    pub fn serial(&self) -> &SerialLog {
        &self.serial
    }

    /// What QEMU printed on stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        ferry_testkit::sync::lock(&self.stderr).clone()
    }

    /// Sends one line to the guest's serial input. The guest understands
    /// `dN` (set dirty rate to N pages/tick) and `v` (verify at next tick).
    /// Only send after the guest printed `ready` (it resets its UART at boot).
    pub fn send_serial(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| QemuError::Protocol("QEMU stdin closed".into()))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| QemuError::io("writing to the guest serial port", e))
    }

    /// Sets the guest's dirty rate (pages per ~100 ms tick) and waits for the
    /// guest to acknowledge it.
    pub fn set_dirty_rate(&mut self, pages_per_tick: u32, timeout: Duration) -> Result<()> {
        let from = self.serial.len();
        self.send_serial(&format!("d{pages_per_tick}"))?;
        let want = format!("dirty set {pages_per_tick}");
        self.serial
            .wait_line_from(from, &want, timeout, |l| l == want)?;
        Ok(())
    }

    /// Asks the guest to verify its memory at its next tick and returns the
    /// report.
    pub fn request_verify(&mut self, timeout: Duration) -> Result<VerifyReport> {
        let from = self.serial.len();
        self.send_serial("v")?;
        self.serial.wait_verify_from(from, timeout)
    }

    /// Returns QEMU's exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child
            .try_wait()
            .map_err(|e| QemuError::io("checking the QEMU process", e))
    }

    /// Kills QEMU now (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            tracing::debug!(vm = %self.name, pid = self.child.id(), "killing QEMU");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

type Attached = (
    Option<ChildStdin>,
    SerialLog,
    Arc<Mutex<Vec<String>>>,
    BlockingQmp,
);

/// Starts the stdout/stderr readers and connects QMP.
fn attach(child: &mut Child, config: &QemuConfig, qmp_path: &Path) -> Result<Attached> {
    let stdin = child.stdin.take();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let serial = match child.stdout.take() {
        Some(out) => SerialLog::spawn_reader(&config.name, out)?,
        None => return Err(QemuError::Protocol("QEMU stdout not captured".into())),
    };
    if let Some(err) = child.stderr.take() {
        let sink = Arc::clone(&stderr);
        let vm = config.name.clone();
        std::thread::Builder::new()
            .name(format!("stderr-{}", config.name))
            .spawn(move || {
                for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                    tracing::debug!(vm = %vm, "qemu stderr: {line}");
                    let mut v = ferry_testkit::sync::lock(&sink);
                    if v.len() < 1000 {
                        v.push(line);
                    }
                }
            })
            .map_err(|e| QemuError::io("spawning the stderr reader thread", e))?;
    }
    match connect_qmp(qmp_path, config.qmp_timeout, child) {
        Ok(qmp) => Ok((stdin, serial, stderr, qmp)),
        Err(QemuError::Exited { status, .. }) => {
            // Give the stderr thread a moment so the error says why.
            std::thread::sleep(Duration::from_millis(200));
            let tail = ferry_testkit::sync::lock(&stderr).join("\n");
            Err(QemuError::Exited {
                name: config.name.clone(),
                status,
                stderr: tail,
            })
        }
        Err(e) => Err(e),
    }
}

fn connect_qmp(path: &Path, timeout: Duration, child: &mut Child) -> Result<BlockingQmp> {
    let deadline = Instant::now() + timeout;
    // Wait for the socket to appear, noticing an early exit (bad arguments).
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(QemuError::Exited {
                name: String::new(),
                status: status.to_string(),
                stderr: String::new(),
            });
        }
        if Instant::now() >= deadline {
            return Err(QemuError::timeout(
                format!("QMP socket {}", path.display()),
                timeout,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(BlockingQmp::connect(path, timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_com2_and_extra_qmp_is_a_control_monitor() {
        let image = GuestImage::from_path("/k");
        let plain = QemuConfig::default().args(&image, Path::new("/q.sock"), None);
        assert!(!plain
            .iter()
            .any(|a| a.contains("hb0") || a.contains("qmp1")));

        let cfg = QemuConfig::default()
            .with_heartbeat_socket("/t/hb.sock")
            .with_extra_qmp_socket("/t/a,b.qmp");
        let a = cfg.args(&image, Path::new("/q.sock"), None);
        let serials: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "-serial")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(serials, ["chardev:ser0", "chardev:hb0"], "{a:?}");
        assert!(a.contains(&"socket,id=hb0,path=/t/hb.sock,server=on,wait=off".to_string()));
        assert!(a.contains(&"socket,id=qmp1,path=/t/a,,b.qmp,server=on,wait=off".to_string()));
        let mon = a.iter().position(|s| s == "-mon").expect("-mon");
        assert_eq!(a[mon + 1], "chardev=qmp1,mode=control");
    }

    #[test]
    fn ram_dirs_of_gone_processes_are_swept_ours_kept() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let gone = child.id();
        child.wait().expect("wait");
        let stale = Path::new(RAM_FILE_DIR).join(format!("{RAM_DIR_PREFIX}{gone}-test"));
        let ours = Path::new(RAM_FILE_DIR).join(format!("{RAM_DIR_PREFIX}{}-test", std::process::id()));
        for d in [&stale, &ours] {
            std::fs::create_dir_all(d).expect("create");
            std::fs::write(d.join("ram"), b"x").expect("write");
        }
        sweep_stale_ram_dirs();
        assert!(!stale.exists() && ours.exists());
        std::fs::remove_dir_all(&ours).expect("clean up");
    }

    #[test]
    fn ram_file_is_the_machine_memory_and_held_destination_has_minus_s() {
        let image = GuestImage::from_path("/k");
        let cfg = QemuConfig::default().held_at_cutover();
        let a = cfg.args(&image, Path::new("/q.sock"), Some(Path::new("/dev/shm/x,y/ram")));
        let after = |flag: &str| a.iter().position(|s| s == flag).map(|i| a[i + 1].as_str());
        assert_eq!(after("-machine"), Some("pc,memory-backend=ram0"));
        assert_eq!(
            after("-object"),
            Some("memory-backend-file,id=ram0,size=64M,mem-path=/dev/shm/x,,y/ram,share=on")
        );
        assert_eq!(after("-m"), Some("64M"));
        assert_eq!(after("-incoming"), Some("defer"));
        assert!(a.iter().any(|s| s == "-S"));
        let plain = QemuConfig::default().args(&image, Path::new("/q.sock"), None);
        assert_eq!(plain.iter().position(|s| s == "-machine").map(|i| plain[i + 1].as_str()), Some("pc"));
        assert!(!plain.iter().any(|s| s == "-S" || s == "-object"));
    }
}
