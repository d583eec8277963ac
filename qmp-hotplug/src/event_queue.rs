//! The queue behind one [`crate::EventStream`]: bounded in events and in bytes.
//!
//! An event is queued as the line QEMU sent (shared by every queue that takes it) and
//! parsed only when the stream's owner receives it. So the memory a queue holds is the
//! bytes it counts: a parsed event of many small JSON values takes many times its text's
//! size, and counting events alone let a stream nobody read hold gigabytes. An event that
//! would take a queue past either bound is dropped and counted, in events and bytes.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::client::CloseReason;

/// One event as QEMU sent it: a complete JSON object.
pub(crate) type RawEvent = Arc<[u8]>;

/// What [`EventQueue::pop`] found.
#[derive(Debug)]
pub(crate) enum Popped {
    /// The oldest queued event.
    Event(RawEvent),
    /// Nothing arrived before the deadline.
    Timeout,
    /// The connection is gone and everything queued has been taken.
    Closed(CloseReason),
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<RawEvent>,
    bytes: usize,
    dropped: u64,
    dropped_bytes: u64,
    closed: Option<CloseReason>,
}

/// A bounded queue of events, filled by the connection's reader thread.
#[derive(Debug)]
pub(crate) struct EventQueue {
    state: Mutex<State>,
    ready: Condvar,
    max_events: usize,
    max_bytes: usize,
}

impl EventQueue {
    /// An empty queue holding at most `max_events` events of `max_bytes` bytes in all.
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        EventQueue { state: Mutex::new(State::default()), ready: Condvar::new(), max_events, max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters and a deque: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event`, or drops and counts it when either bound would be passed.
    pub(crate) fn push(&self, event: &RawEvent) {
        let mut s = self.lock();
        let bytes = s.bytes.saturating_add(event.len());
        if s.items.len() >= self.max_events || bytes > self.max_bytes {
            s.dropped = s.dropped.saturating_add(1);
            s.dropped_bytes = s.dropped_bytes.saturating_add(u64::try_from(event.len()).unwrap_or(u64::MAX));
            return;
        }
        s.bytes = bytes;
        s.items.push_back(Arc::clone(event));
        drop(s);
        self.ready.notify_one();
    }

    /// Ends the queue: what is queued can still be taken, then `reason` is reported.
    pub(crate) fn close(&self, reason: CloseReason) {
        self.lock().closed.get_or_insert(reason);
        self.ready.notify_all();
    }

    /// The oldest event, waiting until `deadline` (`None`: do not wait).
    pub(crate) fn pop(&self, deadline: Option<Instant>) -> Popped {
        let mut s = self.lock();
        loop {
            if let Some(ev) = s.items.pop_front() {
                s.bytes = s.bytes.saturating_sub(ev.len());
                return Popped::Event(ev);
            }
            if let Some(reason) = &s.closed {
                return Popped::Closed(reason.clone());
            }
            let left = deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return Popped::Timeout;
            }
            s = match self.ready.wait_timeout(s, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Events dropped on a full queue.
    pub(crate) fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Bytes of the events dropped on a full queue.
    pub(crate) fn dropped_bytes(&self) -> u64 {
        self.lock().dropped_bytes
    }

    /// Bytes queued now.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> RawEvent {
        Arc::from(vec![b' '; n])
    }

    #[test]
    fn bounded_in_events_and_bytes() {
        let q = EventQueue::new(3, 100);
        for _ in 0..5 {
            q.push(&ev(10));
        }
        assert_eq!((q.dropped(), q.dropped_bytes(), q.queued_bytes()), (2, 20, 30));
        let q = EventQueue::new(100, 100);
        q.push(&ev(60));
        q.push(&ev(60));
        q.push(&ev(40));
        assert_eq!((q.dropped(), q.dropped_bytes(), q.queued_bytes()), (1, 60, 100));
        assert!(matches!(q.pop(None), Popped::Event(e) if e.len() == 60));
        assert_eq!(q.queued_bytes(), 40);
        q.close(CloseReason::Eof);
        assert!(matches!(q.pop(None), Popped::Event(e) if e.len() == 40));
        assert!(matches!(
            q.pop(Some(Instant::now() + Duration::from_secs(5))),
            Popped::Closed(CloseReason::Eof)
        ));
    }

    #[test]
    fn pop_waits_until_the_deadline() {
        let q = EventQueue::new(10, 100);
        let t = Instant::now();
        assert!(matches!(q.pop(Some(t + Duration::from_millis(50))), Popped::Timeout));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(matches!(q.pop(None), Popped::Timeout));
    }
}
