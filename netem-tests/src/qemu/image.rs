//! Building the test guest kernel with `nasm`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::{find_in_path, QemuError, Result};

/// The guest's assembly source (`netem-tests/guest/guest.asm`), embedded so the
/// harness works from any working directory.
pub const GUEST_SOURCE: &str = include_str!("../../guest/guest.asm");

/// Serializes builds (and apt-get runs) inside one test process.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The assembled test guest: a multiboot v1 flat kernel for `qemu -kernel`.
///
/// It can also describe a Linux guest ([`GuestImage::linux`], used by
/// [`super::LinuxGuest`]): a kernel, an initramfs (`-initrd`) and a fixed
/// kernel command line that replaces [`super::QemuConfig::guest`]'s.
#[derive(Debug, Clone)]
pub struct GuestImage {
    path: PathBuf,
    initrd: Option<PathBuf>,
    append: Option<String>,
}

impl GuestImage {
    /// Assembles the guest into `<target>/ferry-guest/guest-<hash>.bin` (cached
    /// by source hash; `<target>` is `$CARGO_TARGET_DIR` or the workspace's
    /// `target/`).
    ///
    /// If `nasm` is missing and we run as root, installs it with
    /// `apt-get install -y nasm` (running `apt-get update` first if needed),
    /// unless `FERRY_NO_APT=1`. Otherwise returns [`QemuError::ToolMissing`].
    pub fn build() -> Result<GuestImage> {
        Self::build_in(&default_cache_dir())
    }

    /// Like [`GuestImage::build`], with an explicit output directory.
    pub fn build_in(dir: &Path) -> Result<GuestImage> {
        let _guard = ferry_testkit::sync::lock(&BUILD_LOCK);
        let out = dir.join(format!(
            "guest-{:016x}.bin",
            fnv1a64(GUEST_SOURCE.as_bytes())
        ));
        if out.is_file() {
            tracing::debug!(path = %out.display(), "guest image cached");
            return Ok(GuestImage::from_path(out));
        }
        let nasm = ensure_nasm()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| QemuError::io(format!("creating {}", dir.display()), e))?;
        let tmp = tempfile::Builder::new()
            .prefix("guest-build")
            .tempdir_in(dir)
            .map_err(|e| QemuError::io(format!("creating a temp dir in {}", dir.display()), e))?;
        let src = tmp.path().join("guest.asm");
        let bin = tmp.path().join("guest.bin");
        std::fs::write(&src, GUEST_SOURCE)
            .map_err(|e| QemuError::io(format!("writing {}", src.display()), e))?;
        let mut cmd = Command::new(&nasm);
        cmd.arg("-f").arg("bin").arg("-o").arg(&bin).arg(&src);
        run(&mut cmd)?;
        // Atomic publish, safe against concurrent test processes.
        std::fs::rename(&bin, &out)
            .map_err(|e| QemuError::io(format!("moving guest image to {}", out.display()), e))?;
        tracing::info!(path = %out.display(), "assembled test guest");
        Ok(GuestImage::from_path(out))
    }

    /// Uses an already built image file.
    pub fn from_path(path: impl Into<PathBuf>) -> GuestImage {
        GuestImage {
            path: path.into(),
            initrd: None,
            append: None,
        }
    }

    /// A Linux kernel with an initramfs and its own command line (`-kernel`,
    /// `-initrd`, `-append`); [`super::QemuConfig::guest`] is then ignored.
    pub fn linux(
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        append: impl Into<String>,
    ) -> GuestImage {
        GuestImage {
            path: kernel.into(),
            initrd: Some(initrd.into()),
            append: Some(append.into()),
        }
    }

    /// Path of the kernel file, for `-kernel`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The initramfs (`-initrd`), for a Linux guest.
    pub fn initrd(&self) -> Option<&Path> {
        self.initrd.as_deref()
    }

    /// The image's own kernel command line (a Linux guest); `None` for the
    /// test guest, whose command line is [`GuestConfig::cmdline`].
    pub fn append(&self) -> Option<&str> {
        self.append.as_deref()
    }
}

/// Guest behaviour, passed as the multiboot command line (`-append`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Random pages rewritten after every tick (~100 ms by default, see
    /// [`GuestConfig::tick_jiffies`]). 64 pages/tick is about 2.6 MB/s of
    /// dirtying at 100 ms ticks. 0 stops dirtying.
    pub dirty_pages_per_tick: u32,
    /// Run a full memory verification every this many ticks (0 = only on
    /// request, see [`super::Qemu::request_verify`]).
    pub verify_every_ticks: u32,
    /// MiB of duplicate pages (4 repeating fill patterns), from 2 MiB up.
    pub dup_mib: u32,
    /// MiB of self-describing pseudo-random pages (max 768).
    pub rand_mib: u32,
    /// MiB of pages after the random region that must stay zero.
    pub zero_mib: u32,
    /// Seed of the guest's xorshift generator.
    pub seed: u32,
    /// Length of a tick in jiffies (10 ms each, the guest's PIT runs at
    /// 100 Hz): default 10 = 100 ms; the guest treats 0 as 1. Every tick
    /// prints `tick N` on COM1 and on COM2 (the heartbeat, see
    /// [`super::QemuConfig::heartbeat_socket`]), then dirties and maybe
    /// verifies, so those rates scale with it too.
    pub tick_jiffies: u32,
    /// `retouch=1`: after writing a page the guest invalidates its TLB entry
    /// (`invlpg`) and rewrites one dword of it with the same value. This works
    /// around QEMU TCG before 9.0 (upstream fix 03bfc2188f, "physmem: Fix
    /// migration dirty bitmap coherency with TCG memory access"; Debian's 7.2
    /// lacks it): a dirty-bitmap sync does not re-arm write tracking for pages
    /// in the TLB, so in a migration with more than two dirty syncs the pages
    /// the guest keeps writing (its variables, stack, seed table, ...) are not
    /// sent again and the destination resumes with stale copies (its tick
    /// counter jumps back; `verify` does not notice, as page and seed table
    /// are stale together). With it, such migrations leave the destination's
    /// memory identical to the source's, and those pages (small changes to a
    /// page sent before) are what QEMU's XBZRLE encodes. Off by default.
    pub retouch: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            dirty_pages_per_tick: 64,
            verify_every_ticks: 10,
            dup_mib: 4,
            rand_mib: 8,
            zero_mib: 4,
            seed: 0x2545_F491,
            tick_jiffies: 10,
            retouch: false,
        }
    }
}

impl GuestConfig {
    /// Bytes of guest RAM the layout needs (kernel area + all regions); the
    /// VM's `-m` must be at least this.
    pub fn min_ram_bytes(&self) -> u64 {
        (2 + u64::from(self.dup_mib) + u64::from(self.rand_mib) + u64::from(self.zero_mib)) << 20
    }

    /// Nominal tick period in guest time: `tick_jiffies` (at least 1) × 10 ms.
    /// Under TCG the guest's clock roughly follows wall time.
    pub fn tick_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(10 * u64::from(self.tick_jiffies.max(1)))
    }

    /// The multiboot command line the guest parses.
    pub fn cmdline(&self) -> String {
        format!(
            "dirty={} verify={} dup={} rand={} zero={} seed={} tick={} retouch={}",
            self.dirty_pages_per_tick,
            self.verify_every_ticks,
            self.dup_mib,
            self.rand_mib,
            self.zero_mib,
            self.seed,
            self.tick_jiffies,
            u8::from(self.retouch)
        )
    }
}

pub(crate) fn default_cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("ferry-guest")
}

pub(crate) fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    tracing::debug!(command = %line, "running");
    let out = cmd
        .output()
        .map_err(|e| QemuError::io(format!("running {line}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(QemuError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(2000)
                .collect(),
        })
    }
}

/// Returns the path of `nasm`, installing it with apt-get if allowed.
fn ensure_nasm() -> Result<PathBuf> {
    if let Some(p) = find_in_path("nasm") {
        return Ok(p);
    }
    let missing = |reason: String| QemuError::ToolMissing {
        tool: "nasm".into(),
        reason,
    };
    if std::env::var("FERRY_NO_APT").is_ok_and(|v| v == "1") {
        return Err(missing(
            "FERRY_NO_APT=1; install it with `apt-get install -y nasm`".into(),
        ));
    }
    if !ferry_testkit::sys::is_root() {
        return Err(missing(
            "not root, so not installing it; run `sudo apt-get install -y nasm`".into(),
        ));
    }
    if find_in_path("apt-get").is_none() {
        return Err(missing(
            "no apt-get on this machine; install nasm by hand".into(),
        ));
    }
    tracing::info!("nasm missing: installing it with apt-get");
    let install = || {
        let mut c = Command::new("apt-get");
        c.args([
            "install",
            "-y",
            "-q",
            "-o",
            "DPkg::Lock::Timeout=300",
            "nasm",
        ]);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    if let Err(first) = install() {
        tracing::info!(error = %first, "apt-get install nasm failed; running apt-get update and retrying");
        let mut up = Command::new("apt-get");
        up.args(["update", "-q", "-o", "DPkg::Lock::Timeout=300"]);
        run(&mut up)?;
        install()?;
    }
    find_in_path("nasm")
        .ok_or_else(|| missing("apt-get reported success but nasm is not on PATH".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_every_knob() {
        let c = GuestConfig {
            dirty_pages_per_tick: 7,
            ..GuestConfig::default()
        };
        assert_eq!(
            c.cmdline(),
            "dirty=7 verify=10 dup=4 rand=8 zero=4 seed=625341585 tick=10 retouch=0"
        );
        assert_eq!(c.min_ram_bytes(), 18 << 20);
    }
}
