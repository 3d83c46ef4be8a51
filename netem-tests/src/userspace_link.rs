//! The userspace link emulator: forwards IP packets between two TUN devices,
//! one thread per direction, applying one-way delay (+ order-preserving
//! jitter), a bottleneck rate with a drop-tail queue sized in time, Bernoulli
//! loss and a scheduled outage.
//!
//! Each direction keeps its packets in a preallocated ring of fixed-size
//! slots: a packet is read from the ingress TUN straight into the next free
//! slot, stamped with its release time, and written to the egress TUN when
//! that time has come.  Release times never decrease, so the ring is a plain
//! FIFO.  The thread sleeps in `ppoll` on the ingress TUN (and a stop
//! `eventfd`) with a timeout equal to the next release time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ferry_testkit::rng::Rng;

use crate::error::{Error, Result};
use crate::link_params::LinkParams;
use crate::tun::Tun;

/// Bytes per ring slot; the TUN MTU (1500) must stay below this.
pub const SLOT_BYTES: usize = 2048;
/// Packets read (and, separately, released) per loop turn before re-checking the other side.
const BATCH: usize = 128;
/// Shortest timed sleep, see the end of [`Direction::run`].
const MIN_TIMER_NS: u64 = 30_000;
/// Idle link time (ps) that may be caught up in a burst, see [`Shaper::admit`].
const BURST_CREDIT_PS: u64 = 1_000_000_000;
/// Fewest and most slots a ring gets.
const MIN_SLOTS: usize = 4096;
const MAX_SLOTS: usize = 1 << 17;

/// Ring slots needed to hold everything in flight plus a full queue.
fn ring_slots(p: &LinkParams) -> usize {
    let horizon = (p.delay + p.jitter + p.queue).as_secs_f64() + 0.005;
    ((p.packet_rate_estimate() * horizon * 1.25) as usize)
        .clamp(MIN_SLOTS, MAX_SLOTS)
        .next_power_of_two()
}

/// Packet counters of one direction (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Packets read from the ingress TUN.
    pub received: u64,
    /// Packets written to the egress TUN.
    pub delivered: u64,
    /// Bytes written to the egress TUN (IP packets).
    pub delivered_bytes: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Dropped because the bottleneck queue was full.
    pub queue_drops: u64,
    /// Dropped during the outage window.
    pub outage_drops: u64,
    /// Dropped because the emulator's ring was full (should stay 0).
    pub overflow_drops: u64,
    /// Egress writes that failed.
    pub write_errors: u64,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    received: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    outage_drops: AtomicU64,
    overflow_drops: AtomicU64,
    write_errors: AtomicU64,
}

impl AtomicCounters {
    fn add(&self, c: &LinkCounters) {
        let pairs = [
            (&self.received, c.received),
            (&self.delivered, c.delivered),
            (&self.delivered_bytes, c.delivered_bytes),
            (&self.lost, c.lost),
            (&self.queue_drops, c.queue_drops),
            (&self.outage_drops, c.outage_drops),
            (&self.overflow_drops, c.overflow_drops),
            (&self.write_errors, c.write_errors),
        ];
        for (counter, v) in pairs {
            if v != 0 {
                counter.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> LinkCounters {
        LinkCounters {
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queue_drops: self.queue_drops.load(Ordering::Relaxed),
            outage_drops: self.outage_drops.load(Ordering::Relaxed),
            overflow_drops: self.overflow_drops.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// Preallocated FIFO of packets waiting for their release time.
struct Ring {
    data: Vec<u8>,
    len: Vec<u16>,
    release_ns: Vec<u64>,
    mask: usize,
    head: usize,
    count: usize,
}

impl Ring {
    fn new(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two());
        // Zeroed allocations are lazily backed by the kernel: untouched slots cost nothing.
        Ring {
            data: vec![0u8; slots * SLOT_BYTES],
            len: vec![0u16; slots],
            release_ns: vec![0u64; slots],
            mask: slots - 1,
            head: 0,
            count: 0,
        }
    }

    #[inline]
    fn is_full(&self) -> bool {
        self.count == self.mask + 1
    }

    /// The free slot packets are read into.
    #[inline]
    fn tail_slot(&mut self) -> &mut [u8] {
        let i = (self.head + self.count) & self.mask;
        &mut self.data[i * SLOT_BYTES..(i + 1) * SLOT_BYTES]
    }

    /// Commits the tail slot (filled by the caller) with `len` bytes.
    #[inline]
    fn push(&mut self, len: usize, release_ns: u64) {
        let i = (self.head + self.count) & self.mask;
        self.len[i] = len as u16;
        self.release_ns[i] = release_ns;
        self.count += 1;
    }

    #[inline]
    fn front_release(&self) -> Option<u64> {
        (self.count > 0).then(|| self.release_ns[self.head])
    }

    #[inline]
    fn front(&self) -> &[u8] {
        let i = self.head;
        &self.data[i * SLOT_BYTES..i * SLOT_BYTES + self.len[i] as usize]
    }

    #[inline]
    fn pop(&mut self) {
        self.head = (self.head + 1) & self.mask;
        self.count -= 1;
    }
}

/// The per-direction packet scheduler: decides drop or release time (pure
/// logic, separated from I/O so it can be unit-tested).
struct Shaper {
    delay_ns: u64,
    jitter_ns: u64,
    /// Picoseconds per byte at the bottleneck; 0 = unlimited.
    ps_per_byte: u64,
    queue_ps: u64,
    /// Loss threshold on a uniform u64 draw (`u64::MAX` = lose everything).
    loss_threshold: u64,
    loss_all: bool,
    outage_ns: Option<(u64, u64)>,
    link_free_ps: u64,
    last_release_ns: u64,
    rng: Rng,
}

/// What the shaper decided for one packet.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Release(u64),
    Lost,
    QueueFull,
    Outage,
}

impl Shaper {
    fn new(p: &LinkParams) -> Self {
        let ps_per_byte = if p.rate_bps == 0 {
            0
        } else {
            (8e12 / p.rate_bps as f64).round().max(1.0) as u64
        };
        let loss = p.loss.clamp(0.0, 1.0);
        Shaper {
            delay_ns: p.delay.as_nanos() as u64,
            jitter_ns: p.jitter.as_nanos() as u64,
            ps_per_byte,
            queue_ps: (p.queue.as_nanos() as u64).saturating_mul(1000),
            loss_threshold: (loss * u64::MAX as f64) as u64,
            loss_all: loss >= 1.0,
            outage_ns: p
                .outage
                .map(|(a, b)| (a.as_nanos() as u64, b.as_nanos() as u64)),
            link_free_ps: 0,
            last_release_ns: 0,
            rng: Rng::new(p.seed),
        }
    }

    #[inline]
    fn in_outage(&self, t_ns: u64) -> bool {
        matches!(self.outage_ns, Some((a, b)) if t_ns >= a && t_ns < b)
    }

    /// Decides the fate of a `len`-byte packet arriving at `now_ns`.
    #[inline]
    fn admit(&mut self, now_ns: u64, len: usize) -> Verdict {
        if self.in_outage(now_ns) {
            return Verdict::Outage;
        }
        if self.loss_threshold != 0 && (self.loss_all || self.rng.next() < self.loss_threshold) {
            return Verdict::Lost;
        }
        let depart_ns = if self.ps_per_byte == 0 {
            now_ns
        } else {
            let now_ps = now_ns.saturating_mul(1000);
            if self.link_free_ps.saturating_sub(now_ps) > self.queue_ps {
                return Verdict::QueueFull;
            }
            // Packets are stamped when read, not when they arrived: after the
            // thread was kept off the CPU the link would look idle for that
            // gap and lose capacity.  Like tbf's burst, up to BURST_CREDIT of
            // idle link time can be caught up; delay stays exact because a
            // packet never departs before it was read.
            let start = self
                .link_free_ps
                .max(now_ps.saturating_sub(BURST_CREDIT_PS));
            self.link_free_ps = start + len as u64 * self.ps_per_byte;
            self.link_free_ps.max(now_ps) / 1000
        };
        let mut delay = self.delay_ns;
        if self.jitter_ns > 0 {
            let span = 2 * self.jitter_ns + 1;
            let offset = self.rng.next() % span;
            delay = (delay + offset).saturating_sub(self.jitter_ns);
        }
        let release = (depart_ns + delay).max(self.last_release_ns);
        self.last_release_ns = release;
        Verdict::Release(release)
    }
}

/// A running userspace link between two TUN devices. Stops (and joins its
/// threads) on [`UserspaceLink::stop`] or drop.
#[derive(Debug)]
pub struct UserspaceLink {
    stop: Arc<AtomicBool>,
    /// Set: the link drops everything in both directions (an outage started at run time).
    down: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
    counters: [Arc<AtomicCounters>; 2],
    epoch: Instant,
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::io("eventfd", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UserspaceLink {
    /// Starts (`true`) or ends an outage now: while down, every packet of both directions is
    /// dropped, also those already queued.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Starts forwarding `a → b` with `a_to_b` and `b → a` with `b_to_a`.
    /// Outage windows are measured from `epoch`.
    pub fn start(
        a: Tun,
        b: Tun,
        a_to_b: LinkParams,
        b_to_a: LinkParams,
        epoch: Instant,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(eventfd()?);
        let a = Arc::new(a);
        let b = Arc::new(b);
        let counters = [
            Arc::new(AtomicCounters::default()),
            Arc::new(AtomicCounters::default()),
        ];
        let mut link = UserspaceLink {
            stop,
            down: Arc::new(AtomicBool::new(false)),
            wake,
            threads: Vec::new(),
            counters,
            epoch,
        };
        let dirs = [(a.clone(), b.clone(), a_to_b, "a>b"), (b, a, b_to_a, "b>a")];
        for (i, (inp, out, params, label)) in dirs.into_iter().enumerate() {
            let stop = link.stop.clone();
            let down = link.down.clone();
            let wake = link.wake.clone();
            let counters = link.counters[i].clone();
            let name = format!("netem-{label}");
            let slots = ring_slots(&params);
            tracing::debug!(
                direction = label,
                slots,
                ?params,
                "starting emulator thread"
            );
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let mut dir = Direction {
                        inp: &inp,
                        out: &out,
                        wake: wake.as_raw_fd(),
                        stop: &stop,
                        down: &down,
                        counters: &counters,
                        epoch,
                        ring: Ring::new(slots),
                        shaper: Shaper::new(&params),
                    };
                    dir.run();
                })
                .map_err(|e| Error::io("spawning emulator thread", e))?;
            link.threads.push(handle);
        }
        Ok(link)
    }

    /// Counters of the `a → b` and `b → a` directions.
    pub fn counters(&self) -> (LinkCounters, LinkCounters) {
        (self.counters[0].snapshot(), self.counters[1].snapshot())
    }

    /// When the link's clock started (outage windows count from here).
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Stops both threads and waits for them. Idempotent.
    pub fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("emulator thread panicked");
            }
        }
        let (ab, ba) = self.counters();
        tracing::debug!(?ab, ?ba, "userspace link stopped");
    }
}

impl Drop for UserspaceLink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Gives the emulator threads a larger CPU share than the traffic they carry
/// and unrelated load (nice -10), so the link does not slow down when the
/// machine is busy.  Best effort.
fn raise_priority() {
    // SAFETY: on Linux, PRIO_PROCESS with who = 0 changes the calling thread's nice value only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } != 0 {
        tracing::debug!("could not raise the emulator thread's priority");
    }
}

/// State of one forwarding thread.
struct Direction<'a> {
    inp: &'a Tun,
    out: &'a Tun,
    wake: RawFd,
    stop: &'a AtomicBool,
    down: &'a AtomicBool,
    counters: &'a AtomicCounters,
    epoch: Instant,
    ring: Ring,
    shaper: Shaper,
}

impl Direction<'_> {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(&mut self) {
        // 1 µs timer slack: wake-ups land on the scheduled release times.
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
        raise_priority();
        let mut scratch = vec![0u8; SLOT_BYTES];
        let mut local = LinkCounters::default();
        let mut write_error_logged = false;
        while !self.stop.load(Ordering::Relaxed) {
            // Release what is due.
            let mut now = self.now_ns();
            let mut released = 0;
            while let Some(t) = self.ring.front_release() {
                if t > now || released == BATCH {
                    break;
                }
                if self.shaper.in_outage(t) || self.down.load(Ordering::Relaxed) {
                    local.outage_drops += 1;
                } else {
                    match self.out.send(self.ring.front()) {
                        Ok(n) => {
                            local.delivered += 1;
                            local.delivered_bytes += n as u64;
                        }
                        Err(e) => {
                            local.write_errors += 1;
                            if !write_error_logged {
                                tracing::warn!(device = self.out.name(), error = %e, "TUN write failed");
                                write_error_logged = true;
                            }
                        }
                    }
                }
                self.ring.pop();
                released += 1;
            }
            // Take in what arrived.
            let mut read = 0;
            let mut drained = false;
            while read < BATCH {
                let full = self.ring.is_full();
                let res = if full {
                    self.inp.recv(&mut scratch)
                } else {
                    self.inp.recv(self.ring.tail_slot())
                };
                let len = match res {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(device = self.inp.name(), error = %e, "TUN read failed; emulator thread stops");
                        self.counters.add(&local);
                        return;
                    }
                };
                read += 1;
                local.received += 1;
                if full {
                    local.overflow_drops += 1;
                    continue;
                }
                now = self.now_ns();
                let verdict = if self.down.load(Ordering::Relaxed) { Verdict::Outage } else { self.shaper.admit(now, len) };
                match verdict {
                    Verdict::Release(t) => self.ring.push(len, t),
                    Verdict::Lost => local.lost += 1,
                    Verdict::QueueFull => local.queue_drops += 1,
                    Verdict::Outage => local.outage_drops += 1,
                }
            }
            if local != LinkCounters::default() {
                self.counters.add(&local);
                local = LinkCounters::default();
            }
            if !drained || released == BATCH {
                continue;
            }
            // Nothing more to read right now: sleep until readable or the next
            // release, but at least MIN_TIMER_NS: a timer per 12 µs packet (1 Gbit/s)
            // costs more CPU than the forwarding; releases are at most that late.
            let timeout = match self.ring.front_release() {
                Some(t) => {
                    let now = self.now_ns();
                    if t <= now {
                        continue;
                    }
                    Some((t - now).max(MIN_TIMER_NS))
                }
                None => None,
            };
            self.wait(timeout);
        }
        self.counters.add(&local);
    }

    /// Sleeps until the ingress TUN is readable, the stop eventfd fires or `timeout_ns` passes.
    fn wait(&self, timeout_ns: Option<u64>) {
        let mut fds = [
            libc::pollfd {
                fd: self.inp.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = timeout_ns.map(|ns| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` and `ts` outlive the call; nfds matches the array length;
        // a null sigmask leaves the signal mask unchanged.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn params() -> LinkParams {
        LinkParams {
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            rate_bps: 0,
            queue: Duration::from_millis(50),
            loss: 0.0,
            outage: None,
            seed: 1,
        }
    }

    #[test]
    fn plain_delay() {
        let mut s = Shaper::new(&params());
        assert_eq!(s.admit(0, 1500), Verdict::Release(10_000_000));
        assert_eq!(s.admit(5, 1500), Verdict::Release(10_000_005));
    }

    #[test]
    fn rate_and_drop_tail_queue() {
        // 8 Mbit/s: a 1000-byte packet takes exactly 1 ms.
        let p = LinkParams {
            rate_bps: 8_000_000,
            queue: Duration::from_millis(3),
            ..params()
        };
        let mut s = Shaper::new(&p);
        let ms = 1_000_000;
        // A burst at t=0: packets leave at 1, 2, 3, 4 ms (queueing delays 0..3 ms), the fifth waits 4 ms > 3 ms.
        for k in 1..=4u64 {
            assert_eq!(s.admit(0, 1000), Verdict::Release(k * ms + 10 * ms));
        }
        assert_eq!(s.admit(0, 1000), Verdict::QueueFull);
        // Later, after the link idled: 1 ms of burst credit lets the first
        // packet out without serialization delay; then the rate applies again.
        assert_eq!(s.admit(100 * ms, 1000), Verdict::Release(110 * ms));
        assert_eq!(s.admit(100 * ms, 1000), Verdict::Release(111 * ms));
        assert_eq!(s.admit(100 * ms, 1000), Verdict::Release(112 * ms));
    }

    #[test]
    fn jitter_keeps_order_and_bounds() {
        let p = LinkParams {
            jitter: Duration::from_millis(2),
            ..params()
        };
        let mut s = Shaper::new(&p);
        let mut last = 0;
        for i in 0..10_000u64 {
            let now = i * 10_000;
            let Verdict::Release(t) = s.admit(now, 100) else {
                panic!("dropped")
            };
            assert!(t >= last, "reordered");
            assert!(t <= now + 12_000_000, "too late");
            last = t;
        }
    }

    #[test]
    fn loss_rate_is_bernoulli() {
        let p = LinkParams {
            loss: 0.01,
            ..params()
        };
        let mut s = Shaper::new(&p);
        let lost = (0..200_000u64)
            .filter(|i| s.admit(*i, 100) == Verdict::Lost)
            .count();
        // mean 2000, sd ~44.5
        assert!((1800..2200).contains(&lost), "lost {lost}");
        let mut all = Shaper::new(&LinkParams {
            loss: 1.0,
            ..params()
        });
        assert!((0..1000).all(|i| all.admit(i, 100) == Verdict::Lost));
    }

    #[test]
    fn outage_window() {
        let p = LinkParams {
            outage: Some((Duration::from_secs(1), Duration::from_secs(2))),
            ..params()
        };
        let mut s = Shaper::new(&p);
        assert!(matches!(s.admit(999_999_999, 100), Verdict::Release(_)));
        assert_eq!(s.admit(1_000_000_000, 100), Verdict::Outage);
        assert_eq!(s.admit(1_999_999_999, 100), Verdict::Outage);
        assert!(matches!(s.admit(2_000_000_000, 100), Verdict::Release(_)));
    }

    #[test]
    fn ring_sizes() {
        let p = LinkParams {
            rate_bps: 1_000_000_000,
            delay: Duration::from_millis(75),
            ..params()
        };
        let slots = ring_slots(&p);
        assert!(slots.is_power_of_two());
        assert!((20_000..=MAX_SLOTS).contains(&slots), "{slots}");
        assert!(ring_slots(&params()) >= MIN_SLOTS);
    }

    #[test]
    fn ring_fifo() {
        let mut r = Ring::new(4);
        for i in 0..4u8 {
            r.tail_slot()[0] = i;
            r.push(1, u64::from(i));
        }
        assert!(r.is_full());
        for i in 0..4u8 {
            assert_eq!(r.front_release(), Some(u64::from(i)));
            assert_eq!(r.front(), &[i]);
            r.pop();
        }
        assert_eq!(r.front_release(), None);
    }
}
