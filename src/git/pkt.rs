//! Git's pkt-line framing (`gitprotocol-common(5)`): four hex digits of length (including
//! themselves) then the payload; `0000` is a flush. Side-band-64k multiplexes a response into
//! band 1 (data), 2 (progress, shown as `remote:` lines) and 3 (fatal error).

use super::GitError;

/// The flush packet.
pub const FLUSH: &[u8] = b"0000";
/// Largest pkt-line, length prefix included.
pub const MAX_PKT: usize = 65520;
/// Largest side-band payload (one byte of the packet is the band).
const MAX_BAND_DATA: usize = MAX_PKT - 5;

/// One packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    Flush,
    /// `0001` and `0002` (protocol v2 delimiters); not expected on receive-pack but tolerated.
    Special(u8),
    Data(Vec<u8>),
}

/// Encodes one data packet. `payload` must fit in a packet.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() + 4 <= MAX_PKT);
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes `data` on side band `band` (side-band-64k), split into as many packets as it takes.
pub fn sideband(band: u8, data: &[u8]) -> Vec<u8> {
    sideband_max(band, data, MAX_BAND_DATA)
}

/// Like [`sideband`] with at most `max` bytes of data per packet (995 for plain `side-band`).
pub fn sideband_max(band: u8, data: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    for chunk in data.chunks(max.clamp(1, MAX_BAND_DATA)) {
        let mut p = Vec::with_capacity(chunk.len() + 1);
        p.push(band);
        p.extend_from_slice(chunk);
        out.extend_from_slice(&encode(&p));
    }
    out
}

/// An incremental parser: feed bytes with [`Parser::push`], take packets with [`Parser::next`].
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet parsed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete packet, `None` when more bytes are needed.
    pub fn next_pkt(&mut self) -> Result<Option<Pkt>, GitError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = std::str::from_utf8(&self.buf[..4])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| GitError::Protocol("bad pkt-line length".into()))?;
        let pkt = match len {
            0 => {
                self.buf.drain(..4);
                Pkt::Flush
            }
            1..=3 => {
                self.buf.drain(..4);
                Pkt::Special(len as u8)
            }
            n if n > MAX_PKT => {
                return Err(GitError::Protocol(format!("pkt-line of {n} bytes")));
            }
            n if self.buf.len() < n => return Ok(None),
            n => {
                let data = self.buf[4..n].to_vec();
                self.buf.drain(..n);
                Pkt::Data(data)
            }
        };
        Ok(Some(pkt))
    }
}

/// Parses a whole buffer of packets.
pub fn parse_all(bytes: &[u8]) -> Result<Vec<Pkt>, GitError> {
    let mut p = Parser::default();
    p.push(bytes);
    let mut out = Vec::new();
    while let Some(pkt) = p.next_pkt()? {
        out.push(pkt);
    }
    if p.pending() > 0 {
        return Err(GitError::Protocol("truncated pkt-line".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_parses_round_trip() {
        let mut bytes = encode(b"unpack ok\n");
        bytes.extend_from_slice(FLUSH);
        assert_eq!(&bytes[..4], b"000e");
        let pkts = parse_all(&bytes).unwrap();
        assert_eq!(pkts, vec![Pkt::Data(b"unpack ok\n".to_vec()), Pkt::Flush]);
    }

    #[test]
    fn parses_incrementally() {
        let bytes = [encode(b"hello"), FLUSH.to_vec()].concat();
        let mut p = Parser::default();
        for b in &bytes[..6] {
            p.push(&[*b]);
        }
        assert_eq!(p.next_pkt().unwrap(), None);
        p.push(&bytes[6..]);
        assert_eq!(p.next_pkt().unwrap(), Some(Pkt::Data(b"hello".to_vec())));
        assert_eq!(p.next_pkt().unwrap(), Some(Pkt::Flush));
    }

    #[test]
    fn sideband_splits_large_data() {
        let data = vec![b'x'; MAX_BAND_DATA * 2 + 3];
        let pkts = parse_all(&sideband(2, &data)).unwrap();
        assert_eq!(pkts.len(), 3);
        for p in pkts {
            match p {
                Pkt::Data(d) => assert_eq!(d[0], 2),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_all(b"zzzz").is_err());
        assert!(parse_all(b"ffff").is_err());
        assert!(parse_all(b"0009ab").is_err());
    }
}
