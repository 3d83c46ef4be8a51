//! Bounded buffer of asynchronous QMP events.
//!
//! QEMU may send events at any time (and a chatty guest can make it send many); the reader
//! task must never block on a slow consumer, nor grow without bound. When the buffer is full
//! the oldest event is dropped and counted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::types::Event;

/// Events waiting to be taken, plus whether the connection has ended.
#[derive(Debug)]
pub(crate) struct EventQueue {
    inner: Mutex<Inner>,
    capacity: usize,
    dropped: AtomicU64,
    notify: Notify,
}

#[derive(Debug)]
struct Inner {
    events: VecDeque<Event>,
    closed: bool,
}

/// What [`EventQueue::pop`] found.
pub(crate) enum Pop {
    Event(Event),
    Empty,
    Closed,
}

impl EventQueue {
    /// A queue holding at most `capacity` (≥ 1) events.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        EventQueue {
            inner: Mutex::new(Inner {
                events: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
            }),
            capacity,
            dropped: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    /// Adds an event, dropping the oldest one if full.
    pub(crate) fn push(&self, event: Event) {
        {
            let mut inner = self.inner.lock();
            if inner.events.len() >= self.capacity {
                if let Some(old) = inner.events.pop_front() {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(
                        dropped = n,
                        event = old.event.name(),
                        "QMP event buffer full; dropped the oldest event"
                    );
                }
            }
            inner.events.push_back(event);
        }
        self.notify.notify_waiters();
    }

    /// Marks the connection as ended and wakes every waiter.
    pub(crate) fn close(&self) {
        self.inner.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// Takes the oldest event; `Closed` only once the buffer is empty.
    pub(crate) fn pop(&self) -> Pop {
        let mut inner = self.inner.lock();
        match inner.events.pop_front() {
            Some(e) => Pop::Event(e),
            None if inner.closed => Pop::Closed,
            None => Pop::Empty,
        }
    }

    /// Takes every buffered event.
    pub(crate) fn drain(&self) -> Vec<Event> {
        self.inner.lock().events.drain(..).collect()
    }

    /// Events dropped because the buffer was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits for the next event; `None` once the connection has ended and the buffer is empty.
    pub(crate) async fn next(&self) -> Option<Event> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a push between the check and the await is not lost.
            notified.as_mut().enable();
            match self.pop() {
                Pop::Event(e) => return Some(e),
                Pop::Closed => return None,
                Pop::Empty => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::QmpEvent;

    fn ev(n: u64) -> Event {
        Event {
            event: QmpEvent::MigrationPass { pass: n },
            timestamp: None,
        }
    }

    #[tokio::test]
    async fn drops_oldest_when_full_and_counts() {
        let q = EventQueue::new(3);
        for n in 0..5 {
            q.push(ev(n));
        }
        assert_eq!(q.dropped(), 2);
        let got: Vec<_> = q.drain().into_iter().map(|e| e.event).collect();
        assert_eq!(
            got,
            (2..5)
                .map(|pass| QmpEvent::MigrationPass { pass })
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn next_wakes_on_push_and_close() {
        let q = std::sync::Arc::new(EventQueue::new(4));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { (q2.next().await, q2.next().await) });
        tokio::task::yield_now().await;
        q.push(ev(7));
        q.close();
        let (a, b) = waiter.await.unwrap();
        assert_eq!(
            a.map(|e| e.event),
            Some(QmpEvent::MigrationPass { pass: 7 })
        );
        assert!(b.is_none());
    }
}
