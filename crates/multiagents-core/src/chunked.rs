//! A list whose clone copies at most one partial chunk of elements and a
//! pointer per full chunk of 64, not all of them: the steps, fan-out
//! branches and history of a workflow state.
//!
//! The runtime clones a state to apply one input to it. Full chunks are
//! shared (copy on write); the last, partial chunk — the tail, where a
//! list grows — is the list's own, copied with the clone and then changed
//! in place. So the clone and the transition that follows touch only the
//! chunks that change — a step's status, the tail of the history — and a
//! step of a 10,000-step workflow costs what a step of a 10-step one does,
//! while a short list costs what a `Vec` does. Stores compare chunks by
//! pointer, and tails by the clone they came from, to find what a
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
//! a.push(200);
//! assert_eq!(
//!     a.changed_since(&b).collect::<Vec<_>>(),
//!     vec![128..192, 192..201]
//! );
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

/// A list in shared chunks of [`CHUNK`] elements and an owned tail.
pub struct Chunked<T> {
    /// The elements after the full chunks, fewer than [`CHUNK`]: all of
    /// them in a short list.
    tail: Vec<T>,
    /// The full chunks, once there is one: a short list is a `Vec` and a
    /// pointer.
    full: Option<Box<Full<T>>>,
}

/// The full chunks of a long list, and what it keeps about its tail.
struct Full<T> {
    /// [`CHUNK`] elements each, shared by clones.
    chunks: Vec<Arc<Chunk<T>>>,
    /// The tail's summaries (as a chunk's).
    tail_summary: [AtomicU64; SUMMARIES],
    /// Names the tail's contents across clones: equal and not [`FRESH`] in
    /// two lists when both tails are copies of one that neither changed
    /// since. Given on the first clone after a change.
    tail_id: AtomicU64,
}

/// How many summaries a chunk keeps ([`Chunked::summaries`]).
pub const SUMMARIES: usize = 4;

/// [`CHUNK`] elements, with summaries of them computed once (see
/// [`Chunked::summaries`]) and forgotten when they change.
struct Chunk<T> {
    items: Vec<T>,
    /// [`UNSET`] until computed. Computing one twice at once is harmless:
    /// both compute the same value.
    summary: [AtomicU64; SUMMARIES],
}

/// A summary not computed yet.
const UNSET: u64 = u64::MAX - 1;

/// A tail changed since it was last cloned (no other list shares its id).
const FRESH: u64 = 0;

/// Where tail ids come from.
static TAIL_IDS: AtomicU64 = AtomicU64::new(1);

fn unset() -> [AtomicU64; SUMMARIES] {
    std::array::from_fn(|_| AtomicU64::new(UNSET))
}

/// The elements of a chunk, to change: copied first if shared, and the
/// summaries forgotten.
fn items_mut<T: Clone>(chunk: &mut Arc<Chunk<T>>) -> &mut Vec<T> {
    if Arc::get_mut(chunk).is_none() {
        *chunk = Arc::new(Chunk {
            items: chunk.items.clone(),
            summary: unset(),
        });
    }
    let chunk = Arc::get_mut(chunk).expect("unique after the copy");
    for s in &mut chunk.summary {
        *s.get_mut() = UNSET;
    }
    &mut chunk.items
}

/// The elements of a [`Chunked`], in order.
pub struct Iter<'a, T> {
    chunks: std::slice::Iter<'a, Arc<Chunk<T>>>,
    /// The tail, until it is taken by `front` or `back`.
    tail: Option<&'a [T]>,
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
            if let Some(c) = self.chunks.next() {
                self.front = c.items.iter();
            } else if let Some(t) = self.tail.take() {
                self.front = t.iter();
            } else {
                return self.back.next();
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
            if let Some(t) = self.tail.take() {
                self.back = t.iter();
            } else if let Some(c) = self.chunks.next_back() {
                self.back = c.items.iter();
            } else {
                return self.front.next_back();
            }
        }
    }
}

impl<T> Chunked<T> {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            tail: Vec::new(),
            full: None,
        }
    }

    /// The full chunks.
    fn chunks(&self) -> &[Arc<Chunk<T>>] {
        self.full.as_ref().map_or(&[], |f| &f.chunks)
    }

    /// How many elements are in full chunks.
    fn in_chunks(&self) -> usize {
        self.chunks().len() * CHUNK
    }

    /// How many elements.
    pub fn len(&self) -> usize {
        self.in_chunks() + self.tail.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.full.is_none() && self.tail.is_empty()
    }

    /// The element at `i`.
    pub fn get(&self, i: usize) -> Option<&T> {
        let chunks = self.chunks();
        match chunks.get(i / CHUNK) {
            Some(c) => Some(&c.items[i % CHUNK]),
            None => self.tail.get(i - chunks.len() * CHUNK),
        }
    }

    /// The first element.
    pub fn first(&self) -> Option<&T> {
        self.get(0)
    }

    /// The last element.
    pub fn last(&self) -> Option<&T> {
        match self.tail.last() {
            Some(v) => Some(v),
            None => self.chunks().last()?.items.last(),
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            chunks: self.chunks().iter(),
            tail: Some(&self.tail),
            front: [].iter(),
            back: [].iter(),
        }
    }

    /// The elements from `start` on.
    pub fn iter_from(&self, start: usize) -> impl DoubleEndedIterator<Item = &T> + '_ {
        let all = self.chunks();
        let first = start / CHUNK;
        if first < all.len() {
            Iter {
                chunks: all[first + 1..].iter(),
                tail: Some(&self.tail[..]),
                front: all[first].items[start % CHUNK..].iter(),
                back: [].iter(),
            }
        } else {
            let skip = (start - all.len() * CHUNK).min(self.tail.len());
            Iter {
                chunks: [].iter(),
                tail: Some(&[][..]),
                front: self.tail[skip..].iter(),
                back: [].iter(),
            }
        }
    }

    /// The index ranges not shared with `earlier` (an earlier clone of
    /// this list): what changed or was added since, in whole chunks (the
    /// tail as one; a short list's tail is always reported). Elements of
    /// `earlier` beyond this list's length are not reported.
    pub fn changed_since<'a>(
        &'a self,
        earlier: &'a Self,
    ) -> impl Iterator<Item = Range<usize>> + 'a {
        let theirs = earlier.chunks();
        let full = self.chunks().iter().enumerate().filter_map(move |(k, c)| {
            let same = theirs.get(k).is_some_and(|e| Arc::ptr_eq(e, c));
            (!same).then(|| k * CHUNK..(k + 1) * CHUNK)
        });
        let from = self.in_chunks();
        let tail = (!self.tail.is_empty() && !self.same_tail(earlier))
            .then(|| from..from + self.tail.len());
        full.chain(tail)
    }

    /// True when both tails are copies of one that neither changed since.
    fn same_tail(&self, other: &Self) -> bool {
        match (&self.full, &other.full) {
            (Some(a), Some(b)) => {
                let id = a.tail_id.load(Ordering::Relaxed);
                id != FRESH && id == b.tail_id.load(Ordering::Relaxed)
            }
            _ => false,
        }
    }
}

impl<T> Chunked<T> {
    /// Summary number `slot` (below [`SUMMARIES`]) of each chunk, in order
    /// (the tail last, if any): `summary` of its elements, computed once
    /// and kept with the chunk until it changes (a short list's, whose
    /// elements are all in its tail, each time). A transition that changes
    /// one step recomputes one chunk's, not the whole list's. `summary`
    /// must be the same function at every call with a given slot on a list
    /// (what is kept is its value).
    pub fn summaries<'a>(
        &'a self,
        slot: usize,
        summary: impl Fn(&[T]) -> u64 + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        let kept_tail = self.full.as_ref().map(|f| &f.tail_summary);
        let tail = (!self.tail.is_empty()).then_some((&self.tail[..], kept_tail));
        self.chunks()
            .iter()
            .map(|c| (&c.items[..], Some(&c.summary)))
            .chain(tail)
            .map(move |(items, kept)| {
                let Some(kept) = kept else {
                    return summary(items);
                };
                let v = kept[slot].load(Ordering::Relaxed);
                if v != UNSET {
                    return v;
                }
                let v = summary(items);
                // The one value that cannot be kept is computed each time.
                if v != UNSET {
                    kept[slot].store(v, Ordering::Relaxed);
                }
                v
            })
    }

    /// The least of summary `slot` over the chunks (`u64::MAX` when empty).
    pub fn min_summary(&self, slot: usize, summary: impl Fn(&[T]) -> u64) -> u64 {
        self.summaries(slot, summary).min().unwrap_or(u64::MAX)
    }

    /// The tail is about to change: its summaries are forgotten and its id
    /// no longer shared with a clone.
    fn touch_tail(full: &mut Option<Box<Full<T>>>) {
        if let Some(f) = full {
            for s in &mut f.tail_summary {
                *s.get_mut() = UNSET;
            }
            *f.tail_id.get_mut() = FRESH;
        }
    }
}

impl<T: Clone> Chunked<T> {
    /// The element at `i`, to change (its chunk is copied first if shared).
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let in_chunks = self.in_chunks();
        if i < in_chunks {
            let full = self.full.as_mut()?;
            return items_mut(&mut full.chunks[i / CHUNK]).get_mut(i % CHUNK);
        }
        if i - in_chunks >= self.tail.len() {
            return None;
        }
        Self::touch_tail(&mut self.full);
        self.tail.get_mut(i - in_chunks)
    }

    /// Appends an element.
    pub fn push(&mut self, value: T) {
        Self::touch_tail(&mut self.full);
        self.tail.push(value);
        if self.tail.len() == CHUNK {
            let items = std::mem::take(&mut self.tail);
            let full = self.full.get_or_insert_with(|| {
                Box::new(Full {
                    chunks: Vec::new(),
                    tail_summary: unset(),
                    tail_id: AtomicU64::new(FRESH),
                })
            });
            full.chunks.push(Arc::new(Chunk {
                items,
                summary: unset(),
            }));
        }
    }

    /// Every element, to change (every shared chunk is copied).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        Self::touch_tail(&mut self.full);
        let chunks: &mut [Arc<Chunk<T>>] = match &mut self.full {
            Some(f) => &mut f.chunks,
            None => &mut [],
        };
        chunks
            .iter_mut()
            .flat_map(|c| items_mut(c).iter_mut())
            .chain(self.tail.iter_mut())
    }

    /// The elements as one `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().cloned().collect()
    }

    /// Gives back the room the tail has beyond its elements (for a list
    /// kept long and no longer appended to). A copy, not a `realloc`, which
    /// an allocator may answer in place without freeing anything.
    pub fn shrink_to_fit(&mut self) {
        if self.tail.capacity() > self.tail.len() {
            let mut tail = Vec::with_capacity(self.tail.len());
            tail.append(&mut self.tail);
            self.tail = tail;
        }
    }

    /// A clone whose tail has room for `room` more elements before it
    /// grows (a state's history, to which a transition appends).
    pub fn clone_with_room(&self, room: usize) -> Self {
        let mut tail = Vec::with_capacity((self.tail.len() + room).min(CHUNK));
        tail.extend_from_slice(&self.tail);
        let full = self.full.as_ref().map(|f| {
            let mut id = f.tail_id.load(Ordering::Relaxed);
            if id == FRESH && !self.tail.is_empty() {
                id = TAIL_IDS.fetch_add(1, Ordering::Relaxed);
                f.tail_id.store(id, Ordering::Relaxed);
            }
            Box::new(Full {
                chunks: f.chunks.clone(),
                tail_summary: std::array::from_fn(|k| {
                    AtomicU64::new(f.tail_summary[k].load(Ordering::Relaxed))
                }),
                tail_id: AtomicU64::new(id),
            })
        });
        Self { tail, full }
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> Clone for Chunked<T> {
    /// Shares every full chunk and copies the tail.
    fn clone(&self) -> Self {
        self.clone_with_room(0)
    }
}

impl<T: fmt::Debug> fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.chunks(), other.chunks());
        a.len() == b.len()
            && (self.same_tail(other) || self.tail == other.tail)
            && a.iter()
                .zip(b)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.items == b.items)
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        match self.get(i) {
            Some(v) => v,
            None => panic!("index {i} out of a list of {}", self.len()),
        }
    }
}

impl<T: Clone> IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        let len = self.len();
        match self.get_mut(i) {
            Some(v) => v,
            None => panic!("index {i} out of a list of {len}"),
        }
    }
}

impl<T: Clone> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = Self::new();
        for v in iter {
            out.push(v);
        }
        out
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
        if v.len() < CHUNK {
            return Self {
                tail: v,
                full: None,
            };
        }
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
        let mut seq = s.serialize_seq(Some(self.len()))?;
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
    fn shrinking_gives_back_the_room_of_the_tail_and_keeps_every_element() {
        let a: Chunked<u32> = (0..70).collect();
        let mut b = a.clone_with_room(4);
        b.push(70);
        assert!(b.tail.capacity() > b.tail.len(), "room left by the clone");
        b.shrink_to_fit();
        assert_eq!(b.tail.capacity(), b.tail.len());
        assert_eq!(
            b.iter().copied().collect::<Vec<_>>(),
            (0..71).collect::<Vec<_>>()
        );
        assert_eq!(
            b.changed_since(&a).count(),
            1,
            "the tail, changed by the push"
        );
        let mut short: Chunked<u32> = Chunked::new();
        short.push(1);
        short.shrink_to_fit();
        assert_eq!(short.iter().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_tail_is_copied_with_the_clone_and_reported_once_it_changes() {
        let mut a: Chunked<u32> = (0..70).collect();
        let b = a.clone();
        assert_eq!(a.changed_since(&b).count(), 0, "an unchanged clone");
        assert_eq!(a, b);
        a[65] = 1;
        assert_eq!(a.changed_since(&b).collect::<Vec<_>>(), vec![64..70]);
        assert_eq!(b[65], 65);
        assert_ne!(a, b);
        // A clone of a clone shares the tail with both until one changes.
        let c = b.clone();
        let d = c.clone();
        assert_eq!(d.changed_since(&b).count(), 0);
        // Filling the tail makes it a shared chunk.
        let mut e = b.clone();
        e.extend(70..128);
        assert_eq!(e.len(), 128);
        assert_eq!(e.changed_since(&b).collect::<Vec<_>>(), vec![64..128]);
        let f = e.clone();
        e.push(128);
        assert_eq!(e.changed_since(&f).collect::<Vec<_>>(), vec![128..129]);
        assert_eq!(
            e.iter().rev().take(3).copied().collect::<Vec<_>>(),
            vec![128, 127, 126]
        );
        assert_eq!(e.iter().count(), 129);
        assert_eq!(
            e.iter_from(127).copied().collect::<Vec<_>>(),
            vec![127, 128]
        );
        assert_eq!(e.iter_from(128).copied().collect::<Vec<_>>(), vec![128]);
        let mut g = f.clone();
        for v in g.iter_mut() {
            *v += 1;
        }
        assert_eq!(g.to_vec(), (1..129).collect::<Vec<_>>());
        assert_eq!(f.to_vec(), (0..128).collect::<Vec<_>>());
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
