//! A tiny length-prefixed binary record encoding for redb values.
//!
//! Records are versionless byte strings whose layout is owned by [`super::records`]; a schema
//! change bumps [`super::SCHEMA_VERSION`] and adds a migration. Decoding never panics: a short
//! or malformed value is a [`super::StoreError::Corrupt`].

use super::StoreError;

#[derive(Default)]
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A length-prefixed (u32) byte string.
    pub(crate) fn bytes(mut self, v: &[u8]) -> Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&v[..len as usize]);
        self
    }
    pub(crate) fn done(self) -> Vec<u8> {
        self.0
    }
}

pub(crate) struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self(buf)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("record too short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    /// Whether every byte has been read (fields appended by a later schema are absent from
    /// older records).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| StoreError::Corrupt("string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let buf = Enc::default().u8(7).u32(9).u64(u64::MAX).bytes(b"hi").done();
        let mut d = Dec::new(&buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 9);
        assert_eq!(d.u64().unwrap(), u64::MAX);
        assert_eq!(d.bytes().unwrap(), b"hi");
        assert!(matches!(d.u8(), Err(StoreError::Corrupt(_))));
        let mut short = Dec::new(&buf[..buf.len() - 1]);
        short.u8().unwrap();
        short.u32().unwrap();
        short.u64().unwrap();
        assert!(short.bytes().is_err());
    }
}
