//! The core's replicas by id, in a dense table.
//!
//! Replica ids are allocated in sequence (`Core::alloc_replica`), so a slot per id since the
//! oldest one kept is all the index a replica needs. A hash map would add its key and a
//! control byte per entry and, past each power of two, double its buckets: for a job of a
//! million tasks at quorum 2 (two million replicas) that slack alone was some 0.5 GB of the
//! coordinator's memory. Lookups stay O(1); an id below the table's base or beyond its end is
//! simply absent (a replica id in a message is a remote party's claim).

use std::collections::VecDeque;

use tasks::wire::ReplicaId;

use super::Replica;

/// Replicas by id: `slots[i]` is replica `base + i`.
#[derive(Debug, Default)]
pub(crate) struct ReplicaTable {
    base: ReplicaId,
    slots: VecDeque<Option<Replica>>,
    len: usize,
}

impl ReplicaTable {
    fn index(&self, id: ReplicaId) -> Option<usize> {
        let i = id.checked_sub(self.base)?;
        (i < self.slots.len() as u64).then_some(i as usize)
    }

    pub fn get(&self, id: &ReplicaId) -> Option<&Replica> {
        self.slots.get(self.index(*id)?)?.as_ref()
    }

    pub fn get_mut(&mut self, id: &ReplicaId) -> Option<&mut Replica> {
        let i = self.index(*id)?;
        self.slots.get_mut(i)?.as_mut()
    }

    /// Insert (or replace) replica `id`. Ids come from the core's own sequence (or the store,
    /// at restore, in any order): the table grows to cover them.
    pub fn insert(&mut self, id: ReplicaId, r: Replica) -> Option<Replica> {
        if self.slots.is_empty() {
            self.base = id;
        }
        if id < self.base {
            for _ in id..self.base {
                self.slots.push_front(None);
            }
            self.base = id;
        }
        let i = (id - self.base) as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        let old = self.slots[i].replace(r);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: &ReplicaId) -> Option<Replica> {
        let i = self.index(*id)?;
        let old = self.slots[i].take();
        if old.is_some() {
            self.len -= 1;
            // Keep the table from starting with holes.
            while matches!(self.slots.front(), Some(None)) {
                self.slots.pop_front();
                self.base += 1;
            }
            while matches!(self.slots.back(), Some(None)) {
                self.slots.pop_back();
            }
            if self.slots.is_empty() {
                self.base = 0;
            }
        }
        old
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Replicas with their ids, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, &Replica)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, r)| r.as_ref().map(|r| (base + i as u64, r)))
    }

    pub fn values(&self) -> impl Iterator<Item = &Replica> {
        self.slots.iter().flatten()
    }
}

impl std::ops::Index<&ReplicaId> for ReplicaTable {
    type Output = Replica;

    fn index(&self, id: &ReplicaId) -> &Replica {
        self.get(id).expect("no such replica")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReplicaPhase;
    use tasks::{JobId, NodeId, TaskId};

    fn rep(index: u32) -> Replica {
        Replica {
            task: TaskId {
                job: JobId(1),
                index,
            },
            worker: NodeId([1; 32]),
            fp: 0,
            deadline_ms: 0,
            phase: ReplicaPhase::InFlight,
            result: None,
            verdict: None,
            anchor: false,
            block: None,
            lost_mark: 0,
            first_deadline_ms: 0,
            progress: None,
        }
    }

    #[test]
    fn ids_in_any_order_holes_and_removals() {
        let mut t = ReplicaTable::default();
        assert!(t.get(&0).is_none());
        t.insert(10, rep(10));
        t.insert(7, rep(7)); // below the base: the table grows at the front
        t.insert(12, rep(12)); // a hole at 11
        assert_eq!(t.len(), 3);
        assert_eq!(t[&7].task.index, 7);
        assert!(t.get(&11).is_none() && t.get(&6).is_none() && t.get(&13).is_none());
        assert!(t.get(&u64::MAX).is_none());
        assert_eq!(
            t.iter()
                .map(|(id, r)| (id, r.task.index))
                .collect::<Vec<_>>(),
            vec![(7, 7), (10, 10), (12, 12)]
        );
        assert!(t.insert(10, rep(100)).is_some(), "replaced, not added");
        assert_eq!(t.len(), 3);
        t.get_mut(&10).unwrap().fp = 3;
        assert_eq!(t[&10].fp, 3);
        assert_eq!(t.remove(&7).map(|r| r.task.index), Some(7));
        assert!(t.remove(&7).is_none());
        assert_eq!(t.len(), 2);
        assert!(t.get(&12).is_some() && t.get(&7).is_none());
        t.remove(&10);
        t.remove(&12);
        assert_eq!((t.len(), t.values().count()), (0, 0));
        t.insert(3, rep(3));
        assert_eq!(t.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![3]);
    }
}
