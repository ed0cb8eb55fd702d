//! A list whose clone costs a pointer per 64 elements, not a copy of them
//! all: the steps, fan-out branches and history of a workflow state.
//!
//! The runtime clones a state to apply one input to it. With the elements in
//! shared chunks (copy on write), that clone and the transition that follows
//! touch only the chunks that change — a step's status, the last chunk of the
//! history — so a step of a 10,000-step workflow costs what a step of a
//! 10-step one does. Stores compare chunks by pointer to find what a
//! transition changed ([`Chunked::changed_since`]).
//!
//! It reads and writes as a JSON array, like a `Vec`.
//!
//! ```
//! use multiagents_core::chunked::Chunked;
//!
//! let mut a: Chunked<u32> = (0..200).collect();
//! let b = a.clone();
//! a[150] = 7;
//! assert_eq!(b[150], 150);
//! assert_eq!(a.changed_since(&b).collect::<Vec<_>>(), vec![128..192]);
//! ```

use std::fmt;
use std::ops::{Index, IndexMut, Range};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Elements per chunk.
pub const CHUNK: usize = 64;

/// A list in shared chunks of [`CHUNK`] elements.
pub struct Chunked<T> {
    // One chunk inline: cloning a short list allocates nothing.
    chunks: smallvec::SmallVec<[Arc<Chunk<T>>; 1]>,
    len: usize,
}

/// How many summaries a chunk keeps ([`Chunked::summaries`]).
pub const SUMMARIES: usize = 4;

/// Up to [`CHUNK`] elements, with summaries of them computed once (see
/// [`Chunked::summaries`]) and forgotten when they change.
struct Chunk<T> {
    items: Vec<T>,
    /// [`UNSET`] until computed. Computing one twice at once is harmless:
    /// both compute the same value.
    summary: [AtomicU64; SUMMARIES],
}

/// A summary not computed yet.
const UNSET: u64 = u64::MAX - 1;

fn unset() -> [AtomicU64; SUMMARIES] {
    std::array::from_fn(|_| AtomicU64::new(UNSET))
}

impl<T> Chunk<T> {
    fn new(items: Vec<T>) -> Self {
        Self {
            items,
            summary: unset(),
        }
    }
}

/// The elements of a chunk, to change: copied first if shared (with room
/// for `room` more), and the summaries forgotten.
fn items_mut<T: Clone>(chunk: &mut Arc<Chunk<T>>, room: usize) -> &mut Vec<T> {
    if Arc::get_mut(chunk).is_none() {
        let mut items = Vec::with_capacity(chunk.items.len() + room);
        items.extend_from_slice(&chunk.items);
        *chunk = Arc::new(Chunk::new(items));
    }
    let chunk = Arc::get_mut(chunk).expect("unique after the copy");
    for s in &chunk.summary {
        s.store(UNSET, Ordering::Relaxed);
    }
    &mut chunk.items
}

/// The elements of a [`Chunked`], in order.
pub struct Iter<'a, T> {
    chunks: std::slice::Iter<'a, Arc<Chunk<T>>>,
    front: std::slice::Iter<'a, T>,
    back: std::slice::Iter<'a, T>,
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        loop {
            if let Some(v) = self.front.next() {
                return Some(v);
            }
            match self.chunks.next() {
                Some(c) => self.front = c.items.iter(),
                None => return self.back.next(),
            }
        }
    }
}

impl<T> DoubleEndedIterator for Iter<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(v) = self.back.next_back() {
                return Some(v);
            }
            match self.chunks.next_back() {
                Some(c) => self.back = c.items.iter(),
                None => return self.front.next_back(),
            }
        }
    }
}

impl<T> Chunked<T> {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            chunks: smallvec::SmallVec::new_const(),
            len: 0,
        }
    }

    /// How many elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element at `i`.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.items.get(i % CHUNK)
    }

    /// The first element.
    pub fn first(&self) -> Option<&T> {
        self.get(0)
    }

    /// The last element.
    pub fn last(&self) -> Option<&T> {
        self.chunks.last()?.items.last()
    }

    /// The elements in order.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            chunks: self.chunks.iter(),
            front: [].iter(),
            back: [].iter(),
        }
    }

    /// The elements from `start` on.
    pub fn iter_from(&self, start: usize) -> impl DoubleEndedIterator<Item = &T> + '_ {
        let first = start / CHUNK;
        let skip = start % CHUNK;
        self.chunks
            .iter()
            .skip(first)
            .enumerate()
            .flat_map(move |(k, c)| {
                c.items[if k == 0 { skip.min(c.items.len()) } else { 0 }..].iter()
            })
    }

    /// The index ranges whose chunks are not shared with `earlier` (an
    /// earlier clone of this list): what changed or was added since, in
    /// whole chunks. Elements of `earlier` beyond this list's length are
    /// not reported.
    pub fn changed_since<'a>(
        &'a self,
        earlier: &'a Self,
    ) -> impl Iterator<Item = Range<usize>> + 'a {
        self.chunks.iter().enumerate().filter_map(move |(k, c)| {
            let same = earlier.chunks.get(k).is_some_and(|e| Arc::ptr_eq(e, c));
            (!same).then(|| k * CHUNK..k * CHUNK + c.items.len())
        })
    }
}

impl<T> Chunked<T> {
    /// Summary number `slot` (below [`SUMMARIES`]) of each chunk, in order:
    /// `summary` of its elements, computed once and kept with the chunk
    /// until it changes. A transition that changes one step recomputes one
    /// chunk's, not the whole list's. `summary` must be the same function at
    /// every call with a given slot on a list (what is kept is its value).
    pub fn summaries<'a>(
        &'a self,
        slot: usize,
        summary: impl Fn(&[T]) -> u64 + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        self.chunks.iter().map(move |c| {
            let kept = c.summary[slot].load(Ordering::Relaxed);
            if kept != UNSET {
                return kept;
            }
            let v = summary(&c.items);
            // The one value that cannot be kept is computed each time.
            if v != UNSET {
                c.summary[slot].store(v, Ordering::Relaxed);
            }
            v
        })
    }

    /// The least of summary `slot` over the chunks (`u64::MAX` when empty).
    pub fn min_summary(&self, slot: usize, summary: impl Fn(&[T]) -> u64) -> u64 {
        self.summaries(slot, summary).min().unwrap_or(u64::MAX)
    }
}

impl<T: Clone> Chunked<T> {
    /// The element at `i`, to change (its chunk is copied first if shared).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let chunk = self.chunks.get_mut(i / CHUNK)?;
        if i % CHUNK >= chunk.items.len() {
            return None;
        }
        items_mut(chunk, 0).get_mut(i % CHUNK)
    }

    /// Appends an element.
    pub fn push(&mut self, value: T) {
        match self.chunks.last_mut() {
            // A shared last chunk is copied with room for a few more
            // (the history of a transition is a few entries).
            Some(last) if last.items.len() < CHUNK => items_mut(last, 4).push(value),
            _ => {
                // Grown as needed: most lists (a short workflow's steps and
                // history) never fill a chunk.
                let mut items = Vec::with_capacity(4);
                items.push(value);
                self.chunks.push(Arc::new(Chunk::new(items)));
            }
        }
        self.len += 1;
    }

    /// Every element, to change (every shared chunk is copied).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks
            .iter_mut()
            .flat_map(|c| items_mut(c, 0).iter_mut())
    }

    /// The elements as one `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().cloned().collect()
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Chunked<T> {
    /// Shares every chunk.
    fn clone(&self) -> Self {
        Self {
            chunks: self.chunks.clone(),
            len: self.len,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .chunks
                .iter()
                .zip(&other.chunks)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.items == b.items)
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        match self.get(i) {
            Some(v) => v,
            None => panic!("index {i} out of a list of {}", self.len),
        }
    }
}

impl<T: Clone> IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        let len = self.len;
        match self.get_mut(i) {
            Some(v) => v,
            None => panic!("index {i} out of a list of {len}"),
        }
    }
}

impl<T: Clone> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = Self::new();
        let mut iter = iter.into_iter();
        loop {
            let items: Vec<T> = iter.by_ref().take(CHUNK).collect();
            if items.is_empty() {
                return out;
            }
            out.len += items.len();
            let full = items.len() == CHUNK;
            out.chunks.push(Arc::new(Chunk::new(items)));
            if !full {
                return out;
            }
        }
    }
}

impl<T: Clone> Extend<T> for Chunked<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        for v in iter {
            self.push(v);
        }
    }
}

impl<T: Clone> From<Vec<T>> for Chunked<T> {
    fn from(v: Vec<T>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a, T> IntoIterator for &'a Chunked<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T: Serialize> Serialize for Chunked<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.len))?;
        for v in self.iter() {
            seq.serialize_element(v)?;
        }
        seq.end()
    }
}

impl<'de, T: Deserialize<'de> + Clone> Deserialize<'de> for Chunked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Clone> Visitor<'de> for Seq<T> {
            type Value = Chunked<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Chunked<T>, A::Error> {
                let mut out = Chunked::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_shares_until_written_and_reads_like_a_vec() {
        let mut a: Chunked<u32> = (0..150).collect();
        assert_eq!(a.len(), 150);
        assert_eq!(
            a.iter().copied().collect::<Vec<_>>(),
            (0..150).collect::<Vec<_>>()
        );
        let b = a.clone();
        a[3] = 1000;
        a.push(150);
        assert_eq!(b[3], 3);
        assert_eq!(b.len(), 150);
        assert_eq!(a[3], 1000);
        assert_eq!(a.last(), Some(&150));
        // Chunk 0 was written, chunk 2 grew; chunk 1 is still shared.
        assert_eq!(
            a.changed_since(&b).collect::<Vec<_>>(),
            vec![0..64, 128..151]
        );
        assert_eq!(
            a.iter_from(149).copied().collect::<Vec<_>>(),
            vec![149, 150]
        );
        assert_eq!(a.iter_from(64).count(), 87);
        assert_eq!(a.iter_from(500).count(), 0);
        assert_ne!(a, b);
        assert_eq!(b, b.clone());
    }

    #[test]
    fn a_summary_is_kept_per_chunk_until_the_chunk_changes() {
        let calls = std::cell::Cell::new(0);
        let least = |c: &[u64]| {
            calls.set(calls.get() + 1);
            c.iter().copied().min().unwrap_or(u64::MAX)
        };
        let mut a: Chunked<u64> = (100..300).collect();
        assert_eq!(a.min_summary(0, least), 100);
        assert_eq!(calls.get(), 4);
        assert_eq!(a.min_summary(0, least), 100);
        assert_eq!(calls.get(), 4, "kept");
        let b = a.clone();
        a[150] = 7;
        assert_eq!(a.min_summary(0, least), 7);
        assert_eq!(calls.get(), 5, "only the changed chunk again");
        assert_eq!(b.min_summary(0, least), 100, "the clone keeps its own");
        a.push(1);
        assert_eq!(a.min_summary(0, least), 1);
        // Another slot is another summary.
        let sum: u64 = a.summaries(1, |c| c.len() as u64).sum();
        assert_eq!(sum, 201);
        assert_eq!(Chunked::<u64>::new().min_summary(0, least), u64::MAX);
    }

    #[test]
    fn it_reads_and_writes_as_a_json_array() {
        let a: Chunked<u32> = (0..100).collect();
        let text = serde_json::to_string(&a).expect("encode");
        assert_eq!(
            text,
            serde_json::to_string(&(0..100).collect::<Vec<u32>>()).expect("encode")
        );
        let back: Chunked<u32> = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, a);
        let empty: Chunked<u32> = serde_json::from_str("[]").expect("decode");
        assert!(empty.is_empty());
        assert!(empty.last().is_none());
    }
}
