//! The page index at the end of an image (layout in [`super`]): one entry per PAGE_DATA
//! word and one per compressed block, so a single page is found without reading the rest.

use super::{ImageError, MAX_INDEX_RAW};
use crate::stream::format::page_pfn;

/// How one PAGE_DATA entry is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// BROKEN / XALLOC / XTAB: no data in the stream.
    NoData,
    Zero,
    /// Every u64 of the page is this value.
    Word(u64),
    /// Same bytes as the entry with this index (a `Block` entry).
    Dup(u64),
    /// Slot `slot` of compressed block `block`.
    Block {
        block: u64,
        slot: u16,
    },
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// The PAGE_DATA word (type in bits 63..60, pfn in bits 51..0).
    pub word: u64,
    pub class: PageClass,
}

/// One compressed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    /// Offset of its frame header.
    pub offset: u64,
    /// Frame length (header + payload).
    pub frame_len: u32,
    pub pages: u16,
    pub codec: u8,
}

/// The decoded index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub records: u64,
    pub stream_len: u64,
    /// The check of the whole regenerated stream: in format 3 its digest
    /// ([`crate::digest`]), in formats 1 and 2 its CRC32C (the upper 32 bits zero).
    pub stream_check: u64,
    pub blocks: Vec<BlockEntry>,
    pub pages: Vec<PageEntry>,
}

const HEAD: usize = 80;
const BLOCK: usize = 16;
const PAGE: usize = 24;

/// Counts of entries per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pub nodata: u64,
    pub zero: u64,
    pub word: u64,
    pub dup: u64,
    pub block: u64,
}

impl Index {
    /// Entries per class.
    pub fn counts(&self) -> ClassCounts {
        let mut c = ClassCounts::default();
        for p in &self.pages {
            match p.class {
                PageClass::NoData => c.nodata += 1,
                PageClass::Zero => c.zero += 1,
                PageClass::Word(_) => c.word += 1,
                PageClass::Dup(_) => c.dup += 1,
                PageClass::Block { .. } => c.block += 1,
            }
        }
        c
    }

    /// Serialises the index (before compression).
    pub fn encode(&self) -> Vec<u8> {
        let c = self.counts();
        let mut b = Vec::with_capacity(HEAD + BLOCK * self.blocks.len() + PAGE * self.pages.len());
        for v in [
            self.pages.len() as u64,
            self.blocks.len() as u64,
            self.records,
            self.stream_len,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.stream_check.to_le_bytes());
        for v in [c.zero, c.word, c.dup, c.nodata, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for e in &self.blocks {
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.frame_len.to_le_bytes());
            b.extend_from_slice(&e.pages.to_le_bytes());
            b.push(e.codec);
            b.push(0);
        }
        for p in &self.pages {
            let (class, arg) = match p.class {
                PageClass::NoData => (0u32, 0u64),
                PageClass::Zero => (1, 0),
                PageClass::Word(w) => (2, w),
                PageClass::Dup(i) => (3, i),
                PageClass::Block { block, slot } => (4, block << 16 | slot as u64),
            };
            b.extend_from_slice(&p.word.to_le_bytes());
            b.extend_from_slice(&class.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&arg.to_le_bytes());
        }
        b
    }

    /// Parses and validates an index: sizes agree with the counts, every block reference
    /// names an existing block and slot, every duplicate names an earlier block entry.
    ///
    /// # Errors
    /// [`ImageError::BadIndex`] naming the inconsistency.
    pub fn decode(b: &[u8], block_pages: u16) -> Result<Self, ImageError> {
        let bad = |s: String| ImageError::BadIndex(s);
        if b.len() < HEAD || b.len() > MAX_INDEX_RAW as usize {
            return Err(bad(format!("length {}", b.len())));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let (npages, nblocks) = (u64_at(0), u64_at(8));
        let want = (HEAD as u128) + BLOCK as u128 * nblocks as u128 + PAGE as u128 * npages as u128;
        if want != b.len() as u128 {
            return Err(bad(format!(
                "{npages} pages and {nblocks} blocks need {want} bytes, have {}",
                b.len()
            )));
        }
        let mut idx = Index {
            records: u64_at(16),
            stream_len: u64_at(24),
            stream_check: u64_at(32),
            blocks: Vec::with_capacity(nblocks as usize),
            pages: Vec::with_capacity(npages as usize),
        };
        let mut off = HEAD;
        for _ in 0..nblocks {
            let e = &b[off..off + BLOCK];
            let pages = u16::from_le_bytes([e[12], e[13]]);
            if pages == 0 || pages > block_pages {
                return Err(bad(format!("block of {pages} pages")));
            }
            idx.blocks.push(BlockEntry {
                offset: u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")),
                frame_len: u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")),
                pages,
                codec: e[14],
            });
            off += BLOCK;
        }
        for i in 0..npages {
            let e = &b[off..off + PAGE];
            let word = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
            let class = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
            let arg = u64::from_le_bytes(e[16..24].try_into().expect("8 bytes"));
            let class = match class {
                0 => PageClass::NoData,
                1 => PageClass::Zero,
                2 => PageClass::Word(arg),
                3 => {
                    let ok =
                        arg < i && matches!(idx.pages[arg as usize].class, PageClass::Block { .. });
                    if !ok {
                        return Err(bad(format!(
                            "entry {i} duplicates entry {arg}, which holds no block page"
                        )));
                    }
                    PageClass::Dup(arg)
                }
                4 => {
                    let (block, slot) = (arg >> 16, (arg & 0xffff) as u16);
                    let ok = idx
                        .blocks
                        .get(block as usize)
                        .is_some_and(|b| slot < b.pages);
                    if !ok {
                        return Err(bad(format!(
                            "entry {i} points at block {block} slot {slot}"
                        )));
                    }
                    PageClass::Block { block, slot }
                }
                c => {
                    return Err(bad(format!(
                        "entry {i} (pfn {:#x}) has unknown class {c}",
                        page_pfn(word)
                    )))
                }
            };
            idx.pages.push(PageEntry { word, class });
            off += PAGE;
        }
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        Index {
            records: 3,
            stream_len: 12345,
            stream_check: 77,
            blocks: vec![BlockEntry {
                offset: 32,
                frame_len: 100,
                pages: 2,
                codec: 1,
            }],
            pages: vec![
                PageEntry {
                    word: 1,
                    class: PageClass::Block { block: 0, slot: 0 },
                },
                PageEntry {
                    word: 2,
                    class: PageClass::Zero,
                },
                PageEntry {
                    word: 3,
                    class: PageClass::Word(0xdead),
                },
                PageEntry {
                    word: 4,
                    class: PageClass::Dup(0),
                },
                PageEntry {
                    word: 0xF << 60 | 5,
                    class: PageClass::NoData,
                },
                PageEntry {
                    word: 6,
                    class: PageClass::Block { block: 0, slot: 1 },
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let i = sample();
        assert_eq!(Index::decode(&i.encode(), 16).unwrap(), i);
        assert_eq!(
            i.counts(),
            ClassCounts {
                nodata: 1,
                zero: 1,
                word: 1,
                dup: 1,
                block: 2
            }
        );
    }

    #[test]
    fn rejects_inconsistent_indexes() {
        let mut i = sample();
        i.pages[5].class = PageClass::Block { block: 0, slot: 2 };
        assert!(Index::decode(&i.encode(), 16).is_err());
        let mut i = sample();
        i.pages[3].class = PageClass::Dup(1);
        assert!(Index::decode(&i.encode(), 16).is_err());
        let b = sample().encode();
        assert!(Index::decode(&b[..b.len() - 1], 16).is_err());
    }
}
