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
