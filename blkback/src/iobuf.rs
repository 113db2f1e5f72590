//! Reply data on its way to a client socket: bytes the backend owns, or bytes a storage
//! driver lends out of the memory it shares with the failover endpoint ([`Lent`]); and the
//! queue a frontend writes them from with vectored writes ([`OutQueue`]), so that neither a
//! large read nor lent data is copied into one flat buffer before the socket takes it.
//!
//! All `unsafe` of lent memory is in this module. A [`Lent`] is a raw pointer and a length
//! that its maker promises stay readable while the `Lent` lives. That memory is shared with
//! another process, which could write it at any moment, so it is only ever read by raw
//! copies and by the kernel in `writev`, never through a Rust reference.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// Owned frames shorter than this are copied together into one buffer (one iovec for many
/// small replies); longer ones are queued as they are.
const COALESCE_BELOW: usize = 16 << 10;
/// Largest buffer small frames are copied together into.
const COALESCED_MAX: usize = 64 << 10;
/// Most pieces one `writev` takes (well under `IOV_MAX`).
const MAX_IOVECS: usize = 64;

/// Read data lent out of shared memory, given back when dropped.
pub struct Lent {
    ptr: NonNull<u8>,
    len: usize,
    /// Keeps the memory mapped and reserved for this data; dropping it gives it back.
    _hold: Box<dyn Any + Send>,
}

// SAFETY: the pointer is only read, by raw copies and by `writev`, and stays valid while
// `_hold` lives (the contract of `Lent::new`); `_hold` itself is `Send`.
unsafe impl Send for Lent {}

impl Lent {
    /// Data at `ptr..ptr + len`, kept readable by `hold`.
    ///
    /// # Safety
    /// `len` bytes from `ptr` must stay mapped and readable until `hold` is dropped.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, hold: Box<dyn Any + Send>) -> Self {
        Self {
            ptr,
            len,
            _hold: hold,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copy the data into `out`, which must be exactly [`Lent::len`] bytes.
    ///
    /// # Panics
    /// If `out` has another length.
    pub fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.len,
            "lent data copied to a buffer of another size"
        );
        // SAFETY: `len` bytes at `ptr` are readable while `self` lives (`Lent::new`); a raw
        // copy creates no reference to memory another process may write.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), out.as_mut_ptr(), self.len) };
    }

    /// A copy of the data.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }
}

impl fmt::Debug for Lent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lent").field("len", &self.len).finish()
    }
}

/// A run of bytes to send: owned or lent.
#[derive(Debug)]
pub enum Piece {
    Owned(Vec<u8>),
    Lent(Lent),
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Owned(v) => v.len(),
            Piece::Lent(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes as a vector (lent bytes are copied, and given back).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Piece::Owned(v) => v,
            Piece::Lent(l) => l.to_vec(),
        }
    }

    /// The iovec of the bytes from `from` on (`from` at most the length).
    fn iovec(&self, from: usize) -> libc::iovec {
        let (base, len) = match self {
            Piece::Owned(v) => (v.as_ptr(), v.len()),
            Piece::Lent(l) => (l.ptr.as_ptr().cast_const(), l.len),
        };
        libc::iovec {
            iov_base: base.wrapping_add(from).cast_mut().cast(),
            iov_len: len - from,
        }
    }
}

/// One reply: a header (with any owned data after it) and, for a read served from lent
/// memory, the lent data.
#[derive(Debug)]
pub struct Frame {
    pub head: Vec<u8>,
    pub body: Option<Lent>,
}

impl From<Vec<u8>> for Frame {
    fn from(head: Vec<u8>) -> Self {
        Self { head, body: None }
    }
}

impl Frame {
    /// The whole frame in one vector (lent data copied).
    pub fn into_vec(self) -> Vec<u8> {
        let mut v = self.head;
        if let Some(b) = self.body {
            let at = v.len();
            v.resize(at + b.len(), 0);
            b.copy_to(&mut v[at..]);
        }
        v
    }
}

/// Frames waiting for a socket, in order. Small owned frames are copied together; large
/// ones and lent data stay where they are and go out with one `writev` per call.
#[derive(Debug, Default)]
pub struct OutQueue {
    pieces: VecDeque<Piece>,
    /// Bytes of the front piece already written.
    written: usize,
}

impl OutQueue {
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Queue a whole frame after everything queued.
    pub fn push(&mut self, frame: Frame) {
        self.push_owned(frame.head);
        if let Some(body) = frame.body.filter(|b| !b.is_empty()) {
            self.pieces.push_back(Piece::Lent(body));
        }
    }

    fn push_owned(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if bytes.len() < COALESCE_BELOW {
            if let Some(Piece::Owned(last)) = self.pieces.back_mut() {
                if last.len() + bytes.len() <= COALESCED_MAX {
                    last.extend_from_slice(&bytes);
                    return;
                }
            }
        }
        self.pieces.push_back(Piece::Owned(bytes));
    }

    /// Write what `fd` takes of the queue with one `writev`; the bytes written, which
    /// leave the queue (lent pieces are given back as soon as they are written).
    ///
    /// # Errors
    /// The system call's error (`WouldBlock` on a full non-blocking socket).
    pub fn write_to(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        let mut n = 0;
        for (i, p) in self.pieces.iter().take(MAX_IOVECS).enumerate() {
            iov[i] = p.iovec(if i == 0 { self.written } else { 0 });
            n = i + 1;
        }
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: each of the `n` iovecs covers bytes of a piece in `self.pieces`: an owned
        // vector borrowed for this call, or lent memory that stays readable while its
        // `Lent` lives (`Lent::new`); `writev` only reads them, and no Rust reference to
        // lent memory is made.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        self.advance(r);
        Ok(r)
    }

    /// Drop `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.pieces.front() else {
                break;
            };
            let left = front.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.pieces.pop_front();
            self.written = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Lent memory for a test: a leaked buffer, and a count of holds given back.
    fn lent(bytes: &[u8], given_back: &Arc<AtomicUsize>) -> Lent {
        /// The bytes, owned here so they live as long as the hold.
        struct Hold(Arc<AtomicUsize>, #[allow(dead_code)] Box<[u8]>);
        impl Drop for Hold {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut b: Box<[u8]> = bytes.into();
        let ptr = NonNull::new(b.as_mut_ptr()).unwrap();
        // SAFETY: the boxed bytes live in the hold and do not move when it is boxed.
        unsafe { Lent::new(ptr, bytes.len(), Box::new(Hold(given_back.clone(), b))) }
    }

    /// Frames of every kind come out whole and in order through a socket that takes a
    /// few bytes at a time, and lent data is given back once written.
    #[test]
    fn frames_are_written_in_order_across_partial_writes() {
        let given_back = Arc::new(AtomicUsize::new(0));
        let mut expect = Vec::new();
        let mut q = OutQueue::default();
        let mut lents = 0;
        for i in 0..200usize {
            let head: Vec<u8> = (0..[16, 28, 5000, 70_000][i % 4])
                .map(|j| (i * 7 + j) as u8)
                .collect();
            expect.extend_from_slice(&head);
            let body = (i % 3 == 0).then(|| {
                let data: Vec<u8> = (0..4096 * (1 + i % 5)).map(|j| (i + j * 3) as u8).collect();
                expect.extend_from_slice(&data);
                lents += 1;
                lent(&data, &given_back)
            });
            q.push(Frame { head, body });
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1000];
            loop {
                match b.read(&mut chunk).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        while !q.is_empty() {
            match q.write_to(a.as_fd()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "bytes out of order");
        assert_eq!(given_back.load(Ordering::SeqCst), lents);
    }

    #[test]
    fn a_frame_with_lent_data_becomes_one_vector() {
        let given_back = Arc::new(AtomicUsize::new(0));
        let f = Frame {
            head: vec![1, 2, 3],
            body: Some(lent(&[4, 5], &given_back)),
        };
        assert_eq!(f.into_vec(), vec![1, 2, 3, 4, 5]);
        assert_eq!(given_back.load(Ordering::SeqCst), 1);
    }
}
