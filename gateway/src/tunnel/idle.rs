//! When a flow has been idle too long (`[limits] idle_timeout`): no byte moved either way, on
//! the local connection or the WAN. Sans-IO: the flow passes in the time and its byte count.

use std::time::{Duration, Instant};

/// Watches one flow's byte count for progress.
#[derive(Clone, Debug)]
pub struct IdleWatch {
    timeout: Duration,
    bytes: u64,
    since: Instant,
}

impl IdleWatch {
    /// A flow that has moved `bytes` so far, as of `now`.
    pub fn new(timeout: Duration, now: Instant, bytes: u64) -> Self {
        Self { timeout, bytes, since: now }
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How often to call [`IdleWatch::expired`] so that an idle flow is noticed within a quarter
    /// of the timeout.
    pub fn poll_interval(&self) -> Duration {
        self.timeout / 4
    }

    /// Whether the flow, which has moved `bytes` by `now`, has been idle for the timeout.
    pub fn expired(&mut self, now: Instant, bytes: u64) -> bool {
        if bytes != self.bytes {
            self.bytes = bytes;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_byte_restarts_the_clock() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut watch = IdleWatch::new(10 * s, t0, 100);
        assert_eq!(watch.poll_interval(), Duration::from_millis(2500));
        assert!(!watch.expired(t0 + 9 * s, 100));
        assert!(!watch.expired(t0 + 9 * s, 101), "a byte moved");
        assert!(!watch.expired(t0 + 18 * s, 101));
        assert!(watch.expired(t0 + 19 * s, 101), "ten seconds without a byte");
        assert!(watch.expired(t0 + 30 * s, 101));
    }
}
