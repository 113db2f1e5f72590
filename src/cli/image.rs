//! `remoca image`: copy-on-write overlays (create, inspect, commit) — thin wrappers over
//! `remoca_blkback::overlay` and `remoca_blkback::commit`.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, Subcommand};
use remoca_blkback::overlay::{self, header, Overlay};
use remoca_blkback::raw::RawFile;
use remoca_blkback::Disk;

use super::blkback::{open_template, parse_size};
use super::Global;

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Create an empty copy-on-write overlay for a raw template.
    Create {
        #[arg(long)]
        template: PathBuf,
        #[arg(long)]
        overlay: PathBuf,
        /// Cluster size in bytes (power of two, 4096..2097152; K and M suffixes accepted).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        cluster_size: u64,
    },
    /// Show an overlay's header and how many clusters it holds.
    Inspect {
        overlay: PathBuf,
        /// Check the overlay against this template (default: the path stored in the overlay).
        #[arg(long)]
        template: Option<PathBuf>,
    },
    /// Fold an overlay and its template into a new raw template.
    Commit {
        overlay: PathBuf,
        /// The new template to write (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// The overlay's template (default: the path stored in the overlay).
        #[arg(long)]
        template: Option<PathBuf>,
    },
}

fn template_for(overlay_path: &Path, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(t) => Ok(t),
        None => {
            let info = overlay::inspect(overlay_path)?;
            if info.header.template_path.is_empty() {
                bail!(
                    "{} records no template path; pass --template",
                    overlay_path.display()
                );
            }
            Ok(PathBuf::from(info.header.template_path))
        }
    }
}

pub fn image(a: ImageArgs, g: &Global) -> anyhow::Result<()> {
    super::init_tracing(g.verbose);
    match a.cmd {
        ImageCmd::Create {
            template,
            overlay: path,
            cluster_size,
        } => {
            if !cluster_size.is_power_of_two() {
                bail!("--cluster-size {cluster_size} is not a power of two");
            }
            let t = open_template(&template)?;
            let hint = std::fs::canonicalize(&template).unwrap_or(template.clone());
            let h = Overlay::create(
                &path,
                &*t,
                cluster_size.trailing_zeros(),
                &hint.to_string_lossy(),
            )?;
            println!(
                "created {} over {} ({} bytes, {} clusters of {} bytes)",
                path.display(),
                hint.display(),
                h.virtual_size,
                h.cluster_count,
                h.cluster_size()
            );
        }
        ImageCmd::Inspect {
            overlay: path,
            template,
        } => {
            let i = overlay::inspect(&path)?;
            let h = &i.header;
            println!("overlay:        {}", path.display());
            println!("format:         remoca overlay v{}", header::VERSION);
            println!("virtual size:   {} bytes", h.virtual_size);
            println!("cluster size:   {} bytes", h.cluster_size());
            println!("clusters:       {}", h.cluster_count);
            println!(
                "  in overlay:   {} ({} bytes)",
                i.data_clusters,
                i.data_clusters * h.cluster_size()
            );
            println!("  zeroed:       {}", i.zero_clusters);
            println!("  from template:{}", i.template_clusters);
            println!("template:       {}", h.template_path);
            println!(
                "fingerprint:    {}",
                overlay::short_hex(&h.template_fingerprint)
            );
            let tpath = template.unwrap_or_else(|| PathBuf::from(&h.template_path));
            match RawFile::open_read_only(&tpath) {
                Ok(t) => {
                    let fp = overlay::fingerprint(&t)?;
                    let ok = fp == h.template_fingerprint && t.size() == h.virtual_size;
                    println!(
                        "template check: {}",
                        if ok { "matches" } else { "DOES NOT MATCH" }
                    );
                    if !ok {
                        bail!(
                            "{} is not the template this overlay was made for",
                            tpath.display()
                        );
                    }
                }
                Err(e) => println!("template check: cannot open ({e})"),
            }
        }
        ImageCmd::Commit {
            overlay: path,
            to,
            template,
        } => {
            let tpath = template_for(&path, template)?;
            let base = open_template(&tpath)?;
            let ov = Overlay::open(&path, base, true)?;
            let written = remoca_blkback::commit::commit(&ov, &to)?;
            println!(
                "committed {} over {} into {} ({} bytes of data)",
                path.display(),
                tpath.display(),
                to.display(),
                written
            );
        }
    }
    Ok(())
}
