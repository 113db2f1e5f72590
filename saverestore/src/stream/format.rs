//! Constants of the `xl save` layers (xl, libxl v2, libxc v2/v3), as in `tools/xl/xl.h`,
//! `libxl_sr_stream_format.h` and `xg_sr_stream_format.h`.

use std::fmt;

/// The 32-byte xl magic, with its embedded NUL.
pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// Size of the xl header.
pub const XL_HEADER_LEN: usize = 48;
/// `SAVEFILE_BYTEORDER_VALUE`.
pub const XL_BYTEORDER: u32 = 0x0102_0304;
/// Config data is JSON.
pub const XL_MANDATORY_FLAG_JSON: u32 = 1 << 0;
/// The stream after the xl header is a libxl v2 stream.
pub const XL_MANDATORY_FLAG_STREAMV2: u32 = 1 << 1;
/// Our limit on the xl optional data (the JSON config is a few KiB).
pub const MAX_OPTIONAL_DATA: u32 = 16 << 20;

/// "LibxlFmt".
pub const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74;
/// Size of the libxl stream header.
pub const LIBXL_HEADER_LEN: usize = 16;
pub const LIBXL_END: u32 = 0;
pub const LIBXL_LIBXC_CONTEXT: u32 = 1;
pub const LIBXL_EMULATOR_XENSTORE_DATA: u32 = 2;
pub const LIBXL_EMULATOR_CONTEXT: u32 = 3;
pub const LIBXL_CHECKPOINT_END: u32 = 4;
pub const LIBXL_CHECKPOINT_STATE: u32 = 5;

/// libxc image header marker.
pub const LIBXC_MARKER: u64 = u64::MAX;
/// "XENF".
pub const LIBXC_ID: u32 = 0x5845_4E46;
/// Image header (24 B) plus domain header (16 B).
pub const LIBXC_HEADERS_LEN: usize = 40;
pub const LIBXC_END: u32 = 0x00;
pub const LIBXC_PAGE_DATA: u32 = 0x01;
pub const LIBXC_X86_PV_INFO: u32 = 0x02;
pub const LIBXC_X86_PV_P2M_FRAMES: u32 = 0x03;
pub const LIBXC_X86_PV_VCPU_BASIC: u32 = 0x04;
pub const LIBXC_X86_PV_VCPU_EXTENDED: u32 = 0x05;
pub const LIBXC_X86_PV_VCPU_XSAVE: u32 = 0x06;
pub const LIBXC_SHARED_INFO: u32 = 0x07;
pub const LIBXC_X86_TSC_INFO: u32 = 0x08;
pub const LIBXC_HVM_CONTEXT: u32 = 0x09;
pub const LIBXC_HVM_PARAMS: u32 = 0x0A;
pub const LIBXC_X86_PV_VCPU_MSRS: u32 = 0x0C;
pub const LIBXC_CHECKPOINT: u32 = 0x0E;
pub const LIBXC_CHECKPOINT_DIRTY_PFN_LIST: u32 = 0x0F;
pub const LIBXC_STATIC_DATA_END: u32 = 0x10;
pub const LIBXC_X86_CPUID_POLICY: u32 = 0x11;
pub const LIBXC_X86_MSR_POLICY: u32 = 0x12;
/// First reserved (unknown, mandatory) libxc record type.
pub const LIBXC_FIRST_RESERVED: u32 = 0x13;
/// Bit 31 marks an optional record in both layers.
pub const REC_TYPE_OPTIONAL: u32 = 0x8000_0000;
/// `REC_LENGTH_MAX` of the libxc restorer; we apply it to both layers.
pub const REC_LENGTH_MAX: u32 = 128 << 20;

/// Guest page size (`page_shift` 12).
pub const PAGE_SIZE: usize = 4096;
pub const PAGE_DATA_PFN_MASK: u64 = 0x000f_ffff_ffff_ffff;
pub const PAGE_DATA_TYPE_SHIFT: u32 = 60;
/// Page types (`XEN_DOMCTL_PFINFO_*` >> 28).
pub const PT_NOTAB: u8 = 0x0;
pub const PT_L1TAB: u8 = 0x1;
pub const PT_L4TAB: u8 = 0x4;
pub const PT_L1TAB_PINNED: u8 = 0x9;
pub const PT_L4TAB_PINNED: u8 = 0xC;
pub const PT_BROKEN: u8 = 0xD;
pub const PT_XALLOC: u8 = 0xE;
pub const PT_XTAB: u8 = 0xF;
/// Xen's `MAX_BATCH_SIZE`: its writer never sends more pfns in one PAGE_DATA record. The
/// parser accepts larger counts as long as the record length is within limits.
pub const MAX_BATCH_SIZE: u32 = 1024;

/// Rounds a record body length up to the 8-byte record alignment.
pub fn pad8(len: u32) -> usize {
    (8 - (len as usize % 8)) % 8
}

/// The type nibble of a PAGE_DATA pfn word.
pub fn page_type(word: u64) -> u8 {
    (word >> PAGE_DATA_TYPE_SHIFT) as u8
}

/// The pfn of a PAGE_DATA pfn word.
pub fn page_pfn(word: u64) -> u64 {
    word & PAGE_DATA_PFN_MASK
}

/// Whether a page type is defined at all (0x5..=0x8 are reserved).
pub fn page_type_known(t: u8) -> bool {
    !(0x5..=0x8).contains(&t)
}

/// Whether a PAGE_DATA entry of this type is followed by 4096 bytes of data.
pub fn page_has_data(t: u8) -> bool {
    !matches!(t, PT_BROKEN | PT_XALLOC | PT_XTAB)
}

/// Human name of a page type.
pub fn page_type_name(t: u8) -> &'static str {
    match t {
        0x0 => "NOTAB",
        0x1 => "L1TAB",
        0x2 => "L2TAB",
        0x3 => "L3TAB",
        0x4 => "L4TAB",
        0x9 => "L1TAB|PINNED",
        0xA => "L2TAB|PINNED",
        0xB => "L3TAB|PINNED",
        0xC => "L4TAB|PINNED",
        0xD => "BROKEN",
        0xE => "XALLOC",
        0xF => "XTAB",
        _ => "RESERVED",
    }
}

/// Which layer a verbatim piece of the stream belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// xl header and optional data (the JSON config).
    XlHeader,
    /// The 16-byte libxl header.
    LibxlHeader,
    /// One libxl record, header, body and padding.
    LibxlRecord,
    /// libxc image and domain headers.
    LibxcHeader,
    /// One libxc record other than PAGE_DATA.
    LibxcRecord,
    /// Bytes after the libxl END record (kept, never interpreted).
    Trailing,
}

impl Part {
    /// Code stored in image frames.
    pub fn code(self) -> u8 {
        match self {
            Part::XlHeader => 1,
            Part::LibxlHeader => 2,
            Part::LibxlRecord => 3,
            Part::LibxcHeader => 4,
            Part::LibxcRecord => 5,
            Part::Trailing => 6,
        }
    }

    /// Inverse of [`Part::code`].
    pub fn from_code(c: u8) -> Option<Part> {
        Some(match c {
            1 => Part::XlHeader,
            2 => Part::LibxlHeader,
            3 => Part::LibxlRecord,
            4 => Part::LibxcHeader,
            5 => Part::LibxcRecord,
            6 => Part::Trailing,
            _ => return None,
        })
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::XlHeader => "xl header",
            Part::LibxlHeader => "libxl header",
            Part::LibxlRecord => "libxl",
            Part::LibxcHeader => "libxc header",
            Part::LibxcRecord => "libxc",
            Part::Trailing => "trailing",
        })
    }
}

/// Name of a libxl record type.
pub fn libxl_record_name(t: u32) -> &'static str {
    match t {
        LIBXL_END => "END",
        LIBXL_LIBXC_CONTEXT => "LIBXC_CONTEXT",
        LIBXL_EMULATOR_XENSTORE_DATA => "EMULATOR_XENSTORE_DATA",
        LIBXL_EMULATOR_CONTEXT => "EMULATOR_CONTEXT",
        LIBXL_CHECKPOINT_END => "CHECKPOINT_END",
        LIBXL_CHECKPOINT_STATE => "CHECKPOINT_STATE",
        t if t & REC_TYPE_OPTIONAL != 0 => "optional",
        _ => "reserved",
    }
}

/// Name of a libxc record type.
pub fn libxc_record_name(t: u32) -> &'static str {
    match t {
        LIBXC_END => "END",
        LIBXC_PAGE_DATA => "PAGE_DATA",
        LIBXC_X86_PV_INFO => "X86_PV_INFO",
        LIBXC_X86_PV_P2M_FRAMES => "X86_PV_P2M_FRAMES",
        LIBXC_X86_PV_VCPU_BASIC => "X86_PV_VCPU_BASIC",
        LIBXC_X86_PV_VCPU_EXTENDED => "X86_PV_VCPU_EXTENDED",
        LIBXC_X86_PV_VCPU_XSAVE => "X86_PV_VCPU_XSAVE",
        LIBXC_SHARED_INFO => "SHARED_INFO",
        LIBXC_X86_TSC_INFO => "X86_TSC_INFO",
        LIBXC_HVM_CONTEXT => "HVM_CONTEXT",
        LIBXC_HVM_PARAMS => "HVM_PARAMS",
        0x0B => "TOOLSTACK",
        LIBXC_X86_PV_VCPU_MSRS => "X86_PV_VCPU_MSRS",
        0x0D => "VERIFY",
        LIBXC_CHECKPOINT => "CHECKPOINT",
        LIBXC_CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
        LIBXC_STATIC_DATA_END => "STATIC_DATA_END",
        LIBXC_X86_CPUID_POLICY => "X86_CPUID_POLICY",
        LIBXC_X86_MSR_POLICY => "X86_MSR_POLICY",
        t if t & REC_TYPE_OPTIONAL != 0 => "optional",
        _ => "reserved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_rounds_to_eight() {
        assert_eq!(pad8(0), 0);
        assert_eq!(pad8(1), 7);
        assert_eq!(pad8(8), 0);
        assert_eq!(pad8(1000), 0);
        assert_eq!(pad8(1001), 7);
    }

    #[test]
    fn types_without_data() {
        for t in [PT_BROKEN, PT_XALLOC, PT_XTAB] {
            assert!(!page_has_data(t));
        }
        for t in [
            PT_NOTAB,
            PT_L1TAB,
            PT_L4TAB,
            PT_L1TAB_PINNED,
            PT_L4TAB_PINNED,
        ] {
            assert!(page_has_data(t));
        }
        assert!(!page_type_known(0x7));
    }

    #[test]
    fn part_codes_round_trip() {
        for p in [
            Part::XlHeader,
            Part::LibxlHeader,
            Part::LibxlRecord,
            Part::LibxcHeader,
            Part::LibxcRecord,
            Part::Trailing,
        ] {
            assert_eq!(Part::from_code(p.code()), Some(p));
        }
        assert_eq!(Part::from_code(0), None);
    }
}
