//! The sealed backup file: a clear header, then the archive encrypted in chunks.
//!
//! ```text
//! ESCALE-BACKUP v1\n
//! {"format":1, "installation_id":..., "created_at":..., "schema_version":..., "salt":..., "key_check":...}\n
//! frame*   frame = u32 BE length ‖ AES-256-GCM(chunk of at most 1 MiB)
//! ```
//!
//! The key is HKDF-SHA256(master key, salt, "escale-backup-v1"): one key per backup. Each
//! chunk's nonce is its index (8 bytes, big endian) ‖ 3 zero bytes ‖ 1 on the last chunk, and
//! its associated data is the header line, so chunks cannot be reordered, dropped, cut off at
//! the end or moved to another backup, and the header cannot be changed. `key_check`
//! (HMAC of a constant under the derived key) tells "another master key" from "damaged"
//! before anything is decrypted.
//!
//! Inside, the archive is a list of entries (no symbolic links, no owners, paths relative and
//! made of plain components only):
//! `'D' u16 len ‖ path ‖ u32 mode`, `'F' u16 len ‖ path ‖ u32 mode ‖ u64 size ‖ bytes`, `'E'`.

use std::io::{self, Read, Write};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::BackupError;
use crate::secrets::MasterKey;

/// The first line of every backup file.
pub const MAGIC: &[u8] = b"ESCALE-BACKUP v1\n";
/// Plaintext bytes per sealed chunk.
const CHUNK: usize = 1 << 20;
/// What the backup key is derived for.
const PURPOSE: &str = "escale-backup-v1";
/// The header line is never longer than this.
pub(crate) const MAX_HEADER: usize = 16 * 1024;

/// The clear header: what a backup is, readable without the key (no secret in it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub installation_id: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The registry's schema version (its newest migration).
    pub schema_version: i64,
    /// The escale version that wrote it.
    pub escale_version: String,
    /// Hex; random per backup.
    pub salt: String,
    /// Hex; HMAC-SHA256(backup key, "key-check").
    pub key_check: String,
}

fn cipher_and_check(key: &MasterKey, salt: &[u8]) -> (Aes256Gcm, String) {
    let k = key.derive(PURPOSE, salt);
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&k).expect("any key length");
    mac.update(b"key-check");
    (
        Aes256Gcm::new_from_slice(&k).expect("32-byte key"),
        hex::encode(mac.finalize().into_bytes()),
    )
}

fn nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Writes a sealed backup to `out`: call [`SealWriter::finish`] at the end (a file without its
/// last chunk does not open).
pub struct SealWriter<W: Write> {
    out: W,
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    buf: Vec<u8>,
    index: u64,
    /// Sealed bytes written so far (header included).
    pub written: u64,
}

impl<W: Write> SealWriter<W> {
    /// Writes the header for `installation_id` and returns the writer of the sealed body.
    pub fn new(
        mut out: W,
        key: &MasterKey,
        installation_id: &str,
        schema_version: i64,
    ) -> io::Result<SealWriter<W>> {
        let mut salt = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let (cipher, key_check) = cipher_and_check(key, &salt);
        let header = Header {
            format: 1,
            installation_id: installation_id.to_string(),
            created_at: crate::registry::now_ms(),
            schema_version,
            escale_version: env!("CARGO_PKG_VERSION").to_string(),
            salt: hex::encode(salt),
            key_check,
        };
        let mut line = serde_json::to_vec(&header).map_err(io::Error::other)?;
        line.push(b'\n');
        out.write_all(MAGIC)?;
        out.write_all(&line)?;
        Ok(SealWriter {
            out,
            cipher,
            written: (MAGIC.len() + line.len()) as u64,
            aad: line,
            buf: Vec::with_capacity(CHUNK),
            index: 0,
        })
    }

    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce(self.index, last)),
                Payload {
                    msg: &self.buf,
                    aad: &self.aad,
                },
            )
            .map_err(|_| io::Error::other("AES-GCM sealing failed"))?;
        self.out.write_all(&(ct.len() as u32).to_be_bytes())?;
        self.out.write_all(&ct)?;
        self.written += 4 + ct.len() as u64;
        self.index += 1;
        self.buf.clear();
        Ok(())
    }

    /// Seals the last chunk and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.seal_chunk(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the clear header of a backup file.
pub fn read_header(input: &mut impl Read) -> Result<(Header, Vec<u8>), BackupError> {
    let mut magic = vec![0u8; MAGIC.len()];
    input
        .read_exact(&mut magic)
        .map_err(|_| BackupError::NotABackup)?;
    if magic != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        input
            .read_exact(&mut byte)
            .map_err(|_| BackupError::NotABackup)?;
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
        if line.len() > MAX_HEADER {
            return Err(BackupError::NotABackup);
        }
    }
    let header: Header = serde_json::from_slice(&line).map_err(|_| BackupError::NotABackup)?;
    if header.format != 1 {
        return Err(BackupError::Damaged(format!(
            "backup format {} is not known to this escale",
            header.format
        )));
    }
    Ok((header, line))
}

/// Reads the archive out of a sealed backup: every chunk is authenticated before a byte of it
/// is returned; a missing last chunk or bytes after it are errors.
pub struct OpenReader<R: Read> {
    input: R,
    cipher: Aes256Gcm,
    aad: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    index: u64,
    done: bool,
}

impl<R: Read> OpenReader<R> {
    /// Reads the header and checks that `key` is the one the backup was sealed with.
    pub fn new(mut input: R, key: &MasterKey) -> Result<(Header, OpenReader<R>), BackupError> {
        let (header, line) = read_header(&mut input)?;
        let salt = hex::decode(&header.salt)
            .map_err(|_| BackupError::Damaged("the header's salt is not hex".into()))?;
        let (cipher, check) = cipher_and_check(key, &salt);
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(check.as_bytes(), header.key_check.as_bytes()).into();
        if !matches {
            return Err(BackupError::WrongKey {
                installation: header.installation_id.clone(),
            });
        }
        Ok((
            header,
            OpenReader {
                input,
                cipher,
                aad: line,
                plain: Vec::new(),
                pos: 0,
                index: 0,
                done: false,
            },
        ))
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the backup is cut short ({e})"),
            )
        })?;
        let len = u32::from_be_bytes(len) as usize;
        if len > CHUNK + 16 {
            return Err(damaged("a chunk is larger than any escale writes"));
        }
        let mut ct = vec![0u8; len];
        self.input
            .read_exact(&mut ct)
            .map_err(|_| damaged("the backup is cut short"))?;
        for last in [false, true] {
            if let Ok(p) = self.cipher.decrypt(
                Nonce::from_slice(&nonce(self.index, last)),
                Payload {
                    msg: &ct,
                    aad: &self.aad,
                },
            ) {
                self.plain = p;
                self.pos = 0;
                self.index += 1;
                if last {
                    self.done = true;
                    let mut extra = [0u8; 1];
                    if self.input.read(&mut extra)? != 0 {
                        return Err(damaged("bytes follow the last chunk"));
                    }
                }
                return Ok(());
            }
        }
        Err(damaged(
            "a chunk does not authenticate (the file was changed or damaged)",
        ))
    }
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.plain.len() - self.pos);
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One archive entry, as read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { path: String, mode: u32 },
    File { path: String, mode: u32, size: u64 },
    End,
}

/// Writes a directory entry.
pub fn write_dir(out: &mut impl Write, path: &str, mode: u32) -> io::Result<()> {
    out.write_all(b"D")?;
    write_path(out, path)?;
    out.write_all(&mode.to_be_bytes())
}

/// Writes a file entry's head; exactly `size` bytes must follow.
pub fn write_file_head(out: &mut impl Write, path: &str, mode: u32, size: u64) -> io::Result<()> {
    out.write_all(b"F")?;
    write_path(out, path)?;
    out.write_all(&mode.to_be_bytes())?;
    out.write_all(&size.to_be_bytes())
}

/// Writes the end mark.
pub fn write_end(out: &mut impl Write) -> io::Result<()> {
    out.write_all(b"E")
}

fn write_path(out: &mut impl Write, path: &str) -> io::Result<()> {
    let len = u16::try_from(path.len()).map_err(|_| io::Error::other("path too long"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(path.as_bytes())
}

/// Reads the next entry's head (a file's bytes follow it).
pub fn read_entry(input: &mut impl Read) -> io::Result<Entry> {
    let mut kind = [0u8; 1];
    input.read_exact(&mut kind)?;
    let read_path = |input: &mut dyn Read| -> io::Result<String> {
        let mut len = [0u8; 2];
        input.read_exact(&mut len)?;
        let mut p = vec![0u8; u16::from_be_bytes(len) as usize];
        input.read_exact(&mut p)?;
        let p = String::from_utf8(p).map_err(|_| damaged("a path is not UTF-8"))?;
        check_path(&p)?;
        Ok(p)
    };
    let u32_of = |input: &mut dyn Read| -> io::Result<u32> {
        let mut b = [0u8; 4];
        input.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    };
    match kind[0] {
        b'D' => {
            let path = read_path(input)?;
            Ok(Entry::Dir {
                path,
                mode: u32_of(input)?,
            })
        }
        b'F' => {
            let path = read_path(input)?;
            let mode = u32_of(input)?;
            let mut b = [0u8; 8];
            input.read_exact(&mut b)?;
            Ok(Entry::File {
                path,
                mode,
                size: u64::from_be_bytes(b),
            })
        }
        b'E' => Ok(Entry::End),
        _ => Err(damaged("unknown archive entry")),
    }
}

/// A path inside the archive: relative, plain components only, under `escale.db` or `git/`.
pub fn check_path(p: &str) -> io::Result<()> {
    let ok = !p.is_empty()
        && !p.starts_with('/')
        && p.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        && (p == "escale.db" || p == "git" || p.starts_with("git/"));
    if ok {
        Ok(())
    } else {
        Err(damaged(&format!(
            "the archive holds a path escale never writes: {}",
            crate::validate::printable(p)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: &MasterKey, body: &[u8]) -> Vec<u8> {
        let mut w = SealWriter::new(Vec::new(), key, "inst1", 7).unwrap();
        w.write_all(body).unwrap();
        w.finish().unwrap()
    }

    fn open_all(key: &MasterKey, file: &[u8]) -> Result<Vec<u8>, String> {
        let (_, mut r) = OpenReader::new(file, key).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn round_trip_over_several_chunks_and_empty() {
        let key = MasterKey::random();
        let body: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        assert_eq!(open_all(&key, &sealed(&key, &body)).unwrap(), body);
        assert_eq!(open_all(&key, &sealed(&key, b"")).unwrap(), b"");
    }

    #[test]
    fn the_body_is_not_in_clear() {
        let key = MasterKey::random();
        let file = sealed(&key, b"canary-secret-1234 canary-secret-1234");
        assert!(!file.windows(14).any(|w| w == b"canary-secret-"));
    }

    #[test]
    fn wrong_key_is_named_before_decrypting() {
        let file = sealed(&MasterKey::random(), b"data");
        let err = open_all(&MasterKey::random(), &file).unwrap_err();
        assert!(err.contains("another master key"), "{err}");
    }

    #[test]
    fn tampering_truncation_and_trailing_bytes_fail() {
        let key = MasterKey::random();
        let body: Vec<u8> = vec![7u8; CHUNK + 10];
        let file = sealed(&key, &body);
        // A flipped byte in the body.
        let mut t = file.clone();
        let n = t.len();
        t[n - 20] ^= 1;
        assert!(open_all(&key, &t).unwrap_err().contains("authenticate"));
        // The last chunk cut off: the first chunk is not marked last.
        let first_len = {
            let (_, line) = read_header(&mut &file[..]).unwrap();
            let at = MAGIC.len() + line.len();
            at + 4 + u32::from_be_bytes(file[at..at + 4].try_into().unwrap()) as usize
        };
        assert!(open_all(&key, &file[..first_len])
            .unwrap_err()
            .contains("cut short"));
        // Bytes after the end.
        let mut t = file.clone();
        t.push(0);
        assert!(open_all(&key, &t).unwrap_err().contains("follow the last"));
        // The header changed (another installation id): no chunk authenticates.
        let pos = file.windows(5).position(|w| w == b"inst1").unwrap();
        let mut t = file.clone();
        t[pos + 4] = b'2';
        assert!(open_all(&key, &t).unwrap_err().contains("authenticate"));
        // Not a backup at all.
        assert!(open_all(&key, b"hello")
            .unwrap_err()
            .contains("not an escale backup"));
    }

    #[test]
    fn paths_outside_the_data_dir_are_refused() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "git/../../x",
            "git//a",
            "master.key",
            "git/./a",
            "x",
        ] {
            assert!(check_path(p).is_err(), "{p:?} accepted");
        }
        for p in ["escale.db", "git", "git/apps/u1.git/HEAD"] {
            assert!(check_path(p).is_ok(), "{p:?} refused");
        }
    }
}
