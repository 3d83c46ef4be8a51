//! A realistic Linux guest: Debian's kernel and a busybox initramfs built at
//! run time, for migrations whose memory looks like a real machine's.
//!
//! # What is in it
//!
//! * Kernel: `/boot/vmlinuz-*` of Debian's `linux-image-amd64` (the package the
//!   metapackage depends on, e.g. `linux-image-6.1.0-56-amd64`).
//! * Initramfs (cpio newc, written here in Rust, uncompressed): `busybox` from
//!   Debian's `busybox-static`, the kernel package's `lib/modules/<release>/kernel/fs`
//!   tree (≈ 39 MB of real binaries standing in for the image's installed
//!   files; not loaded, just files) and `/init`, the shell script
//!   `linux_init.sh` next to this file.
//! * `/init` mounts proc/sys/devtmpfs/tmpfs, builds a memory mix in tmpfs
//!   (see [`LinuxGuestConfig`]: duplicate copies of binaries, compressible
//!   text that is the same in every guest of the image, per-boot
//!   `/dev/urandom` data), prints a summary (`mix ...`, `mem ...`), `ready`,
//!   then `tick N` on the console (COM1) every ~100 ms while a background
//!   loop rewrites part of a file each tick. Building the default mix takes
//!   about a minute under TCG (`seq` and `awk` compute in floating point,
//!   which TCG emulates slowly); the kernel itself boots in about 4 s.
//!   Serial input `v` re-checks the
//!   md5 sums of the files it generated (`verify ok tick=0 sum=...`, parsed
//!   by [`super::Qemu::request_verify`]).
//!
//! # Where the Debian files come from ([`LinuxGuest::build`])
//!
//! In this order: `$FERRY_LINUX_KERNEL` / `$FERRY_BUSYBOX` (and optionally
//! `$FERRY_LINUX_MODULES`, a `lib/modules/<release>` directory) if set; the
//! host's installed packages (`linux-image-amd64` → `/boot/vmlinuz-*`,
//! `busybox-static` → `/bin/busybox`); an earlier download in
//! `<target>/ferry-guest/linux/`; else `apt-get download` of the two packages
//! into that cache and `dpkg-deb --fsys-tarfile | tar -x` of just the files
//! needed. Downloading rather than installing keeps the host's `/boot` and
//! `/lib/modules` untouched (installing a kernel package also runs
//! initramfs-tools and bootloader hooks on the host) and needs no root once
//! the apt lists exist. As root, a missing apt list is fetched with
//! `apt-get update` unless `FERRY_NO_APT=1`. If none of this works the error
//! is [`QemuError::ToolMissing`] with [`LINUX_GUEST_APT_HINT`].
//!
//! # Caveat: QEMU 7.2 TCG dirty tracking
//!
//! Under TCG before QEMU 9.0, pages the guest keeps writing after the second
//! dirty-bitmap sync may not be sent again (see `netem-tests/guest/README.md`,
//! "retouch"). A Linux guest cannot work around that, so keep its migrations
//! short (few passes): the destination may hold stale copies of hot pages.
//! `v` only checks the files written before the migration.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::image::{default_cache_dir, fnv1a64, run};
use super::{find_in_path, GuestImage, Qemu, QemuConfig, QemuError, Result};

/// The guest's `/init` (busybox `sh`).
pub const LINUX_INIT_SCRIPT: &str = include_str!("linux_init.sh");

/// What to tell a user whose machine lacks the Debian packages.
pub const LINUX_GUEST_APT_HINT: &str = "the Linux test guest needs Debian's kernel and static busybox: \
run `apt-get update && apt-get install -y linux-image-amd64 busybox-static` (as root), or let \
the harness download them (`apt-get download`, needs the apt lists: `apt-get update`; not with \
FERRY_NO_APT=1), or set FERRY_LINUX_KERNEL=/path/to/vmlinuz and FERRY_BUSYBOX=/path/to/static/busybox";

/// Serializes downloads and initramfs builds inside one process.
static LINUX_BUILD_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the Linux guest's `/init` builds, passed as `ferry_*=N` on the kernel
/// command line (so the initramfs is the same for every setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuestConfig {
    /// Guest RAM, MiB (`-m`).
    pub memory_mib: u32,
    /// Copies ("container layers") of busybox and the `btrfs`, `xfs`, `ext4`
    /// and `nfs` module directories (≈ 16 MB per copy): duplicate pages.
    pub copies: u32,
    /// MiB of generated text, half `seq` numbers and half web-server access
    /// log lines (awk with a fixed seed): compressible, and the same in every
    /// guest of the image.
    pub text_mib: u32,
    /// MiB read from `/dev/urandom`: incompressible, different in every boot.
    pub rand_mib: u32,
    /// MiB of the file the workload keeps rewriting.
    pub hot_mib: u32,
    /// KiB of that file rewritten per tick (half random, half log text);
    /// below 8 the workload is off.
    pub dirty_kib_per_tick: u32,
    /// Tick period, ms (`tick N` lines and the workload).
    pub tick_ms: u32,
    /// More kernel parameters (e.g. `nokaslr`).
    pub extra_cmdline: String,
}

impl Default for LinuxGuestConfig {
    fn default() -> Self {
        LinuxGuestConfig {
            memory_mib: 256,
            copies: 2,
            text_mib: 32,
            rand_mib: 16,
            hot_mib: 4,
            dirty_kib_per_tick: 256,
            tick_ms: 100,
            extra_cmdline: String::new(),
        }
    }
}

impl LinuxGuestConfig {
    /// The kernel command line: serial console, quiet, panic reboots (so
    /// QEMU, started with `-no-reboot`, exits), then the `ferry_*` knobs.
    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "console=ttyS0,115200 quiet loglevel=3 panic=-1 ferry_copies={} ferry_text_mib={} \
             ferry_rand_mib={} ferry_hot_mib={} ferry_dirty_kib={} ferry_tick_ms={}",
            self.copies,
            self.text_mib,
            self.rand_mib,
            self.hot_mib,
            self.dirty_kib_per_tick,
            self.tick_ms
        );
        if !self.extra_cmdline.trim().is_empty() {
            s.push(' ');
            s.push_str(self.extra_cmdline.trim());
        }
        s
    }
}

/// The Debian files a Linux guest is made of.
#[derive(Debug, Clone)]
pub struct LinuxGuestFiles {
    /// `vmlinuz-<release>`.
    pub kernel: PathBuf,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// `lib/modules/<release>` (only its `kernel/fs` subtree is used), if
    /// available.
    pub modules: Option<PathBuf>,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// Where they came from, for humans.
    pub source: String,
}

/// A built Linux guest: kernel + initramfs + command line, ready for
/// [`Qemu::spawn`] with [`LinuxGuest::image`] and [`LinuxGuest::qemu_config`].
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    image: GuestImage,
    config: LinuxGuestConfig,
    files: LinuxGuestFiles,
    initramfs_bytes: u64,
}

impl LinuxGuest {
    /// Finds (or downloads) the Debian files and writes the initramfs into
    /// `<target>/ferry-guest/linux/initramfs-<hash>.cpio` (cached by content).
    pub fn build(config: &LinuxGuestConfig) -> Result<LinuxGuest> {
        let cache = default_cache_dir().join("linux");
        let _guard = ferry_testkit::sync::lock(&LINUX_BUILD_LOCK);
        let files = locate_files(&cache)?;
        let initramfs = build_initramfs(&cache, &files)?;
        let initramfs_bytes = std::fs::metadata(&initramfs)
            .map_err(|e| QemuError::io(format!("reading {}", initramfs.display()), e))?
            .len();
        tracing::info!(kernel = %files.kernel.display(), initramfs = %initramfs.display(), initramfs_bytes, source = %files.source, "Linux guest ready");
        Ok(LinuxGuest {
            image: GuestImage::linux(&files.kernel, initramfs, config.cmdline()),
            config: config.clone(),
            files,
            initramfs_bytes,
        })
    }

    /// The image for [`Qemu::spawn`].
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &LinuxGuestConfig {
        &self.config
    }

    /// The Debian files used.
    pub fn files(&self) -> &LinuxGuestFiles {
        &self.files
    }

    /// Size of the initramfs, bytes.
    pub fn initramfs_bytes(&self) -> u64 {
        self.initramfs_bytes
    }

    /// A [`QemuConfig`] named `name` with this guest's RAM size. Add
    /// `.held_at_cutover()` for a migration destination.
    pub fn qemu_config(&self, name: &str) -> QemuConfig {
        QemuConfig {
            memory_mib: self.config.memory_mib,
            ..QemuConfig::default()
        }
        .named(name)
    }

    /// Waits until `vm`'s `/init` printed `ready` (memory mix built) and
    /// returns its summary lines (`ferry-linux-guest ...`, `mix ...`,
    /// `mem ...`, `built in ...`).
    pub fn wait_ready(vm: &Qemu, timeout: Duration) -> Result<Vec<String>> {
        let log = vm.serial();
        log.wait_line_from(0, "the Linux guest's `ready`", timeout, |l| {
            l.trim() == "ready"
        })?;
        Ok(log
            .lines()
            .into_iter()
            .filter(|l| {
                l.starts_with("ferry-linux-guest")
                    || l.starts_with("mix ")
                    || l.starts_with("mem ")
                    || l.starts_with("built in")
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Finding the Debian files.

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn missing(reason: impl Into<String>) -> QemuError {
    QemuError::ToolMissing {
        tool: "linux-image-amd64 / busybox-static".into(),
        reason: format!("{}; {LINUX_GUEST_APT_HINT}", reason.into()),
    }
}

/// `vmlinuz-<release>` → `<release>`.
fn release_of(kernel: &Path) -> Option<String> {
    kernel
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")
        .map(str::to_string)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with(" installed")
        })
}

/// The newest `vmlinuz-*` in `boot` (by release string, version-aware
/// enough for Debian's `6.1.0-N-amd64`).
fn newest_kernel(boot: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(boot)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| release_of(p).is_some() && p.is_file())
        .collect();
    found.sort_by_key(|p| version_key(&release_of(p).unwrap_or_default()));
    found.pop()
}

fn version_key(s: &str) -> Vec<(u64, String)> {
    s.split(['.', '-', '_', '+', '~'])
        .map(|part| (part.parse().unwrap_or(0), part.to_string()))
        .collect()
}

fn modules_dir(root: &Path, release: &str) -> Option<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(release))
        .find(|p| p.join("kernel").is_dir())
}

fn locate_files(cache: &Path) -> Result<LinuxGuestFiles> {
    // 1. Explicit paths.
    let env_kernel = env_path("FERRY_LINUX_KERNEL");
    let env_busybox = env_path("FERRY_BUSYBOX");
    let mut kernel: Option<(PathBuf, String, Option<PathBuf>, String)> = env_kernel.map(|k| {
        let rel = release_of(&k).unwrap_or_else(|| "custom".into());
        let modules = env_path("FERRY_LINUX_MODULES").or_else(|| modules_dir(Path::new("/"), &rel));
        (k, rel, modules, "FERRY_LINUX_KERNEL".to_string())
    });
    let mut busybox: Option<(PathBuf, String)> =
        env_busybox.map(|b| (b, "FERRY_BUSYBOX".to_string()));

    // 2. Installed packages.
    if kernel.is_none() && dpkg_installed("linux-image-amd64") {
        if let Some(k) = newest_kernel(Path::new("/boot")) {
            let rel = release_of(&k).unwrap_or_default();
            let modules = modules_dir(Path::new("/"), &rel);
            kernel = Some((k, rel, modules, "installed linux-image-amd64".into()));
        }
    }
    if busybox.is_none() && dpkg_installed("busybox-static") {
        busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .map(|p| (p, "installed busybox-static".into()));
    }

    // 3./4. The download cache, filled with apt-get download if needed.
    if kernel.is_none() || busybox.is_none() {
        let root = match cached_debs(cache) {
            Some(r) => r,
            None => download_debs(cache)?,
        };
        let label = format!("Debian packages in {}", root.display());
        if kernel.is_none() {
            let k = newest_kernel(&root.join("boot")).ok_or_else(|| {
                missing(format!("no vmlinuz-* in {}", root.join("boot").display()))
            })?;
            let rel = release_of(&k).unwrap_or_default();
            let modules = modules_dir(&root, &rel);
            kernel = Some((k, rel, modules, label.clone()));
        }
        if busybox.is_none() {
            let b = root.join("bin/busybox");
            if !b.is_file() {
                return Err(missing(format!("no busybox in {}", root.display())));
            }
            busybox = Some((b, label));
        }
    }
    let (Some((kernel, kernel_release, modules, ksrc)), Some((busybox, bsrc))) = (kernel, busybox)
    else {
        return Err(missing("kernel or busybox not found"));
    };
    for p in [&kernel, &busybox] {
        if !p.is_file() {
            return Err(missing(format!("{} does not exist", p.display())));
        }
    }
    let source = if ksrc == bsrc {
        ksrc
    } else {
        format!("kernel: {ksrc}; busybox: {bsrc}")
    };
    Ok(LinuxGuestFiles {
        kernel,
        kernel_release,
        modules,
        busybox,
        source,
    })
}

/// The newest complete `debian-*` directory of the cache.
fn cached_debs(cache: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("debian-"))
                && p.join(".complete").is_file()
        })
        .collect();
    dirs.sort_by_key(|p| version_key(&p.file_name().unwrap_or_default().to_string_lossy()));
    dirs.pop()
}

fn apt_allowed() -> std::result::Result<(), String> {
    if std::env::var("FERRY_NO_APT").is_ok_and(|v| v == "1") {
        return Err("FERRY_NO_APT=1".into());
    }
    for tool in ["apt-get", "dpkg-deb", "tar"] {
        if find_in_path(tool).is_none() {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

/// `apt-get download PKGS` into `dir`, running `apt-get update` once (as
/// root) if the first try fails.
fn apt_download(dir: &Path, pkgs: &[&str]) -> Result<()> {
    let download = || {
        let mut c = Command::new("apt-get");
        c.current_dir(dir)
            .args(["download", "-q", "-o", "DPkg::Lock::Timeout=300"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive");
        if ferry_testkit::sys::is_root() {
            // The cache directory is root's; apt's `_apt` sandbox user could
            // not write there (it would only warn and fall back anyway).
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        run(&mut c)
    };
    match download() {
        Ok(()) => Ok(()),
        Err(first) if ferry_testkit::sys::is_root() => {
            tracing::info!(error = %first, "apt-get download failed; running apt-get update and retrying");
            let mut up = Command::new("apt-get");
            up.args(["update", "-q", "-o", "DPkg::Lock::Timeout=300"]);
            run(&mut up).map_err(|e| missing(format!("apt-get update failed: {e}")))?;
            download().map_err(|e| missing(format!("apt-get download failed: {e}")))
        }
        Err(e) => Err(missing(format!(
            "apt-get download failed (not root, so no apt-get update): {e}"
        ))),
    }
}

fn find_deb(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .map_err(|e| QemuError::io(format!("listing {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| missing(format!("apt-get download left no {prefix}*.deb")))
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let line = format!("dpkg-deb -f {} {field}", deb.display());
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .map_err(|e| QemuError::io(format!("running {line}"), e))?;
    if !out.status.success() {
        return Err(QemuError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x -C DEST --wildcards MEMBERS...`.
fn extract(deb: &Path, dest: &Path, members: &[&str]) -> Result<()> {
    let line = format!(
        "dpkg-deb --fsys-tarfile {} | tar -x {members:?}",
        deb.display()
    );
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| QemuError::io(format!("running {line}"), e))?;
    let stdout = dpkg
        .stdout
        .take()
        .ok_or_else(|| QemuError::Protocol("dpkg-deb stdout not captured".into()))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .arg("--wildcards")
        .args(members)
        .stdin(stdout)
        .output();
    let dpkg_out = dpkg.wait_with_output();
    let tar = tar.map_err(|e| QemuError::io(format!("running {line}"), e))?;
    let dpkg_out = dpkg_out.map_err(|e| QemuError::io(format!("running {line}"), e))?;
    if !tar.status.success() || !dpkg_out.status.success() {
        return Err(QemuError::Command {
            command: line,
            status: format!("dpkg-deb {}, tar {}", dpkg_out.status, tar.status),
            stderr: format!(
                "{} {}",
                String::from_utf8_lossy(&dpkg_out.stderr).trim(),
                String::from_utf8_lossy(&tar.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Downloads `linux-image-amd64` (and the kernel package it depends on) and
/// `busybox-static`, and extracts `boot/vmlinuz-*`,
/// `lib/modules/*/kernel/fs` and `bin/busybox` into
/// `<cache>/debian-<kernel version>/`.
fn download_debs(cache: &Path) -> Result<PathBuf> {
    apt_allowed().map_err(|why| missing(format!("cannot download the packages: {why}")))?;
    std::fs::create_dir_all(cache)
        .map_err(|e| QemuError::io(format!("creating {}", cache.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(cache)
        .map_err(|e| QemuError::io(format!("creating a temp dir in {}", cache.display()), e))?;
    let debs = tmp.path().join("debs");
    let root = tmp.path().join("root");
    for d in [&debs, &root] {
        std::fs::create_dir_all(d)
            .map_err(|e| QemuError::io(format!("creating {}", d.display()), e))?;
    }
    tracing::info!("downloading linux-image-amd64 and busybox-static with apt-get download");
    apt_download(&debs, &["linux-image-amd64", "busybox-static"])?;
    let meta = find_deb(&debs, "linux-image-amd64_")?;
    let depends = deb_field(&meta, "Depends")?;
    let kernel_pkg = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && *d != "linux-image-amd64")
        .ok_or_else(|| {
            missing(format!(
                "linux-image-amd64 depends on no kernel package: {depends:?}"
            ))
        })?
        .to_string();
    apt_download(&debs, &[&kernel_pkg])?;
    let kernel_deb = find_deb(&debs, &format!("{kernel_pkg}_"))?;
    let version = deb_field(&kernel_deb, "Version")?;
    extract(
        &kernel_deb,
        &root,
        &["./boot/vmlinuz-*", "./lib/modules/*/kernel/fs"],
    )?;
    extract(
        &find_deb(&debs, "busybox-static_")?,
        &root,
        &["./bin/busybox"],
    )?;
    std::fs::write(
        root.join(".complete"),
        format!("{kernel_pkg} {version}\nbusybox-static\n"),
    )
    .map_err(|e| QemuError::io("writing .complete", e))?;
    let safe: String = format!("{kernel_pkg}_{version}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = cache.join(format!("debian-{safe}"));
    if out.join(".complete").is_file() {
        return Ok(out); // Another process won the race.
    }
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&root, &out)
        .map_err(|e| QemuError::io(format!("moving the packages to {}", out.display()), e))?;
    tracing::info!(dir = %out.display(), "Debian kernel and busybox extracted");
    Ok(out)
}

// ---------------------------------------------------------------------------
// The initramfs.

/// What goes into the archive, by path inside it.
enum Node {
    Dir,
    File { source: PathBuf, mode: u32 },
    Data { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32, mode: u32 },
}

fn build_initramfs(cache: &Path, files: &LinuxGuestFiles) -> Result<PathBuf> {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "lib",
    ] {
        nodes.insert(d.into(), Node::Dir);
    }
    nodes.insert(
        "dev/console".into(),
        Node::CharDev {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    );
    nodes.insert(
        "bin/busybox".into(),
        Node::File {
            source: files.busybox.clone(),
            mode: 0o755,
        },
    );
    nodes.insert("bin/sh".into(), Node::Symlink("busybox".into()));
    nodes.insert(
        "init".into(),
        Node::Data {
            data: LINUX_INIT_SCRIPT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    let mut key = format!(
        "{LINUX_INIT_SCRIPT}\0{}\0{}\0",
        files.busybox.display(),
        len_of(&files.busybox)
    );
    if let Some(modules) = &files.modules {
        let fs = modules.join("kernel").join("fs");
        if fs.is_dir() {
            let prefix = format!("lib/modules/{}/kernel/fs", files.kernel_release);
            add_parents(&mut nodes, &prefix);
            add_tree(&mut nodes, &fs, &prefix)?;
            key += &format!("{}\0", fs.display());
        }
    }
    let file_bytes: u64 = nodes
        .values()
        .map(|n| match n {
            Node::File { source, .. } => len_of(source),
            _ => 0,
        })
        .sum();
    key += &format!("{} {file_bytes}", nodes.len());
    let out = cache.join(format!("initramfs-{:016x}.cpio", fnv1a64(key.as_bytes())));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| QemuError::io(format!("creating {}", cache.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix("initramfs-")
        .suffix(".tmp")
        .tempfile_in(cache)
        .map_err(|e| QemuError::io(format!("creating a temp file in {}", cache.display()), e))?;
    {
        let mut w = CpioWriter::new(BufWriter::new(tmp.as_file()));
        for (name, node) in &nodes {
            match node {
                Node::Dir => w.entry(name, 0o040_755, &[], (0, 0))?,
                Node::File { source, mode } => {
                    let data = std::fs::read(source)
                        .map_err(|e| QemuError::io(format!("reading {}", source.display()), e))?;
                    w.entry(name, 0o100_000 | mode, &data, (0, 0))?;
                }
                Node::Data { data, mode } => w.entry(name, 0o100_000 | mode, data, (0, 0))?,
                Node::Symlink(target) => w.entry(name, 0o120_777, target.as_bytes(), (0, 0))?,
                Node::CharDev { major, minor, mode } => {
                    w.entry(name, 0o020_000 | mode, &[], (*major, *minor))?
                }
            }
        }
        w.finish()?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile creates 0600; QEMU may run as another user.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| QemuError::io(format!("chmod {}", tmp.path().display()), e))?;
    }
    tmp.persist(&out)
        .map_err(|e| QemuError::io(format!("writing {}", out.display()), e.error))?;
    tracing::info!(path = %out.display(), entries = nodes.len(), "wrote the Linux guest's initramfs");
    Ok(out)
}

fn len_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn add_parents(nodes: &mut BTreeMap<String, Node>, path: &str) {
    let mut cur = String::new();
    for part in path.split('/') {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(part);
        nodes.entry(cur.clone()).or_insert(Node::Dir);
    }
}

/// Adds the regular files and directories under `dir` as `prefix/...`
/// (symlinks and other special files are skipped). BTreeMap order puts a
/// directory before its contents.
fn add_tree(nodes: &mut BTreeMap<String, Node>, dir: &Path, prefix: &str) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| QemuError::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| QemuError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let inner = format!("{prefix}/{name}");
        let ft = entry
            .file_type()
            .map_err(|e| QemuError::io(format!("stat {}", path.display()), e))?;
        if ft.is_dir() {
            nodes.insert(inner.clone(), Node::Dir);
            add_tree(nodes, &path, &inner)?;
        } else if ft.is_file() {
            nodes.insert(
                inner,
                Node::File {
                    source: path,
                    mode: 0o644,
                },
            );
        }
    }
    Ok(())
}

/// A minimal writer of the cpio "newc" format the kernel unpacks
/// (`Documentation/driver-api/early-userspace/buffer-format.rst`).
struct CpioWriter<W: Write> {
    w: W,
    offset: u64,
    ino: u32,
}

impl<W: Write> CpioWriter<W> {
    fn new(w: W) -> Self {
        CpioWriter {
            w,
            offset: 0,
            ino: 1,
        }
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| QemuError::io("writing the initramfs", e))?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }

    /// One entry: `name` without a leading `/`, `mode` with the file type
    /// bits, `data` the file content or symlink target, `rdev` (major,
    /// minor) for device nodes.
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| QemuError::Protocol(format!("{name} is too large for cpio")))?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.ino += 1;
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()
    }

    fn finish(mut self) -> Result<()> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.w
            .flush()
            .map_err(|e| QemuError::io("writing the initramfs", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_console_and_knobs() {
        let c = LinuxGuestConfig {
            extra_cmdline: " nokaslr ".into(),
            ..LinuxGuestConfig::default()
        };
        assert_eq!(
            c.cmdline(),
            "console=ttyS0,115200 quiet loglevel=3 panic=-1 ferry_copies=2 ferry_text_mib=32 \
             ferry_rand_mib=16 ferry_hot_mib=4 ferry_dirty_kib=256 ferry_tick_ms=100 nokaslr"
        );
    }

    #[test]
    fn cpio_newc_layout() {
        let mut buf = Vec::new();
        {
            let mut w = CpioWriter::new(&mut buf);
            w.entry("init", 0o100_755, b"#!/bin/sh\n", (0, 0)).unwrap();
            w.entry("dev/console", 0o020_600, &[], (5, 1)).unwrap();
            w.finish().unwrap();
        }
        // Header 110 bytes + "init\0" = 115, padded to 116, then 10 bytes of
        // data padded to 12.
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(&buf[110..115], b"init\0");
        assert_eq!(&buf[116..126], b"#!/bin/sh\n");
        let second = &buf[128..];
        assert_eq!(&second[..6], b"070701");
        // rdevmajor / rdevminor are fields 10 and 11 (after the magic).
        assert_eq!(&second[6 + 9 * 8..6 + 10 * 8], b"00000005");
        assert_eq!(&second[6 + 10 * 8..6 + 11 * 8], b"00000001");
        assert!(buf.len() % 4 == 0);
        let tail = String::from_utf8_lossy(&buf[buf.len() - 24..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn kernel_release_and_version_order() {
        assert_eq!(
            release_of(Path::new("/boot/vmlinuz-6.1.0-56-amd64")).as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert!(version_key("6.1.0-9-amd64") < version_key("6.1.0-56-amd64"));
    }
}

/// Boots the real guest (root not needed; QEMU and the Debian packages are).
/// `cargo test -p ferry-netem --lib linux_guest -- --ignored --nocapture`
#[cfg(test)]
mod boot_tests {
    use super::*;

    #[test]
    #[ignore = "boots Debian's kernel under TCG (about a minute); downloads packages if needed"]
    fn linux_guest_boots_ticks_and_verifies() {
        if !super::super::qemu_available() {
            println!("skipping: qemu-system-x86_64 not installed");
            return;
        }
        let guest = match LinuxGuest::build(&LinuxGuestConfig::default()) {
            Ok(g) => g,
            Err(e @ QemuError::ToolMissing { .. }) => {
                println!("skipping: {e}");
                return;
            }
            Err(e) => panic!("building the Linux guest: {e}"),
        };
        println!(
            "kernel {} ({}), initramfs {} bytes",
            guest.files().kernel.display(),
            guest.files().source,
            guest.initramfs_bytes()
        );
        let started = std::time::Instant::now();
        let mut vm = Qemu::spawn(guest.image(), &guest.qemu_config("linux"), None).expect("spawn");
        let info = LinuxGuest::wait_ready(&vm, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e}\n{}", vm.serial().tail(40)));
        println!("ready after {:.1} s", started.elapsed().as_secs_f64());
        for l in &info {
            println!("  {l}");
        }
        let t0 = std::time::Instant::now();
        let first = vm
            .serial()
            .wait_for_tick(1, Duration::from_secs(30))
            .expect("tick");
        let last = vm
            .serial()
            .wait_for_tick(first + 20, Duration::from_secs(60))
            .expect("ticks");
        println!(
            "ticks {first}..{last} in {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        let t1 = std::time::Instant::now();
        let v = vm.request_verify(Duration::from_secs(120)).expect("verify");
        println!("{v:?} in {:.1} s", t1.elapsed().as_secs_f64());
        assert!(matches!(v, super::super::VerifyReport::Ok { .. }), "{v:?}");
    }
}
