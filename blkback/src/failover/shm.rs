//! The shared-memory data area of a channel to a local driver (Unix socket only).
//!
//! At the handshake the endpoint creates a memfd of `slots × slot_size` bytes, maps it, and
//! passes it to the driver with `SCM_RIGHTS` together with an offer frame
//! (`u32 SHM_MAGIC | u32 slots | u32 slot_size`, big-endian). A request whose data fits a
//! slot carries the slot number instead of its data: the endpoint copies WRITE data into the
//! slot, the driver writes READ data straight into it and answers with a reply of kind
//! [`super::wire::KIND_REPLY_SLOT`] (the data length, no data on the socket). Headers,
//! heartbeats and every other reply stay on the socket, so the socket frame is the
//! notification.
//!
//! Nothing read from the area or from the driver is trusted: a slot number and length come
//! from the endpoint's own table (the slot it assigned to the request id), a length from the
//! driver is checked against the slot size before any use, and the endpoint never holds a
//! Rust reference into memory the driver may write at the same time: it copies bytes in
//! with raw copies, and lends a READ reply's slot to the frontend ([`Slots::lend`], a
//! [`Lent`]), which sends it with `writev` and frees the slot when done. The memfd is
//! sealed against shrinking and growing before it is sent, so a driver cannot make the
//! endpoint's mapping fault (SIGBUS) by truncating the file. Every connection gets its own
//! memfd, so a superseded driver that keeps writing into its old mapping touches nothing
//! the endpoint still reads.
//!
//! All `unsafe` of the shared-memory channel is in this module.

use std::ffi::c_void;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::iobuf::Lent;

/// Magic of the offer frame sent with the memfd.
pub const SHM_MAGIC: u32 = 0x5246_4f4d; // "RFOM"
/// Length of the offer frame.
pub const OFFER_LEN: usize = 12;
/// Slots the endpoint offers (at most this many requests have their data in the area at a
/// time; the others use socket frames as before).
pub const DEFAULT_SLOTS: u32 = 64;
/// Bytes per slot: requests with more data use socket frames.
pub const DEFAULT_SLOT_SIZE: u32 = 1 << 20;
/// Largest area a driver accepts (slots × slot size).
pub const MAX_AREA: u64 = 1 << 30;

/// Why a shared-memory access or offer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShmError {
    #[error("slot {0} is out of range")]
    BadSlot(u64),
    #[error("length {0} does not fit a slot")]
    BadLength(u64),
    #[error("bad shared-memory offer")]
    BadOffer,
    #[error("slot {0} is already in use by another request")]
    SlotBusy(u64),
    #[error("request {0} has no slot")]
    NoSlot(u64),
}

/// A mapped data area: `slots` slots of `slot_size` bytes.
#[derive(Debug)]
pub struct Area {
    ptr: NonNull<u8>,
    len: usize,
    slots: u32,
    slot_size: u32,
    fd: OwnedFd,
    /// Slots lent out by [`Area::slot_mut`]: one slice per slot at a time.
    busy: Box<[AtomicBool]>,
}

// SAFETY: the area is plain shared bytes reached only through raw copies (`put`, `take`)
// or, in the driver, through slices whose exclusive use the protocol gives the holder of
// a request; the pointer stays valid until drop.
unsafe impl Send for Area {}
// SAFETY: as for Send: no method hands out a reference that outlives the call except
// `slot_mut`, which lends each slot to one holder at a time (its busy flag, see there).
unsafe impl Sync for Area {}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `map`, unmapped only here.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len) };
    }
}

/// The area's geometry from an offer frame, checked.
///
/// # Errors
/// [`ShmError::BadOffer`] for a bad magic, zero slots or slot size, or an area over
/// [`MAX_AREA`].
pub fn parse_offer(b: &[u8; OFFER_LEN]) -> Result<(u32, u32), ShmError> {
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (magic, slots, slot_size) = (word(0), word(4), word(8));
    if magic != SHM_MAGIC
        || slots == 0
        || slot_size == 0
        || slots > u32::from(u16::MAX) + 1
        || u64::from(slots) * u64::from(slot_size) > MAX_AREA
    {
        return Err(ShmError::BadOffer);
    }
    Ok((slots, slot_size))
}

pub fn encode_offer(slots: u32, slot_size: u32) -> [u8; OFFER_LEN] {
    let mut b = [0u8; OFFER_LEN];
    b[0..4].copy_from_slice(&SHM_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&slots.to_be_bytes());
    b[8..12].copy_from_slice(&slot_size.to_be_bytes());
    b
}

impl Area {
    /// A fresh memfd-backed area (the endpoint side).
    ///
    /// # Errors
    /// From `memfd_create`, `ftruncate`, `mmap`; a geometry over [`MAX_AREA`].
    pub fn create(slots: u32, slot_size: u32) -> io::Result<Self> {
        parse_offer(&encode_offer(slots, slot_size))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let fd = rustix::fs::memfd_create(
            "remoca-failover",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )?;
        let len = u64::from(slots) * u64::from(slot_size);
        rustix::fs::ftruncate(&fd, len)?;
        // The driver gets this descriptor: sealed, it can neither shrink the file under our
        // mapping (our next access would die of SIGBUS) nor change the seals.
        use rustix::fs::SealFlags;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Self::map(fd, slots, slot_size)
    }

    /// Map an area received from the endpoint (the driver side), after checking the memfd
    /// is at least as large as the offer says.
    ///
    /// # Errors
    /// A file smaller than the offer; `mmap` errors.
    pub fn map(fd: OwnedFd, slots: u32, slot_size: u32) -> io::Result<Self> {
        let len64 = u64::from(slots) * u64::from(slot_size);
        let st = rustix::fs::fstat(&fd)?;
        if (st.st_size as u64) < len64 || len64 == 0 || len64 > MAX_AREA {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                ShmError::BadOffer,
            ));
        }
        let len = len64 as usize;
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long, at an
        // address the kernel picks; nothing else refers to it yet.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self {
            ptr,
            len,
            slots,
            slot_size,
            fd,
            busy: (0..slots).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The address `off` bytes into the mapping (computing it is safe; using it is not).
    fn at(&self, off: usize) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(off)
    }

    /// The byte offset of `len` bytes in `slot`, checked.
    fn range(&self, slot: u64, len: u64) -> Result<usize, ShmError> {
        if slot >= u64::from(self.slots) {
            return Err(ShmError::BadSlot(slot));
        }
        if len > u64::from(self.slot_size) {
            return Err(ShmError::BadLength(len));
        }
        // slot < slots and len ≤ slot_size: the range lies inside the mapping.
        Ok((slot * u64::from(self.slot_size)) as usize)
    }

    /// Whether `len` bytes fit in `slot`.
    ///
    /// # Errors
    /// A bad slot or a length over the slot size.
    pub fn check(&self, slot: u64, len: usize) -> Result<(), ShmError> {
        self.range(slot, len as u64).map(|_| ())
    }

    /// Copy `data` into `slot` (the endpoint, before sending a WRITE).
    ///
    /// # Errors
    /// A bad slot or a length over the slot size.
    pub fn put(&self, slot: u64, data: &[u8]) -> Result<(), ShmError> {
        let at = self.range(slot, data.len() as u64)?;
        // SAFETY: `range` checked `at + data.len()` lies inside the mapping; a raw copy
        // into shared memory creates no reference to it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.at(at), data.len()) };
        Ok(())
    }

    /// Copy `out.len()` bytes out of `slot` (the endpoint's replies are lent instead, see
    /// [`Slots::lend`]; the tests read slots with this). The other side may write the slot
    /// meanwhile: the bytes are then whatever it wrote, never out of bounds.
    ///
    /// # Errors
    /// A bad slot or a length over the slot size.
    pub fn take(&self, slot: u64, out: &mut [u8]) -> Result<(), ShmError> {
        let at = self.range(slot, out.len() as u64)?;
        // SAFETY: `range` checked the source lies inside the mapping; a raw copy out of
        // shared memory creates no reference to it.
        unsafe { std::ptr::copy_nonoverlapping(self.at(at), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// The first `len` bytes of `slot` as a mutable slice (the driver, running a request),
    /// until the guard is dropped.
    ///
    /// The protocol gives the slot of an unanswered request to the driver alone: the
    /// endpoint neither writes nor reads it until the reply. An endpoint that broke this
    /// would only change the bytes the driver reads or writes for that request. One that
    /// named the same slot for two requests at once gets [`ShmError::SlotBusy`] for the
    /// second: this process never holds two slices of one slot.
    ///
    /// # Errors
    /// A bad slot, a length over the slot size, a slot already lent out.
    pub fn slot_mut(&self, slot: u64, len: usize) -> Result<SlotGuard<'_>, ShmError> {
        let at = self.range(slot, len as u64)?;
        let busy = &self.busy[slot as usize];
        if busy.swap(true, Ordering::Acquire) {
            return Err(ShmError::SlotBusy(slot));
        }
        // SAFETY: `range` checked the slice lies inside the mapping, which lives as long as
        // `self`; the busy flag just taken makes this the only slice of the slot until the
        // guard drops (the endpoint leaves the slot alone meanwhile, see above).
        let buf = unsafe { std::slice::from_raw_parts_mut(self.at(at), len) };
        Ok(SlotGuard { buf, busy })
    }
}

/// A slot lent out by [`Area::slot_mut`]; gives it back when dropped.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    buf: &'a mut [u8],
    busy: &'a AtomicBool,
}

impl std::ops::Deref for SlotGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
    }
}

impl std::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

/// Send the offer frame and the memfd over a Unix socket.
///
/// # Errors
/// From `sendmsg`; a short send.
pub fn send_offer(sock: impl AsFd, area: &Area) -> io::Result<()> {
    let frame = encode_offer(area.slots, area.slot_size);
    let fds = [area.fd.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the memfd"));
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != OFFER_LEN {
        return Err(io::Error::other("short send of the shared-memory offer"));
    }
    Ok(())
}

/// Receive the offer frame and its memfd, and map the area.
///
/// # Errors
/// From `recvmsg`; a missing descriptor, a bad offer, a file smaller than offered.
pub fn recv_offer(sock: impl AsFd) -> io::Result<Area> {
    let mut frame = [0u8; OFFER_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let sock = sock.as_fd();
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut frame)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    let mut got = r.bytes;
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    while got < OFFER_LEN {
        let n = rustix::io::read(sock, &mut frame[got..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let fd = fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, ShmError::BadOffer))?;
    let (slots, slot_size) =
        parse_offer(&frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Area::map(fd, slots, slot_size)
}

/// The endpoint's side of a connection's area: the free slots and the slot of every request
/// whose data is in the area.
#[derive(Debug)]
pub struct Slots {
    pub area: Area,
    table: Mutex<SlotTable>,
}

#[derive(Debug)]
struct SlotTable {
    free: Vec<u32>,
    by_id: std::collections::HashMap<u64, u32>,
}

impl Slots {
    pub fn new(area: Area) -> Self {
        let free = (0..area.slots).rev().collect();
        Self {
            area,
            table: Mutex::new(SlotTable {
                free,
                by_id: std::collections::HashMap::new(),
            }),
        }
    }

    /// A free slot for request `id` with `len` bytes of data, if one fits.
    pub fn assign(&self, id: u64, len: usize) -> Option<u32> {
        if len > self.area.slot_size as usize {
            return None;
        }
        let mut t = self.table.lock();
        let s = t.free.pop()?;
        if let Some(old) = t.by_id.insert(id, s) {
            t.free.push(old);
        }
        Some(s)
    }

    /// The slot request `id` held, now free again.
    pub fn release(&self, id: u64) -> Option<u32> {
        let mut t = self.table.lock();
        let s = t.by_id.remove(&id)?;
        t.free.push(s);
        Some(s)
    }

    /// The first `len` bytes of the slot request `id` holds, lent until the [`Lent`] is
    /// dropped (the endpoint, on a READ reply: the frontend sends them from the slot). The
    /// slot leaves `id` at once, so a second reply for `id` finds no slot; it is free again
    /// only when the lent data is dropped, so no later request's data lands on it meanwhile.
    ///
    /// # Errors
    /// No slot for `id`; a length over the slot size (the slot is then freed).
    pub fn lend(self: &Arc<Self>, id: u64, len: usize) -> Result<Lent, ShmError> {
        let slot = self
            .table
            .lock()
            .by_id
            .remove(&id)
            .ok_or(ShmError::NoSlot(id))?;
        let hold = SlotHold {
            slots: self.clone(),
            slot,
        };
        let at = self.area.range(slot.into(), len as u64)?;
        let ptr = NonNull::new(self.area.at(at)).expect("inside the mapping");
        // SAFETY: `range` checked the `len` bytes at `ptr` lie inside the mapping, which
        // `hold` keeps alive (it holds the `Slots` that own the `Area`, unmapped only on
        // drop); the slot stays reserved to this data until `hold` is dropped.
        Ok(unsafe { Lent::new(ptr, len, Box::new(hold)) })
    }
}

/// A lent slot: frees it when dropped.
struct SlotHold {
    slots: Arc<Slots>,
    slot: u32,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.slots.table.lock().free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_round_trips_and_refuses_bad_geometry() {
        assert_eq!(parse_offer(&encode_offer(64, 1 << 20)), Ok((64, 1 << 20)));
        assert_eq!(parse_offer(&encode_offer(0, 4096)), Err(ShmError::BadOffer));
        assert_eq!(parse_offer(&encode_offer(4, 0)), Err(ShmError::BadOffer));
        assert_eq!(
            parse_offer(&encode_offer(1 << 20, 1 << 20)),
            Err(ShmError::BadOffer)
        );
        let mut b = encode_offer(4, 4096);
        b[0] ^= 1;
        assert_eq!(parse_offer(&b), Err(ShmError::BadOffer));
    }

    #[test]
    fn hostile_slots_and_lengths_give_errors_not_panics() {
        let a = Area::create(4, 4096).expect("memfd");
        assert_eq!(a.put(4, &[1]), Err(ShmError::BadSlot(4)));
        assert_eq!(a.put(u64::MAX, &[1]), Err(ShmError::BadSlot(u64::MAX)));
        assert_eq!(a.put(0, &[0; 4097]), Err(ShmError::BadLength(4097)));
        let mut out = vec![0u8; 4097];
        assert_eq!(a.take(3, &mut out), Err(ShmError::BadLength(4097)));
        assert_eq!(a.take(9, &mut out[..1]), Err(ShmError::BadSlot(9)));
        assert!(a.slot_mut(4, 1).is_err());
        assert!(a.slot_mut(0, usize::MAX).is_err());
        // A slot is lent once at a time.
        let mut held = a.slot_mut(1, 8).expect("slot 1");
        held[0] = 9;
        assert_eq!(a.slot_mut(1, 8).map(|_| ()), Err(ShmError::SlotBusy(1)));
        drop(held);
        assert_eq!(a.slot_mut(1, 8).expect("slot 1 again")[0], 9);
        // The last byte of the last slot is reachable, and data stays in its slot.
        a.put(3, &[7; 4096]).expect("last slot");
        a.put(2, &[5; 4096]).expect("slot 2");
        let mut back = vec![0u8; 4096];
        a.take(3, &mut back).expect("take");
        assert!(back.iter().all(|&b| b == 7));
        a.take(2, &mut back).expect("take");
        assert!(back.iter().all(|&b| b == 5));
    }

    #[test]
    fn the_memfd_passes_over_a_unix_socket_and_both_sides_see_the_bytes() {
        let (e, d) = std::os::unix::net::UnixStream::pair().expect("pair");
        let a = Area::create(2, 8192).expect("memfd");
        send_offer(&e, &a).expect("send");
        let b = recv_offer(&d).expect("recv");
        assert_eq!((b.slots(), b.slot_size()), (2, 8192));
        a.put(1, b"from the endpoint").expect("put");
        assert_eq!(&b.slot_mut(1, 17).expect("slot")[..], b"from the endpoint");
        b.slot_mut(0, 3).expect("slot").copy_from_slice(b"abc");
        let mut out = [0u8; 3];
        a.take(0, &mut out).expect("take");
        assert_eq!(&out, b"abc");
    }

    #[test]
    fn an_offer_without_a_descriptor_or_with_a_short_file_is_refused() {
        use std::io::Write;
        let (mut e, d) = std::os::unix::net::UnixStream::pair().expect("pair");
        e.write_all(&encode_offer(2, 4096)).expect("write");
        assert!(recv_offer(&d).is_err());
        let (e, d) = std::os::unix::net::UnixStream::pair().expect("pair");
        let a = Area::create(1, 4096).expect("memfd");
        // Claim more slots than the file holds.
        let fake = Area {
            ptr: a.ptr,
            len: 0,
            slots: 8,
            slot_size: 4096,
            fd: a.fd.try_clone().expect("dup"),
            busy: Box::new([]),
        };
        let r = send_offer(&e, &fake);
        std::mem::forget(fake);
        r.expect("send");
        assert!(recv_offer(&d).is_err());
    }

    /// A driver holding the memfd cannot shrink it under the endpoint's mapping.
    #[test]
    fn the_area_cannot_be_shrunk_or_grown_by_the_driver() {
        let (e, d) = std::os::unix::net::UnixStream::pair().expect("pair");
        let a = Area::create(2, 4096).expect("memfd");
        send_offer(&e, &a).expect("send");
        let b = recv_offer(&d).expect("recv");
        assert!(rustix::fs::ftruncate(b.fd(), 0).is_err());
        assert!(rustix::fs::ftruncate(b.fd(), 1 << 20).is_err());
        assert!(rustix::fs::fcntl_add_seals(b.fd(), rustix::fs::SealFlags::empty()).is_err());
        a.put(1, &[3; 4096]).expect("still mapped");
        let mut out = [0u8; 4096];
        a.take(1, &mut out).expect("still mapped");
        assert_eq!(out, [3; 4096]);
    }

    #[test]
    fn slots_are_assigned_once_and_released_by_id() {
        let s = Slots::new(Area::create(2, 4096).expect("memfd"));
        let a = s.assign(1, 4096).expect("slot");
        let b = s.assign(2, 10).expect("slot");
        assert_ne!(a, b);
        assert_eq!(s.assign(3, 10), None, "both slots in use");
        assert_eq!(s.assign(4, 4097), None, "too large for a slot");
        assert_eq!(s.release(1), Some(a));
        assert_eq!(s.release(1), None, "released twice");
        assert_eq!(s.assign(3, 10), Some(a));
    }

    /// A lent slot holds the reply's bytes and stays off the free list until the lent data
    /// is dropped; a second reply for the same request finds no slot.
    #[test]
    fn a_lent_slot_is_not_reused_before_its_data_is_dropped() {
        let s = Arc::new(Slots::new(Area::create(1, 4096).expect("memfd")));
        let slot = s.assign(1, 4096).expect("slot");
        s.area.put(slot.into(), &[7; 100]).unwrap();
        let lent = s.lend(1, 100).expect("lend");
        assert_eq!(lent.to_vec(), vec![7; 100]);
        assert_eq!(s.lend(1, 100).unwrap_err(), ShmError::NoSlot(1));
        assert_eq!(s.release(1), None, "the slot left the request");
        assert_eq!(s.assign(2, 10), None, "the only slot is lent");
        drop(lent);
        assert_eq!(s.assign(2, 10), Some(slot));
        // A length over the slot is refused, and the slot is free again.
        assert_eq!(s.lend(2, 4097).unwrap_err(), ShmError::BadLength(4097));
        assert_eq!(s.assign(3, 10), Some(slot));
    }
}
