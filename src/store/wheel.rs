//! A lazy timing wheel: the expiry index.
//!
//! A session is filed under the slot of the deadline it had when it was filed. Touches do not
//! re-file anything, so a read costs no more than its map access. When a slot comes due, the
//! reaper re-checks each key's real deadline: dead ones are expired, touched ones are filed
//! again under their new slot. Reaper work is therefore proportional to expirations plus
//! re-files, never to the number of live sessions.
//!
//! The wheel is split into independently locked parts by key, so concurrent creates rarely
//! meet on a lock, and every lock is held only for a push or a pop.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::session::{Millis, SessionKey};

/// Slot number -> keys filed under it.
type Slots = BTreeMap<u64, Vec<SessionKey>>;

/// The expiry index. See the module docs.
pub struct Wheel {
    /// Width of one slot. Expiry is exact regardless (reads check deadlines themselves);
    /// this only sets how promptly memory is freed.
    granularity: Millis,
    parts: Box<[Mutex<Slots>]>,
}

impl Wheel {
    /// A wheel with `parts` independently locked parts.
    pub fn new(granularity: Millis, parts: usize) -> Self {
        Wheel {
            granularity: granularity.max(1),
            parts: (0..parts.max(1))
                .map(|_| Mutex::new(BTreeMap::new()))
                .collect(),
        }
    }

    /// Files `key` under the slot that contains `deadline`.
    pub fn file(&self, key: SessionKey, deadline: Millis) {
        let slot = deadline.div_ceil(self.granularity);
        self.part(&key).entry(slot).or_default().push(key);
    }

    /// Takes up to `max` keys whose slot is due at `now`, with the start of the oldest due
    /// slot (for lag reporting). Keys stay in the wheel if `max` is reached first.
    pub fn take_due(&self, now: Millis, max: usize, out: &mut Vec<SessionKey>) -> Option<Millis> {
        self.take(0, now / self.granularity, max, out)
            .map(|slot| slot * self.granularity)
    }

    /// Takes up to `max` keys with the earliest slots, due or not, starting at part `from`
    /// (callers rotate it so no part is drained first every time): eviction candidates.
    pub fn take_earliest(&self, from: usize, max: usize, out: &mut Vec<SessionKey>) {
        self.take(from, u64::MAX, max, out);
    }

    /// Takes up to `max` keys from slots up to `last_slot`, visiting the parts from `from`
    /// on, earliest slots first within each; returns the earliest slot taken.
    fn take(
        &self,
        from: usize,
        last_slot: u64,
        max: usize,
        out: &mut Vec<SessionKey>,
    ) -> Option<u64> {
        let n = self.parts.len();
        let mut earliest: Option<u64> = None;
        for i in 0..n {
            let mut slots = lock(&self.parts[(from + i) % n]);
            while out.len() < max {
                let Some(mut entry) = slots.first_entry() else {
                    break;
                };
                let slot = *entry.key();
                if slot > last_slot {
                    break;
                }
                earliest = Some(earliest.map_or(slot, |e| e.min(slot)));
                let keys = entry.get_mut();
                let room = max - out.len();
                if keys.len() <= room {
                    out.append(&mut entry.remove());
                } else {
                    let tail = keys.len() - room;
                    out.extend(keys.drain(tail..));
                }
            }
            if out.len() >= max {
                break;
            }
        }
        earliest
    }

    /// How many keys are filed, live or not. For tests and diagnostics; takes every lock.
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| lock(p).values().map(Vec::len).sum::<usize>())
            .sum()
    }

    /// Whether nothing is filed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part(&self, key: &SessionKey) -> std::sync::MutexGuard<'_, Slots> {
        let b = key.as_bytes();
        let i = usize::from(b[8]) | usize::from(b[9]) << 8;
        lock(&self.parts[i % self.parts.len()])
    }
}

/// Locks a part. No code path panics while holding one, but if one ever did, the wheel's data
/// (a list of keys to re-check) is still valid, so poisoning is ignored rather than spread.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_only_due_slots_in_bounded_batches() {
        let wheel = Wheel::new(1000, 1);
        let keys: Vec<_> = (0..10).map(|_| SessionKey::generate()).collect();
        for (i, k) in keys.iter().enumerate() {
            wheel.file(*k, 1000 + i as u64 * 1000);
        }
        let mut out = Vec::new();
        assert_eq!(wheel.take_due(999, 100, &mut out), None);
        assert!(out.is_empty());
        // Deadlines 1000..=5000 are due at 5000.
        let oldest = wheel.take_due(5000, 3, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(oldest, Some(1000));
        out.clear();
        wheel.take_due(5000, 100, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(wheel.len(), 5);
    }

    #[test]
    fn a_deadline_inside_a_slot_is_not_due_before_it_passes() {
        let wheel = Wheel::new(1000, 1);
        let k = SessionKey::generate();
        wheel.file(k, 1500);
        let mut out = Vec::new();
        wheel.take_due(1999, 10, &mut out);
        assert!(out.is_empty());
        wheel.take_due(2000, 10, &mut out);
        assert_eq!(out, vec![k]);
    }
}
