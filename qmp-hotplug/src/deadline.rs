//! Deadlines from timeouts, without overflow.
//!
//! `Instant + Duration` panics when the sum does not fit the clock's representation (a
//! timeout of `Duration::MAX`, in release builds too). Every deadline of this crate is
//! made here instead, and a timeout too long to represent **saturates**: the deadline
//! becomes the latest instant the clock can represent from now (centuries away), so
//! `Duration::MAX` means "no practical limit", which is what a caller passing it asks for.

use std::time::{Duration, Instant};

/// `start + timeout`, or the latest representable instant when that overflows.
pub(crate) fn from(start: Instant, timeout: Duration) -> Instant {
    if let Some(d) = start.checked_add(timeout) {
        return d;
    }
    // Find the largest addend that fits by halving: at most 64 steps.
    let mut fits = Duration::ZERO;
    let mut step = timeout;
    while !step.is_zero() {
        step /= 2;
        if let Some(longer) = fits.checked_add(step) {
            if start.checked_add(longer).is_some() {
                fits = longer;
            }
        }
    }
    start.checked_add(fits).unwrap_or(start)
}

/// `now + timeout`, saturating as [`from`] does.
pub(crate) fn after(timeout: Duration) -> Instant {
    from(Instant::now(), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_saturate_far_away() {
        let now = Instant::now();
        let d = from(now, Duration::MAX);
        // Far beyond any wait, and later than any shorter timeout.
        assert!(d.duration_since(now) > Duration::from_secs(100 * 365 * 24 * 3600));
        assert_eq!(from(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert!(after(Duration::MAX) > after(Duration::from_secs(1 << 32)));
    }
}
