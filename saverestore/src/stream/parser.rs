//! Streaming parser of `xl save` files: yields verbatim pieces and PAGE_DATA records in
//! stream order, one record at a time, so memory stays at one record (at most 4 MiB of
//! pages for a stream written by Xen).

use std::io::{self, Read};

use super::format::*;
use super::StreamError;

/// One PAGE_DATA record, split into its pfn/type words and the data of the pages that carry
/// data (4096 bytes each, in word order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRecord {
    /// The reserved u32 after `count`, kept so the record is regenerated exactly.
    pub reserved: u32,
    /// `pfn_and_type[count]`.
    pub words: Vec<u64>,
    /// Concatenated page data.
    pub pages: Vec<u8>,
}

impl PageRecord {
    /// Number of pages carrying data.
    pub fn data_pages(&self) -> usize {
        self.pages.len() / PAGE_SIZE
    }

    /// Length field of the regenerated record.
    pub fn record_len(&self) -> u64 {
        8 + 8 * self.words.len() as u64 + self.pages.len() as u64
    }
}

/// One piece of the stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes outside PAGE_DATA, exactly as read: a header, or a whole record with its header
    /// and padding. `rtype` is the record type (0 for headers).
    Verbatim {
        part: Part,
        rtype: u32,
        bytes: Vec<u8>,
    },
    /// A libxc PAGE_DATA record.
    Pages(PageRecord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    XlHeader,
    LibxlHeader,
    LibxlRecords,
    LibxcHeaders,
    LibxcRecords,
    Trailing,
    Done,
}

/// Pull parser over any reader (a file, a pipe, a FIFO from `xl save`).
#[derive(Debug)]
pub struct StreamParser<R> {
    input: R,
    state: State,
    offset: u64,
    domain_type: Option<u32>,
    libxc_version: Option<u32>,
    /// Page buffers handed back by the consumer ([`StreamParser::recycle`]), reused so that
    /// steady-state parsing neither allocates nor zero-fills page memory.
    spare: Vec<Vec<u8>>,
    /// Leave PAGE_DATA page bytes in the input ([`StreamParser::next_event_borrowed`]).
    defer_pages: bool,
    /// Page bytes of the last record left in the input.
    deferred: usize,
}

/// Recycled page buffers kept at most.
const MAX_SPARE: usize = 16;

const TRAILING_CHUNK: usize = 1 << 20;
const RESERVE_AHEAD: usize = 8 + 8 * 1024 + 1024 * PAGE_SIZE;

impl<R: Read> StreamParser<R> {
    /// A parser positioned at the start of an `xl save` file.
    pub fn new(input: R) -> Self {
        StreamParser {
            input,
            state: State::XlHeader,
            offset: 0,
            domain_type: None,
            libxc_version: None,
            spare: Vec::new(),
            defer_pages: false,
            deferred: 0,
        }
    }

    /// Hands back the page buffer of a consumed [`PageRecord`] for reuse by a later record.
    pub fn recycle(&mut self, pages: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && pages.capacity() > 0 {
            self.spare.push(pages);
        }
    }

    /// The underlying reader.
    pub fn input_ref(&self) -> &R {
        &self.input
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// libxc domain type once seen: 1 x86 PV, 2 x86 HVM.
    pub fn domain_type(&self) -> Option<u32> {
        self.domain_type
    }

    /// libxc stream version once seen (2 or 3).
    pub fn libxc_version(&self) -> Option<u32> {
        self.libxc_version
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let mut done = 0;
        while done < buf.len() {
            match self.input.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        what,
                        offset: self.offset + done as u64,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Appends exactly `len` bytes to `out`; the buffer grows only with bytes that arrived.
    fn read_into(
        &mut self,
        out: &mut Vec<u8>,
        len: usize,
        what: &'static str,
    ) -> Result<(), StreamError> {
        let start = out.len();
        // Up to one full PAGE_DATA record is reserved at once; beyond that the buffer grows
        // with the bytes that actually arrive.
        out.reserve(len.min(RESERVE_AHEAD));
        let got = (&mut self.input)
            .take(len as u64)
            .read_to_end(out)
            .map_err(StreamError::Io)?;
        self.offset += got as u64;
        if got < len {
            return Err(StreamError::Truncated {
                what,
                offset: self.offset,
            });
        }
        debug_assert_eq!(out.len(), start + len);
        Ok(())
    }

    /// The next piece, or `None` after the libxl END record and any trailing bytes.
    ///
    /// # Errors
    /// A [`StreamError`] naming what is wrong; the parser is unusable afterwards.
    pub fn next_event(&mut self) -> Result<Option<Event>, StreamError> {
        let r = self.step();
        if r.is_err() {
            self.state = State::Done;
        }
        r
    }

    fn step(&mut self) -> Result<Option<Event>, StreamError> {
        match self.state {
            State::XlHeader => self.xl_header().map(Some),
            State::LibxlHeader => self.libxl_header().map(Some),
            State::LibxlRecords => self.libxl_record().map(Some),
            State::LibxcHeaders => self.libxc_headers().map(Some),
            State::LibxcRecords => self.libxc_record().map(Some),
            State::Trailing => self.trailing(),
            State::Done => Ok(None),
        }
    }

    fn xl_header(&mut self) -> Result<Event, StreamError> {
        let mut h = [0u8; XL_HEADER_LEN];
        self.read_exact(&mut h, "xl header")?;
        if &h[..32] != XL_MAGIC {
            return Err(StreamError::BadXlMagic);
        }
        let u = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let (byteorder, mflags, _oflags, optlen) = (u(32), u(36), u(40), u(44));
        if byteorder != XL_BYTEORDER {
            return Err(StreamError::BadByteOrder(byteorder));
        }
        let known = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2;
        if mflags & !known != 0 {
            return Err(StreamError::UnknownXlFlags(mflags & !known));
        }
        if mflags & XL_MANDATORY_FLAG_STREAMV2 == 0 {
            return Err(StreamError::LegacyStream);
        }
        if optlen > MAX_OPTIONAL_DATA {
            return Err(StreamError::OptionalDataTooLong(optlen));
        }
        let mut bytes = Vec::with_capacity(XL_HEADER_LEN + optlen as usize);
        bytes.extend_from_slice(&h);
        self.read_into(&mut bytes, optlen as usize, "xl optional data")?;
        self.state = State::LibxlHeader;
        Ok(Event::Verbatim {
            part: Part::XlHeader,
            rtype: 0,
            bytes,
        })
    }

    fn libxl_header(&mut self) -> Result<Event, StreamError> {
        let mut h = [0u8; LIBXL_HEADER_LEN];
        self.read_exact(&mut h, "libxl header")?;
        let ident = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let version = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let options = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let bad = |detail: String| StreamError::BadHeader {
            what: "libxl",
            detail,
        };
        if ident != LIBXL_IDENT {
            return Err(bad(format!("ident {ident:#x} is not LibxlFmt")));
        }
        if version != 2 {
            return Err(bad(format!("version {version}, expected 2")));
        }
        if options & 1 != 0 {
            return Err(bad("big-endian stream".into()));
        }
        self.state = State::LibxlRecords;
        Ok(Event::Verbatim {
            part: Part::LibxlHeader,
            rtype: 0,
            bytes: h.to_vec(),
        })
    }

    /// Reads a record header and body (with padding) into one buffer.
    fn record(
        &mut self,
        part: Part,
        what: &'static str,
    ) -> Result<(u32, u32, Vec<u8>), StreamError> {
        let mut rh = [0u8; 8];
        self.read_exact(&mut rh, what)?;
        let rtype = u32::from_le_bytes(rh[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(rh[4..8].try_into().expect("4 bytes"));
        if len > REC_LENGTH_MAX {
            return Err(StreamError::RecordTooLong { part, rtype, len });
        }
        Ok((rtype, len, rh.to_vec()))
    }

    fn libxl_record(&mut self) -> Result<Event, StreamError> {
        let part = Part::LibxlRecord;
        let (rtype, len, mut bytes) = self.record(part, "libxl record header")?;
        match rtype {
            LIBXL_END | LIBXL_EMULATOR_XENSTORE_DATA | LIBXL_EMULATOR_CONTEXT => {}
            LIBXL_LIBXC_CONTEXT => {
                if len != 0 {
                    return Err(StreamError::BadLibxcContext(len));
                }
            }
            LIBXL_CHECKPOINT_END | LIBXL_CHECKPOINT_STATE => {
                return Err(StreamError::Checkpoint { part, rtype });
            }
            t if t & REC_TYPE_OPTIONAL != 0 => {}
            _ => return Err(StreamError::UnknownMandatoryRecord { part, rtype }),
        }
        bytes.reserve(len as usize + pad8(len));
        self.read_into(&mut bytes, len as usize + pad8(len), "libxl record body")?;
        self.state = match rtype {
            LIBXL_END => State::Trailing,
            LIBXL_LIBXC_CONTEXT => State::LibxcHeaders,
            _ => State::LibxlRecords,
        };
        Ok(Event::Verbatim { part, rtype, bytes })
    }

    fn libxc_headers(&mut self) -> Result<Event, StreamError> {
        let mut h = [0u8; LIBXC_HEADERS_LEN];
        self.read_exact(&mut h, "libxc headers")?;
        let marker = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let id = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let version = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let options = u16::from_be_bytes(h[16..18].try_into().expect("2 bytes"));
        let dtype = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
        let page_shift = u16::from_le_bytes(h[28..30].try_into().expect("2 bytes"));
        let bad = |detail: String| StreamError::BadHeader {
            what: "libxc",
            detail,
        };
        if marker != LIBXC_MARKER || id != LIBXC_ID {
            return Err(bad(format!(
                "marker {marker:#x} id {id:#x} is not a libxc image header"
            )));
        }
        if !(2..=3).contains(&version) {
            return Err(bad(format!("version {version}, expected 2 or 3")));
        }
        if options & 1 != 0 {
            return Err(bad("big-endian stream".into()));
        }
        if page_shift != 12 {
            return Err(bad(format!("page_shift {page_shift}, expected 12")));
        }
        self.domain_type = Some(dtype);
        self.libxc_version = Some(version);
        self.state = State::LibxcRecords;
        Ok(Event::Verbatim {
            part: Part::LibxcHeader,
            rtype: 0,
            bytes: h.to_vec(),
        })
    }

    fn libxc_record(&mut self) -> Result<Event, StreamError> {
        let part = Part::LibxcRecord;
        let start = self.offset;
        let (rtype, len, mut bytes) = self.record(part, "libxc record header")?;
        match rtype {
            LIBXC_PAGE_DATA => return self.page_data(start, len).map(Event::Pages),
            LIBXC_CHECKPOINT | LIBXC_CHECKPOINT_DIRTY_PFN_LIST => {
                return Err(StreamError::Checkpoint { part, rtype });
            }
            t if t < LIBXC_FIRST_RESERVED || t & REC_TYPE_OPTIONAL != 0 => {}
            _ => return Err(StreamError::UnknownMandatoryRecord { part, rtype }),
        }
        bytes.reserve(len as usize + pad8(len));
        self.read_into(&mut bytes, len as usize + pad8(len), "libxc record body")?;
        if rtype == LIBXC_END {
            self.state = State::LibxlRecords;
        }
        Ok(Event::Verbatim { part, rtype, bytes })
    }

    fn page_data(&mut self, offset: u64, len: u32) -> Result<PageRecord, StreamError> {
        let bad = |detail: String| StreamError::BadPageData { offset, detail };
        if len < 8 {
            return Err(bad(format!("length {len} is shorter than its header")));
        }
        let mut h = [0u8; 8];
        self.read_exact(&mut h, "PAGE_DATA header")?;
        let count = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let reserved = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if count == 0 {
            return Err(bad("count is 0".into()));
        }
        let words_len = 8 * count as u64;
        if 8 + words_len > len as u64 {
            return Err(bad(format!("count {count} does not fit in length {len}")));
        }
        let mut raw = Vec::new();
        self.read_into(&mut raw, words_len as usize, "PAGE_DATA pfn array")?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut with_data = 0u64;
        for &w in &words {
            let t = page_type(w);
            if !page_type_known(t) {
                return Err(bad(format!(
                    "pfn {:#x} has unrecognised type {t:#x}",
                    page_pfn(w)
                )));
            }
            with_data += page_has_data(t) as u64;
        }
        let expect = 8 + words_len + with_data * PAGE_SIZE as u64;
        if expect != len as u64 {
            return Err(bad(format!(
                "length {len} but {count} pfns with {with_data} data pages need {expect}"
            )));
        }
        let want = (with_data as usize) * PAGE_SIZE;
        if self.defer_pages {
            self.deferred = want;
            return Ok(PageRecord {
                reserved,
                words,
                pages: Vec::new(),
            });
        }
        let mut pages = self.spare.pop().unwrap_or_default();
        if want <= pages.len() {
            // A recycled buffer already initialised that far: read straight into it (no
            // zero-filling, no allocation).
            pages.truncate(want);
            self.read_exact(&mut pages, "PAGE_DATA pages")?;
        } else {
            pages.clear();
            self.read_into(&mut pages, want, "PAGE_DATA pages")?;
        }
        Ok(PageRecord {
            reserved,
            words,
            pages,
        })
    }

    fn trailing(&mut self) -> Result<Option<Event>, StreamError> {
        let mut bytes = Vec::new();
        let got = (&mut self.input)
            .take(TRAILING_CHUNK as u64)
            .read_to_end(&mut bytes)
            .map_err(StreamError::Io)?;
        self.offset += got as u64;
        if got == 0 {
            self.state = State::Done;
            return Ok(None);
        }
        Ok(Some(Event::Verbatim {
            part: Part::Trailing,
            rtype: 0,
            bytes,
        }))
    }
}

impl<R: Read> Iterator for StreamParser<R> {
    type Item = Result<Event, StreamError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

impl<'a> StreamParser<io::Cursor<&'a [u8]>> {
    /// Like [`StreamParser::next_event`] over a stream held in memory (or mapped), but a
    /// PAGE_DATA record's page bytes are not copied: the record comes with empty `pages` and
    /// the second value is its page data, borrowed from the input (empty for other events).
    ///
    /// # Errors
    /// As [`StreamParser::next_event`], with the same messages.
    pub fn next_event_borrowed(&mut self) -> Result<Option<(Event, &'a [u8])>, StreamError> {
        self.defer_pages = true;
        self.deferred = 0;
        let r = self.next_event();
        self.defer_pages = false;
        let Some(ev) = r? else { return Ok(None) };
        let want = std::mem::take(&mut self.deferred);
        if want == 0 {
            return Ok(Some((ev, &[])));
        }
        let data: &'a [u8] = self.input.get_ref();
        let pos = (self.input.position() as usize).min(data.len());
        let avail = data.len() - pos;
        if avail < want {
            self.offset += avail as u64;
            self.input.set_position(data.len() as u64);
            self.state = State::Done;
            return Err(StreamError::Truncated {
                what: "PAGE_DATA pages",
                offset: self.offset,
            });
        }
        self.input.set_position((pos + want) as u64);
        self.offset += want as u64;
        Ok(Some((ev, &data[pos..pos + want])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::builder::{build_stream, BuildOptions, GuestShape};
    use crate::stream::writer::write_event;

    fn ram(pages: usize) -> Vec<u8> {
        (0..pages * PAGE_SIZE)
            .map(|i| ((i / 4096) as u8).wrapping_mul((i % 251) as u8))
            .collect()
    }

    fn built(shape: GuestShape, pages: usize) -> Vec<u8> {
        let mut s = Vec::new();
        build_stream(
            &ram(pages)[..],
            &mut s,
            &BuildOptions::new(shape, (pages * PAGE_SIZE) as u64),
        )
        .unwrap();
        s
    }

    fn regenerate(stream: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        for ev in StreamParser::new(stream) {
            write_event(&mut out, &ev?).unwrap();
        }
        Ok(out)
    }

    #[test]
    fn regenerates_both_shapes_byte_for_byte() {
        for shape in [GuestShape::Pv, GuestShape::Hvm] {
            let s = built(shape, 3000);
            assert_eq!(regenerate(&s).unwrap(), s);
        }
    }

    /// The borrowing parser: the same events (pages put back) and the same errors as the
    /// copying one.
    fn parse_borrowed(stream: &[u8]) -> Result<Vec<Event>, StreamError> {
        let mut p = StreamParser::new(io::Cursor::new(stream));
        let mut evs = Vec::new();
        while let Some((mut ev, pages)) = p.next_event_borrowed()? {
            if let Event::Pages(r) = &mut ev {
                assert!(r.pages.is_empty());
                r.pages = pages.to_vec();
            } else {
                assert!(pages.is_empty());
            }
            evs.push(ev);
        }
        assert_eq!(p.offset(), stream.len() as u64);
        Ok(evs)
    }

    #[test]
    fn borrowed_parse_matches_copying_parse() {
        let mut s = built(GuestShape::Hvm, 700);
        s.extend_from_slice(b"tail");
        let copied: Vec<Event> = StreamParser::new(&s[..]).collect::<Result<_, _>>().unwrap();
        assert!(copied.iter().any(|e| matches!(e, Event::Pages(_))));
        assert_eq!(parse_borrowed(&s).unwrap(), copied);
        for cut in (0..s.len()).step_by(4093) {
            let want = StreamParser::new(&s[..cut])
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err();
            let got = parse_borrowed(&s[..cut]).unwrap_err();
            assert_eq!(got.to_string(), want.to_string(), "cut {cut}");
        }
    }

    #[test]
    fn keeps_trailing_bytes() {
        let mut s = built(GuestShape::Hvm, 300);
        s.extend_from_slice(b"junk");
        assert_eq!(regenerate(&s).unwrap(), s);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let s = built(GuestShape::Pv, 40);
        for cut in (0..s.len()).step_by(997) {
            let err = regenerate(&s[..cut]).unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    fn find_libxc_record(s: &[u8], want: u32) -> usize {
        let mut p = StreamParser::new(s);
        loop {
            let before = p.offset();
            match p.next_event().unwrap().unwrap() {
                Event::Verbatim {
                    part: Part::LibxcRecord,
                    rtype,
                    ..
                } if rtype == want => return before as usize,
                _ => {}
            }
        }
    }

    #[test]
    fn rejects_checkpoint_and_unknown_mandatory() {
        let s = built(GuestShape::Hvm, 40);
        let at = find_libxc_record(&s, LIBXC_X86_TSC_INFO);
        let mut c = s.clone();
        c[at..at + 4].copy_from_slice(&LIBXC_CHECKPOINT.to_le_bytes());
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::Checkpoint { .. }
        ));
        c[at..at + 4].copy_from_slice(&0x4242u32.to_le_bytes());
        let e = regenerate(&c).unwrap_err();
        assert!(
            matches!(e, StreamError::UnknownMandatoryRecord { rtype: 0x4242, .. }),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("unknown mandatory libxc record type 0x4242"));
    }

    #[test]
    fn rejects_bad_headers() {
        let s = built(GuestShape::Hvm, 8);
        let mut c = s.clone();
        c[0] = b'Y';
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::BadXlMagic
        ));
        let mut c = s.clone();
        c[36] = 1; // mandatory flags without STREAMv2
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::LegacyStream
        ));
        let mut c = s.clone();
        c[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::OptionalDataTooLong(_)
        ));
    }

    #[test]
    fn rejects_page_data_length_mismatch_and_huge_records() {
        let s = built(GuestShape::Hvm, 8);
        let at = find_libxc_record(&s, LIBXC_STATIC_DATA_END) + 8; // PAGE_DATA follows
        let mut c = s.clone();
        let len = u32::from_le_bytes(c[at + 4..at + 8].try_into().unwrap());
        c[at + 4..at + 8].copy_from_slice(&(len - 8).to_le_bytes());
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::BadPageData { .. }
        ));
        c[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::RecordTooLong { .. }
        ));
        let mut c = s.clone();
        c[at + 8 + 8 + 7] = 0x70; // first pfn word gets reserved type 7
        assert!(matches!(
            regenerate(&c).unwrap_err(),
            StreamError::BadPageData { .. }
        ));
    }
}
