//! The benchmark's memory contents, shared by the workload (wl_bench)
//! that fills its heap with them and the benchmark (bench) that writes the
//! same bytes for its baseline: random bytes, structured records, zeros.

pub const RAND_SEED: u64 = 0x243F_6A88_85A3_08D3;
pub const REC_SEED: u64 = 0x1319_8A2E_0370_7344;
pub const SEQ_START: u64 = 1_000_000;
pub const TS_START: u64 = 1_700_000_000_000_000;
pub const NAMES: [&[u8]; 12] = [
    b"checkout",
    b"billing",
    b"auth-gw",
    b"inventory",
    b"search",
    b"mailer",
    b"thumbnailer",
    b"ledger",
    b"sessions",
    b"geo-ip",
    b"recommender",
    b"audit-log",
];

/// xorshift64* (Vigna).
pub struct XorShift(pub u64);

impl XorShift {
    #[allow(clippy::should_implement_trait)] // an endless generator, not an Iterator
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Streams the content of an area of `len` bytes (a multiple of 256).
pub struct Gen {
    len: usize,
    pos: usize,
    rand: XorShift,
    rec: XorShift,
    seq: u64,
    ts: u64,
}

impl Gen {
    pub fn new(len: usize) -> Gen {
        Gen {
            len,
            pos: 0,
            rand: XorShift(RAND_SEED),
            rec: XorShift(REC_SEED),
            seq: SEQ_START,
            ts: TS_START,
        }
    }

    /// Writes the next `out.len()` bytes (a multiple of 64) of the content.
    pub fn fill(&mut self, out: &mut [u8]) {
        let q = self.len / 4;
        for block in out.chunks_exact_mut(64) {
            if self.pos < q {
                for w in block.chunks_exact_mut(8) {
                    w.copy_from_slice(&self.rand.next().to_le_bytes());
                }
            } else if self.pos < 3 * q {
                self.record(block);
            } else {
                block.fill(0);
            }
            self.pos += 64;
        }
    }

    /// One 64-byte record: seq, timestamp (us, slowly increasing), kind,
    /// status, length, service name, amount, user id, flags, zero padding.
    pub fn record(&mut self, b: &mut [u8]) {
        let r = self.rec.next();
        let r2 = self.rec.next();
        self.seq += 1;
        self.ts += r % 1500;
        let kind: u16 = match r >> 60 {
            0..=7 => 0,
            8..=11 => 1,
            12..=13 => 2,
            14 => 3,
            _ => 4,
        };
        let status: u16 = match (r >> 40) & 0xff {
            0..=2 => 500 + ((r >> 48) & 3) as u16,
            3..=9 => 404,
            10..=12 => 302,
            _ => 200,
        };
        let len: u32 = 64 << ((r >> 32) % 7);
        let name = NAMES[((r >> 20) & 0xfff) as usize % NAMES.len()];
        let amount = if kind == 2 { r2 % 100_000 } else { 0 };
        let user = ((r2 >> 32) % 5000) as u32;
        let flags = (u32::from(kind) << 8) | u32::from(status == 200);
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.ts.to_le_bytes());
        b[16..18].copy_from_slice(&kind.to_le_bytes());
        b[18..20].copy_from_slice(&status.to_le_bytes());
        b[20..24].copy_from_slice(&len.to_le_bytes());
        b[24..40].fill(0);
        b[24..24 + name.len()].copy_from_slice(name);
        b[40..48].copy_from_slice(&amount.to_le_bytes());
        b[48..52].copy_from_slice(&user.to_le_bytes());
        b[52..56].copy_from_slice(&flags.to_le_bytes());
        b[56..64].fill(0);
    }
}

/// A 4-lane multiplicative hash over 32-byte blocks.
pub struct Sum {
    lanes: [u64; 4],
    n: u64,
}

impl Sum {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;

    #[allow(clippy::new_without_default)] // the starting lanes are the definition
    pub fn new() -> Sum {
        Sum {
            lanes: [1, 2, 3, 4],
            n: 0,
        }
    }

    /// `data.len()` must be a multiple of 32.
    pub fn update(&mut self, data: &[u8]) {
        for c in data.chunks_exact(32) {
            for (i, lane) in self.lanes.iter_mut().enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[i * 8..i * 8 + 8]);
                *lane = (*lane ^ u64::from_le_bytes(w))
                    .wrapping_mul(Self::K)
                    .rotate_left(29);
            }
        }
        self.n += data.len() as u64;
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.n.wrapping_mul(Self::K);
        for l in self.lanes {
            h = (h ^ l).wrapping_mul(0xFF51_AFD7_ED55_8CCD).rotate_left(31);
        }
        h ^ (h >> 33)
    }
}
