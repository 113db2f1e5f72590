//! File header, frame header and trailer of the image (layout in [`super`]).

use crate::crc::Crc32c;

use super::{ImageError, MAGIC, MAX_FRAME_PAYLOAD, MIN_VERSION, TRAILER_MAGIC, VERSION};

/// The 32-byte file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version (written: [`VERSION`]; read: [`MIN_VERSION`]..=[`VERSION`]).
    pub version: u32,
    /// 0 auto, else the codec id used for every block.
    pub codec_choice: u8,
    pub level: i8,
    pub block_pages: u16,
}

impl FileHeader {
    pub const LEN: usize = 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[16] = self.codec_choice;
        b[17] = self.level as u8;
        b[18..20].copy_from_slice(&self.block_pages.to_le_bytes());
        b[20..24].copy_from_slice(&4096u32.to_le_bytes());
        b
    }

    /// # Errors
    /// Wrong magic, version, flags, page size or block size.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, ImageError> {
        if &b[0..8] != MAGIC {
            return Err(ImageError::BadMagic);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ImageError::UnsupportedVersion(version));
        }
        let flags = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        if flags != 0 {
            return Err(ImageError::UnknownFlags(flags));
        }
        let block_pages = u16::from_le_bytes(b[18..20].try_into().expect("2 bytes"));
        let page_size = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
        if page_size != 4096 || block_pages == 0 || block_pages > 256 {
            return Err(ImageError::Corrupt {
                offset: 0,
                what: format!("page size {page_size} / block of {block_pages} pages"),
            });
        }
        Ok(FileHeader {
            version,
            codec_choice: b[16],
            level: b[17] as i8,
            block_pages,
        })
    }
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Verbatim = 1,
    PageRecord = 2,
    Block = 3,
    Index = 4,
}

/// A 16-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub sub: u8,
    pub len: u32,
    pub aux: u32,
    pub crc: u32,
}

impl FrameHeader {
    pub const LEN: usize = 16;

    /// Appends a whole frame (header with checksum, then payload) to `out`.
    pub fn write_frame(out: &mut Vec<u8>, kind: FrameKind, sub: u8, aux: u32, payload: &[u8]) {
        Self::write_frame_parts(out, kind, sub, aux, &[payload]);
    }

    /// Like [`FrameHeader::write_frame`] with the payload given in pieces.
    pub fn write_frame_parts(
        out: &mut Vec<u8>,
        kind: FrameKind,
        sub: u8,
        aux: u32,
        parts: &[&[u8]],
    ) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = [0u8; Self::LEN];
        h[0] = kind as u8;
        h[1] = sub;
        h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        h[8..12].copy_from_slice(&aux.to_le_bytes());
        let mut crc = Crc32c::new();
        crc.update(&h[..12]);
        for p in parts {
            crc.update(p);
        }
        let crc = crc.value();
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        out.reserve(Self::LEN + len);
        out.extend_from_slice(&h);
        for p in parts {
            out.extend_from_slice(p);
        }
    }

    /// Fills in the header of a frame whose payload already sits at `buf[16..]` (so a codec
    /// can compress straight into the frame buffer).
    pub fn seal(buf: &mut [u8], kind: FrameKind, sub: u8, aux: u32) {
        let len = (buf.len() - Self::LEN) as u32;
        buf[..Self::LEN].fill(0);
        buf[0] = kind as u8;
        buf[1] = sub;
        buf[4..8].copy_from_slice(&len.to_le_bytes());
        buf[8..12].copy_from_slice(&aux.to_le_bytes());
        let crc = header_and_payload_crc(&buf[..12], &buf[Self::LEN..]);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses a header found at `offset` (for error messages).
    ///
    /// # Errors
    /// Unknown kind or a length over the limit.
    pub fn decode(b: &[u8; Self::LEN], offset: u64) -> Result<Self, ImageError> {
        let kind = match b[0] {
            1 => FrameKind::Verbatim,
            2 => FrameKind::PageRecord,
            3 => FrameKind::Block,
            4 => FrameKind::Index,
            k => {
                return Err(ImageError::Corrupt {
                    offset,
                    what: format!("unknown frame kind {k}"),
                })
            }
        };
        let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if len > MAX_FRAME_PAYLOAD {
            return Err(ImageError::Corrupt {
                offset,
                what: format!("frame length {len} over the limit"),
            });
        }
        Ok(FrameHeader {
            kind,
            sub: b[1],
            len,
            aux: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        })
    }

    /// Whether `payload` matches the checksum (which also covers this header).
    pub fn check(&self, raw_header: &[u8; Self::LEN], payload: &[u8]) -> bool {
        header_and_payload_crc(&raw_header[..12], payload) == self.crc
    }
}

/// The 32-byte trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_offset: u64,
    pub trailer_offset: u64,
}

impl Trailer {
    pub const LEN: usize = 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.index_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.trailer_offset.to_le_bytes());
        let crc = crate::crc::crc32c(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// # Errors
    /// `Truncated` when the trailer is missing (an unfinished or cut image), `Corrupt` when it
    /// is damaged or does not sit where it says.
    pub fn decode(b: &[u8; Self::LEN], at: u64) -> Result<Self, ImageError> {
        if &b[0..8] != TRAILER_MAGIC {
            return Err(ImageError::Truncated("no index trailer at the end".into()));
        }
        let crc = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
        if crate::crc::crc32c(&b[..24]) != crc {
            return Err(ImageError::Corrupt {
                offset: at,
                what: "trailer checksum mismatch".into(),
            });
        }
        let t = Trailer {
            index_offset: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            trailer_offset: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        };
        if t.trailer_offset != at || t.index_offset < FileHeader::LEN as u64 || t.index_offset >= at
        {
            return Err(ImageError::Truncated(format!(
                "trailer says the image ends at {} but it ends at {}",
                t.trailer_offset + Self::LEN as u64,
                at + Self::LEN as u64
            )));
        }
        Ok(t)
    }
}

/// A frame's checksum: CRC32C over its header's first 12 bytes and its payload.
fn header_and_payload_crc(head12: &[u8], payload: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(head12);
    crc.update(payload);
    crc.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = FileHeader {
            version: VERSION,
            codec_choice: 2,
            level: -3,
            block_pages: 16,
        };
        let b = h.encode();
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            FileHeader::decode(&bad),
            Err(ImageError::BadMagic)
        ));
        // Versions 1 and 2 (before the LZ4 codec, before the stream digest) are still
        // read; 0 and newer ones are not.
        for v in [1u8, 2] {
            let mut old = b;
            old[8] = v;
            assert_eq!(FileHeader::decode(&old).unwrap().version, u32::from(v));
        }
        for v in [0u8, 4] {
            let mut bad = b;
            bad[8] = v;
            assert!(matches!(
                FileHeader::decode(&bad),
                Err(ImageError::UnsupportedVersion(n)) if n == u32::from(v)
            ));
        }
    }

    #[test]
    fn frame_checksum_covers_header_and_payload() {
        let mut out = Vec::new();
        FrameHeader::write_frame(&mut out, FrameKind::Verbatim, 5, 9, b"hello");
        let raw: [u8; 16] = out[..16].try_into().unwrap();
        let h = FrameHeader::decode(&raw, 0).unwrap();
        assert_eq!(
            (h.kind, h.sub, h.len, h.aux),
            (FrameKind::Verbatim, 5, 5, 9)
        );
        assert!(h.check(&raw, &out[16..]));
        assert!(!h.check(&raw, b"hellp"));
        let mut raw2 = raw;
        raw2[8] = 10;
        assert!(!h.check(&raw2, &out[16..]));
    }

    #[test]
    fn trailer_round_trip_and_truncation() {
        let t = Trailer {
            index_offset: 100,
            trailer_offset: 200,
        };
        let b = t.encode();
        assert_eq!(Trailer::decode(&b, 200).unwrap(), t);
        assert!(matches!(
            Trailer::decode(&b, 300),
            Err(ImageError::Truncated(_))
        ));
        assert!(matches!(
            Trailer::decode(&[0; 32], 200),
            Err(ImageError::Truncated(_))
        ));
    }
}
