//! `ferry-host microvm run`: a reference microVM driven through a control socket.
//!
//! JSON lines over a Unix socket (`ferry_api::framing`, each line bounded), one request, one
//! reply: `{"cmd":"status"}`, `{"cmd":"pause"}` (replies with the kick's latency),
//! `{"cmd":"resume"}`, `{"cmd":"digest"}` (blake3 of guest memory; pause first for a stable
//! one), `{"cmd":"quit"}`. Clients are served one at a time. SIGINT/SIGTERM or `quit` end it.
//! Not yet wired to `migrate`/`serve` (phase 2 of issue 14).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ferry_api::framing::JsonLines;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::microvm::{calibrate, GuestParams, MicroVm, MicroVmConfig};

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Whether the vCPU runs, and what the guest reported.
    Status,
    /// Stop the vCPU now.
    Pause,
    /// Run the vCPU.
    Resume,
    /// blake3 of the guest memory.
    Digest,
    /// Stop the microVM and exit.
    Quit,
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The microVM's state.
    Status {
        /// The VM's name.
        name: String,
        /// Whether the vCPU runs.
        running: bool,
        /// Reports the guest made on port 0x3f8.
        reports: u64,
        /// The latest reported counter.
        counter: Option<u32>,
        /// Why the vCPU stopped, if it failed.
        vcpu_error: Option<String>,
    },
    /// The vCPU paused.
    Paused {
        /// From the request to the vCPU's acknowledgement, in microseconds.
        latency_us: u64,
    },
    /// The vCPU runs.
    Resumed,
    /// blake3 of guest memory, hex.
    Digest {
        /// The digest.
        blake3: String,
    },
    /// The microVM stops.
    Quitting,
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// `microvm run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The VM's name.
    pub name: String,
    /// The microVM.
    pub config: MicroVmConfig,
    /// The control socket's path.
    pub control: PathBuf,
}

fn answer(vm: &Mutex<MicroVm>, name: &str, request: Request) -> Reply {
    let vm = vm.lock();
    let result = match request {
        Request::Status => {
            let r = vm.reports();
            Ok(Reply::Status { name: name.to_string(), running: vm.is_running(), reports: r.count, counter: r.last.map(|l| l.0), vcpu_error: vm.vcpu_error() })
        }
        Request::Pause => vm.pause().map(|d| Reply::Paused { latency_us: d.as_micros() as u64 }),
        Request::Resume => vm.resume().map(|()| Reply::Resumed),
        Request::Digest => vm.memory_digest().map(|d| Reply::Digest { blake3: d.to_hex().to_string() }),
        Request::Quit => Ok(Reply::Quitting),
    };
    result.unwrap_or_else(|e| Reply::Error { message: e.to_string() })
}

/// Runs the microVM and its control socket until `quit` or a signal.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let cal = tokio::task::spawn_blocking(|| calibrate(std::time::Duration::from_millis(200))).await?.context("KVM calibration (is /dev/kvm usable?)")?;
    let GuestParams { pages, delay, report_every_log2 } = options.config.guest;
    tracing::info!(name = %options.name, mem = options.config.mem_size, pages, delay, report_every_log2, us_per_instruction = cal.us_per_instruction, control = %options.control.display(), "microVM starting");
    let vm = MicroVm::new(options.config).context("cannot create the microVM")?;
    vm.resume().context("cannot start the vCPU")?;
    let vm = Arc::new(Mutex::new(vm));
    if let Some(dir) = options.control.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&options.control);
    let listener = tokio::net::UnixListener::bind(&options.control).with_context(|| format!("cannot listen on {}", options.control.display()))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("control socket accept")?,
            _ = terminate.recv() => break Ok(()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let (r, w) = stream.into_split();
        let mut lines = JsonLines::new(r, w);
        let mut quit = false;
        while let Ok(Some(request)) = lines.recv::<Request>().await {
            let (vm, name) = (vm.clone(), options.name.clone());
            let reply = tokio::task::spawn_blocking(move || answer(&vm, &name, request)).await?;
            if lines.send(&reply).await.is_err() {
                break;
            }
            if request == Request::Quit {
                quit = true;
                break;
            }
        }
        if quit {
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(&options.control);
    tracing::info!(name = %options.name, "microVM stopped");
    result
}
