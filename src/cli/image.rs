//! `remoca image`: copy-on-write overlays (create, inspect, commit) and the content-addressed
//! image store (import, export, ls, log, rm, verify, gc, du) — thin wrappers over
//! `remoca_blkback::overlay`, `remoca_blkback::commit` and `remoca_blkback::images::store`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use remoca_blkback::images::chunk::ChunkSize;
use remoca_blkback::images::store::arena::Compression;
use remoca_blkback::images::store::{gc::GcOptions, ingest, Store, StoreOptions};
use remoca_blkback::overlay::{self, header, Overlay};
use remoca_blkback::raw::RawFile;
use remoca_blkback::Disk;

use super::blkback::{open_template, parse_size};
use super::Global;
use remoca_saverestore::progress::Progress;

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
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        cluster_size: u64,
    },
    /// Show an overlay's header and how many clusters it holds.
    Inspect {
        overlay: PathBuf,
        /// Check the overlay against this template (default: the path stored in the overlay).
        #[arg(long)]
        template: Option<PathBuf>,
    },
    /// Fold an overlay and its template into a new raw template (`--to FILE`), or make it a
    /// layer in the image store (`--base NAME@VERSION --image NAME`): only the pieces the
    /// overlay changed are stored, on top of the version it was made over.
    Commit {
        overlay: PathBuf,
        /// The new template to write (must not exist).
        #[arg(long, required_unless_present = "base", conflicts_with = "base")]
        to: Option<PathBuf>,
        /// The overlay's template (default: the path stored in the overlay).
        #[arg(long)]
        template: Option<PathBuf>,
        /// The store version the overlay's template was exported from.
        #[arg(long, requires = "image")]
        base: Option<String>,
        /// The image the new layer becomes the next version of (may be the base's image).
        #[arg(long, requires = "base")]
        image: Option<String>,
        #[command(flatten)]
        compress: CompressArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Import a disk image as the next version of NAME (raw, or anything `qemu-img convert`
    /// reads; `-` reads raw from stdin).
    Import {
        source: PathBuf,
        name: String,
        /// Chunk size: a power of two from 4K to 64K (match the guest's block size or a
        /// multiple of it).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        chunk_size: u64,
        /// Source format: auto (by magic), raw, or a qemu-img format (qcow2, vmdk, vdi, ...).
        #[arg(long, default_value = "auto")]
        format: String,
        #[command(flatten)]
        compress: CompressArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Write a version (NAME for the newest, NAME@N) as a raw image to a new file, or `-`.
    Export {
        version: String,
        dest: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the images in the store.
    Ls {
        #[command(flatten)]
        store: StoreArg,
    },
    /// An image's versions: time, parent, size, data and the bytes each added.
    Log {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove one version (its chunks are freed by the next gc).
    Rm {
        version: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Re-hash every chunk, check every version's chunks are present; fails if anything is
    /// wrong, naming the chunk and the versions using it.
    Verify {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Free chunks no kept version references (rewriting the arenas that hold them).
    Gc {
        /// Also remove all but the newest N versions of each image (bases of kept layers
        /// stay).
        #[arg(long)]
        keep: Option<usize>,
        /// Show what would be freed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Space used: logical bytes, distinct bytes, stored bytes, dedup ratio, per image.
    Du {
        #[command(flatten)]
        store: StoreArg,
    },
}

/// How the chunks a command adds are compressed.
#[derive(Debug, Args)]
struct CompressArg {
    /// Compression of new chunks: zstd[:LEVEL] (1-19, default 3), lz4 or none; a chunk is
    /// stored raw when compression saves less than an eighth. Chunks already in the store
    /// keep the codec they were written with.
    #[arg(long, value_name = "CODEC", default_value_t = Compression::default())]
    compress: Compression,
    /// The same as `--compress none`.
    #[arg(long, conflicts_with = "compress")]
    no_compress: bool,
}

impl CompressArg {
    fn how(&self) -> Compression {
        if self.no_compress {
            Compression::None
        } else {
            self.compress
        }
    }
}

/// Where the image store is.
#[derive(Debug, Args)]
struct StoreArg {
    /// The image store: a directory, or `s3://BUCKET/PREFIX` (endpoint, region and
    /// credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY). Default: `$REMOCA_STORE`, else `images/` in remoca's runtime
    /// directory, `$XDG_RUNTIME_DIR/remoca` or `/tmp/remoca-UID`.
    #[arg(long = "store", env = "REMOCA_STORE")]
    dir: Option<PathBuf>,
}

impl StoreArg {
    fn path(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| remoca_xen::sim::attached::runtime_dir().join("images"))
    }

    fn open(&self, write: bool, compression: Compression) -> anyhow::Result<Store> {
        let dir = self.path();
        let opts = StoreOptions {
            write,
            compression,
            ..StoreOptions::default()
        };
        Store::open_location(&dir, opts)
            .with_context(|| format!("cannot open image store {}", dir.display()))
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < U.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[u])
    }
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, proleptic
/// Gregorian).
fn when(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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
            outln!(
                "created {} over {} ({} bytes, {} clusters of {} bytes)",
                path.display(),
                hint.display(),
                h.virtual_size,
                h.cluster_count,
                h.cluster_size()
            )?;
        }
        ImageCmd::Inspect {
            overlay: path,
            template,
        } => {
            let i = overlay::inspect(&path)?;
            let h = &i.header;
            outln!("overlay:        {}", path.display())?;
            outln!("format:         remoca overlay v{}", header::VERSION)?;
            outln!("virtual size:   {} bytes", h.virtual_size)?;
            outln!("cluster size:   {} bytes", h.cluster_size())?;
            outln!("clusters:       {}", h.cluster_count)?;
            outln!(
                "  in overlay:   {} ({} bytes)",
                i.data_clusters,
                i.data_clusters * h.cluster_size()
            )?;
            outln!("  zeroed:       {}", i.zero_clusters)?;
            outln!("  from template:{}", i.template_clusters)?;
            outln!("template:       {}", h.template_path)?;
            outln!(
                "fingerprint:    {}",
                overlay::short_hex(&h.template_fingerprint)
            )?;
            let tpath = template.unwrap_or_else(|| PathBuf::from(&h.template_path));
            match RawFile::open_read_only(&tpath) {
                Ok(t) => {
                    let fp = overlay::fingerprint(&t)?;
                    let ok = fp == h.template_fingerprint && t.size() == h.virtual_size;
                    outln!(
                        "template check: {}",
                        if ok { "matches" } else { "DOES NOT MATCH" }
                    )?;
                    if !ok {
                        bail!(
                            "{} is not the template this overlay was made for",
                            tpath.display()
                        );
                    }
                }
                Err(e) => outln!("template check: cannot open ({e})")?,
            }
        }
        ImageCmd::Commit {
            overlay: path,
            base: Some(base),
            image: Some(image),
            compress,
            store,
            ..
        } => {
            let mut s = store.open(true, compress.how())?;
            let base = s.resolve(&base)?;
            let bar = Progress::new("commit", None, true);
            let note = format!("commit of overlay {}", path.display());
            let r = s.commit_overlay(&path, &base, &image, &note, &mut |n| bar.set(n))?;
            bar.finish();
            outln!(
                "{}: layer on {base} with {} changed pieces ({} zeroed), {} new chunks, {} new bytes",
                r.version, r.chunks, r.zero_chunks, r.new_chunks, r.new_bytes
            )?;
        }
        ImageCmd::Commit {
            overlay: path,
            to,
            template,
            ..
        } => {
            let to = to.context("--to FILE or --base NAME@VERSION --image NAME")?;
            let tpath = template_for(&path, template)?;
            let base = open_template(&tpath)?;
            let ov = Overlay::open(&path, base, true)?;
            let written = remoca_blkback::commit::commit(&ov, &to)?;
            outln!(
                "committed {} over {} into {} ({} bytes of data)",
                path.display(),
                tpath.display(),
                to.display(),
                written
            )?;
        }
        cmd => store_cmd(cmd)?,
    }
    Ok(())
}

fn store_cmd(cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Import {
            source,
            name,
            chunk_size,
            format,
            compress,
            store,
        } => {
            let cs = ChunkSize::new(chunk_size)?;
            let mut s = store.open(true, compress.how())?;
            let note = format!("import of {}", source.display());
            let (r, secs) = if source.as_os_str() == "-" {
                let bar = Progress::new("import", None, true);
                let t = std::time::Instant::now();
                let r = s.import(&name, &mut std::io::stdin().lock(), cs, &note, &mut |n| {
                    bar.set(n)
                })?;
                bar.finish();
                (r, t.elapsed().as_secs_f64())
            } else {
                let (file, tmp) = ingest::open_source(s.dir(), &source, &format)?;
                let total = file.metadata().map(|m| m.len()).ok();
                let bar = Progress::new("import", total, true);
                let t = std::time::Instant::now();
                let mut rd = std::io::BufReader::with_capacity(1 << 20, file);
                let r = s.import(&name, &mut rd, cs, &note, &mut |n| bar.set(n));
                bar.finish();
                if let Some(tmp) = tmp {
                    let _ = std::fs::remove_file(tmp);
                }
                (r?, t.elapsed().as_secs_f64())
            };
            outln!(
                "{}: {} bytes, {} chunks of {} ({} zero pieces elided), {} new chunks, {} new bytes, {:.1} MiB/s",
                r.version,
                r.size,
                r.chunks,
                cs.bytes(),
                r.zero_chunks,
                r.new_chunks,
                r.new_bytes,
                r.size as f64 / (1 << 20) as f64 / secs.max(1e-9)
            )?;
        }
        ImageCmd::Export {
            version,
            dest,
            store,
        } => {
            let s = store.open(false, Compression::None)?;
            let v = s.resolve(&version)?;
            let size = s.manifest(&v)?.size;
            let bar = Progress::new("export", Some(size), dest.as_os_str() != "-");
            if dest.as_os_str() == "-" {
                let out = super::StdoutStream::lock();
                let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
                s.export_to(&v, &mut out, &mut |n| bar.set(n))?;
            } else {
                s.export_file(&v, &dest, &mut |n| bar.set(n))?;
                bar.finish();
                outln!("{v}: {size} bytes written to {}", dest.display())?;
            }
        }
        ImageCmd::Ls { store } => {
            let s = store.open(false, Compression::None)?;
            outln!(
                "{:<24} {:>8} {:>7} {:>16}  created",
                "IMAGE",
                "VERSIONS",
                "NEWEST",
                "SIZE"
            )?;
            for name in s.images()? {
                let vs = s.versions(&name)?;
                let Some(last) = vs.last() else { continue };
                let m = s.manifest(last)?;
                outln!(
                    "{:<24} {:>8} {:>7} {:>16}  {}",
                    name,
                    vs.len(),
                    last.version,
                    m.size,
                    when(m.created)
                )?;
            }
        }
        ImageCmd::Log { name, store } => {
            let s = store.open(false, Compression::None)?;
            let vs = s.versions(&name)?;
            if vs.is_empty() {
                bail!("no image {name:?} in {}", s.location());
            }
            for v in vs.iter().rev() {
                let i = s.version_info(v)?;
                outln!("version {}", i.version)?;
                outln!("  created:    {}", when(i.created))?;
                match &i.parent {
                    Some(p) => outln!(
                        "  parent:     {p} (layer of {} changed pieces)",
                        i.own_chunks
                    )?,
                    None => outln!("  parent:     none")?,
                }
                outln!(
                    "  size:       {} bytes ({}), chunk size {}",
                    i.size,
                    human(i.size),
                    i.chunk_size
                )?;
                outln!("  data:       {} bytes", i.data_bytes)?;
                outln!("  new bytes:  {} ({})", i.new_bytes, human(i.new_bytes))?;
                outln!("  from:       {}", i.note)?;
            }
        }
        ImageCmd::Rm { version, store } => {
            let mut s = store.open(true, Compression::default())?;
            let v = version.parse()?;
            s.remove(&v)?;
            outln!("removed {v}; `remoca image gc` frees its chunks")?;
        }
        ImageCmd::Verify { store } => {
            let s = store.open(false, Compression::None)?;
            let total: u64 = s.index().values().map(|l| u64::from(l.raw_len)).sum();
            let bar = Progress::new("verify", Some(total), true);
            let r = s.verify(&mut |n| bar.set(n))?;
            bar.finish();
            for n in &r.notes {
                outln!("note: {n}")?;
            }
            for b in &r.bad_chunks {
                let users: Vec<String> = b.used_by.iter().map(ToString::to_string).collect();
                outln!(
                    "BAD chunk {} (arena {} offset {}): {}; used by: {}",
                    b.id,
                    b.arena,
                    b.offset,
                    b.why,
                    if users.is_empty() {
                        "nothing".into()
                    } else {
                        users.join(", ")
                    }
                )?;
            }
            for (v, id) in &r.missing {
                outln!("MISSING chunk {id} needed by {v}")?;
            }
            for (v, why) in &r.bad_versions {
                outln!("BAD version {v}: {why}")?;
            }
            outln!(
                "checked {} chunks ({} bytes) and {} versions; {} unreferenced chunks ({} bytes) for gc",
                r.chunks_checked, r.bytes_checked, r.versions_checked, r.unreferenced_chunks, r.unreferenced_bytes
            )?;
            if !r.is_clean() {
                bail!(
                    "store {} has {} corrupt chunks, {} missing chunks, {} bad versions",
                    s.location(),
                    r.bad_chunks.len(),
                    r.missing.len(),
                    r.bad_versions.len()
                );
            }
            outln!("store is consistent")?;
        }
        ImageCmd::Gc {
            keep,
            dry_run,
            store,
        } => {
            let mut s = store.open(true, Compression::default())?;
            let bar = Progress::new("gc", None, true);
            let opts = GcOptions {
                keep_last: keep,
                dry_run,
            };
            let r = s.gc(opts, &mut |n| bar.set(n))?;
            bar.finish();
            let verb = if dry_run { "would remove" } else { "removed" };
            for v in &r.versions_removed {
                outln!("{verb} {v}")?;
            }
            outln!(
                "{} {} chunks; chunks {} -> {}; stored bytes {} -> {}; arena bytes {} -> {}; {} arenas rewritten, {} bytes copied",
                if dry_run { "would free" } else { "freed" },
                r.chunks_freed,
                r.chunks_before,
                r.chunks_after,
                r.stored_before,
                r.stored_after,
                r.arena_bytes_before,
                r.arena_bytes_after,
                r.arenas_rewritten.len(),
                r.bytes_copied
            )?;
        }
        ImageCmd::Du { store } => {
            let s = store.open(false, Compression::None)?;
            let u = s.usage()?;
            outln!("store:          {}", s.location())?;
            outln!("chunks:         {}", u.chunks)?;
            outln!(
                "logical bytes:  {} ({})",
                u.logical_bytes,
                human(u.logical_bytes)
            )?;
            outln!(
                "unique bytes:   {} ({})",
                u.unique_bytes,
                human(u.unique_bytes)
            )?;
            outln!(
                "stored bytes:   {} ({})",
                u.stored_bytes,
                human(u.stored_bytes)
            )?;
            outln!(
                "arena bytes:    {} ({})",
                u.arena_bytes,
                human(u.arena_bytes)
            )?;
            outln!(
                "unreferenced:   {} bytes (gc frees them)",
                u.unreferenced_bytes
            )?;
            outln!("dedup ratio:    {:.2}", u.dedup_ratio())?;
            outln!(
                "{:<24} {:>8} {:>16} {:>16} {:>16}",
                "IMAGE",
                "VERSIONS",
                "LOGICAL",
                "UNIQUE",
                "EXCLUSIVE"
            )?;
            for i in &u.images {
                outln!(
                    "{:<24} {:>8} {:>16} {:>16} {:>16}",
                    i.name,
                    i.versions,
                    i.logical_bytes,
                    i.unique_bytes,
                    i.exclusive_bytes
                )?;
            }
        }
        ImageCmd::Create { .. } | ImageCmd::Inspect { .. } | ImageCmd::Commit { .. } => {
            unreachable!("handled by image()")
        }
    }
    Ok(())
}
