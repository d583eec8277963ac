//! Allocation from free sets, never from counts.
//!
//! A name derived from "how many ports exist" collides as soon as one in the middle is
//! released (the bug Kata hit). Every numbered thing the planner hands out — ids, chassis
//! and slot numbers, devfns, bus numbers, CCW device numbers, zPCI uid/fid — comes from a
//! [`FreeSet`]: the lowest free value is taken, a released value becomes free again.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors allocating from a free set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AllocError {
    /// Every value in the set's range is taken.
    #[error("no free {what} left in {lo}..={hi}")]
    Exhausted {
        /// What was being allocated.
        what: String,
        /// Lowest value of the range.
        lo: u32,
        /// Highest value of the range.
        hi: u32,
    },
    /// A specific value was asked for but is taken or outside the range.
    #[error("{what} {value} is taken or outside {lo}..={hi}")]
    Unavailable {
        /// What was being allocated.
        what: String,
        /// The value asked for.
        value: u32,
        /// Lowest value of the range.
        lo: u32,
        /// Highest value of the range.
        hi: u32,
    },
}

/// A set of free values in `lo..=hi`, stored as the set of used ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreeSet {
    what: String,
    lo: u32,
    hi: u32,
    used: BTreeSet<u32>,
}

impl FreeSet {
    /// All of `lo..=hi` free; `what` names the values in errors ("chassis", "bus number").
    pub fn new(what: &str, lo: u32, hi: u32) -> Self {
        FreeSet { what: what.to_string(), lo, hi, used: BTreeSet::new() }
    }

    /// Takes the lowest free value.
    pub fn alloc(&mut self) -> Result<u32, AllocError> {
        self.alloc_from(self.lo)
    }

    /// Takes the lowest free value `>= start`.
    pub fn alloc_from(&mut self, start: u32) -> Result<u32, AllocError> {
        let mut v = start.max(self.lo);
        // The used set is sorted: walk it from `v` until a gap appears.
        for &u in self.used.range(v..) {
            if u != v {
                break;
            }
            v = match v.checked_add(1) {
                Some(n) => n,
                None => break,
            };
        }
        if v > self.hi || self.used.contains(&v) {
            return Err(self.exhausted());
        }
        self.used.insert(v);
        Ok(v)
    }

    /// Takes a run of `count` consecutive free values, the lowest such run `>= start`.
    pub fn alloc_run(&mut self, start: u32, count: u32) -> Result<u32, AllocError> {
        let count = count.max(1);
        let mut first = start.max(self.lo);
        loop {
            let last = first.checked_add(count - 1).ok_or_else(|| self.exhausted())?;
            if last > self.hi {
                return Err(self.exhausted());
            }
            match self.used.range(first..=last).next_back() {
                Some(&taken) => first = taken.checked_add(1).ok_or_else(|| self.exhausted())?,
                None => {
                    self.used.extend(first..=last);
                    return Ok(first);
                }
            }
        }
    }

    /// Takes exactly `value`.
    pub fn take(&mut self, value: u32) -> Result<(), AllocError> {
        if value < self.lo || value > self.hi || !self.used.insert(value) {
            return Err(AllocError::Unavailable { what: self.what.clone(), value, lo: self.lo, hi: self.hi });
        }
        Ok(())
    }

    /// Returns `value` to the set; true if it was taken.
    pub fn release(&mut self, value: u32) -> bool {
        self.used.remove(&value)
    }

    /// Whether `value` is taken.
    pub fn is_used(&self, value: u32) -> bool {
        self.used.contains(&value)
    }

    /// Number of values taken.
    pub fn used_count(&self) -> usize {
        self.used.len()
    }

    fn exhausted(&self) -> AllocError {
        AllocError::Exhausted { what: self.what.clone(), lo: self.lo, hi: self.hi }
    }
}

/// Ids `<prefix><n>` with `n` from a free set, skipping ids already taken elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdAllocator {
    prefix: String,
    numbers: FreeSet,
}

impl IdAllocator {
    /// Ids `prefix0`, `prefix1`, … (the prefix must start with a letter).
    pub fn new(prefix: &str) -> Self {
        IdAllocator {
            prefix: prefix.to_string(),
            numbers: FreeSet::new(&format!("{prefix} id"), 0, u32::MAX - 1),
        }
    }

    /// The next free id for which `taken` says no.
    pub fn alloc(&mut self, taken: impl Fn(&str) -> bool) -> Result<String, AllocError> {
        loop {
            let n = self.numbers.alloc()?;
            let id = format!("{}{}", self.prefix, n);
            if !taken(&id) {
                return Ok(id);
            }
        }
    }

    /// Frees the number of an id made by this allocator (other ids are ignored).
    pub fn release(&mut self, id: &str) {
        if let Some(n) = id.strip_prefix(&self.prefix).and_then(|s| s.parse::<u32>().ok()) {
            self.numbers.release(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_is_reused() {
        let mut s = FreeSet::new("slot", 1, 4);
        assert_eq!(s.alloc(), Ok(1));
        assert_eq!(s.alloc(), Ok(2));
        assert_eq!(s.alloc(), Ok(3));
        assert!(s.release(2));
        assert_eq!(s.alloc(), Ok(2));
        assert_eq!(s.alloc(), Ok(4));
        assert!(matches!(s.alloc(), Err(AllocError::Exhausted { .. })));
        assert!(s.take(9).is_err());
    }

    #[test]
    fn runs_skip_taken_values() {
        let mut s = FreeSet::new("bus", 0, 255);
        s.take(3).unwrap();
        assert_eq!(s.alloc_run(1, 3), Ok(4));
        assert_eq!(s.alloc_run(0, 2), Ok(0));
        assert_eq!(s.alloc_run(250, 6), Ok(250));
        assert!(s.alloc_run(250, 1).is_err());
    }

    #[test]
    fn ids_skip_foreign_names() {
        let mut ids = IdAllocator::new("rp");
        assert_eq!(ids.alloc(|id| id == "rp0").unwrap(), "rp1");
        assert_eq!(ids.alloc(|_| false).unwrap(), "rp2");
        ids.release("rp1");
        assert_eq!(ids.alloc(|_| false).unwrap(), "rp1");
    }
}
