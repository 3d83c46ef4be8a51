//! Collecting the guest's serial output and waiting for lines in it.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{QemuError, Result};

/// Lines kept at most (older ones are dropped; indices keep counting).
const MAX_LINES: usize = 100_000;

#[derive(Debug, Default)]
struct State {
    /// Index (since start) of `lines[0]`.
    first: usize,
    lines: Vec<String>,
    last_tick: Option<u64>,
    closed: bool,
}

/// The guest's serial console output, split into lines, filled by a
/// background thread. Cheap to clone; all clones see the same log.
#[derive(Debug, Clone, Default)]
pub struct SerialLog {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// One `verify` line printed by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReport {
    /// `verify ok tick=N sum=XXXXXXXX`: every page was as expected.
    Ok {
        /// Guest tick at which the check ran.
        tick: u64,
        /// Hash of all random-page seeds (constant while dirtying is off).
        sum: u32,
    },
    /// `verify FAIL <region> page=N tick=N`: memory was corrupted.
    Fail {
        /// The raw line.
        line: String,
    },
}

impl VerifyReport {
    /// Parses a `verify ...` line.
    pub fn parse(line: &str) -> Option<VerifyReport> {
        let rest = line.strip_prefix("verify ")?;
        if rest.starts_with("FAIL") {
            return Some(VerifyReport::Fail {
                line: line.to_string(),
            });
        }
        let rest = rest.strip_prefix("ok ")?;
        let mut tick = None;
        let mut sum = None;
        for field in rest.split_whitespace() {
            if let Some(v) = field.strip_prefix("tick=") {
                tick = v.parse().ok();
            } else if let Some(v) = field.strip_prefix("sum=") {
                sum = u32::from_str_radix(v, 16).ok();
            }
        }
        Some(VerifyReport::Ok {
            tick: tick?,
            sum: sum?,
        })
    }
}

/// Parses a `tick N` line.
pub(crate) fn parse_tick(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?.trim().parse().ok()
}

impl SerialLog {
    /// Starts a thread that reads `reader` line by line into a new log.
    /// `name` is used for the thread name and trace output.
    pub(crate) fn spawn_reader<R: Read + Send + 'static>(
        name: &str,
        reader: R,
    ) -> Result<SerialLog> {
        let log = SerialLog::default();
        let writer = log.clone();
        let vm = name.to_string();
        std::thread::Builder::new()
            .name(format!("serial-{name}"))
            .spawn(move || {
                let mut r = BufReader::new(reader);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\r', '\n'])
                                .to_string();
                            tracing::trace!(vm = %vm, "serial: {line}");
                            writer.push(line);
                        }
                    }
                }
                writer.close();
            })
            .map_err(|e| QemuError::io("spawning the serial reader thread", e))?;
        Ok(log)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        ferry_testkit::sync::lock(&self.inner.0)
    }

    /// Appends a line (used by the reader thread; public for tests of code
    /// built on top of the log).
    pub fn push(&self, line: String) {
        let mut st = self.lock();
        if let Some(t) = parse_tick(&line) {
            st.last_tick = Some(t);
        }
        st.lines.push(line);
        if st.lines.len() > MAX_LINES {
            let drop = st.lines.len() - MAX_LINES / 2;
            st.lines.drain(..drop);
            st.first += drop;
        }
        drop(st);
        self.inner.1.notify_all();
    }

    /// Marks the stream as ended (QEMU exited or closed its stdout).
    pub fn close(&self) {
        self.lock().closed = true;
        self.inner.1.notify_all();
    }

    /// True once the stream ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Number of lines seen so far (an index for [`SerialLog::wait_line_from`]).
    pub fn len(&self) -> usize {
        let st = self.lock();
        st.first + st.lines.len()
    }

    /// True if no line was seen yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The highest-index `tick N` seen so far.
    pub fn last_tick(&self) -> Option<u64> {
        self.lock().last_tick
    }

    /// A copy of all retained lines.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// The last `n` lines joined with newlines (for error messages).
    pub fn tail(&self, n: usize) -> String {
        let st = self.lock();
        let start = st.lines.len().saturating_sub(n);
        st.lines[start..].join("\n")
    }

    /// Waits for the first line with index >= `from` for which `pred` holds;
    /// returns its index and text.
    pub fn wait_line_from(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut st = self.lock();
        loop {
            let start = next.max(st.first);
            for (i, line) in st.lines.iter().enumerate().skip(start - st.first) {
                if pred(line) {
                    return Ok((st.first + i, line.clone()));
                }
            }
            next = st.first + st.lines.len();
            if st.closed {
                return Err(QemuError::Protocol(format!(
                    "serial output ended while waiting for {what}; last lines:\n{}",
                    tail_of(&st.lines, 10)
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::timeout(
                    format!(
                        "{what} on the guest serial console (last lines: {})",
                        tail_of(&st.lines, 5)
                    ),
                    timeout,
                ));
            }
            st = self
                .inner
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the guest printed `tick N` with `N >= min`; returns `N`.
    pub fn wait_for_tick(&self, min: u64, timeout: Duration) -> Result<u64> {
        let (_, line) = self.wait_line_from(0, &format!("tick >= {min}"), timeout, |l| {
            parse_tick(l).is_some_and(|t| t >= min)
        })?;
        parse_tick(&line).ok_or_else(|| QemuError::Protocol(format!("bad tick line {line:?}")))
    }

    /// Waits for the first tick line with index >= `from`; returns its value.
    pub fn wait_next_tick_from(&self, from: usize, timeout: Duration) -> Result<u64> {
        let (_, line) =
            self.wait_line_from(from, "a tick line", timeout, |l| parse_tick(l).is_some())?;
        parse_tick(&line).ok_or_else(|| QemuError::Protocol(format!("bad tick line {line:?}")))
    }

    /// Waits for a `verify` line with index >= `from` and parses it.
    pub fn wait_verify_from(&self, from: usize, timeout: Duration) -> Result<VerifyReport> {
        let (_, line) =
            self.wait_line_from(from, "a verify line", timeout, |l| l.starts_with("verify "))?;
        VerifyReport::parse(&line)
            .ok_or_else(|| QemuError::Protocol(format!("bad verify line {line:?}")))
    }
}

fn tail_of(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        assert_eq!(parse_tick("tick 42"), Some(42));
        assert_eq!(parse_tick("ticks"), None);
        assert_eq!(
            VerifyReport::parse("verify ok tick=10 sum=e0d37ee7"),
            Some(VerifyReport::Ok {
                tick: 10,
                sum: 0xe0d3_7ee7
            })
        );
        assert!(matches!(
            VerifyReport::parse("verify FAIL rand page=3 tick=9"),
            Some(VerifyReport::Fail { .. })
        ));
        assert_eq!(VerifyReport::parse("tick 1"), None);
    }

    #[test]
    fn waits_for_lines_pushed_later() {
        let log = SerialLog::default();
        let w = log.clone();
        let t = std::thread::spawn(move || {
            for i in 1..=5 {
                w.push(format!("tick {i}"));
            }
            w.close();
        });
        assert_eq!(log.wait_for_tick(5, Duration::from_secs(5)).ok(), Some(5));
        t.join().ok();
        assert_eq!(log.last_tick(), Some(5));
        assert!(log.wait_for_tick(6, Duration::from_secs(5)).is_err());
    }
}
