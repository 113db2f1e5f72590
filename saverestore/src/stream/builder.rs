//! Builds realistic `xl save` streams around a raw guest RAM image, for tests and
//! benchmarks: the layout `xl save` writes for a PV or an HVM guest, every page type
//! (page tables, pinned tables, BROKEN/XALLOC/XTAB without data, an XTAB hole), batches of
//! varied size, an optional record, and records whose bodies need padding.

use std::io::{self, Read, Write};

use super::format::*;

/// Which guest layout to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestShape {
    /// x86 PV: PV_INFO, P2M frames, page-table pages, SHARED_INFO and per-vCPU records.
    Pv,
    /// x86 HVM: HVM_PARAMS, HVM_CONTEXT, the VGA hole as XTAB, an emulator context.
    Hvm,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub shape: GuestShape,
    /// Bytes of guest RAM the reader supplies (a multiple of 4096).
    pub ram_bytes: u64,
    /// libxc stream version, 2 or 3.
    pub libxc_version: u32,
    /// Vary the PAGE_DATA batch sizes (Xen's own writer uses full 1024-page batches).
    pub varied_batches: bool,
}

impl BuildOptions {
    /// The usual shape for a given guest and RAM size.
    pub fn new(shape: GuestShape, ram_bytes: u64) -> Self {
        BuildOptions {
            shape,
            ram_bytes,
            libxc_version: 3,
            varied_batches: true,
        }
    }
}

/// Page type the builder gives to `pfn`.
pub fn builder_page_type(shape: GuestShape, pfn: u64) -> u8 {
    match shape {
        GuestShape::Hvm if (0xA0..0xC0).contains(&pfn) => PT_XTAB,
        GuestShape::Pv if (0x9F0..0xA00).contains(&pfn) => PT_XTAB,
        _ if pfn % 10007 == 5 => PT_BROKEN,
        _ if pfn % 7919 == 13 => PT_XALLOC,
        GuestShape::Pv if pfn == 0x1000 => PT_L4TAB_PINNED,
        GuestShape::Pv if pfn % 4093 == 2 => 0x2,
        GuestShape::Pv if pfn % 8191 == 3 => 0x3,
        GuestShape::Pv if pfn % 509 == 1 => PT_L1TAB,
        GuestShape::Pv if pfn % 1021 == 7 => PT_L1TAB_PINNED,
        _ => PT_NOTAB,
    }
}

fn filler(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

fn record<W: Write>(out: &mut W, rtype: u32, body: &[u8]) -> io::Result<u64> {
    out.write_all(&rtype.to_le_bytes())?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(body)?;
    let pad = pad8(body.len() as u32);
    out.write_all(&[0u8; 8][..pad])?;
    Ok(8 + body.len() as u64 + pad as u64)
}

fn vcpu_record(vcpu: u32, payload_len: usize, seed: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload_len);
    b.extend_from_slice(&vcpu.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&filler(seed, payload_len));
    b
}

/// Reads `opts.ram_bytes` of RAM from `ram` and writes a whole `xl save` file to `out`.
/// Returns the number of bytes written.
///
/// # Errors
/// I/O errors of either side; `InvalidInput` for a RAM size that is not whole pages;
/// `UnexpectedEof` if `ram` ends early.
pub fn build_stream<R: Read, W: Write>(
    mut ram: R,
    out: &mut W,
    opts: &BuildOptions,
) -> io::Result<u64> {
    if opts.ram_bytes % PAGE_SIZE as u64 != 0 || opts.ram_bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "RAM size is not a whole number of pages",
        ));
    }
    let pv = opts.shape == GuestShape::Pv;
    let npfn = opts.ram_bytes / PAGE_SIZE as u64;
    let mut n = 0u64;

    // xl header + JSON config (odd length: the libxl stream starts unaligned, as in real files).
    let config = format!(
        "{{\n    \"c_info\": {{\n        \"type\": \"{}\",\n        \"name\": \"remoca-guest\",\n        \"uuid\": \"0b7a5c1e-63d2-4e38-9d5e-2f00c0ffee01\"\n    }},\n    \"b_info\": {{\n        \"max_vcpus\": 2,\n        \"max_memkb\": {},\n        \"target_memkb\": {}\n    }},\n    \"on_reboot\": \"restart\"\n}}\n",
        if pv { "pv" } else { "hvm" },
        opts.ram_bytes / 1024,
        opts.ram_bytes / 1024
    );
    let mut h = Vec::with_capacity(48 + 4 + config.len() + 1);
    h.extend_from_slice(XL_MAGIC);
    h.extend_from_slice(&XL_BYTEORDER.to_le_bytes());
    h.extend_from_slice(&(XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&(4 + config.len() as u32 + 1).to_le_bytes());
    h.extend_from_slice(&(config.len() as u32 + 1).to_le_bytes());
    h.extend_from_slice(config.as_bytes());
    h.push(0);
    out.write_all(&h)?;
    n += h.len() as u64;

    // libxl header (big-endian) and LIBXC_CONTEXT.
    out.write_all(&LIBXL_IDENT.to_be_bytes())?;
    out.write_all(&2u32.to_be_bytes())?;
    out.write_all(&0u32.to_be_bytes())?;
    n += 16;
    n += record(out, LIBXL_LIBXC_CONTEXT, &[])?;

    // libxc image header (big-endian) and domain header.
    out.write_all(&LIBXC_MARKER.to_be_bytes())?;
    out.write_all(&LIBXC_ID.to_be_bytes())?;
    out.write_all(&opts.libxc_version.to_be_bytes())?;
    out.write_all(&[0u8; 8])?;
    out.write_all(&(if pv { 1u32 } else { 2u32 }).to_le_bytes())?;
    out.write_all(&12u16.to_le_bytes())?;
    out.write_all(&0u16.to_le_bytes())?;
    out.write_all(&4u32.to_le_bytes())?;
    out.write_all(&17u32.to_le_bytes())?;
    n += 40;

    if pv {
        n += record(out, LIBXC_X86_PV_INFO, &[8, 4, 0, 0, 0, 0, 0, 0])?;
    }
    n += record(out, LIBXC_X86_CPUID_POLICY, &filler(1, 37 * 24))?;
    n += record(out, LIBXC_X86_MSR_POLICY, &filler(2, 3 * 16))?;
    if opts.libxc_version >= 3 {
        n += record(out, LIBXC_STATIC_DATA_END, &[])?;
    }
    if pv {
        let frames = npfn.div_ceil(512);
        let mut b = Vec::with_capacity(8 + 8 * frames as usize);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&((npfn - 1) as u32).to_le_bytes());
        for i in 0..frames {
            b.extend_from_slice(&(0x7_0000 + i).to_le_bytes());
        }
        n += record(out, LIBXC_X86_PV_P2M_FRAMES, &b)?;
    }

    // PAGE_DATA batches, all pfns in order as send_all_pages does.
    let batch_sizes: &[u64] = if opts.varied_batches {
        &[1024, 1024, 1000, 513, 1024, 7, 1024, 64]
    } else {
        &[1024]
    };
    let mut pfn = 0u64;
    let mut bi = 0usize;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut body = Vec::with_capacity(8 + 8 * 1024 + 1024 * PAGE_SIZE);
    while pfn < npfn {
        let count = batch_sizes[bi % batch_sizes.len()].min(npfn - pfn);
        bi += 1;
        body.clear();
        body.extend_from_slice(&(count as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut data = Vec::with_capacity(count as usize * PAGE_SIZE);
        for p in pfn..pfn + count {
            let t = builder_page_type(opts.shape, p);
            body.extend_from_slice(&(((t as u64) << PAGE_DATA_TYPE_SHIFT) | p).to_le_bytes());
            ram.read_exact(&mut page)?;
            if page_has_data(t) {
                data.extend_from_slice(&page);
            }
        }
        body.extend_from_slice(&data);
        n += record(out, LIBXC_PAGE_DATA, &body)?;
        pfn += count;
        if bi == 3 {
            // An optional record with an odd length between page batches.
            n += record(out, REC_TYPE_OPTIONAL | 0x1234, &filler(3, 13))?;
        }
    }

    let mut tsc = Vec::new();
    tsc.extend_from_slice(&1u32.to_le_bytes());
    tsc.extend_from_slice(&2_400_000u32.to_le_bytes());
    tsc.extend_from_slice(&123_456_789u64.to_le_bytes());
    tsc.extend_from_slice(&7u32.to_le_bytes());
    tsc.extend_from_slice(&0u32.to_le_bytes());
    n += record(out, LIBXC_X86_TSC_INFO, &tsc)?;
    if pv {
        n += record(out, LIBXC_SHARED_INFO, &filler(4, PAGE_SIZE))?;
        for v in 0..2u32 {
            n += record(out, LIBXC_X86_PV_VCPU_BASIC, &vcpu_record(v, 1005, 10 + v))?;
            n += record(out, LIBXC_X86_PV_VCPU_EXTENDED, &vcpu_record(v, 36, 20 + v))?;
            n += record(out, LIBXC_X86_PV_VCPU_XSAVE, &vcpu_record(v, 832, 30 + v))?;
            n += record(out, LIBXC_X86_PV_VCPU_MSRS, &vcpu_record(v, 48, 40 + v))?;
        }
    } else {
        let mut params = Vec::new();
        params.extend_from_slice(&5u32.to_le_bytes());
        params.extend_from_slice(&0u32.to_le_bytes());
        for (i, v) in [
            (1u64, 0xfeff_0000u64),
            (2, 3),
            (5, 1),
            (12, 0xfeff_1000),
            (34, 8),
        ] {
            params.extend_from_slice(&i.to_le_bytes());
            params.extend_from_slice(&v.to_le_bytes());
        }
        n += record(out, LIBXC_HVM_PARAMS, &params)?;
        n += record(out, LIBXC_HVM_CONTEXT, &filler(5, 1001))?;
    }
    n += record(out, LIBXC_END, &[])?;

    // libxl trailer records.
    let mut xs = Vec::new();
    xs.extend_from_slice(&2u32.to_le_bytes());
    xs.extend_from_slice(&0u32.to_le_bytes());
    xs.extend_from_slice(b"physmap/1/start_addr\0f0000000\0physmap/1/size\0800000\0");
    n += record(out, LIBXL_EMULATOR_XENSTORE_DATA, &xs)?;
    if !pv {
        let mut emu = Vec::new();
        emu.extend_from_slice(&2u32.to_le_bytes());
        emu.extend_from_slice(&0u32.to_le_bytes());
        emu.extend_from_slice(&filler(6, 12345));
        n += record(out, LIBXL_EMULATOR_CONTEXT, &emu)?;
    }
    n += record(out, LIBXL_END, &[])?;
    out.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_type_appears() {
        let mut seen = std::collections::HashSet::new();
        for p in 0..131_072 {
            seen.insert(builder_page_type(GuestShape::Pv, p));
        }
        for t in [
            PT_NOTAB,
            PT_L1TAB,
            2,
            3,
            PT_L1TAB_PINNED,
            PT_L4TAB_PINNED,
            PT_BROKEN,
            PT_XALLOC,
            PT_XTAB,
        ] {
            assert!(seen.contains(&t), "type {t:#x} missing");
        }
    }

    #[test]
    fn rejects_partial_pages() {
        let opts = BuildOptions::new(GuestShape::Hvm, 100);
        let err = build_stream(&[0u8; 100][..], &mut Vec::new(), &opts).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
