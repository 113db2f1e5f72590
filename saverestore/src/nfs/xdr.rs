//! XDR (RFC 4506) encoding and decoding of the few types NFSv3 needs: big-endian u32/u64,
//! variable opaque data and strings padded to 4 bytes. Decoding checks every length against
//! the bytes present before slicing.

/// Builds an XDR message.
#[derive(Debug, Default)]
pub struct XdrOut(pub Vec<u8>);

impl XdrOut {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn opaque(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self.0.resize(self.0.len() + (4 - b.len() % 4) % 4, 0);
        self
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }
}

/// Error: the message is shorter than its fields say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("XDR message too short")]
pub struct Short;

/// Reads an XDR message.
#[derive(Debug)]
pub struct XdrIn<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> XdrIn<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        XdrIn { b, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(Short)?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn bool(&mut self) -> Result<bool, Short> {
        Ok(self.u32()? != 0)
    }
    pub fn opaque(&mut self) -> Result<&'a [u8], Short> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        self.take((4 - n % 4) % 4)?;
        Ok(s)
    }
    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn skip(&mut self, n: usize) -> Result<(), Short> {
        self.take(n).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let mut o = XdrOut::default();
        o.u32(7).u64(1 << 40).string("abcde").opaque(&[]);
        assert_eq!(o.0.len(), 4 + 8 + 4 + 8 + 4);
        let mut i = XdrIn::new(&o.0);
        assert_eq!(i.u32(), Ok(7));
        assert_eq!(i.u64(), Ok(1 << 40));
        assert_eq!(i.opaque(), Ok(&b"abcde"[..]));
        assert_eq!(i.opaque(), Ok(&b""[..]));
        assert_eq!(i.u32(), Err(Short));
        let mut i = XdrIn::new(&[0, 0, 1, 0, 1]);
        assert_eq!(i.opaque(), Err(Short));
    }
}
