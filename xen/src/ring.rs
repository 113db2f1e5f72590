//! Xen shared rings (`io/ring.h`): one generic back ring and the matching front ring.
//!
//! ```text
//!           shared page(s)                         private state
//!  +---------------------------------+     back:  req_cons, rsp_prod_pvt
//!  | req_prod  req_event             |     front: req_prod_pvt, rsp_cons
//!  | rsp_prod  rsp_event   pad       |
//!  +---------------------------------+ 64
//!  | entry 0 | entry 1 | ... | n-1   |  entry = union(request, response)
//!  +---------------------------------+
//! ```
//!
//! Indices are free-running u32 counters; slot = index & (n - 1). Ordering rules, as in
//! Xen: the consumer reads `req_prod` with acquire ordering (read barrier) before touching
//! entries, and copies each entry out of shared memory before validating it; the producer
//! writes entries, then publishes its producer index with release ordering (write barrier);
//! a full barrier separates publishing from reading the peer's `*_event` hold-off index.
//! The back end never trusts the front end: an index that claims more than `n` outstanding
//! requests is reported as [`RingError::Overflow`].

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;

use crate::abi::ring::{ring_size, ENTRIES, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD};
use crate::mapping::Mapping;

/// Plain data that may live in a shared ring: `repr(C)`, `Copy`, every bit pattern valid.
///
/// # Safety
/// Implementors must have no padding-sensitive invariants, no pointers or references, and
/// accept any byte pattern a hostile peer writes.
pub unsafe trait RingEntry: Copy + 'static {}

// SAFETY: all are repr(C) structs of integers (and integer arrays); any bits are valid.
unsafe impl RingEntry for crate::abi::blkif::Request {}
// SAFETY: as above.
unsafe impl RingEntry for crate::abi::blkif::Response {}
// SAFETY: as above.
unsafe impl RingEntry for crate::abi::blkif::Request32 {}
// SAFETY: as above.
unsafe impl RingEntry for crate::abi::blkif::Response32 {}
// SAFETY: as above.
unsafe impl RingEntry for crate::abi::vm_event::VmEvent {}
// SAFETY: a plain integer.
unsafe impl RingEntry for u64 {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("ring of {bytes} bytes holds no {entry}-byte entry")]
    TooSmall { bytes: usize, entry: usize },
    #[error("peer claims {claimed} outstanding entries on a ring of {size}")]
    Overflow { claimed: u32, size: u32 },
}

/// Shared header and entry area over a mapping.
#[derive(Debug)]
struct Shared {
    map: Arc<Mapping>,
    size: u32,
    entry: usize,
}

impl Shared {
    fn new(map: Arc<Mapping>, entry: usize) -> Result<Self, RingError> {
        let size = ring_size(map.len(), entry);
        if size == 0 {
            return Err(RingError::TooSmall {
                bytes: map.len(),
                entry,
            });
        }
        Ok(Shared { map, size, entry })
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset <= RSP_EVENT);
        // SAFETY: the mapping is at least one page (ring_size > 0 implies len > 64), page
        // aligned so the u32 header fields are 4-byte aligned, and lives as long as `self`.
        // Xen peers access these words concurrently, which is what AtomicU32 is for.
        unsafe { &*(self.map.as_ptr().wrapping_add(offset) as *const AtomicU32) }
    }

    fn slot_ptr(&self, idx: u32) -> *mut u8 {
        let slot = (idx & (self.size - 1)) as usize;
        // SAFETY: slot < size and ENTRIES + size * entry <= map.len() by ring_size(), so the
        // offset stays inside the mapping.
        unsafe { self.map.as_ptr().add(ENTRIES + slot * self.entry) }
    }

    fn read_entry<T: RingEntry>(&self, idx: u32) -> T {
        let p = self.slot_ptr(idx) as *const T;
        // SAFETY: the slot is inside the mapping and `entry >= size_of::<T>()`; T is
        // RingEntry so any bytes are a valid T; read_unaligned copies it out of shared memory
        // once, so later validation sees a stable value.
        unsafe { std::ptr::read_unaligned(p) }
    }

    fn write_entry<T: RingEntry>(&self, idx: u32, value: T) {
        let p = self.slot_ptr(idx) as *mut T;
        // SAFETY: the slot is inside the writable mapping and large enough for T.
        unsafe { std::ptr::write_unaligned(p, value) }
    }
}

fn entry_size<A, B>() -> usize {
    std::mem::size_of::<A>().max(std::mem::size_of::<B>())
}

/// The back end of a ring: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<Req: RingEntry, Rsp: RingEntry> {
    shared: Shared,
    req_cons: u32,
    rsp_prod_pvt: u32,
    _t: PhantomData<(Req, Rsp)>,
}

impl<Req: RingEntry, Rsp: RingEntry> BackRing<Req, Rsp> {
    /// `BACK_RING_INIT` over a ring the front end initialised.
    ///
    /// # Errors
    /// `TooSmall` when the mapping cannot hold one entry.
    pub fn new(map: Arc<Mapping>) -> Result<Self, RingError> {
        let shared = Shared::new(map, entry_size::<Req, Rsp>())?;
        Ok(BackRing {
            shared,
            req_cons: 0,
            rsp_prod_pvt: 0,
            _t: PhantomData,
        })
    }

    /// Attach to a live ring after a backend restart: everything up to the published
    /// `rsp_prod` was answered; requests from there to `req_prod` are replayed.
    ///
    /// # Errors
    /// `TooSmall` when the mapping cannot hold one entry.
    pub fn attach(map: Arc<Mapping>) -> Result<Self, RingError> {
        let mut ring = Self::new(map)?;
        let rsp_prod = ring.shared.index(RSP_PROD).load(Ordering::Acquire);
        ring.req_cons = rsp_prod;
        ring.rsp_prod_pvt = rsp_prod;
        Ok(ring)
    }

    /// Number of entries in the ring.
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Requests consumed but not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Requests the front end published that we have not consumed.
    ///
    /// # Errors
    /// `Overflow` if the front end's index is impossible.
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let prod = self.shared.index(REQ_PROD).load(Ordering::Acquire);
        let n = prod.wrapping_sub(self.req_cons);
        // Requests in the ring plus responses we still owe can never exceed its size.
        if n.wrapping_add(self.in_flight()) > self.shared.size {
            return Err(RingError::Overflow {
                claimed: n,
                size: self.shared.size,
            });
        }
        Ok(n)
    }

    /// Copy the next request out of the ring, if there is one.
    ///
    /// # Errors
    /// `Overflow` if the front end's index is impossible.
    pub fn next_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.unconsumed()? == 0 {
            return Ok(None);
        }
        let req = self.shared.read_entry::<Req>(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// After [`Self::attach`], when the next unanswered slot holds a response rather than a
    /// request (a backend killed between writing a response and publishing it): count that
    /// slot's request as consumed and its response as queued, so the next
    /// [`Self::publish`] sends it. `is_response` tells the two apart (the backend marks its
    /// responses); it sees the slot read as a response. Returns whether a slot was adopted.
    ///
    /// # Errors
    /// `Overflow` if the front end's index is impossible.
    pub fn adopt_written_response(
        &mut self,
        is_response: impl Fn(&Rsp) -> bool,
    ) -> Result<bool, RingError> {
        if self.req_cons != self.rsp_prod_pvt || self.unconsumed()? == 0 {
            return Ok(false);
        }
        if !is_response(&self.shared.read_entry::<Rsp>(self.req_cons)) {
            return Ok(false);
        }
        self.req_cons = self.req_cons.wrapping_add(1);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(true)
    }

    /// Queue a response (not visible to the front end until [`Self::publish`]).
    pub fn push_response(&mut self, rsp: Rsp) {
        self.shared.write_entry(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish queued responses; true when the
    /// front end asked to be notified.
    pub fn publish(&mut self) -> bool {
        let old = self.shared.index(RSP_PROD).load(Ordering::Relaxed);
        let new = self.rsp_prod_pvt;
        // Release: the entries written above are visible before the new producer index.
        self.shared.index(RSP_PROD).store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.shared.index(RSP_EVENT).load(Ordering::Acquire);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: before sleeping, ask to be notified of the next
    /// request and re-check, so a request published meanwhile is not missed.
    ///
    /// # Errors
    /// `Overflow` if the front end's index is impossible.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.shared
            .index(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }
}

/// The front end of a ring, as a guest driver (or the simulator's guest) uses it.
#[derive(Debug)]
pub struct FrontRing<Req: RingEntry, Rsp: RingEntry> {
    shared: Shared,
    req_prod_pvt: u32,
    rsp_cons: u32,
    _t: PhantomData<(Req, Rsp)>,
}

impl<Req: RingEntry, Rsp: RingEntry> FrontRing<Req, Rsp> {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`: zero the header and take ownership.
    ///
    /// # Errors
    /// `TooSmall` when the mapping cannot hold one entry.
    pub fn init(map: Arc<Mapping>) -> Result<Self, RingError> {
        let shared = Shared::new(map, entry_size::<Req, Rsp>())?;
        shared.index(REQ_PROD).store(0, Ordering::Relaxed);
        shared.index(RSP_PROD).store(0, Ordering::Relaxed);
        shared.index(REQ_EVENT).store(1, Ordering::Relaxed);
        shared.index(RSP_EVENT).store(1, Ordering::Release);
        Ok(FrontRing {
            shared,
            req_prod_pvt: 0,
            rsp_cons: 0,
            _t: PhantomData,
        })
    }

    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Free request slots.
    pub fn free_slots(&self) -> u32 {
        self.shared.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queue a request; false if the ring is full.
    pub fn push_request(&mut self, req: Req) -> bool {
        if self.free_slots() == 0 {
            return false;
        }
        self.shared.write_entry(self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    pub fn publish(&mut self) -> bool {
        let old = self.shared.index(REQ_PROD).load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        self.shared.index(REQ_PROD).store(new, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = self.shared.index(REQ_EVENT).load(Ordering::Acquire);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// The next response, if any.
    pub fn next_response(&mut self) -> Option<Rsp> {
        let prod = self.shared.index(RSP_PROD).load(Ordering::Acquire);
        if prod == self.rsp_cons {
            return None;
        }
        let rsp = self.shared.read_entry::<Rsp>(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(rsp)
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`.
    pub fn final_check_for_responses(&mut self) -> bool {
        let pending = |s: &Self| s.shared.index(RSP_PROD).load(Ordering::Acquire) != s.rsp_cons;
        if pending(self) {
            return true;
        }
        self.shared
            .index(RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        pending(self)
    }

    /// Write a raw request producer index (tests use this to play a hostile front end).
    pub fn force_req_prod(&self, value: u32) {
        self.shared.index(REQ_PROD).store(value, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimHost;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn ring_pair() -> (FrontRing<u64, u64>, BackRing<u64, u64>) {
        let page = Arc::new(SimHost::anonymous_shared_pages(1).unwrap());
        let front = FrontRing::init(page.clone()).unwrap();
        let back = BackRing::new(page).unwrap();
        (front, back)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u64),
        PublishReq,
        Consume,
        Answer,
        PublishRsp,
        Collect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<u64>().prop_map(Op::Push),
            Just(Op::PublishReq),
            Just(Op::Consume),
            Just(Op::Answer),
            Just(Op::PublishRsp),
            Just(Op::Collect),
        ]
    }

    proptest! {
        /// Drive the real back ring against the front ring and a model of FIFO queues:
        /// every published request is consumed once, in order, every response reaches the
        /// front in order, and the ring never reports overflow for a well-behaved front.
        #[test]
        fn back_ring_matches_model(ops in proptest::collection::vec(op(), 1..400)) {
            let (mut front, mut back) = ring_pair();
            let mut queued: VecDeque<u64> = VecDeque::new();      // pushed, not published
            let mut published: VecDeque<u64> = VecDeque::new();   // visible to back
            let mut consumed: VecDeque<u64> = VecDeque::new();    // back owes answers
            let mut answered: VecDeque<u64> = VecDeque::new();    // pushed responses
            let mut visible: VecDeque<u64> = VecDeque::new();     // published responses
            let mut outstanding = 0u32;
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let ok = front.push_request(v);
                        prop_assert_eq!(ok, outstanding < front.size());
                        if ok { queued.push_back(v); outstanding += 1; }
                    }
                    Op::PublishReq => { front.publish(); published.extend(queued.drain(..)); }
                    Op::Consume => {
                        let got = back.next_request().unwrap();
                        prop_assert_eq!(got, published.pop_front());
                        if let Some(v) = got { consumed.push_back(v); }
                    }
                    Op::Answer => {
                        if let Some(v) = consumed.pop_front() {
                            back.push_response(!v);
                            answered.push_back(!v);
                        }
                    }
                    Op::PublishRsp => { back.publish(); visible.extend(answered.drain(..)); }
                    Op::Collect => {
                        let got = front.next_response();
                        prop_assert_eq!(got, visible.pop_front());
                        if got.is_some() { outstanding -= 1; }
                    }
                }
                prop_assert_eq!(back.in_flight() as usize, consumed.len());
            }
        }
    }

    #[test]
    fn notification_hold_off() {
        let (mut front, mut back) = ring_pair();
        // The back end asked for an event at req_cons + 1 = 1.
        assert!(!back.final_check_for_requests().unwrap());
        front.push_request(1);
        assert!(front.publish(), "first request after final check notifies");
        front.push_request(2);
        assert!(
            !front.publish(),
            "back end has not re-armed: no second notification"
        );
        assert_eq!(back.next_request().unwrap(), Some(1));
        assert_eq!(back.next_request().unwrap(), Some(2));
        assert!(!back.final_check_for_requests().unwrap());
        back.push_response(10);
        assert!(back.publish(), "front end armed rsp_event = 1 at init");
    }

    #[test]
    fn hostile_index_is_overflow_not_garbage() {
        let (front, mut back) = ring_pair();
        front.force_req_prod(10_000);
        assert!(matches!(
            back.next_request(),
            Err(RingError::Overflow { .. })
        ));
    }

    #[test]
    fn attach_adopts_a_response_written_but_not_published() {
        let (mut front, mut back) = ring_pair();
        for v in 1..=3 {
            front.push_request(v);
        }
        front.publish();
        assert_eq!(back.next_request().unwrap(), Some(1));
        assert_eq!(back.next_request().unwrap(), Some(2));
        // Killed after writing the answer to 1 (marked by its high bit) before publishing.
        back.push_response(1 | 1 << 63);
        let page = back.shared.map.clone();
        drop(back);
        let mut fresh = BackRing::<u64, u64>::attach(page).unwrap();
        let marked = |r: &u64| r >> 63 == 1;
        assert!(fresh.adopt_written_response(marked).unwrap());
        assert!(
            !fresh.adopt_written_response(marked).unwrap(),
            "2 is a request"
        );
        assert_eq!(fresh.next_request().unwrap(), Some(2));
        assert!(
            !fresh.adopt_written_response(marked).unwrap(),
            "not after consuming"
        );
        fresh.publish();
        assert_eq!(front.next_response(), Some(1 | 1 << 63));
        assert_eq!(fresh.next_request().unwrap(), Some(3));
    }

    #[test]
    fn attach_replays_unanswered_requests() {
        let (mut front, mut back) = ring_pair();
        for v in 1..=3 {
            front.push_request(v);
        }
        front.publish();
        assert_eq!(back.next_request().unwrap(), Some(1));
        back.push_response(100);
        back.publish();
        assert_eq!(back.next_request().unwrap(), Some(2));
        // The backend dies here with request 2 consumed but unanswered.
        let page = back.shared.map.clone();
        drop(back);
        let mut fresh = BackRing::<u64, u64>::attach(page).unwrap();
        assert_eq!(fresh.next_request().unwrap(), Some(2));
        assert_eq!(fresh.next_request().unwrap(), Some(3));
        assert_eq!(fresh.next_request().unwrap(), None);
    }
}
