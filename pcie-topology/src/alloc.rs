//! Allocation from free sets, never from counts.
//!
//! A name derived from "how many ports exist" collides as soon as one in the middle is
//! released (the bug Kata hit). Every numbered thing the planner hands out — ids, chassis
//! and slot numbers, devfns, bus numbers, CCW device numbers, zPCI uid/fid — comes from a
//! [`FreeSet`]: the lowest free value is taken, a released value becomes free again.

use std::collections::BTreeMap;

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

/// A set of free values in `lo..=hi`, stored as the runs of used ones.
///
/// Used values are kept as disjoint, non-adjacent runs `first..=last`, so taking the lowest
/// free value, a run of free values, or a given one costs a few map lookups however many
/// values are taken (allocating n values one after another is n log n, not n²).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FreeSet {
    what: String,
    lo: u32,
    hi: u32,
    /// First value of each run of used values → its last value.
    runs: BTreeMap<u32, u32>,
    /// How many values are used.
    count: u64,
}

impl FreeSet {
    /// All of `lo..=hi` free; `what` names the values in errors ("chassis", "bus number").
    pub(crate) fn new(what: &str, lo: u32, hi: u32) -> Self {
        FreeSet { what: what.to_string(), lo, hi, runs: BTreeMap::new(), count: 0 }
    }

    /// The run of used values that holds `value`.
    fn run_of(&self, value: u32) -> Option<(u32, u32)> {
        self.runs.range(..=value).next_back().filter(|(_, last)| **last >= value).map(|(f, l)| (*f, *l))
    }

    /// Marks the free values `first..=last` used, merging with the runs next to them.
    fn mark(&mut self, first: u32, last: u32) {
        let mut run = (first, last);
        if let Some(before) = first.checked_sub(1).and_then(|b| self.run_of(b)) {
            self.runs.remove(&before.0);
            run.0 = before.0;
        }
        if let Some(after) = last.checked_add(1).and_then(|a| self.runs.remove(&a)) {
            run.1 = after;
        }
        self.runs.insert(run.0, run.1);
        self.count += u64::from(last - first) + 1;
    }

    /// Takes the lowest free value.
    pub(crate) fn alloc(&mut self) -> Result<u32, AllocError> {
        self.alloc_from(self.lo)
    }

    /// Takes the lowest free value `>= start`.
    pub(crate) fn alloc_from(&mut self, start: u32) -> Result<u32, AllocError> {
        self.alloc_run(start, 1)
    }

    /// Takes a run of `count` consecutive free values, the lowest such run `>= start`.
    pub(crate) fn alloc_run(&mut self, start: u32, count: u32) -> Result<u32, AllocError> {
        let count = count.max(1);
        let mut first = start.max(self.lo);
        loop {
            // Runs are never adjacent, so the value after a used run is free.
            if let Some((_, last)) = self.run_of(first) {
                first = last.checked_add(1).ok_or_else(|| self.exhausted())?;
            }
            let last = first.checked_add(count - 1).ok_or_else(|| self.exhausted())?;
            if last > self.hi {
                return Err(self.exhausted());
            }
            match self.runs.range(first..=last).next().map(|(_, l)| *l) {
                Some(taken_to) => first = taken_to.checked_add(1).ok_or_else(|| self.exhausted())?,
                None => {
                    self.mark(first, last);
                    return Ok(first);
                }
            }
        }
    }

    /// Takes exactly `value`.
    pub(crate) fn take(&mut self, value: u32) -> Result<(), AllocError> {
        if value < self.lo || value > self.hi || self.is_used(value) {
            return Err(AllocError::Unavailable { what: self.what.clone(), value, lo: self.lo, hi: self.hi });
        }
        self.mark(value, value);
        Ok(())
    }

    /// Returns `value` to the set; true if it was taken. (Only the tests free values one
    /// by one: the planner rebuilds its free sets from the plan, so a released device's
    /// numbers are free again there.)
    #[cfg(test)]
    pub(crate) fn release(&mut self, value: u32) -> bool {
        let Some((first, last)) = self.run_of(value) else { return false };
        self.runs.remove(&first);
        if let Some(end) = value.checked_sub(1).filter(|e| *e >= first) {
            self.runs.insert(first, end);
        }
        if let Some(begin) = value.checked_add(1).filter(|b| *b <= last) {
            self.runs.insert(begin, last);
        }
        self.count -= 1;
        true
    }

    /// Whether `value` is taken.
    pub(crate) fn is_used(&self, value: u32) -> bool {
        self.run_of(value).is_some()
    }

    /// Number of values taken.
    #[cfg(test)]
    pub(crate) fn used_count(&self) -> usize {
        usize::try_from(self.count).unwrap_or(usize::MAX)
    }

    fn exhausted(&self) -> AllocError {
        AllocError::Exhausted { what: self.what.clone(), lo: self.lo, hi: self.hi }
    }
}

/// Ids `<prefix><n>` with `n` from a free set, skipping ids already taken elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdAllocator {
    prefix: String,
    numbers: FreeSet,
}

impl IdAllocator {
    /// Ids `prefix0`, `prefix1`, … (the prefix must start with a letter).
    pub(crate) fn new(prefix: &str) -> Self {
        IdAllocator {
            prefix: prefix.to_string(),
            numbers: FreeSet::new(&format!("{prefix} id"), 0, u32::MAX - 1),
        }
    }

    /// The next free id for which `taken` says no.
    pub(crate) fn alloc(&mut self, taken: impl Fn(&str) -> bool) -> Result<String, AllocError> {
        loop {
            let n = self.numbers.alloc()?;
            let id = format!("{}{}", self.prefix, n);
            if !taken(&id) {
                return Ok(id);
            }
        }
    }

    /// Frees the number of an id made by this allocator (other ids are ignored).
    #[cfg(test)]
    pub(crate) fn release(&mut self, id: &str) {
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

    #[test]
    fn runs_split_and_merge() {
        let mut s = FreeSet::new("n", 0, u32::MAX);
        for v in 0..10 {
            assert_eq!(s.alloc(), Ok(v));
        }
        assert!(s.release(4) && !s.release(4));
        assert_eq!(s.used_count(), 9);
        assert!(s.is_used(3) && !s.is_used(4) && s.is_used(5));
        assert_eq!(s.alloc_from(2), Ok(4));
        assert_eq!(s.alloc_run(0, 3), Ok(10));
        s.take(u32::MAX).unwrap();
        assert!(s.take(u32::MAX).is_err());
        assert_eq!(s.alloc_from(u32::MAX), Err(s.exhausted()));
        assert_eq!(s.alloc_run(u32::MAX - 1, 2), Err(s.exhausted()));
        assert_eq!(s.alloc_from(u32::MAX - 1), Ok(u32::MAX - 1));
        assert_eq!(s.used_count(), 15);
    }

    proptest::proptest! {
        /// The runs behave like the plain set of used values they replaced.
        #[test]
        fn behaves_like_a_set_of_used_values(ops in proptest::collection::vec((0u8..4, 0u32..40, 1u32..5), 0..200)) {
            let mut s = FreeSet::new("n", 3, 33);
            let mut model = std::collections::BTreeSet::new();
            for (op, v, n) in ops {
                match op {
                    0 => {
                        let got = s.alloc_from(v);
                        let want = (v.max(3)..=33).find(|x| !model.contains(x));
                        proptest::prop_assert_eq!(got.ok(), want);
                        model.extend(want);
                    }
                    1 => {
                        let got = s.alloc_run(v, n);
                        let want = (v.max(3)..=33).find(|f| (*f..f + n).all(|x| x <= 33 && !model.contains(&x)));
                        proptest::prop_assert_eq!(got.ok(), want);
                        if let Some(f) = want { model.extend(f..f + n); }
                    }
                    2 => {
                        let ok = (3..=33).contains(&v) && !model.contains(&v);
                        proptest::prop_assert_eq!(s.take(v).is_ok(), ok);
                        if ok { model.insert(v); }
                    }
                    _ => proptest::prop_assert_eq!(s.release(v), model.remove(&v)),
                }
                proptest::prop_assert_eq!(s.used_count(), model.len());
                for x in 0..40 {
                    proptest::prop_assert_eq!(s.is_used(x), model.contains(&x));
                }
            }
        }
    }
}
