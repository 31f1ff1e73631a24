//! The deterministic patterns written to memory and disk (documented in
//! README.md; the host recomputes the disk pattern to check image files).

/// SplitMix64's finalizer applied to `x + 0x9E3779B97F4A7C15`.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word at offset 0 of working-set page `page` written in generation `gen`;
/// the word at offset 4088 is its bitwise complement.
pub fn mem_word(page: u64, gen: u64) -> u64 {
    mix64(gen << 40 ^ page)
}

/// The little-endian u64 at byte `8*word` of disk sector `sector` (512 bytes,
/// 64 words) for pattern `seed`.
pub fn blk_word(seed: u64, sector: u64, word: u64) -> u64 {
    mix64(seed.wrapping_mul(0x0000_0100_0000_01b3) ^ (sector << 6 | word))
}
