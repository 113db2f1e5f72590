//! Rendezvous (highest-random-weight) placement of pages over servers.
//!
//! Every server gets a score per (namespace, key); the page's preference list is the servers
//! by descending score. Adding or losing a server moves only the pages whose top choices
//! change, and the next server in the list is the natural place for a replica or a fallback.

/// A 64-bit finaliser (splitmix64): cheap, well mixed, stable across builds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable seed for a server from its name (address).
pub fn server_seed(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn score(seed: u64, namespace: u64, key: u64) -> u64 {
    mix(seed ^ mix(namespace ^ mix(key)))
}

/// Server indices in preference order for (namespace, key).
pub fn rank(seeds: &[u64], namespace: u64, key: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..seeds.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(score(seeds[i], namespace, key)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly_and_moves_little_when_a_server_goes() {
        let seeds: Vec<u64> = (0..4)
            .map(|i| server_seed(&format!("10.0.0.{i}:7000")))
            .collect();
        let mut counts = [0usize; 4];
        for k in 0..40_000 {
            counts[rank(&seeds, 1, k)[0]] += 1;
        }
        for c in counts {
            assert!((8_000..12_000).contains(&c), "uneven: {counts:?}");
        }
        // Drop server 3: pages whose first choice was 0..2 keep it.
        let three = &seeds[..3];
        for k in 0..10_000 {
            let full = rank(&seeds, 1, k);
            if full[0] != 3 {
                assert_eq!(seeds[full[0]], three[rank(three, 1, k)[0]]);
            }
        }
    }
}
