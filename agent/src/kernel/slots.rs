//! Stable stats slots: a name keeps its slot (and so its counters) across reloads.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Rules that wait for a missing interface, and those interfaces: their slots are kept.
#[derive(Debug, Default)]
pub struct Waiting {
    pub rules: BTreeSet<String>,
    pub ifaces: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Slots {
    by_name: HashMap<String, u32>,
    free: BTreeSet<u32>,
}

impl Slots {
    /// Slots `base..base + count`.
    pub fn new(base: u32, count: u32) -> Self {
        Self {
            by_name: HashMap::new(),
            free: (base..base + count).collect(),
        }
    }

    /// Slots `base..base + count`, with the owners a previous agent recorded. Recorded slots
    /// outside the range (another version's layout) are dropped.
    pub fn with_owners(base: u32, count: u32, owners: &BTreeMap<String, u32>) -> Self {
        let mut s = Self::new(base, count);
        for (name, &slot) in owners {
            if s.free.remove(&slot) {
                s.by_name.insert(name.clone(), slot);
            }
        }
        s
    }

    /// Every owner with its slot.
    pub fn owners(&self) -> BTreeMap<String, u32> {
        self.by_name.iter().map(|(n, &s)| (n.clone(), s)).collect()
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Gives every name a slot, keeping existing ones. Returns the names' slots that are new,
    /// whose counters must be cleared of a former owner's. Fails when slots run out.
    pub fn assign<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<u32>, usize> {
        let mut fresh = Vec::new();
        for name in names {
            if self.by_name.contains_key(name) {
                continue;
            }
            let Some(slot) = self.free.pop_first() else {
                return Err(self.by_name.len());
            };
            self.by_name.insert(name.to_owned(), slot);
            fresh.push(slot);
        }
        Ok(fresh)
    }

    /// Gives `name` the free `slot`, if it has none: the slot the kernel's maps show it in
    /// when the record of owners is lost. Returns whether it did.
    pub fn claim(&mut self, name: &str, slot: u32) -> bool {
        if self.by_name.contains_key(name) || !self.free.remove(&slot) {
            return false;
        }
        self.by_name.insert(name.to_owned(), slot);
        true
    }

    /// Frees the slots of names not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let free = &mut self.free;
        self.by_name.retain(|name, slot| {
            let kept = keep(name);
            if !kept {
                free.insert(*slot);
            }
            kept
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_slots_and_freed_slots_are_reused() {
        let mut s = Slots::new(10, 3);
        assert_eq!(s.assign(["a", "b"]).unwrap(), [10, 11]);
        assert_eq!(s.assign(["b", "a", "c"]).unwrap(), [12]);
        assert_eq!(
            (s.get("a"), s.get("b"), s.get("c")),
            (Some(10), Some(11), Some(12))
        );
        assert_eq!(s.assign(["d"]), Err(3));
        s.retain(|n| n != "b");
        assert_eq!(s.get("b"), None);
        assert_eq!(s.assign(["d"]).unwrap(), [11]);
    }

    #[test]
    fn recorded_owners_keep_their_slots() {
        let mut s = Slots::new(10, 3);
        s.assign(["a", "b", "c"]).unwrap();
        s.retain(|n| n != "b");
        let mut again = Slots::with_owners(10, 3, &s.owners());
        assert_eq!((again.get("a"), again.get("c")), (Some(10), Some(12)));
        assert_eq!(again.assign(["a", "x"]).unwrap(), [11]);
        let foreign = BTreeMap::from([("z".to_owned(), 99)]);
        assert_eq!(Slots::with_owners(10, 3, &foreign).get("z"), None);
    }
}
