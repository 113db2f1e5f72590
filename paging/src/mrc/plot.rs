//! A miss-ratio curve as a small terminal plot (Unicode block characters).
//!
//! ```text
//! 1.00 ┤█▇
//!      ┤██▅▂
//! 0.50 ┤████▆▃▁
//!      ┤███████▇▅▃▂▁▁▁▁▁▁▁▁
//! 0.00 ┼────────────▲───────
//!      0      recommended 12 MiB       48 MiB
//! ```

use super::Mrc;
use crate::pager::PAGE_KIB;

const EIGHTHS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn size_label(pages: u64) -> String {
    let kib = pages * PAGE_KIB;
    if kib >= 1 << 20 {
        format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64)
    } else if kib >= 1024 {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    } else {
        format!("{kib} KiB")
    }
}

/// Render `mrc` in `width` columns × `height` rows of plot (plus axes), marking `mark`
/// (a size in pages, e.g. the recommended one) under the x axis.
pub fn render(mrc: &Mrc, width: usize, height: usize, mark: Option<u64>) -> String {
    render_from(mrc, width, height, mark, 0)
}

/// As [`render`], for a curve whose size 0 stands for `base` pages (a live guest's curve
/// starts at its current memory): the axis labels add `base`.
pub fn render_from(mrc: &Mrc, width: usize, height: usize, mark: Option<u64>, base: u64) -> String {
    let (width, height) = (width.max(8), height.max(2));
    let ratios = mrc.ratios();
    let max_pages = (ratios.len() as u64 - 1).max(1) * mrc.bucket();
    let col_pages = |c: usize| (c as u64 * max_pages).div_ceil(width as u64 - 1);
    let values: Vec<f64> = (0..width).map(|c| mrc.miss_ratio(col_pages(c))).collect();
    let mut out = String::new();
    for row in 0..height {
        let label = match row {
            0 => "1.00",
            r if r == height / 2 && height > 2 => "0.50",
            _ => "    ",
        };
        out.push_str(label);
        out.push_str(" ┤");
        // Eighths of this row covered by each column's bar.
        let base = (height - 1 - row) * 8;
        for v in &values {
            let filled = (v * (height * 8) as f64).round() as usize;
            out.push(EIGHTHS[filled.saturating_sub(base).min(8)]);
        }
        out.push('\n');
    }
    out.push_str("0.00 ┼");
    let mark_col =
        mark.map(|m| ((m as f64 / max_pages as f64) * (width - 1) as f64).round() as usize);
    for c in 0..width {
        out.push(if Some(c) == mark_col { '▲' } else { '─' });
    }
    out.push('\n');
    let left = if base == 0 {
        "     0".to_string()
    } else {
        format!("     {}", size_label(base))
    };
    let right = size_label(base + max_pages);
    let middle = mark
        .map(|m| format!("▲ {}", size_label(base + m)))
        .unwrap_or_default();
    let pad = (width + 6)
        .saturating_sub(left.chars().count() + right.chars().count() + middle.chars().count());
    out.push_str(&left);
    out.push_str(&" ".repeat(pad / 2));
    out.push_str(&middle);
    out.push_str(&" ".repeat(pad - pad / 2));
    out.push_str(&right);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mrc::exact_lru;

    #[test]
    fn a_cliff_plots_full_then_empty() {
        let mrc = exact_lru((0..2000u64).map(|i| i % 100), 10);
        let s = render(&mrc, 20, 4, Some(mrc.recommend(0.01)));
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 6, "{s}");
        // Top row: full bars left of the cliff, blank right of it.
        let top: Vec<char> = lines[0].chars().skip(6).collect();
        assert_eq!(top[0], '█', "{s}");
        assert_eq!(*top.last().unwrap(), ' ', "{s}");
        assert!(lines[4].contains('▲'), "{s}");
        assert!(lines[5].contains("400 KiB"), "{s}");
    }
}
