//! Getting images in and out: import from a raw byte stream, export to a file or a stream,
//! and commit of a VM's overlay as a layer on the store version it was made over.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::manifest::{check_name, Manifest};
use super::{io_at, Store, StoreError, VersionRef};
use crate::images::chunk::{ChunkId, ChunkList, ChunkSize};
use crate::overlay::Overlay;
use crate::Disk;

/// What an import or a commit added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddReport {
    pub version: VersionRef,
    pub size: u64,
    /// Pieces the version sets (a whole image: its non-zero pieces; a layer: the pieces it
    /// changes).
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks that were not in the store before.
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// Told each piece of a version: its offset, its length, its bytes (`None`: zeroes).
pub type PieceFn<'a> = dyn FnMut(u64, usize, Option<&[u8]>) -> Result<(), StoreError> + 'a;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes read and prepared per batch.
const BATCH_BYTES: usize = 4 << 20;
/// Threads that hash and compress a batch.
const MAX_THREADS: usize = 8;

/// One piece after hashing.
enum Prepared {
    Zero,
    /// Already in the store.
    Known(ChunkId),
    /// Not in the store: its id, codec and encoded payload.
    New(ChunkId, u8, Vec<u8>),
}

/// Hash the pieces of `buf` (lengths `lens`, each at a multiple of `cs`) on up to
/// `threads` threads, and encode those `index` does not have.
fn prepare(
    buf: &[u8],
    lens: &[usize],
    cs: usize,
    index: &std::collections::HashMap<ChunkId, super::arena::Location>,
    compression: super::arena::Compression,
    threads: usize,
) -> Vec<Prepared> {
    let one = |k: usize| -> Prepared {
        let piece = &buf[k * cs..k * cs + lens[k]];
        if is_zero(piece) {
            return Prepared::Zero;
        }
        let id = ChunkId::of(piece);
        if index.contains_key(&id) {
            return Prepared::Known(id);
        }
        let (codec, payload) = super::arena::encode_payload(piece, compression);
        Prepared::New(id, codec, payload)
    };
    if threads <= 1 || lens.len() < 2 {
        return (0..lens.len()).map(one).collect();
    }
    let per = lens.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..lens.len())
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(lens.len());
                s.spawn(move || (start..end).map(one).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("import worker panicked"))
            .collect()
    })
}

/// Read until `buf` is full or the stream ends; returns the bytes read.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Store {
    /// Import a raw image from `src` as the next version of `image`. `progress` is told the
    /// bytes read so far.
    ///
    /// # Errors
    /// I/O errors of the source or the store; a bad image name.
    pub fn import(
        &mut self,
        image: &str,
        src: &mut dyn Read,
        chunk_size: ChunkSize,
        note: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<AddReport, StoreError> {
        check_name(image)?;
        let cs = chunk_size.bytes() as usize;
        // Spread hashing and compression over the cores; without compression the import is
        // bound by its writes and one thread measured faster (docs/image-store.md).
        let threads = if self.opts.compression != super::arena::Compression::None {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_THREADS)
        } else {
            1
        };
        // One piece at a time when single-threaded: the piece stays in cache from read to
        // write.
        let per_batch = if threads > 1 {
            (BATCH_BYTES / cs).max(1)
        } else {
            1
        };
        let mut buf = vec![0u8; cs * per_batch];
        let mut lens = Vec::with_capacity(per_batch);
        let mut entries = BTreeMap::new();
        let (mut size, mut index) = (0u64, 0u64);
        let (mut zero, mut new_chunks, mut new_bytes) = (0, 0, 0);
        let mut eof = false;
        while !eof {
            // Read a batch of pieces ...
            lens.clear();
            while lens.len() < per_batch {
                let at = lens.len() * cs;
                let n =
                    read_full(src, &mut buf[at..at + cs]).map_err(|e| io_at("import source", e))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                lens.push(n);
                if n < cs {
                    eof = true;
                    break;
                }
            }
            // ... hash (and compress what is new) on every core ...
            let prepared = prepare(&buf, &lens, cs, &self.index, self.opts.compression, threads);
            // ... and append in order.
            for (k, p) in prepared.into_iter().enumerate() {
                let n = lens[k];
                match p {
                    Prepared::Zero => zero += 1,
                    Prepared::Known(id) => {
                        entries.insert(index, Some(id));
                    }
                    Prepared::New(id, codec, payload) => {
                        // A batch may hold the same new piece twice.
                        if !self.index.contains_key(&id) {
                            self.append_encoded(id, codec, n as u32, &payload)?;
                            new_chunks += 1;
                            new_bytes += n as u64;
                        }
                        entries.insert(index, Some(id));
                    }
                }
                size += n as u64;
                index += 1;
            }
            progress(size);
        }
        if size > super::manifest::MAX_IMAGE_SIZE {
            return Err(StoreError::Invalid(format!(
                "image of {size} bytes is too large"
            )));
        }
        let chunks = entries.len() as u64;
        let m = Manifest {
            version: 0,
            created: now(),
            chunk_size,
            size,
            new_bytes,
            parent: None,
            note: note.to_string(),
            entries,
        };
        let version = self.add_version(image, m)?;
        Ok(AddReport {
            version,
            size,
            chunks,
            zero_chunks: zero,
            new_chunks,
            new_bytes,
        })
    }

    /// Call `f` with each piece of version `v` in order (`None`: a piece of zeroes), every
    /// chunk checked against its id.
    pub fn for_each_piece(
        &self,
        v: &VersionRef,
        f: &mut PieceFn<'_>,
    ) -> Result<ChunkList, StoreError> {
        let list = self.chunk_list(v)?;
        let cs = list.chunk_size.bytes() as u64;
        for (i, c) in list.chunks.iter().enumerate() {
            let len = list.len_of(i);
            match c {
                None => f(i as u64 * cs, len, None)?,
                Some(id) => {
                    let data = self.read_chunk(id)?;
                    if data.len() != len {
                        return Err(StoreError::Format(format!(
                            "{v}: chunk {id} is {} bytes where piece {i} has {len}",
                            data.len()
                        )));
                    }
                    f(i as u64 * cs, len, Some(&data))?;
                }
            }
        }
        Ok(list)
    }

    /// Write version `v` to `out` as a raw image (zero pieces written as zeroes).
    pub fn export_to(
        &self,
        v: &VersionRef,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut zeroes = Vec::new();
        let mut done = 0;
        let list = self.for_each_piece(v, &mut |_, len, data| {
            let b = match data {
                Some(d) => d,
                None => {
                    zeroes.resize(len, 0);
                    &zeroes[..len]
                }
            };
            out.write_all(b).map_err(|e| io_at("export output", e))?;
            done += len as u64;
            progress(done);
            Ok(())
        })?;
        out.flush().map_err(|e| io_at("export output", e))?;
        Ok(list.size)
    }

    /// Write version `v` to a new raw file `path` (zero pieces left as holes): written next
    /// to it, synced, renamed into place.
    pub fn export_file(
        &self,
        v: &VersionRef,
        path: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        if path.exists() {
            return Err(StoreError::Invalid(format!(
                "{} exists; refusing to overwrite it",
                path.display()
            )));
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_at(&tmp, e))?;
        let mut done = 0;
        let res = self.for_each_piece(v, &mut |off, len, data| {
            if let Some(d) = data {
                file.write_all_at(d, off).map_err(|e| io_at(&tmp, e))?;
            }
            done += len as u64;
            progress(done);
            Ok(())
        });
        let finish = |list: ChunkList| -> Result<u64, StoreError> {
            file.set_len(list.size)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_at(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| io_at(path, e))?;
            Ok(list.size)
        };
        match res.and_then(finish) {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Make the overlay at `overlay` (created over an export of `base`) a new version of
    /// `image` whose parent is `base`: every chunk-sized piece the overlay holds clusters
    /// for (data or zeroes) that differs from `base` becomes a chunk of the layer.
    ///
    /// # Errors
    /// An overlay that was not made over `base` (its template fingerprint differs), store
    /// and overlay errors.
    pub fn commit_overlay(
        &mut self,
        overlay: &Path,
        base: &VersionRef,
        image: &str,
        note: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<AddReport, StoreError> {
        check_name(image)?;
        let bdisk = Arc::new(self.version_disk(base)?);
        let list = bdisk.chunk_list().clone();
        let ov = Overlay::open(overlay, bdisk, true)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", overlay.display())))?;
        let derr = |e: crate::DiskError| StoreError::Invalid(format!("{}: {e}", overlay.display()));
        let cs = list.chunk_size.bytes() as u64;
        // Pieces that touch a cluster the overlay itself holds (depth 1).
        let mut touched = Vec::new();
        let mut pos = 0;
        for e in ov.block_status(0, list.size).map_err(derr)? {
            if e.depth == 1 {
                let first = pos / cs;
                let last = (pos + e.len - 1) / cs;
                for i in first..=last {
                    if touched.last() != Some(&i) {
                        touched.push(i);
                    }
                }
            }
            pos += e.len;
        }
        let mut entries = BTreeMap::new();
        let (mut zero, mut new_chunks, mut new_bytes) = (0, 0, 0);
        let mut buf = vec![0u8; cs as usize];
        for (k, &i) in touched.iter().enumerate() {
            let len = list.len_of(i as usize);
            ov.read_at(&mut buf[..len], i * cs).map_err(derr)?;
            let piece = &buf[..len];
            let now_id: Option<ChunkId> = if is_zero(piece) {
                None
            } else {
                Some(ChunkId::of(piece))
            };
            if now_id == list.chunks[i as usize] {
                continue;
            }
            match now_id {
                None => zero += 1,
                Some(_) => {
                    let (_, new) = self.put_chunk(piece)?;
                    if new {
                        new_chunks += 1;
                        new_bytes += len as u64;
                    }
                }
            }
            entries.insert(i, now_id);
            progress((k as u64 + 1) * cs);
        }
        let chunks = entries.len() as u64;
        let m = Manifest {
            version: 0,
            created: now(),
            chunk_size: list.chunk_size,
            size: list.size,
            new_bytes,
            parent: Some(base.clone()),
            note: note.to_string(),
            entries,
        };
        let version = self.add_version(image, m)?;
        Ok(AddReport {
            version,
            size: list.size,
            chunks,
            zero_chunks: zero,
            new_chunks,
            new_bytes,
        })
    }
}

/// Open `path` for import: a raw file as is; any other format qemu-img knows converted to
/// a raw temporary file in the store's `tmp/` first. Returns the reader and the temporary
/// file to delete afterwards.
pub fn open_source(
    store_dir: &Path,
    path: &Path,
    format: &str,
) -> Result<(File, Option<std::path::PathBuf>), StoreError> {
    let f = File::open(path).map_err(|e| io_at(path, e))?;
    let fmt = if format == "auto" {
        sniff_format(&f).map_err(|e| io_at(path, e))?
    } else {
        format.to_string()
    };
    if fmt == "raw" {
        return Ok((f, None));
    }
    let tmp = store_dir
        .join("tmp")
        .join(format!("convert.{}.raw", std::process::id()));
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", &fmt, "-O", "raw"])
        .arg(path)
        .arg(&tmp)
        .output()
        .map_err(|e| StoreError::Invalid(format!("cannot run qemu-img: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::Invalid(format!(
            "qemu-img convert -f {fmt} -O raw {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let f = File::open(&tmp).map_err(|e| io_at(&tmp, e))?;
    Ok((f, Some(tmp)))
}

/// The image format by its magic: `qcow2`, `vmdk`, `vdi`, `vhdx`, `qed`, else `raw`.
pub fn sniff_format(f: &File) -> io::Result<String> {
    let mut b = [0u8; 72];
    let n = f.read_at(&mut b, 0)?;
    let b = &b[..n];
    let fmt = if b.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if b.starts_with(b"KDMV") || b.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else if b.len() >= 68 && b[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        "vdi"
    } else if b.starts_with(b"vhdxfile") {
        "vhdx"
    } else if b.starts_with(b"QEMU\0") {
        "qed"
    } else {
        "raw"
    };
    Ok(fmt.to_string())
}
