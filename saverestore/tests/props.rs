//! Properties: the parser never panics and never changes a byte it accepted; a damaged image
//! never restores to anything but the exact original stream (it fails instead).

use proptest::prelude::*;
use remoca_saverestore::image::ImageReader;
use remoca_saverestore::stream::{
    build_stream, write_event, BuildOptions, GuestShape, StreamParser,
};
use remoca_saverestore::{restore_stream, save_stream, Codec, CodecChoice, SaveOptions};

fn small_stream(shape: GuestShape) -> Vec<u8> {
    let ram: Vec<u8> = (0..40 * 4096u32)
        .map(|i| ((i / 4096) % 3 * (i % 17)) as u8)
        .collect();
    let mut s = Vec::new();
    build_stream(
        &ram[..],
        &mut s,
        &BuildOptions::new(shape, ram.len() as u64),
    )
    .unwrap();
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn parser_keeps_accepted_bytes(pv in any::<bool>(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), cut in any::<prop::sample::Index>()) {
        let mut s = small_stream(if pv { GuestShape::Pv } else { GuestShape::Hvm });
        for (i, b) in &flips {
            let at = i.index(s.len());
            s[at] ^= b;
        }
        let end = cut.index(s.len() + 1);
        let data = &s[..end];
        let mut p = StreamParser::new(data);
        let mut out = Vec::new();
        while let Ok(Some(ev)) = p.next_event() {
            write_event(&mut out, &ev).unwrap();
        }
        prop_assert_eq!(&out[..], &data[..out.len()]);
    }

    #[test]
    fn damaged_image_never_restores_wrong_bytes(at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let s = small_stream(GuestShape::Hvm);
        let mut img = Vec::new();
        let opts = SaveOptions { codec: CodecChoice::Fixed(Codec::Snap), block_pages: 4, window_pages: 8, threads: 1 };
        save_stream(&s[..], &mut img, &opts, &|_| {}).unwrap();
        let i = at.index(img.len());
        img[i] ^= x;
        if let Ok(r) = ImageReader::open(img) {
            let mut out = Vec::new();
            if restore_stream(&r, &mut out, 1, &|_| {}).is_ok() {
                prop_assert!(out == s, "damage at {} restored to different bytes", i);
            }
        }
    }
}
