//! Template identity: a BLAKE3 fingerprint stored in the overlay header so an overlay is never
//! opened over a different template than the one it was made for.
//!
//! Hashing a whole multi-gigabyte template at every start would be too slow, so the
//! fingerprint covers the size plus samples: the first 64 KiB, the last 4 KiB, and 64 blocks
//! of 4 KiB spread evenly across the image. Any other image of the same size differs in a
//! sample with near certainty; templates are immutable by contract, and this is a guard
//! against wiring the wrong file, not a proof that no byte changed.

use crate::disk::{Disk, DiskError};

const HEAD: u64 = 64 << 10;
const SAMPLE: u64 = 4096;
const SAMPLES: u64 = 64;

/// Fingerprint `disk` (normally the template).
///
/// # Errors
/// [`DiskError`] from reading the samples.
pub fn fingerprint(disk: &dyn Disk) -> Result<[u8; 32], DiskError> {
    let size = disk.size();
    let mut h = blake3::Hasher::new();
    h.update(b"remoca template fingerprint v1");
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; HEAD as usize];
    let mut sample = |offset: u64, len: u64, h: &mut blake3::Hasher| -> Result<(), DiskError> {
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        let b = &mut buf[..len as usize];
        disk.read_at(b, offset)?;
        h.update(&offset.to_le_bytes());
        h.update(b);
        Ok(())
    };
    sample(0, HEAD, &mut h)?;
    for i in 0..SAMPLES {
        let at = (size / SAMPLES * i) / SAMPLE * SAMPLE;
        sample(at, SAMPLE, &mut h)?;
    }
    sample(size.saturating_sub(SAMPLE), SAMPLE, &mut h)?;
    Ok(*h.finalize().as_bytes())
}

/// Short hex form for messages and `image inspect`.
pub fn short_hex(fp: &[u8; 32]) -> String {
    fp[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemDisk;

    #[test]
    fn differs_when_content_or_size_differs() {
        let a = MemDisk::new(1 << 20);
        let b = MemDisk::new(1 << 20);
        assert_eq!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        b.write_at(b"x", 0, Default::default()).unwrap();
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&b).unwrap());
        let c = MemDisk::new(2 << 20);
        assert_ne!(fingerprint(&a).unwrap(), fingerprint(&c).unwrap());
        let tiny = MemDisk::new(100);
        assert_eq!(short_hex(&fingerprint(&tiny).unwrap()).len(), 16);
    }
}
