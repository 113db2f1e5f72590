//! Save → restore round trips and single-page extraction on synthetic guests of both shapes.

use std::io::Write;

use remoca_saverestore::image::{FrameKind, ImageReader};
use remoca_saverestore::stream::builder::builder_page_type;
use remoca_saverestore::stream::{
    build_stream, page_has_data, BuildOptions, Event, GuestShape, StreamParser, PAGE_SIZE,
};
use remoca_saverestore::{
    restore_stream, save_slice, save_stream, Codec, CodecChoice, ImageError, SaveOptions,
};

/// RAM with every class: zero pages, single-word pages, duplicates, text-like and random.
fn ram(pages: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut r = Vec::with_capacity(pages * PAGE_SIZE);
    for p in 0..pages {
        match p % 11 {
            0 | 5 => r.resize(r.len() + PAGE_SIZE, 0),
            1 => r.extend_from_slice(&(p as u64 * 0x0101).to_le_bytes().repeat(PAGE_SIZE / 8)),
            2 => r.extend_from_slice(&[0xAB; PAGE_SIZE]),
            3 | 7 => {
                let start = r.len() - 3 * PAGE_SIZE;
                r.extend_from_within(start..start + PAGE_SIZE)
            }
            4 => {
                for _ in 0..PAGE_SIZE / 8 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    r.extend_from_slice(&x.to_le_bytes());
                }
            }
            _ => {
                let line =
                    format!("page {p} of the guest: the quick brown fox jumps over the lazy dog\n");
                let bytes = line.as_bytes();
                for i in 0..PAGE_SIZE {
                    r.push(bytes[i % bytes.len()]);
                }
            }
        }
    }
    r
}

fn stream(shape: GuestShape, ram: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    build_stream(ram, &mut s, &BuildOptions::new(shape, ram.len() as u64)).unwrap();
    s
}

fn save(s: &[u8], codec: CodecChoice, block_pages: usize, window_pages: usize) -> Vec<u8> {
    let mut img = Vec::new();
    let opts = SaveOptions {
        codec,
        block_pages,
        window_pages,
        threads: 2,
    };
    save_stream(s, &mut img, &opts, &|_| {}).unwrap();
    img
}

/// Opens and restores an image held in memory or in a file.
fn restore<R: remoca_saverestore::ReadAt + Sync>(storage: R) -> Result<Vec<u8>, ImageError> {
    let r = ImageReader::open(storage)?;
    let mut out = Vec::new();
    restore_stream(&r, &mut out, 2, &|_| {})?;
    Ok(out)
}

#[test]
fn both_shapes_all_codecs_round_trip_byte_for_byte() {
    let ram = ram(3000);
    for shape in [GuestShape::Pv, GuestShape::Hvm] {
        let s = stream(shape, &ram);
        for (codec, bp, win) in [
            (CodecChoice::Fixed(Codec::Snap), 16, 4096),
            (CodecChoice::Fixed(Codec::Zstd(3)), 16, 700),
            (CodecChoice::Auto, 1, 100),
            (CodecChoice::Fixed(Codec::Zstd(1)), 256, 1),
            (CodecChoice::Fixed(Codec::Lz4(1)), 16, 4096),
            ("fast".parse().unwrap(), 7, 300),
        ] {
            let img = save(&s, codec, bp, win);
            assert!(
                img.len() < s.len() / 2,
                "{shape:?} {codec}: image {} of stream {}",
                img.len(),
                s.len()
            );
            assert!(
                restore(img).unwrap() == s,
                "{shape:?} {codec} bp {bp}: restore differs"
            );
        }
    }
}

/// Pages copied several times over, in their own window and in later ones: restore fills
/// each copy from its first (kept across windows until its last copy is written).
#[test]
fn duplicates_within_and_across_windows_restore() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut random_page = || -> Vec<u8> {
        (0..PAGE_SIZE / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    };
    let firsts: Vec<Vec<u8>> = (0..150).map(|_| random_page()).collect();
    let mut ram = Vec::new();
    for p in 0..3000usize {
        if p < firsts.len() {
            ram.extend_from_slice(&firsts[p]);
        } else if p % 3 == 0 {
            ram.extend_from_slice(&firsts[p * 7 % firsts.len()]);
        } else {
            ram.extend_from_slice(&random_page());
        }
    }
    let s = stream(GuestShape::Hvm, &ram);
    for (codec, bp, win) in [
        (CodecChoice::Fixed(Codec::Lz4(3)), 16, 1),
        (CodecChoice::Fixed(Codec::Zstd(-1)), 5, 1),
        (CodecChoice::Fixed(Codec::Snap), 16, 4096),
    ] {
        let img = save(&s, codec, bp, win);
        let r = ImageReader::open(img.clone()).unwrap();
        assert!(r.index().counts().dup >= 900, "{:?}", r.index().counts());
        assert!(
            restore(img).unwrap() == s,
            "{codec} window {win}: restore differs"
        );
        for pfn in [0u64, 3, 1500, 2997] {
            let want = &ram[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
            assert!(r.extract(pfn).unwrap() == want, "{codec}: pfn {pfn}");
        }
    }
}

/// Without `--block-pages`, blocks of every codec hold 16 pages (64 KiB); the header's
/// block size is the largest a block of the image may have.
#[test]
fn blocks_hold_16_pages_by_default() {
    let ram = ram(1200);
    let s = stream(GuestShape::Pv, &ram);
    let want = 16u16;
    for codec in [
        CodecChoice::Fixed(Codec::Zstd(-1)),
        CodecChoice::Fixed(Codec::Zstd(1)),
        CodecChoice::Fixed(Codec::Lz4(3)),
        CodecChoice::Fixed(Codec::Snap),
        CodecChoice::Auto,
    ] {
        let img = save(&s, codec, 0, 4096);
        let r = ImageReader::open(img.clone()).unwrap();
        assert_eq!(r.header().block_pages, want, "{codec}");
        let blocks = &r.index().blocks;
        assert!(blocks.iter().all(|b| b.pages <= want), "{codec}");
        assert!(
            blocks.iter().filter(|b| b.pages == want).count() > 1,
            "{codec}"
        );
        assert!(r.extract(0x203).unwrap() == ram[0x203 * PAGE_SIZE..0x204 * PAGE_SIZE]);
        assert!(restore(img).unwrap() == s, "{codec}: restore differs");
    }
}

/// Images of format versions 1 and 2 are still read and checked with the CRC32C their index
/// holds. The fixture was written by remoca before the stream digest (format 2, snappy, from
/// `stream(Hvm, &ram(60))`); version 1 differs from it in the version number only (it has
/// no LZ4 blocks).
#[test]
fn version_1_and_2_images_are_still_read() {
    const V2: &[u8] = include_bytes!("data/v2-hvm-ram60-snap.img");
    let ram = ram(60);
    let s = stream(GuestShape::Hvm, &ram);
    for version in [2u32, 1] {
        let mut img = V2.to_vec();
        img[8..12].copy_from_slice(&version.to_le_bytes());
        let r = ImageReader::open(img.clone()).unwrap();
        assert_eq!(r.header().version, version);
        assert_eq!(r.index().stream_check, u64::from(crc32c::crc32c(&s)));
        assert!(r.extract(0x23).unwrap() == ram[0x23 * PAGE_SIZE..0x24 * PAGE_SIZE]);
        assert!(restore(img.clone()).unwrap() == s, "version {version}");
        // The CRC32C is checked: a verbatim byte changed (its frame checksum mended) fails.
        let e = restore(with_verbatim_byte_changed(&img)).unwrap_err();
        assert!(e.to_string().contains("crc32c"), "{e}");
    }
}

/// `img` with one byte of its first verbatim frame's payload changed and that frame's
/// checksum mended, so that only the whole-stream check can notice.
fn with_verbatim_byte_changed(img: &[u8]) -> Vec<u8> {
    let r = ImageReader::open(img.to_vec()).unwrap();
    let mut at = None;
    r.walk_frames(|fh, off, payload| {
        if at.is_none() && fh.kind == FrameKind::Verbatim && payload.len() > 8 {
            at = Some(off as usize);
        }
        Ok(())
    })
    .unwrap();
    let at = at.expect("a verbatim frame");
    let mut bad = img.to_vec();
    let len = u32::from_le_bytes(bad[at + 4..at + 8].try_into().unwrap()) as usize;
    bad[at + 16 + len / 2] ^= 0x20;
    let mut covered = bad[at..at + 12].to_vec();
    covered.extend_from_slice(&bad[at + 16..at + 16 + len]);
    let crc = crc32c::crc32c(&covered);
    bad[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
    bad
}

/// A regenerated stream that differs from the saved one is an error naming both digests,
/// never a silent success.
#[test]
fn the_whole_stream_is_checked_on_restore() {
    let s = stream(GuestShape::Pv, &ram(700));
    let img = save(&s, "fast".parse().unwrap(), 0, 256);
    let e = restore(with_verbatim_byte_changed(&img)).unwrap_err();
    assert!(matches!(e, ImageError::StreamMismatch { .. }), "{e}");
    assert!(e.to_string().contains("digest"), "{e}");
}

#[test]
fn extracts_every_page_and_names_pages_without_data() {
    let ram = ram(2500);
    for shape in [GuestShape::Pv, GuestShape::Hvm] {
        let img = save(&stream(shape, &ram), CodecChoice::Auto, 16, 512);
        let r = ImageReader::open(img).unwrap();
        for pfn in 0..2500u64 {
            let want = &ram[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
            match r.extract(pfn) {
                Ok(page) => assert!(page == want, "{shape:?} pfn {pfn:#x} differs"),
                Err(ImageError::PfnHasNoData { .. }) => {
                    assert!(
                        !page_has_data(builder_page_type(shape, pfn)),
                        "pfn {pfn:#x}"
                    )
                }
                Err(e) => panic!("pfn {pfn:#x}: {e}"),
            }
        }
        assert!(matches!(
            r.extract(2500),
            Err(ImageError::PfnNotFound(2500))
        ));
        let c = r.index().counts();
        assert!(
            c.zero > 0 && c.word > 0 && c.dup > 0 && c.block > 0 && c.nodata > 0,
            "{c:?}"
        );
    }
}

/// The error of opening and restoring `img` with one byte flipped. Checked to be the same
/// whether the reader borrows frames from memory or reads them from a file.
fn corrupt_check(img: &[u8], at: usize) -> ImageError {
    let mut bad = img.to_vec();
    bad[at] ^= 0x55;
    let in_memory = restore(bad.clone()).unwrap_err();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&bad).unwrap();
    let from_file = restore(file).unwrap_err();
    assert_eq!(
        in_memory.to_string(),
        from_file.to_string(),
        "flipped byte {at}"
    );
    in_memory
}

#[test]
fn restoring_from_a_file_or_from_memory_gives_the_stream() {
    let s = stream(GuestShape::Hvm, &ram(900));
    let img = save(&s, CodecChoice::Fixed(Codec::Lz4(3)), 0, 256);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&img).unwrap();
    assert!(restore(file).unwrap() == s, "from a file");
    assert!(restore(img).unwrap() == s, "from memory");
}

#[test]
fn damaged_images_give_clear_errors() {
    let s = stream(GuestShape::Hvm, &ram(600));
    for codec in [Codec::Snap, Codec::Lz4(3)] {
        damaged_image_errors(&s, codec);
    }
}

fn damaged_image_errors(s: &[u8], codec: Codec) {
    let img = save(s, CodecChoice::Fixed(codec), 16, 4096);
    let r = ImageReader::open(img.clone()).unwrap();
    let b = r.index().blocks[3];
    // A flipped byte inside a block.
    let e = corrupt_check(&img, b.offset as usize + 40);
    assert!(
        matches!(e, ImageError::BlockChecksum { block: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("corrupted block 3"));
    // Single-page extraction from that block says the same.
    let mut bad = img.clone();
    bad[b.offset as usize + 40] ^= 1;
    let r2 = ImageReader::open(bad).unwrap();
    let pfn = r2
        .index()
        .pages
        .iter()
        .find(|p| {
            matches!(
                p.class,
                remoca_saverestore::image::PageClass::Block { block: 3, .. }
            )
        })
        .map(|p| p.word & 0x000f_ffff_ffff_ffff)
        .unwrap();
    assert!(matches!(
        r2.extract(pfn),
        Err(ImageError::BlockChecksum { block: 3, .. })
    ));
    // Truncated anywhere.
    for cut in [10, 100, img.len() / 2, img.len() - 1] {
        let e = ImageReader::open(img[..cut].to_vec()).unwrap_err();
        assert!(matches!(e, ImageError::Truncated(_)), "cut {cut}: {e}");
    }
    // Wrong magic and version.
    assert!(matches!(corrupt_check(&img, 0), ImageError::BadMagic));
    let mut v4 = img.clone();
    v4[8] = 4;
    assert!(matches!(
        ImageReader::open(v4),
        Err(ImageError::UnsupportedVersion(4))
    ));
    // A verbatim frame damaged: named with its offset.
    let last = r.index().blocks.last().unwrap();
    let e = corrupt_check(&img, (last.offset + last.frame_len as u64) as usize + 20);
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
    // The index damaged.
    let e = corrupt_check(&img, r.frames_end() as usize + 20);
    assert!(
        matches!(e, ImageError::Corrupt { .. } | ImageError::BadIndex(_)),
        "{e}"
    );
}

#[test]
fn bad_streams_are_refused_on_save() {
    let s = stream(GuestShape::Hvm, &ram(100));
    let mut img = Vec::new();
    let e = save_stream(
        &s[..s.len() - 5],
        &mut img,
        &SaveOptions::default(),
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("input stream"), "{e}");
    assert!(matches!(
        ImageReader::open(img),
        Err(ImageError::Truncated(_))
    ));
}

/// The stream digest of format 3 computed here on its own: xxh3-64 of the stream with every
/// data page replaced by its xxh3-128 (each PAGE_DATA record ends with its pages; where a
/// record ends comes from the parser).
fn reference_digest(s: &[u8]) -> u64 {
    let mut p = StreamParser::new(s);
    let (mut digest_input, mut done) = (Vec::new(), 0usize);
    while let Some(ev) = p.next_event().unwrap() {
        let end = p.offset() as usize;
        if let Event::Pages(rec) = ev {
            let data = end - rec.pages.len();
            digest_input.extend_from_slice(&s[done..data]);
            for page in s[data..end].chunks(PAGE_SIZE) {
                digest_input.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(page).to_le_bytes());
            }
            done = end;
        }
    }
    digest_input.extend_from_slice(&s[done..]);
    xxhash_rust::xxh3::xxh3_64(&digest_input)
}

/// Saving a stream held in memory (pages borrowed, not copied) writes the same image as
/// saving it through a reader, and the index's stream check is the digest of the whole
/// stream (built in stream order from fingerprints taken in parallel).
#[test]
fn saving_from_memory_writes_the_same_image() {
    let ram = ram(3000);
    for shape in [GuestShape::Pv, GuestShape::Hvm] {
        let mut s = stream(shape, &ram);
        s.extend_from_slice(b"trailing bytes");
        for (codec, bp, win) in [
            (CodecChoice::Fixed(Codec::Zstd(1)), 0, 4096),
            ("fast".parse().unwrap(), 0, 300),
            (CodecChoice::Fixed(Codec::Snap), 5, 1),
        ] {
            let from_reader = save(&s, codec, bp, win);
            let opts = SaveOptions {
                codec,
                block_pages: bp,
                window_pages: win,
                threads: 2,
            };
            let mut from_memory = Vec::new();
            let st = save_slice(&s, &mut from_memory, &opts, &|_| {}).unwrap();
            assert_eq!(st.stream_bytes, s.len() as u64);
            assert!(
                from_memory == from_reader,
                "{shape:?} {codec}: the images differ"
            );
            let r = ImageReader::open(from_memory).unwrap();
            assert_eq!(r.header().version, 3);
            assert_eq!(
                r.index().stream_check,
                reference_digest(&s),
                "{shape:?} {codec}"
            );
            assert_eq!(r.index().stream_len, s.len() as u64);
        }
        for cut in [100, s.len() / 2, s.len() - 20] {
            let mut img = Vec::new();
            let opts = SaveOptions::default();
            let a = save_stream(&s[..cut], &mut img, &opts, &|_| {}).unwrap_err();
            let b = save_slice(&s[..cut], &mut img, &opts, &|_| {}).unwrap_err();
            let (ImageError::Stream(a), ImageError::Stream(b)) = (a, b) else {
                panic!("cut {cut}: not a stream error");
            };
            assert_eq!(a.to_string(), b.to_string());
            assert!(a.to_string().contains("truncated"), "{a}");
        }
    }
}
