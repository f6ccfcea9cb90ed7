//! What the workers send: the logical operations, the mix that picks them, the pool of live
//! sessions they work on, and the attributes a new session starts with.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::Args;

/// An operation's outcome: `Err` names what failed, for the error counts.
pub(crate) type OpResult = Result<(), String>;

/// What an operation on one session did to it, and so to its pool slot.
pub(crate) enum Slot {
    /// Still there under the same ID.
    Kept,
    /// Ended: the slot is refilled by a later create.
    Ended,
    /// Moved to this new ID (Regenerate).
    Moved(String),
}

/// The logical operations.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Get,
    Update,
    Create,
    Destroy,
    Regenerate,
    List,
}

/// Every operation with its name in `--mix`, in the reports and in error counts.
pub(crate) const OPS: [(Op, &str); 6] = [
    (Op::Get, "get"),
    (Op::Update, "update"),
    (Op::Create, "create"),
    (Op::Destroy, "destroy"),
    (Op::Regenerate, "regenerate"),
    (Op::List, "list"),
];

pub(crate) fn op_name(op: Op) -> &'static str {
    OPS.iter().find(|(o, _)| *o == op).map_or("?", |(_, n)| n)
}

/// Parses `get=80,update=12,...` into cumulative weights.
pub(crate) fn parse_mix(s: &str) -> Result<Vec<(Op, u32)>, String> {
    let mut weights = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| format!("mix entry {part:?} is not name=weight"))?;
        let op = OPS
            .iter()
            .find(|(_, n)| *n == name.trim())
            .ok_or_else(|| format!("unknown operation {name:?} in mix"))?
            .0;
        let w: u32 = w
            .trim()
            .parse()
            .map_err(|_| format!("weight of {name} is not a whole number"))?;
        weights.push((op, w));
    }
    if weights.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        return Err("the mix has no weight".into());
    }
    Ok(weights)
}

/// Picks an operation for a roll in `0..total`.
pub(crate) fn pick(mix: &[(Op, u32)], mut roll: u32) -> Op {
    for (op, w) in mix {
        if roll < *w {
            return *op;
        }
        roll -= w;
    }
    mix.last().map_or(Op::Get, |(op, _)| *op)
}

/// A worker's next request: an operation by the mix's weights (`total` their sum), a pool
/// slot out of `slots`, and the request's own random source.
pub(crate) fn draw(
    mix: &[(Op, u32)],
    total: u32,
    slots: usize,
    rng: &mut SmallRng,
) -> (Op, usize, SmallRng) {
    let op = pick(mix, rng.random_range(0..total));
    let slot = rng.random_range(0..slots);
    (op, slot, SmallRng::seed_from_u64(rng.random()))
}

/// The live session IDs the workers draw from; a destroyed slot is refilled by a create.
pub(crate) struct Pool {
    pub(crate) slots: Vec<Mutex<Option<(String, usize)>>>,
    pub(crate) next_user: AtomicUsize,
}

impl Pool {
    pub(crate) fn get(&self, i: usize) -> Option<(String, usize)> {
        self.slots[i % self.slots.len()].lock().unwrap().clone()
    }
    pub(crate) fn set(&self, i: usize, v: Option<(String, usize)>) {
        *self.slots[i % self.slots.len()].lock().unwrap() = v;
    }
}

/// The attributes of a new session: `--attributes` values of `--value-bytes` each.
pub(crate) fn attributes(args: &Args, seed: u64) -> Vec<(String, Bytes)> {
    (0..args.attributes)
        .map(|i| {
            let mut v = vec![b'a' + (seed % 26) as u8; args.value_bytes];
            v[0] = b'0' + (i % 10) as u8;
            (format!("attr{i}"), Bytes::from(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_mix_parses_and_picks_by_weight() {
        let mix = parse_mix("get=80,update=12,create=4,destroy=2,regenerate=1,list=1").unwrap();
        let total: u32 = mix.iter().map(|(_, w)| w).sum();
        assert_eq!(total, 100);
        assert_eq!(pick(&mix, 0), Op::Get);
        assert_eq!(pick(&mix, 79), Op::Get);
        assert_eq!(pick(&mix, 80), Op::Update);
        assert_eq!(pick(&mix, 95), Op::Create);
        assert_eq!(pick(&mix, 96), Op::Destroy);
        assert_eq!(pick(&mix, 99), Op::List);
        let mut counts = HashMap::new();
        for roll in 0..total {
            *counts.entry(op_name(pick(&mix, roll))).or_insert(0) += 1;
        }
        assert_eq!(counts["update"], 12);
        assert!(parse_mix("get=80,fly=1").unwrap_err().contains("fly"));
        assert!(parse_mix("get=0").is_err());
        assert!(parse_mix("get").is_err());
    }
}
