//! Small system helpers tests share: the root check, entering a network namespace, running a
//! command, child processes that die with the test, signals, and thin libc wrappers (each
//! `unsafe` block carries its `// SAFETY:` argument).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its bind-mounted namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// A binary of this workspace, next to the running test or bench executable's `deps/` folder
/// (`target/<profile>/NAME`). Tests of another package than the binary's cannot use
/// `CARGO_BIN_EXE_*`; `cargo build --workspace` (the test command runs it first) builds it.
///
/// # Panics
/// When the binary is not there, with the command that builds it.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    let profile_dir = exe
        .parent()
        .map(|dir| if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir })
        .expect("test executable has a parent folder");
    let bin = profile_dir.join(name);
    assert!(bin.is_file(), "{} not found: run `cargo build --workspace --all-targets` first", bin.display());
    bin
}

/// True when the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments, has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into the network namespace pinned by `ns` (an open namespace file,
/// e.g. `/run/netns/NAME`).
pub fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open descriptor for the whole call; setns(2) with CLONE_NEWNET only
    // changes the calling thread's network namespace (per-thread state in Linux), so no other
    // thread or memory is affected; no pointers are passed.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`) for good.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(Path::new(NETNS_DIR).join(name))?;
    setns_net(&file)
}

/// Runs `cmd args` and panics with its stderr on failure (a test step that must succeed).
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip -n NETNS args` (iproute2 inside namespace `netns`) and panics with its stderr on
/// failure.
pub fn ip_in(netns: &str, args: &[&str]) {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full);
}

/// Sends SIGINT (what Ctrl-C sends) to process `pid`.
pub fn interrupt(pid: u32) -> io::Result<()> {
    send_signal(pid, libc::SIGINT)
}

/// Sends SIGTERM (what `kill` and systemd's stop send) to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    send_signal(pid, libc::SIGTERM)
}

/// Sends `signal` (`libc::SIGTERM`, `SIGKILL`, `SIGSTOP`, ...) to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) takes a pid and a signal number; no pointers, no memory effects here.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A child process killed (SIGKILL) and reaped when dropped, panics included.
#[derive(Debug)]
pub struct Process(pub Child);

impl Process {
    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of the CPU times in `/proc`.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) takes a name constant and no pointers; it cannot fail for _SC_CLK_TCK.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

/// Nice -10 for the calling thread (tests run as root): measurements should not depend on
/// unrelated load on the machine. Best effort: without the privilege nothing changes.
pub fn raise_priority() {
    // SAFETY: setpriority(2) takes no pointers; PRIO_PROCESS with who = 0 changes the calling
    // thread's nice value only.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
}

/// Sets an int-valued `SOL_SOCKET` option (e.g. `SO_RCVBUFFORCE`) on `sock`.
pub fn set_socket_int(sock: &UdpSocket, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) reads `size_of::<c_int>()` bytes from `value`, a live local for the
    // whole call, on a descriptor `sock` owns.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `UDP_SEGMENT` (the UDP GSO segment size option of `SOL_UDP`), not in every libc version.
pub const UDP_SEGMENT: libc::c_int = 103;

/// Turns on UDP GSO for `sock`: one send of up to 64 KiB leaves as datagrams of `segment`
/// payload bytes, so a sender costs little CPU. Fails where the kernel lacks it.
pub fn enable_udp_gso(sock: &UdpSocket, segment: usize) -> io::Result<()> {
    let segment = libc::c_int::try_from(segment).map_err(io::Error::other)?;
    set_socket_int(sock, libc::SOL_UDP, UDP_SEGMENT, segment)
}

/// An exclusive advisory lock (flock) on a file, held until dropped: serialises tests across
/// threads and processes.
#[derive(Debug)]
pub struct FileLock {
    /// Held only to keep the descriptor, and with it the lock, open.
    _file: File,
}

impl FileLock {
    /// Opens (creating it if needed) `path` and blocks until the lock is ours.
    pub fn exclusive(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock(2) on a descriptor `file` owns for the whole call; no pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_a_missing_namespace_fails_cleanly() {
        let err = enter_netns("ferry-testkit-no-such-namespace").expect_err("no such namespace");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn file_lock_can_be_taken_twice_in_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        drop(FileLock::exclusive(&path).expect("first lock"));
        drop(FileLock::exclusive(&path).expect("second lock"));
    }

    #[test]
    fn clock_ticks_are_positive() {
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn interrupting_a_child_ends_it() {
        use std::os::unix::process::CommandExt;
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        // SIGINT back to its default in the child: a test run started in the background by a
        // non-interactive shell inherits it ignored, and the signal would do nothing.
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            sleep.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = sleep.spawn().expect("spawn sleep");
        interrupt(child.id()).expect("SIGINT");
        let status = child.wait().expect("wait");
        assert!(!status.success());
    }

    #[test]
    fn terminated_process_exits_and_a_dropped_one_is_killed() {
        let mut sleeper = Process(Command::new("sleep").arg("30").spawn().expect("spawn sleep"));
        assert!(sleeper.wait_timeout(Duration::from_millis(50)).expect("wait").is_none(), "still sleeping");
        terminate(sleeper.0.id()).expect("SIGTERM");
        let status = sleeper.wait_timeout(Duration::from_secs(5)).expect("wait").expect("exited");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
        let other = Process(Command::new("sleep").arg("30").spawn().expect("spawn sleep"));
        let pid = other.0.id();
        drop(other);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed and reaped");
    }

    #[test]
    fn socket_int_option_is_set() {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        set_socket_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF, 1 << 16).expect("SO_RCVBUF");
    }
}
