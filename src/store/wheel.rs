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
//!
//! A session that ends early (destroyed, regenerated, evicted by the per-user cap) stays
//! filed until its slot comes due, up to the longest idle timeout away, so under churn the
//! wheel could hold many times more keys than there are sessions. The store therefore
//! [`sweep`](Wheel::sweep)s it, in bounded steps, whenever it holds far more keys than there
//! are sessions: touches stay free, and the wheel stays within a constant factor of the
//! live population.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::lock;
use crate::session::{Millis, SessionKey};

/// Slot number -> keys filed under it.
type Slots = BTreeMap<u64, Vec<SessionKey>>;

/// One independently locked part of the wheel.
#[derive(Default)]
struct Part {
    slots: Slots,
    /// Keys in `slots`, kept under the same lock, so filing costs no shared counter.
    len: usize,
}

/// Where an unfinished sweep goes on: a part, and the first slot in it not yet swept.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    part: usize,
    slot: u64,
}

/// The expiry index. See the module docs.
pub(crate) struct Wheel {
    /// Width of one slot. Expiry is exact regardless (reads check deadlines themselves);
    /// this only sets how promptly memory is freed.
    granularity: Millis,
    parts: Box<[Mutex<Part>]>,
    /// The sweep under way, if any.
    sweep: Mutex<Option<Cursor>>,
}

impl Wheel {
    /// A wheel with `parts` independently locked parts.
    pub(crate) fn new(granularity: Millis, parts: usize) -> Self {
        Wheel {
            granularity: granularity.max(1),
            parts: (0..parts.max(1))
                .map(|_| Mutex::new(Part::default()))
                .collect(),
            sweep: Mutex::new(None),
        }
    }

    /// Files `key` under the slot that contains `deadline`.
    pub(crate) fn file(&self, key: SessionKey, deadline: Millis) {
        let slot = deadline.div_ceil(self.granularity);
        let mut part = self.part(&key);
        part.slots.entry(slot).or_default().push(key);
        part.len += 1;
    }

    /// Takes up to `max` keys whose slot is due at `now`, with the start of the oldest due
    /// slot (for lag reporting). Keys stay in the wheel if `max` is reached first.
    pub(crate) fn take_due(
        &self,
        now: Millis,
        max: usize,
        out: &mut Vec<SessionKey>,
    ) -> Option<Millis> {
        self.take(0, now / self.granularity, max, out)
            .map(|slot| slot * self.granularity)
    }

    /// Takes up to `max` keys with the earliest slots, due or not, starting at part `from`
    /// (callers rotate it so no part is drained first every time): eviction candidates.
    pub(crate) fn take_earliest(&self, from: usize, max: usize, out: &mut Vec<SessionKey>) {
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
            let mut part = lock(&self.parts[(from + i) % n]);
            let before = out.len();
            while out.len() < max {
                let Some(mut entry) = part.slots.first_entry() else {
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
            part.len -= out.len() - before;
            if out.len() >= max {
                break;
            }
        }
        earliest
    }

    /// Starts a sweep unless one is under way.
    pub(crate) fn start_sweep(&self) {
        lock(&self.sweep).get_or_insert(Cursor { part: 0, slot: 0 });
    }

    /// Whether a sweep is under way.
    pub(crate) fn sweeping(&self) -> bool {
        lock(&self.sweep).is_some()
    }

    /// One step of the sweep under way: looks at about `budget` filed keys (whole slots, so
    /// a step may go a slot over), drops those `keep` says no to, and returns how many it
    /// dropped. `keep` runs under a part's lock, so it must not file or take.
    pub(crate) fn sweep(&self, budget: usize, keep: impl Fn(&SessionKey) -> bool) -> usize {
        let mut cursor = lock(&self.sweep);
        let mut dropped = 0;
        let mut seen = 0;
        while let Some(at) = *cursor {
            if seen >= budget {
                break;
            }
            let mut part = lock(&self.parts[at.part]);
            let mut next = None;
            let mut emptied = Vec::new();
            let mut here = 0;
            for (&slot, keys) in part.slots.range_mut(at.slot..) {
                if seen >= budget {
                    next = Some(slot);
                    break;
                }
                seen += keys.len();
                let before = keys.len();
                keys.retain(|k| keep(k));
                here += before - keys.len();
                if keys.is_empty() {
                    emptied.push(slot);
                }
            }
            for slot in emptied {
                part.slots.remove(&slot);
            }
            part.len -= here;
            dropped += here;
            drop(part);
            *cursor = match next {
                Some(slot) => Some(Cursor { slot, ..at }),
                None if at.part + 1 < self.parts.len() => Some(Cursor {
                    part: at.part + 1,
                    slot: 0,
                }),
                None => None,
            };
        }
        dropped
    }

    /// How many keys are filed, live or not. Takes every part's lock in turn, briefly.
    pub(crate) fn len(&self) -> usize {
        self.parts.iter().map(|p| lock(p).len).sum()
    }

    /// Whether nothing is filed.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part(&self, key: &SessionKey) -> std::sync::MutexGuard<'_, Part> {
        lock(&self.parts[self.part_of(key)])
    }

    /// Which part files `key`. It reads random bits only, the key's bytes 10..12: not the
    /// ID's slot, which the server may choose (a regenerate keeps it), and not the map's hash
    /// (bytes 2..10), so a part's keys are neither one slot's nor one map shard's.
    fn part_of(&self, key: &SessionKey) -> usize {
        let b = key.random_tail();
        let i = usize::from(b[8]) | usize::from(b[9]) << 8;
        i % self.parts.len()
    }
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

    #[test]
    fn parts_are_chosen_by_random_bits_not_by_the_slot() {
        use crate::session::{Slot, SLOTS};
        let wheel = Wheel::new(1000, 64);
        // Keys in one slot still spread over every part.
        let slot = Slot::new(77).unwrap();
        let parts: std::collections::HashSet<_> = (0..2000)
            .map(|_| wheel.part_of(&SessionKey::generate_in(slot)))
            .collect();
        assert_eq!(parts.len(), 64);
        // Keys that differ only in their slot bits share a part.
        let key = SessionKey::generate();
        let home = Slot::of(&key).get();
        for step in [1, 2, 8192, 16383] {
            let moved = key.with_slot(Slot::new((home + step) % SLOTS).unwrap());
            assert_ne!(moved, key);
            assert_eq!(wheel.part_of(&moved), wheel.part_of(&key));
        }
    }

    #[test]
    fn a_sweep_drops_what_keep_refuses_in_bounded_steps() {
        let wheel = Wheel::new(1000, 4);
        let keys: Vec<_> = (0..100).map(|_| SessionKey::generate()).collect();
        for (i, k) in keys.iter().enumerate() {
            wheel.file(*k, 1000 * (i as u64 % 10 + 1));
        }
        let gone: std::collections::HashSet<_> = keys.iter().step_by(2).copied().collect();
        assert!(!wheel.sweeping());
        assert_eq!(wheel.sweep(10, |_| false), 0, "no sweep under way");
        wheel.start_sweep();
        let mut dropped = 0;
        let mut steps = 0;
        while wheel.sweeping() {
            dropped += wheel.sweep(10, |k| !gone.contains(k));
            steps += 1;
        }
        assert_eq!(dropped, 50);
        assert!(steps > 2, "the sweep went in steps, not all at once");
        assert_eq!(wheel.len(), 50);
        let mut out = Vec::new();
        wheel.take_due(u64::MAX / 2, 1000, &mut out);
        assert_eq!(out.len(), 50);
        assert!(out.iter().all(|k| !gone.contains(k)));
        assert!(wheel.is_empty());
    }
}
