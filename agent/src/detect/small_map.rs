//! A map for the per-workload tables the detectors keep (a workload's
//! destinations, its DNS domains): a sorted vector while small, a hash map
//! once large.
//!
//! With 10,000 workloads × tens of destinations or a few domains, hash
//! tables' empty slots and power-of-two growth were a large share of the
//! agent's memory. A sorted vector grown a quarter at a time has no slack
//! to speak of, and binary search over a few dozen entries is as fast as
//! hashing. Past [`SMALL`] entries (a workload's choice, so possibly
//! hostile) the map becomes a seeded hash map, where inserts stay O(1).
use std::{borrow::Borrow, collections::HashMap, hash::Hash};

/// Entries kept as a sorted vector; one more makes it a hash map.
pub(crate) const SMALL: usize = 32;

/// A value that carries its own key (so the sorted vector stores each key
/// once).
pub(crate) trait Keyed {
    /// The key as looked up (`str` for an owned `Box<str>`).
    type Key: ?Sized + Ord + Hash + Eq;
    /// The key as the hash map owns it.
    type Owned: Borrow<Self::Key> + Hash + Eq;
    /// This value's key.
    fn key(&self) -> &Self::Key;
    /// An owned copy of the key, for the hash map.
    fn owned_key(&self) -> Self::Owned;
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A sorted vector of up to [`SMALL`] values, or a hash map.
#[derive(Debug)]
pub(crate) enum SmallMap<V: Keyed> {
    /// Sorted by key.
    Small(Vec<V>),
    /// Keyed by a copy of each value's key.
    Large(Box<Map<V::Owned, V>>),
}

impl<V: Keyed> Default for SmallMap<V> {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

impl<V: Keyed> SmallMap<V> {
    /// Entries.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Small(v) => v.len(),
            Self::Large(m) => m.len(),
        }
    }

    /// True when empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn search(v: &[V], key: &V::Key) -> Result<usize, usize> {
        v.binary_search_by(|e| e.key().cmp(key))
    }

    /// The value for `key`.
    pub(crate) fn get(&self, key: &V::Key) -> Option<&V> {
        match self {
            Self::Small(v) => Self::search(v, key).ok().map(|i| &v[i]),
            Self::Large(m) => m.get(key),
        }
    }

    /// The value for `key`, mutable.
    pub(crate) fn get_mut(&mut self, key: &V::Key) -> Option<&mut V> {
        match self {
            Self::Small(v) => Self::search(v, key).ok().map(|i| &mut v[i]),
            Self::Large(m) => m.get_mut(key),
        }
    }

    /// The value for `key`, inserting `make()` (whose key must be `key`)
    /// when there is none.
    pub(crate) fn get_or_insert_with(&mut self, key: &V::Key, make: impl FnOnce() -> V) -> &mut V {
        if let Self::Small(v) = self
            && v.len() >= SMALL
            && Self::search(v, key).is_err()
        {
            let map: Map<V::Owned, V> = std::mem::take(v)
                .into_iter()
                .map(|e| (e.owned_key(), e))
                .collect();
            *self = Self::Large(Box::new(map));
        }
        match self {
            Self::Small(v) => {
                let i = match Self::search(v, key) {
                    Ok(i) => i,
                    Err(i) => {
                        if v.len() == v.capacity() {
                            // A quarter more at a time: little slack, and
                            // few reallocations at this size.
                            v.reserve_exact((v.len() / 4).max(1));
                        }
                        let e = make();
                        debug_assert!(e.key() == key, "made a value for another key");
                        v.insert(i, e);
                        i
                    }
                };
                &mut v[i]
            }
            Self::Large(m) => {
                if !m.contains_key(key) {
                    let e = make();
                    debug_assert!(e.key() == key, "made a value for another key");
                    m.insert(e.owned_key(), e);
                }
                m.get_mut(key).expect("present or inserted above")
            }
        }
    }

    /// Removes the value for `key`.
    pub(crate) fn remove(&mut self, key: &V::Key) -> Option<V> {
        let out = match self {
            Self::Small(v) => Self::search(v, key).ok().map(|i| v.remove(i)),
            Self::Large(m) => m.remove(key),
        };
        self.tidy();
        out
    }

    /// Keeps the values `keep` says to keep (it may change them).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        match self {
            Self::Small(v) => v.retain_mut(keep),
            Self::Large(m) => m.retain(|_, e| keep(e)),
        }
        self.tidy();
    }

    /// Gives memory back after removals: a map that fell to half of
    /// [`SMALL`] becomes a vector again, a vector with over half its room
    /// unused shrinks.
    fn tidy(&mut self) {
        match self {
            Self::Small(v) => {
                if v.capacity() > 2 * v.len() + 4 {
                    v.shrink_to_fit();
                }
            }
            Self::Large(m) if m.len() <= SMALL / 2 => {
                let mut v: Vec<V> = std::mem::take(&mut **m).into_values().collect();
                v.sort_unstable_by(|a, b| a.key().cmp(b.key()));
                v.shrink_to_fit();
                *self = Self::Small(v);
            }
            Self::Large(_) => {}
        }
    }

    /// The values (in key order while small, in no order once large).
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        let (small, large) = match self {
            Self::Small(v) => (Some(v.iter()), None),
            Self::Large(m) => (None, Some(m.values())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }

    /// The values, mutable.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        let (small, large) = match self {
            Self::Small(v) => (Some(v.iter_mut()), None),
            Self::Large(m) => (None, Some(m.values_mut())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct E(u32, &'static str);
    impl Keyed for E {
        type Key = u32;
        type Owned = u32;
        fn key(&self) -> &u32 {
            &self.0
        }
        fn owned_key(&self) -> u32 {
            self.0
        }
    }

    fn keys(m: &SmallMap<E>) -> Vec<u32> {
        let mut k: Vec<u32> = m.values().map(|e| e.0).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn sorted_while_small_and_promoted_past_small() {
        let mut m = SmallMap::default();
        // Inserted out of order; kept sorted.
        for k in (0..SMALL as u32).rev() {
            m.get_or_insert_with(&k, || E(k, "new"));
        }
        assert!(matches!(&m, SmallMap::Small(v) if v.windows(2).all(|w| w[0].0 < w[1].0)));
        assert_eq!(m.len(), SMALL);
        // Existing keys do not grow it or call `make`.
        m.get_or_insert_with(&3, || unreachable!("3 is present")).1 = "seen";
        assert!(matches!(m, SmallMap::Small(_)), "full but not past it");
        // One more: a hash map holding every entry.
        m.get_or_insert_with(&1000, || E(1000, "new"));
        assert!(matches!(m, SmallMap::Large(_)));
        assert_eq!(m.len(), SMALL + 1);
        assert_eq!(m.get(&3), Some(&E(3, "seen")));
        assert_eq!(m.get(&1000), Some(&E(1000, "new")));
        assert_eq!(m.get(&999), None);
        let mut want: Vec<u32> = (0..SMALL as u32).collect();
        want.push(1000);
        assert_eq!(keys(&m), want);
        m.get_mut(&1000).unwrap().1 = "changed";
        assert_eq!(m.get(&1000).unwrap().1, "changed");
    }

    #[test]
    fn removals_shrink_back_to_a_vector() {
        let mut m = SmallMap::default();
        for k in 0..100u32 {
            m.get_or_insert_with(&k, || E(k, ""));
        }
        assert!(matches!(m, SmallMap::Large(_)));
        // Still large above half of SMALL.
        m.retain(|e| e.0 < SMALL as u32 / 2 + 1);
        assert!(matches!(m, SmallMap::Large(_)));
        assert_eq!(m.remove(&0), Some(E(0, "")));
        assert_eq!(m.remove(&0), None);
        // Half of SMALL: sorted vector again, every entry kept.
        assert!(matches!(&m, SmallMap::Small(v) if v.windows(2).all(|w| w[0].0 < w[1].0)));
        assert_eq!(keys(&m), (1..=SMALL as u32 / 2).collect::<Vec<_>>());
        // Emptied by retain: a vector without room left over.
        for e in m.values_mut() {
            e.1 = "gone";
        }
        m.retain(|e| e.1 != "gone");
        assert!(m.is_empty());
        assert!(matches!(&m, SmallMap::Small(v) if v.capacity() <= 4));
    }

    #[test]
    fn grows_by_a_quarter() {
        let mut m = SmallMap::default();
        for k in 0..20u32 {
            m.get_or_insert_with(&k, || E(k, ""));
        }
        let SmallMap::Small(v) = &m else {
            panic!("20 entries are small")
        };
        assert!(v.capacity() < 25, "capacity {}", v.capacity());
    }
}
