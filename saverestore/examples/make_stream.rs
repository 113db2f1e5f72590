//! Wraps a raw guest RAM image (optionally zstd-compressed, like the corpus) into an
//! `xl save`-format stream, for trying `remoca save` without a Xen host:
//!
//! ```text
//! cargo run --release -p remoca-saverestore --example make_stream -- ram-work.raw.zst pv out.xl
//! ```

use std::io::{BufWriter, Read};

use remoca_saverestore::stream::{build_stream, BuildOptions, GuestShape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        return Err("usage: make_stream RAM[.zst] pv|hvm OUT".into());
    }
    let shape = match args[2].as_str() {
        "pv" => GuestShape::Pv,
        "hvm" => GuestShape::Hvm,
        s => return Err(format!("shape {s:?}: pv or hvm").into()),
    };
    let f = std::fs::File::open(&args[1])?;
    let mut raw = Vec::new();
    if args[1].ends_with(".zst") {
        let mut d = zstd::stream::read::Decoder::new(f)?;
        d.window_log_max(31)?;
        d.read_to_end(&mut raw)?;
    } else {
        std::io::BufReader::new(f).read_to_end(&mut raw)?;
    }
    raw.truncate(raw.len() / 4096 * 4096);
    let mut out = BufWriter::new(std::fs::File::create(&args[3])?);
    let n = build_stream(
        &raw[..],
        &mut out,
        &BuildOptions::new(shape, raw.len() as u64),
    )?;
    eprintln!("wrote {n} bytes");
    Ok(())
}
