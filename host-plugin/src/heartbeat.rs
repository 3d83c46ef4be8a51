//! Guest-observed downtime: timestamps of a guest heartbeat read from a QEMU chardev socket.
//!
//! The guest writes a line at a steady rate of its own (virtual) time to a serial port whose
//! chardev is a unix socket (`-chardev socket,id=hb,path=...,server=on,wait=off -serial
//! chardev:hb`). Each host-plugin timestamps the lines as they arrive. The guest's time stops
//! while it is paused, so the gap between the source's last line and the destination's first
//! line is one heartbeat interval plus the time the guest could not run:
//! `downtime = gap - interval`, accurate to about the arrival jitter plus the clock offset's
//! uncertainty.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Arrival times kept (for the interval estimate).
const KEPT: usize = 256;
/// Longest heartbeat line read; longer lines are cut (the content does not matter).
const MAX_LINE: u64 = 1024;

/// Nanoseconds since the Unix epoch, now.
pub fn unix_now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// A QMP event's QEMU timestamp (the host's wall clock), ns since the Unix epoch.
pub fn event_time_ns(event: &ferry_qmp::Event) -> Option<i128> {
    event.timestamp.map(|(s, us)| i128::from(s) * 1_000_000_000 + i128::from(us) * 1_000)
}

#[derive(Default)]
struct Beats {
    first: Option<i128>,
    recent: VecDeque<i128>,
    count: u64,
    closed: bool,
}

/// Watches one heartbeat socket in the background; dropping it stops watching.
pub struct Heartbeat {
    beats: Arc<(Mutex<Beats>, Notify)>,
    task: JoinHandle<()>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Heartbeat {
    /// Connects to the chardev socket at `path`, retrying for `timeout` while it does not
    /// exist yet, and starts timestamping lines.
    pub async fn watch(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline
                    && matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("heartbeat socket {}: {e}", path.display()))),
            }
        };
        let beats: Arc<(Mutex<Beats>, Notify)> = Arc::default();
        let task = tokio::spawn(read_beats(stream, beats.clone()));
        Ok(Self { beats, task })
    }

    fn with<R>(&self, f: impl FnOnce(&Beats) -> R) -> R {
        f(&self.beats.0.lock())
    }

    /// Arrival of the first line, ns since the Unix epoch.
    pub fn first(&self) -> Option<i128> {
        self.with(|b| b.first)
    }

    /// Arrival of the latest line.
    pub fn last(&self) -> Option<i128> {
        self.with(|b| b.recent.back().copied())
    }

    /// Lines seen.
    pub fn count(&self) -> u64 {
        self.with(|b| b.count)
    }

    /// Median time between consecutive recent lines (needs at least 3 lines).
    pub fn median_interval_ns(&self) -> Option<i128> {
        self.with(|b| {
            let mut gaps: Vec<i128> = b.recent.iter().zip(b.recent.iter().skip(1)).map(|(a, b)| b - a).collect();
            if gaps.len() < 2 {
                return None;
            }
            gaps.sort_unstable();
            Some(gaps[gaps.len() / 2])
        })
    }

    /// Waits up to `timeout` for the first line.
    pub async fn wait_first(&self, timeout: Duration) -> Option<i128> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.beats.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(first) = self.first() {
                return Some(first);
            }
            if self.with(|b| b.closed) {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

async fn read_beats(stream: UnixStream, beats: Arc<(Mutex<Beats>, Notify)>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let now = unix_now_ns();
                let mut b = beats.0.lock();
                b.first.get_or_insert(now);
                if b.recent.len() == KEPT {
                    b.recent.pop_front();
                }
                b.recent.push_back(now);
                b.count += 1;
                drop(b);
                beats.1.notify_waiters();
            }
        }
    }
    beats.0.lock().closed = true;
    beats.1.notify_waiters();
}

/// Guest-observed downtime from the source's last heartbeat, the destination's first (already
/// converted to the source's clock) and the heartbeat interval, in ns; never negative.
pub fn guest_downtime_ns(source_last: i128, destination_first: i128, interval: i128) -> i128 {
    (destination_first - source_last - interval).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn timestamps_lines_from_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let watcher = tokio::spawn({
            let path = path.clone();
            async move { Heartbeat::watch(&path, Duration::from_secs(5)).await.unwrap() }
        });
        let (mut guest, _) = listener.accept().await.unwrap();
        let hb = watcher.await.unwrap();
        for i in 0..5 {
            guest.write_all(format!("tick {i}\n").as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = hb.wait_first(Duration::from_secs(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(hb.count(), 5);
        assert!(hb.last().unwrap() > first);
        let median = hb.median_interval_ns().unwrap();
        assert!((15_000_000..200_000_000).contains(&median), "{median}");
    }

    #[test]
    fn downtime_is_the_gap_minus_one_interval() {
        assert_eq!(guest_downtime_ns(1_000, 1_600, 100), 500);
        assert_eq!(guest_downtime_ns(1_000, 1_050, 100), 0);
    }
}
