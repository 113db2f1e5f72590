//! Synthetic page-reference traces for tests, benchmarks and `remoca mrc --synthetic`.

/// splitmix64: a small, fast, seedable generator (no dependency for a trace generator).
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(1) ranks over `0..keys` by inverse CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(keys: u64, exponent: f64) -> Self {
        let mut cdf = Vec::with_capacity(keys as usize);
        let mut acc = 0.0;
        for r in 1..=keys.max(1) {
            acc += 1.0 / (r as f64).powf(exponent);
            cdf.push(acc);
        }
        let total = acc;
        cdf.iter_mut().for_each(|c| *c /= total);
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut SplitMix) -> u64 {
        let u = rng.next_f64();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64
    }
}

/// `refs` references: a fraction `scan_fraction` walk sequentially (and forever around) a
/// region of `keys / 2` pages placed after the hot set, the rest are Zipf(1) over `keys`
/// pages — a hot working set disturbed by a streaming scan, the case where LRU needs a
/// curve rather than a guess.
pub fn zipf_scan_mix(
    refs: usize,
    keys: u64,
    scan_fraction: f64,
    seed: u64,
) -> impl Iterator<Item = u64> {
    let zipf = Zipf::new(keys, 1.0);
    let mut rng = SplitMix::new(seed);
    let scan_len = (keys / 2).max(1);
    let mut cursor = 0u64;
    (0..refs).map(move |_| {
        if rng.next_f64() < scan_fraction {
            cursor = (cursor + 1) % scan_len;
            keys + cursor
        } else {
            zipf.sample(&mut rng)
        }
    })
}
