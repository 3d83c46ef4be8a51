//! The kernel backend: a veth pair between the two site namespaces with
//! `tc qdisc netem` (delay, jitter, loss) as root qdisc on each end and a
//! `tbf` child for the bottleneck rate and its drop-tail queue (`latency` =
//! queue length in time).  Outages are emulated by switching netem to
//! `loss 100%` for the window.  Needs `sch_netem` (probed once per process).
//!
//! The command lines are built by pure functions so they can be unit-tested
//! on machines without netem.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::command::run_args;
use crate::error::{Error, Result};
use crate::link_params::LinkParams;
use crate::netns;

/// Whether a qdisc command creates or modifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdiscOp {
    /// `tc qdisc add`
    Add,
    /// `tc qdisc change`
    Change,
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Formats a duration for `tc` in microseconds (`75000us`), which every `tc` accepts.
pub fn tc_time(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// Formats a rate for `tc` as bits per second (`1000000000bit`).
pub fn tc_rate(bits_per_sec: u64) -> String {
    format!("{bits_per_sec}bit")
}

/// Formats a probability as a `tc` percentage (`0.1%`).
pub fn tc_percent(p: f64) -> String {
    let s = format!("{:.6}", p * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// `tc` arguments of the netem qdisc of one side; `loss_override` replaces the
/// configured loss (used for outages).
pub fn netem_args(
    ns: &str,
    dev: &str,
    p: &LinkParams,
    op: QdiscOp,
    loss_override: Option<f64>,
) -> Vec<String> {
    let verb = match op {
        QdiscOp::Add => "add",
        QdiscOp::Change => "change",
    };
    let mut args = owned(&[
        "-n", ns, "qdisc", verb, "dev", dev, "root", "handle", "1:", "netem",
    ]);
    // netem's limit counts every packet it holds, delayed ones included: size it for the whole pipe.
    let horizon = (p.delay + p.jitter + p.queue).as_secs_f64() + 0.01;
    let limit = ((p.packet_rate_estimate() * horizon * 1.5) as u64).clamp(1000, 1_000_000);
    args.extend(owned(&[
        "limit",
        &limit.to_string(),
        "delay",
        &tc_time(p.delay),
    ]));
    if !p.jitter.is_zero() {
        // Without a `distribution` table netem draws jitter uniformly, like the userspace emulator.
        args.push(tc_time(p.jitter));
    }
    let loss = loss_override.unwrap_or(p.loss);
    // `change` replaces every option: restoring after an outage must say `loss 0%` explicitly.
    if loss > 0.0 || op == QdiscOp::Change {
        args.extend(owned(&["loss", "random", &tc_percent(loss)]));
    }
    args
}

/// `tc` arguments of the tbf child (rate + queue) of one side, if the link has a rate.
pub fn tbf_args(ns: &str, dev: &str, p: &LinkParams) -> Option<Vec<String>> {
    if p.rate_bps == 0 {
        return None;
    }
    // One millisecond worth of bytes, at least two full frames.
    let burst = (p.rate_bps / 8 / 1000).max(2 * 1514);
    // tbf rejects latency 0; a tiny queue still holds a packet or two.
    let latency = p.queue.max(Duration::from_micros(100));
    Some(owned(&[
        "-n",
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "parent",
        "1:1",
        "handle",
        "10:",
        "tbf",
        "rate",
        &tc_rate(p.rate_bps),
        "burst",
        &burst.to_string(),
        "latency",
        &tc_time(latency),
    ]))
}

/// `ip` arguments creating the veth pair `dev` from `ns_a` to `ns_b` (same
/// device name on both sides). Addresses and routes are set by the caller.
pub fn veth_args(ns_a: &str, ns_b: &str, dev: &str) -> Vec<String> {
    owned(&[
        "-n", ns_a, "link", "add", dev, "type", "veth", "peer", "name", dev, "netns", ns_b,
    ])
}

/// Probes (once per process) whether `tc qdisc add ... netem` works, on a
/// veth pair in a throwaway namespace. `Err` carries the reason.
pub fn probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone()
}

fn probe_uncached() -> std::result::Result<(), String> {
    let ns = format!("{}-probe", crate::naming::auto_name());
    if let Err(e) = netns::create(&ns) {
        return Err(format!("cannot create probe namespace: {e}"));
    }
    let result = run_args(
        "ip",
        &[
            "-n", &ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
        ],
    )
    .and_then(|_| {
        run_args(
            "tc",
            &[
                "-n", &ns, "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms",
            ],
        )
    })
    .map(|_| ())
    .map_err(|e| e.to_string());
    if let Err(e) = netns::delete(&ns) {
        tracing::warn!(netns = %ns, error = %e, "could not delete probe namespace");
    }
    match &result {
        Ok(()) => tracing::debug!("tc netem is available"),
        Err(e) => tracing::debug!(reason = %e, "tc netem is not available"),
    }
    result
}

/// One side of a netem link, for setup and outage switching.
#[derive(Debug, Clone)]
pub struct NetemSide {
    /// Namespace.
    pub ns: String,
    /// Device (veth end) in that namespace.
    pub dev: String,
    /// What this side's egress does (i.e. the direction leaving this side).
    pub params: LinkParams,
}

/// Installs the qdiscs of one side.
pub fn install(side: &NetemSide) -> Result<()> {
    run_args(
        "tc",
        &netem_args(&side.ns, &side.dev, &side.params, QdiscOp::Add, None),
    )?;
    if let Some(args) = tbf_args(&side.ns, &side.dev, &side.params) {
        run_args("tc", &args)?;
    }
    Ok(())
}

/// Background thread that turns both sides' netem to 100 % loss during the
/// outage window and back afterwards. Stops early when dropped.
#[derive(Debug)]
pub struct OutageScheduler {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OutageScheduler {
    /// Schedules the window `(start, end)` measured from `epoch` on `sides`.
    pub fn start(
        sides: Vec<NetemSide>,
        epoch: Instant,
        window: (Duration, Duration),
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netem-outage".into())
            .spawn(move || {
                let wait_until = |t: Duration| -> bool {
                    let deadline = epoch + t;
                    let left = deadline.saturating_duration_since(Instant::now());
                    matches!(rx.recv_timeout(left), Err(RecvTimeoutError::Timeout))
                };
                if !wait_until(window.0) {
                    return;
                }
                switch(&sides, true);
                // Restore even when stopped early, so the link is usable until torn down.
                let _ = wait_until(window.1);
                switch(&sides, false);
            })
            .map_err(|e| Error::io("spawning outage thread", e))?;
        Ok(OutageScheduler {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the scheduler (restoring the link if inside the window). Idempotent.
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("netem outage thread panicked");
            }
        }
    }
}

impl Drop for OutageScheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns the sides' netem to 100 % loss (`down`) or back to their configured loss.
pub fn switch(sides: &[NetemSide], down: bool) {
    tracing::info!(down, "netem outage switch");
    for side in sides {
        let loss = down.then_some(1.0);
        if let Err(e) = run_args(
            "tc",
            &netem_args(&side.ns, &side.dev, &side.params, QdiscOp::Change, loss),
        ) {
            tracing::warn!(netns = %side.ns, error = %e, "netem outage switch failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LinkParams {
        LinkParams {
            delay: Duration::from_millis(75),
            jitter: Duration::from_millis(2),
            rate_bps: 1_000_000_000,
            queue: Duration::from_millis(50),
            loss: 0.001,
            outage: None,
            seed: 0,
        }
    }

    #[test]
    fn netem_command() {
        let args = netem_args("ns-a", "wan0", &params(), QdiscOp::Add, None);
        let line = args.join(" ");
        assert!(
            line.starts_with("-n ns-a qdisc add dev wan0 root handle 1: netem limit "),
            "{line}"
        );
        assert!(
            line.ends_with("delay 75000us 2000us loss random 0.1%"),
            "{line}"
        );
        // 166k pps * 0.137 s * 1.5 ≈ 34k packets of netem limit.
        let limit: u64 = args[11].parse().unwrap_or(0);
        assert!((30_000..40_000).contains(&limit), "{limit}");
    }

    #[test]
    fn netem_outage_and_plain() {
        let p = LinkParams {
            jitter: Duration::ZERO,
            loss: 0.0,
            ..params()
        };
        let line = netem_args("x", "wan0", &p, QdiscOp::Change, Some(1.0)).join(" ");
        assert!(
            line.contains("qdisc change dev wan0 root handle 1: netem"),
            "{line}"
        );
        assert!(line.ends_with("delay 75000us loss random 100%"), "{line}");
        let line = netem_args("x", "wan0", &p, QdiscOp::Add, None).join(" ");
        assert!(line.ends_with("delay 75000us"), "{line}");
        let line = netem_args("x", "wan0", &p, QdiscOp::Change, None).join(" ");
        assert!(line.ends_with("delay 75000us loss random 0%"), "{line}");
    }

    #[test]
    fn tbf_command() {
        let line = tbf_args("ns-b", "wan0", &params()).map(|a| a.join(" "));
        assert_eq!(
            line.as_deref(),
            Some("-n ns-b qdisc add dev wan0 parent 1:1 handle 10: tbf rate 1000000000bit burst 125000 latency 50000us")
        );
        let unlimited = LinkParams {
            rate_bps: 0,
            ..params()
        };
        assert!(tbf_args("ns-b", "wan0", &unlimited).is_none());
        let slow = LinkParams {
            rate_bps: 1_000_000,
            queue: Duration::ZERO,
            ..params()
        };
        let line = tbf_args("n", "d", &slow)
            .map(|a| a.join(" "))
            .unwrap_or_default();
        assert!(line.ends_with("burst 3028 latency 100us"), "{line}");
    }

    #[test]
    fn veth_command() {
        assert_eq!(
            veth_args("s-a", "s-b", "wan0").join(" "),
            "-n s-a link add wan0 type veth peer name wan0 netns s-b"
        );
    }

    #[test]
    fn times_and_rates() {
        assert_eq!(tc_time(Duration::from_millis(75)), "75000us");
        assert_eq!(tc_rate(200_000_000), "200000000bit");
    }

    #[test]
    fn percentages() {
        assert_eq!(tc_percent(0.001), "0.1%");
        assert_eq!(tc_percent(1.0), "100%");
        assert_eq!(tc_percent(0.0125), "1.25%");
    }
}
