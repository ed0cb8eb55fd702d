//! The hashes the framework derives stable numbers with: FNV-1a over bytes
//! and the splitmix64 mixer. Not for security; for ids and seeds that every
//! replica must compute alike, now and after an upgrade (a child workflow's
//! id is one), so their values never change.
//!
//! ```
//! use multiagents_core::hash::{fnv1a, mix64, splitmix64};
//!
//! assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
//! assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
//! assert_eq!(splitmix64(0), mix64(0x9e37_79b9_7f4a_7c15));
//! ```

/// FNV-1a's offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a's prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// splitmix64's increment: 2⁶⁴ over the golden ratio.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a (64-bit) of `bytes`.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// splitmix64's finaliser: spreads nearby inputs over the whole range.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One splitmix64 output for state `x` (the next state is `x + GOLDEN`):
/// a seeded, reproducible stream of well-spread numbers.
pub fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(GOLDEN))
}

/// A fast hasher for the in-process maps keyed by ids (transaction ids,
/// delivery numbers, step names): a multiply-rotate over 8-byte words,
/// finished by [`mix64`], seeded once per process at random so that keys a
/// client chooses cannot be crafted to collide. Several times cheaper than
/// the standard SipHash on a 16-byte id; never for values that must agree
/// across processes (use [`fnv1a`] for those).
///
/// ```
/// use multiagents_core::hash::IdMap;
///
/// let mut seen: IdMap<u128, &str> = IdMap::default();
/// seen.insert(7, "seven");
/// assert_eq!(seen.get(&7), Some(&"seven"));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct IdHasher(u64);

/// The process's seed for [`IdHasher`].
fn id_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(GOLDEN);
        h.finish()
    })
}

impl Default for IdHasher {
    fn default() -> Self {
        Self(id_seed())
    }
}

impl IdHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for IdHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps "a" and "a\0" apart.
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

/// Builds [`IdHasher`]s.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdMap<K, V> = std::collections::HashMap<K, V, IdBuildHasher>;

/// A `HashSet` of ids, hashed with [`IdHasher`].
pub type IdSet<K> = std::collections::HashSet<K, IdBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash, Hasher};

    fn hash<T: Hash>(t: &T) -> u64 {
        IdBuildHasher::default().hash_one(t)
    }

    #[test]
    fn id_hashes_tell_nearby_keys_apart_and_spread_them() {
        // Stable within the process.
        assert_eq!(hash(&42u64), hash(&42u64));
        assert_ne!(hash(&"a"), hash(&"a\0"));
        assert_ne!(hash(&(1u32, 2u32)), hash(&(2u32, 1u32)));
        // Consecutive ids land in every one of 64 buckets, from the low bits
        // (hashbrown's index) and from the top 7 (its control byte).
        let low: std::collections::HashSet<u64> = (0u64..4096).map(|i| hash(&i) & 63).collect();
        let top: std::collections::HashSet<u64> = (0u64..4096).map(|i| hash(&i) >> 58).collect();
        assert_eq!(low.len(), 64);
        assert_eq!(top.len(), 64);
        let mut h = IdHasher::default();
        h.write(b"0123456789abcdef!");
        assert_ne!(h.finish(), IdHasher::default().finish());
    }
}
