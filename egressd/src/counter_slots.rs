//! Which `SESSION_COUNTERS` slots are free. A slot freed by an ended session goes to the back of
//! the line: a late count of that session (a program run that read its slot just before the
//! session was removed) lands in a slot no one reads, and is zeroed before the slot is given out
//! again, thousands of sessions later.

use std::collections::{HashSet, VecDeque};

pub struct CounterSlots {
    free: VecDeque<u32>,
}

impl CounterSlots {
    /// Slots 1..=`slots` (0 means "no slot"), less those running sessions hold.
    pub fn new(slots: u32, held: impl IntoIterator<Item = u32>) -> CounterSlots {
        let held: HashSet<u32> = held.into_iter().collect();
        CounterSlots {
            free: (1..=slots).filter(|s| !held.contains(s)).collect(),
        }
    }

    /// The slot freed longest ago (or never used); None when every slot is held.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// A slot back, after its session's last counts were read.
    pub fn give_back(&mut self, slot: u32) {
        if slot != 0 && !self.free.contains(&slot) {
            self.free.push_back(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_slots_are_skipped_and_freed_ones_wait_behind_the_rest() {
        let mut s = CounterSlots::new(5, [2, 4, 0]);
        assert_eq!(s.take(), Some(1));
        s.give_back(1);
        assert_eq!(s.take(), Some(3));
        assert_eq!(s.take(), Some(5));
        // 1 was freed after 3 and 5 were queued: it comes after them.
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), None, "2 and 4 are held");
        s.give_back(4);
        s.give_back(4);
        s.give_back(0);
        assert_eq!(s.take(), Some(4));
        assert_eq!(
            s.take(),
            None,
            "a slot given back twice is queued once; 0 is never a slot"
        );
    }
}
