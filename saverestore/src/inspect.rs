//! A readable description of an image: config, records, page classes, ratio and codecs.

use std::fmt::Write as _;

use crate::codec::{codec_name, CODEC_ID_LZ4, CODEC_ID_SNAP, CODEC_ID_ZSTD};
use crate::image::frame::FrameKind;
use crate::image::{ImageError, ImageReader, ReadAt, StreamCheck};
use crate::stream::format::{libxc_record_name, libxl_record_name, Part};

/// Describes an image for `remoca inspect`.
///
/// # Errors
/// A damaged image.
pub fn describe<R: ReadAt>(img: &ImageReader<R>) -> Result<String, ImageError> {
    let idx = img.index();
    let h = img.header();
    let c = idx.counts();
    let mut s = String::new();
    let image_len = img.image_len();
    let _ = writeln!(
        s,
        "image:        {} bytes, format version {}",
        image_len, h.version
    );
    let _ = writeln!(
        s,
        "stream:       {} bytes ({})",
        idx.stream_len,
        StreamCheck::of_version(h.version).show(idx.stream_check)
    );
    let _ = writeln!(
        s,
        "ratio:        {:.2}",
        idx.stream_len as f64 / image_len.max(1) as f64
    );
    let choice = match h.codec_choice {
        0 => "auto".to_string(),
        CODEC_ID_ZSTD => format!("zstd:{}", h.level),
        CODEC_ID_LZ4 => format!("lz4:{}", h.level),
        id => codec_name(id).to_string(),
    };
    let snap = idx
        .blocks
        .iter()
        .filter(|b| b.codec == CODEC_ID_SNAP)
        .count();
    let zstd = idx
        .blocks
        .iter()
        .filter(|b| b.codec == CODEC_ID_ZSTD)
        .count();
    let lz4 = idx
        .blocks
        .iter()
        .filter(|b| b.codec == CODEC_ID_LZ4)
        .count();
    let _ = writeln!(
        s,
        "codec:        {choice}; {} blocks of up to {} pages ({snap} snap, {zstd} zstd, {lz4} lz4)",
        idx.blocks.len(),
        h.block_pages
    );
    let data = c.zero + c.word + c.dup + c.block;
    let pct = |n: u64| 100.0 * n as f64 / data.max(1) as f64;
    let _ = writeln!(
        s,
        "pages:        {} pfns in {} PAGE_DATA records, {data} with data",
        idx.pages.len(),
        idx.records
    );
    let _ = writeln!(s, "  zero        {:>10} ({:5.1} %)", c.zero, pct(c.zero));
    let _ = writeln!(s, "  one word    {:>10} ({:5.1} %)", c.word, pct(c.word));
    let _ = writeln!(s, "  duplicate   {:>10} ({:5.1} %)", c.dup, pct(c.dup));
    let _ = writeln!(s, "  compressed  {:>10} ({:5.1} %)", c.block, pct(c.block));
    let _ = writeln!(s, "  no data     {:>10} (XTAB/BROKEN/XALLOC)", c.nodata);

    let mut runs: Vec<(String, u64, u64)> = Vec::new();
    img.walk_frames(|fh, _off, payload| {
        let name = match fh.kind {
            FrameKind::Verbatim => match Part::from_code(fh.sub) {
                Some(Part::LibxlRecord) => format!("libxl {}", libxl_record_name(fh.aux)),
                Some(Part::LibxcRecord) => format!("libxc {}", libxc_record_name(fh.aux)),
                Some(p) => p.to_string(),
                None => "unknown part".to_string(),
            },
            FrameKind::PageRecord => "libxc PAGE_DATA".to_string(),
            FrameKind::Block | FrameKind::Index => return Ok(()),
        };
        let bytes = payload.len() as u64;
        match runs.last_mut() {
            Some((n, count, b)) if *n == name => {
                *count += 1;
                *b += bytes;
            }
            _ => runs.push((name, 1, bytes)),
        }
        Ok(())
    })?;
    let _ = writeln!(s, "records (in stream order):");
    for (name, count, bytes) in runs {
        if count > 1 {
            let _ = writeln!(s, "  {name} x {count}");
        } else {
            let _ = writeln!(s, "  {name} ({bytes} bytes kept)");
        }
    }
    if let Some(cfg) = img.config_json()? {
        let pretty = serde_json::from_str::<serde_json::Value>(&cfg)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or(cfg);
        let _ = writeln!(s, "config:\n{pretty}");
    }
    Ok(s)
}
