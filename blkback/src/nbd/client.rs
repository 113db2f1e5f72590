//! A minimal blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple or structured replies,
//! one request at a time (or several with [`Client::send`] / [`Client::recv`]). It exists
//! to test the server (error codes, pipelining, crash recovery) and for small tools; real
//! workloads use qemu or libnbd.

use std::io::{self, Read, Write};

use super::wire::*;

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection I/O")]
    Io(#[from] io::Error),
    #[error("server sent something unexpected: {0}")]
    Protocol(String),
    #[error("server refused option {option} with reply {reply:#x}")]
    OptionRefused { option: u32, reply: u32 },
    #[error("server replied with NBD error {0}")]
    Errno(u32),
}

/// One reply: the cookie, the NBD error (0 = success) and any read data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    pub size: u64,
    pub flags: u16,
    structured: bool,
    next_cookie: u64,
}

fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Read one option reply: (option, reply type, data).
///
/// # Errors
/// I/O errors or a bad magic.
pub fn read_option_reply<S: Read>(s: &mut S) -> Result<(u32, u32, Vec<u8>), ClientError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if u64::from_be_bytes(h[0..8].try_into().expect("8")) != OPT_REPLY_MAGIC {
        return Err(ClientError::Protocol("bad option reply magic".into()));
    }
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    if len > MAX_OPTION_LEN {
        return Err(ClientError::Protocol("option reply too long".into()));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    Ok((opt, kind, data))
}

/// Read the greeting and send client flags; the stream is then in the option phase.
///
/// # Errors
/// I/O errors or a server that is not fixed newstyle.
pub fn start_handshake<S: Read + Write>(s: &mut S) -> Result<(), ClientError> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if g[..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(ClientError::Protocol("not a fixed newstyle server".into()));
    }
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
    Ok(())
}

/// Send a raw option and collect replies until a final one (anything but INFO/SERVER/
/// META_CONTEXT). Returns all replies, the final last.
///
/// # Errors
/// I/O or protocol errors.
pub fn option<S: Read + Write>(
    s: &mut S,
    opt: u32,
    data: &[u8],
) -> Result<Vec<(u32, Vec<u8>)>, ClientError> {
    send_option(s, opt, data)?;
    let mut out = Vec::new();
    loop {
        let (_, kind, d) = read_option_reply(s)?;
        let last = !matches!(kind, REP_INFO | REP_SERVER | REP_META_CONTEXT);
        out.push((kind, d));
        if last {
            return Ok(out);
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// Handshake with `NBD_OPT_GO` for `export`, optionally negotiating structured replies.
    ///
    /// # Errors
    /// [`ClientError::OptionRefused`] for an unknown export; I/O and protocol errors.
    pub fn connect(mut stream: S, export: &str, structured: bool) -> Result<Self, ClientError> {
        start_handshake(&mut stream)?;
        if structured {
            let r = option(&mut stream, OPT_STRUCTURED_REPLY, &[])?;
            let kind = r.last().map(|x| x.0).unwrap_or(0);
            if kind != REP_ACK {
                return Err(ClientError::OptionRefused {
                    option: OPT_STRUCTURED_REPLY,
                    reply: kind,
                });
            }
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let replies = option(&mut stream, OPT_GO, &d)?;
        let (mut size, mut flags) = (None, 0);
        for (kind, data) in &replies {
            match *kind {
                REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO | REP_ACK => {}
                other => {
                    return Err(ClientError::OptionRefused {
                        option: OPT_GO,
                        reply: other,
                    })
                }
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT".into()))?;
        Ok(Self {
            stream,
            size,
            flags,
            structured,
            next_cookie: 1,
        })
    }

    /// Send one request (with `data` for WRITE); returns its cookie.
    ///
    /// # Errors
    /// I/O errors.
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        let mut b = encode_request(&h).to_vec();
        b.extend_from_slice(data);
        self.stream.write_all(&b)?;
        Ok(cookie)
    }

    /// Receive one complete reply (for structured replies: all chunks up to DONE; read data
    /// is assembled by offset relative to the smallest offset seen).
    ///
    /// # Errors
    /// I/O and protocol errors.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        let magic = read_u32(&mut self.stream)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(&mut self.stream)?;
                let mut c = [0u8; 8];
                self.stream.read_exact(&mut c)?;
                Ok(Reply {
                    cookie: u64::from_be_bytes(c),
                    error,
                    data: Vec::new(),
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut data = Vec::new();
                let mut error = 0;
                let mut magic = magic;
                loop {
                    if magic != STRUCTURED_REPLY_MAGIC {
                        return Err(ClientError::Protocol("bad chunk magic".into()));
                    }
                    let mut h = [0u8; 16];
                    self.stream.read_exact(&mut h)?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let kind = u16::from_be_bytes([h[2], h[3]]);
                    let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                    let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
                    if len > MAX_PAYLOAD + 64 {
                        return Err(ClientError::Protocol("chunk too long".into()));
                    }
                    let mut p = vec![0u8; len as usize];
                    self.stream.read_exact(&mut p)?;
                    match kind {
                        CHUNK_OFFSET_DATA if p.len() >= 8 => data.extend_from_slice(&p[8..]),
                        CHUNK_ERROR if p.len() >= 4 => {
                            error = u32::from_be_bytes(p[..4].try_into().expect("4"))
                        }
                        _ => data.extend_from_slice(&p),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(Reply {
                            cookie,
                            error,
                            data,
                        });
                    }
                    magic = read_u32(&mut self.stream)?;
                }
            }
            other => Err(ClientError::Protocol(format!("bad reply magic {other:#x}"))),
        }
    }

    /// Read the data that follows a successful simple READ reply.
    fn read_payload(&mut self, len: u32) -> Result<Vec<u8>, ClientError> {
        let mut d = vec![0u8; len as usize];
        self.stream.read_exact(&mut d)?;
        Ok(d)
    }

    fn check(r: Reply) -> Result<Reply, ClientError> {
        if r.error != 0 {
            return Err(ClientError::Errno(r.error));
        }
        Ok(r)
    }

    /// Read `len` bytes at `offset`.
    ///
    /// # Errors
    /// [`ClientError::Errno`] with the server's error.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.send(CMD_READ, 0, offset, len, &[])?;
        let r = self.recv()?;
        if self.structured {
            return Ok(Self::check(r)?.data);
        }
        Self::check(r)?;
        self.read_payload(len)
    }

    /// Write `data` at `offset`.
    ///
    /// # Errors
    /// [`ClientError::Errno`] with the server's error.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.send(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        Self::check(self.recv()?).map(|_| ())
    }

    /// Flush.
    ///
    /// # Errors
    /// [`ClientError::Errno`] with the server's error.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        Self::check(self.recv()?).map(|_| ())
    }

    /// Send a command without payload and return the server's error code (0 = success).
    ///
    /// # Errors
    /// I/O and protocol errors.
    pub fn command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<u32, ClientError> {
        self.send(command, flags, offset, len, &[])?;
        let r = self.recv()?;
        if r.error == 0 && command == CMD_READ && !self.structured {
            self.read_payload(len)?;
        }
        Ok(r.error)
    }

    /// Send NBD_CMD_DISC and give back the stream.
    ///
    /// # Errors
    /// I/O errors.
    pub fn disconnect(mut self) -> Result<S, ClientError> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        Ok(self.stream)
    }
}
