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

/// What a page of the mixed fill (`dirty_fill=mix`) holds, chosen by a hash
/// of its index in the workload's region: half are zero pages, a quarter
/// text-like, a quarter random.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    Zero,
    Text,
    Random,
}

/// The class of region page `page` under `dirty_fill=mix`.
pub fn page_class(page: u64) -> PageClass {
    match mix64(page ^ 0x636c_6173_7300_0000) & 3 {
        0 | 1 => PageClass::Zero,
        2 => PageClass::Text,
        _ => PageClass::Random,
    }
}

/// Little-endian u64 number `word` (0..512) of a random-class page written in
/// generation `gen`, from the page's seed `mem_word(page, gen)`.
pub fn random_word(seed: u64, word: u64) -> u64 {
    mix64(seed ^ word)
}

/// Bytes in one line of a text-like page; a page is 64 such lines.
pub const TEXT_LINE: usize = 64;

/// The words text-like pages are made of (a 32-word vocabulary of logs and
/// source code: zstd packs such pages about 3.5x one by one, 4.5x in bulk),
/// each as its bytes padded with spaces to 8, little-endian, and its length.
const WORDS: [(u64, usize); 32] = {
    const LIST: [&[u8]; 32] = [
        b"the",
        b"and",
        b"for",
        b"with",
        b"from",
        b"error",
        b"info",
        b"debug",
        b"request",
        b"response",
        b"server",
        b"client",
        b"node",
        b"memory",
        b"page",
        b"write",
        b"read",
        b"value",
        b"return",
        b"self",
        b"struct",
        b"match",
        b"some",
        b"none",
        b"true",
        b"false",
        b"size",
        b"index",
        b"buffer",
        b"timeout",
        b"status",
        b"ready",
    ];
    let mut out = [(0, 0); 32];
    let mut i = 0;
    while i < 32 {
        let mut b = [b' '; 8];
        let mut j = 0;
        while j < LIST[i].len() {
            b[j] = LIST[i][j];
            j += 1;
        }
        out[i] = (u64::from_le_bytes(b), LIST[i].len());
        i += 1;
    }
    out
};

/// Line `line` (0..64) of a text-like page written in generation `gen`, from
/// the page's seed `mem_word(page, gen)`: words `WORDS[x & 31]`, taking `x`
/// 5 bits at a time (low bits first, 12 words per value) from the values
/// `s = mix64(seed ^ (line << 32))`, `mix64(s)`, `mix64(mix64(s))`, ...;
/// separated by one space, as many as fit in 63 bytes, padded with spaces,
/// and a `\n` in the last byte. Lines are independent so that the verifier
/// can regenerate the first and the last without the rest.
pub fn text_line(seed: u64, line: u64) -> [u8; TEXT_LINE] {
    // 8 bytes of slack: each word is stored as a whole u64 with its padding.
    let mut buf = [b' '; TEXT_LINE + 8];
    let mut s = mix64(seed ^ (line << 32));
    let mut bits = s;
    let mut left = 12;
    let mut start = 0;
    loop {
        if left == 0 {
            s = mix64(s);
            bits = s;
            left = 12;
        }
        let (word, len) = WORDS[(bits & 31) as usize];
        bits >>= 5;
        left -= 1;
        if start + len > TEXT_LINE - 1 {
            break;
        }
        buf[start..start + 8].copy_from_slice(&word.to_le_bytes());
        start += len + 1;
    }
    let mut out = [b' '; TEXT_LINE];
    out[..TEXT_LINE - 1].copy_from_slice(&buf[..TEXT_LINE - 1]);
    out[TEXT_LINE - 1] = b'\n';
    out
}

/// Little-endian u64 number `word` (0..8) of a text line.
pub fn line_word(line: &[u8; TEXT_LINE], word: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&line[word * 8..word * 8 + 8]);
    u64::from_le_bytes(b)
}
