//! Writes small valid images (PV and HVM streams; snappy, zstd, LZ4 and auto; 4-page blocks,
//! 8-page windows; every page class) as seeds for the `image_reader` fuzz target, and the
//! two streams for `stream_parser`. Without them the fuzzers rarely get past the magic.
//!
//! ```text
//! cargo run --release -p remoca-saverestore --example fuzz_seeds -- \
//!     saverestore/fuzz/corpus/image_reader saverestore/fuzz/corpus/stream_parser
//! ```

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape, PAGE_SIZE};
use remoca_saverestore::{save_stream, CodecChoice, SaveOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: fuzz_seeds IMAGE_DIR STREAM_DIR";
    let dir = std::env::args().nth(1).ok_or(usage)?;
    let stream_dir = std::env::args().nth(2).ok_or(usage)?;
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&stream_dir)?;
    // 48 pages: zero, one-word, duplicates of earlier windows, and compressible noise.
    let mut ram = Vec::new();
    let mut x = 7u64;
    for p in 0..48usize {
        match p % 6 {
            0 => ram.resize(ram.len() + PAGE_SIZE, 0),
            1 => ram.extend_from_slice(&(p as u64).to_le_bytes().repeat(PAGE_SIZE / 8)),
            2 if p > 8 => {
                let s = (p - 7) * PAGE_SIZE;
                ram.extend_from_within(s..s + PAGE_SIZE)
            }
            _ => {
                for _ in 0..PAGE_SIZE / 8 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ram.extend_from_slice(&(x % 7).to_le_bytes());
                }
            }
        }
    }
    for shape in [GuestShape::Pv, GuestShape::Hvm] {
        let mut stream = Vec::new();
        build_stream(
            &ram[..],
            &mut stream,
            &BuildOptions::new(shape, ram.len() as u64),
        )?;
        std::fs::write(format!("{stream_dir}/seed-{shape:?}"), &stream)?;
        for codec in ["snap", "zstd", "lz4", "auto"] {
            let mut img = Vec::new();
            let opts = SaveOptions {
                codec: codec.parse::<CodecChoice>()?,
                block_pages: 4,
                window_pages: 8,
                threads: 1,
            };
            save_stream(&stream[..], &mut img, &opts, &|_| {})?;
            std::fs::write(format!("{dir}/seed-{shape:?}-{codec}"), &img)?;
        }
    }
    Ok(())
}
