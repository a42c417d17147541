//! Record transposition of page chunks before compression.
//!
//! Memory often holds arrays of fixed-size records (structs): the same
//! field of neighbouring records holds similar bytes (counters, time
//! stamps, small integers, flags) that a byte-oriented compressor sees
//! only one record apart. Grouping the bytes of a chunk by their position
//! in `stride`-byte records (byte 0 of every record, then byte 1, ...)
//! puts them side by side. The writer tries a few strides on a sample of
//! each chunk and keeps the transposition only when it compresses better;
//! the chunk record says which stride was used and readers put the bytes
//! back.

/// Strides the writer tries, in bytes.
pub const CANDIDATES: [usize; 4] = [16, 32, 64, 128];

/// Whether `stride` is one a reader accepts for a chunk of `len` bytes: a
/// multiple of 8 up to 512 (so a page holds a multiple of 8 records).
// Not is_multiple_of(): the workspace MSRV (1.85) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub fn valid(stride: usize, len: usize) -> bool {
    (8..=512).contains(&stride) && stride % 8 == 0 && len % (stride * 8) == 0
}

fn load(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn store(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Transpose an 8x8 matrix of bytes held as eight little-endian rows:
/// afterwards word c holds column c (its byte r is row r's byte c).
fn transpose8(a: &mut [u64; 8]) {
    // Swap the off-diagonal 4x4 blocks, then 2x2 inside each, then single
    // bytes inside each 2x2.
    for r in 0..4 {
        let t = ((a[r] >> 32) ^ a[r + 4]) & 0x0000_0000_FFFF_FFFF;
        a[r] ^= t << 32;
        a[r + 4] ^= t;
    }
    for r in [0, 1, 4, 5] {
        let t = ((a[r] >> 16) ^ a[r + 2]) & 0x0000_FFFF_0000_FFFF;
        a[r] ^= t << 16;
        a[r + 2] ^= t;
    }
    for r in [0, 2, 4, 6] {
        let t = ((a[r] >> 8) ^ a[r + 1]) & 0x00FF_00FF_00FF_00FF;
        a[r] ^= t << 8;
        a[r + 1] ^= t;
    }
}

/// Group the bytes of `src` by their position in `stride`-byte records
/// into `dst` (same length; `valid(stride, src.len())`).
pub fn group(src: &[u8], stride: usize, dst: &mut [u8]) {
    let n = src.len() / stride;
    let mut a = [0u64; 8];
    // 64 records at a time, column by column: each plane then gets a
    // whole cache line in a row (planes lie n bytes apart, which with
    // n a power of two makes them share cache sets).
    let mut i0 = 0;
    while i0 < n {
        let groups = ((n - i0) / 8).min(8);
        for k in 0..stride / 8 {
            for g in 0..groups {
                let i = i0 + 8 * g;
                for (r, w) in a.iter_mut().enumerate() {
                    *w = load(src, (i + r) * stride + 8 * k);
                }
                transpose8(&mut a);
                for (t, &w) in a.iter().enumerate() {
                    store(dst, (8 * k + t) * n + i, w);
                }
            }
        }
        i0 += 8 * groups;
    }
}

/// The inverse of [`group`].
pub fn ungroup(src: &[u8], stride: usize, dst: &mut [u8]) {
    let n = src.len() / stride;
    let mut a = [0u64; 8];
    let mut i0 = 0;
    while i0 < n {
        let groups = ((n - i0) / 8).min(8);
        for k in 0..stride / 8 {
            for g in 0..groups {
                let i = i0 + 8 * g;
                for (t, w) in a.iter_mut().enumerate() {
                    *w = load(src, (8 * k + t) * n + i);
                }
                transpose8(&mut a);
                for (r, &w) in a.iter().enumerate() {
                    store(dst, (i + r) * stride + 8 * k, w);
                }
            }
        }
        i0 += 8 * groups;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_is_the_plain_transposition_and_ungroup_inverts_it() {
        let len = 8192;
        let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 13) as u8).collect();
        for stride in [8, 16, 32, 64, 128, 512] {
            assert!(valid(stride, len));
            let n = len / stride;
            let mut g = vec![0u8; len];
            group(&src, stride, &mut g);
            for i in 0..n {
                for j in 0..stride {
                    assert_eq!(g[j * n + i], src[i * stride + j], "stride {stride}");
                }
            }
            let mut back = vec![0u8; len];
            ungroup(&g, stride, &mut back);
            assert_eq!(back, src, "stride {stride}");
        }
        assert!(!valid(24, len) && !valid(0, len) && !valid(1024, len));
    }

    #[test]
    #[ignore = "timing, run by hand: cargo test --release -p cryo-image stride_speed -- --ignored --nocapture"]
    fn stride_speed() {
        let len = 1 << 20;
        let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut dst = vec![0u8; len];
        for stride in [16, 64, 128] {
            let t = std::time::Instant::now();
            for _ in 0..64 {
                group(&src, stride, &mut dst);
            }
            let g = t.elapsed();
            let t = std::time::Instant::now();
            for _ in 0..64 {
                ungroup(&dst, stride, &mut dst.clone());
            }
            eprintln!(
                "stride {stride}: group {:?}/MiB, ungroup(+clone) {:?}/MiB",
                g / 64,
                t.elapsed() / 64
            );
        }
    }
}
