//! The file format shared by log segments and snapshots.
//!
//! A file is an 8-byte header (6 bytes of magic naming the kind, then a little-endian u16
//! format version) followed by frames. A frame is a little-endian u32 payload length, the
//! CRC32C of the payload as a little-endian u32, and the payload: one protobuf message.
//! Readers refuse a version newer than theirs, so a future format can change anything after
//! the header while old files stay readable by new code.

use std::fs::File;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

/// The format version this build writes and the newest it reads.
pub(crate) const FORMAT_VERSION: u16 = 1;

/// Magic of a log segment.
pub const LOG_MAGIC: &[u8; 6] = b"SDLOG\0";

/// Magic of a snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 6] = b"SDSNP\0";

/// Bytes before the first frame.
pub(crate) const HEADER_BYTES: u64 = 8;

/// Bytes of a frame's length and checksum.
pub(crate) const FRAME_HEADER_BYTES: u64 = 8;

/// No record is this large (a session is capped far below); a bigger length is damage.
pub(crate) const MAX_FRAME_BYTES: u32 = 256 * 1024 * 1024;

/// The size of the buffers `scan` reads payloads into.
const ARENA_BYTES: usize = 4 << 20;

/// A file that cannot be read as far as it should be. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not one of our files, or not the kind expected.
    #[error("{}: not a sessiond {kind} file (bad magic)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What it should have been.
        kind: &'static str,
    },
    /// Written by a newer sessiond.
    #[error("{}: format version {found} is newer than this sessiond reads ({FORMAT_VERSION}); run a newer sessiond or restore a backup", path.display())]
    TooNew {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u16,
    },
    /// A complete frame whose checksum or content is wrong: damage, not a torn write.
    #[error("{}: corrupt record at byte offset {offset}; `sessiond --repair` truncates the log there", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the bad frame starts.
        offset: u64,
    },
}

/// Writes the header of a new file.
pub fn write_header(w: &mut impl Write, magic: &[u8; 6]) -> io::Result<()> {
    w.write_all(magic)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())
}

/// Appends one frame around `payload` to `out`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    frame_with(out, |out| out.extend_from_slice(payload));
}

/// Appends one frame to `out` around the payload `write` appends to it: a record encoded in
/// place, without a buffer of its own.
pub fn frame_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    write(out);
    let payload = &out[start + 8..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
}

/// How a scan of a file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte was a good frame.
    Clean,
    /// The file ends inside a frame (a write cut short by a crash), or in zeros a power loss
    /// left: everything from `offset` on is an incomplete last record. A bad frame counts as
    /// torn only when nothing but zeros follows it.
    Torn {
        /// Where the incomplete frame starts.
        offset: u64,
    },
    /// A frame is damaged at `offset` with more than zeros behind it: a bad checksum or
    /// content, or a length no record has (0, or over [`MAX_FRAME_BYTES`]).
    Corrupt {
        /// Where the bad frame starts.
        offset: u64,
        /// Frames that follow it (counted by their length fields, as far as they go; 0
        /// when its own length is impossible, so where the next starts is unknown).
        frames_after: u64,
    },
}

/// Reads a file's frames in order, handing each payload to `each`, and says how it ended.
/// Only an unreadable file or a bad header is an error here; damage is reported in `End`.
///
/// Payloads are slices of large shared buffers, so the `bytes` fields prost decodes from
/// them (keys, attribute values) are views, not copies: recovery allocates per session only
/// what it must.
pub(crate) fn scan(
    path: &Path,
    magic: &[u8; 6],
    kind: &'static str,
    mut each: impl FnMut(Bytes) -> Result<(), FormatError>,
) -> Result<End, FormatError> {
    let io_err = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER_BYTES as usize];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        // A file cut off inside its header holds no record: a torn creation.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(End::Torn { offset: 0 }),
        Err(e) => return Err(io_err(e)),
    }
    if &header[..6] != magic {
        return Err(FormatError::BadMagic {
            path: path.to_owned(),
            kind,
        });
    }
    let found = u16::from_le_bytes([header[6], header[7]]);
    if found > FORMAT_VERSION {
        return Err(FormatError::TooNew {
            path: path.to_owned(),
            found,
        });
    }
    let mut offset = HEADER_BYTES;
    let mut arena = BytesMut::new();
    loop {
        if offset == len {
            return Ok(End::Clean);
        }
        if offset + FRAME_HEADER_BYTES > len {
            return Ok(End::Torn { offset });
        }
        let mut fh = [0u8; FRAME_HEADER_BYTES as usize];
        r.read_exact(&mut fh).map_err(io_err)?;
        let n = u32::from_le_bytes([fh[0], fh[1], fh[2], fh[3]]);
        let crc = u32::from_le_bytes([fh[4], fh[5], fh[6], fh[7]]);
        let end = offset + FRAME_HEADER_BYTES + u64::from(n);
        if n == 0 || n > MAX_FRAME_BYTES {
            // No record is empty or that large. Zeros to the end of the file are a tail the
            // file system extended but never wrote (power loss); anything else is damage.
            if zeros_to_end(path, offset, len).map_err(io_err)? {
                return Ok(End::Torn { offset });
            }
            return Ok(End::Corrupt {
                offset,
                frames_after: 0,
            });
        }
        if end > len {
            // A length running past the end: the tail of a write cut short.
            return Ok(End::Torn { offset });
        }
        let n = n as usize;
        if arena.capacity() < n {
            arena = BytesMut::with_capacity(n.max(ARENA_BYTES));
        }
        arena.resize(n, 0);
        r.read_exact(&mut arena).map_err(io_err)?;
        let payload = arena.split_to(n).freeze();
        let good = crc32c::crc32c(&payload) == crc;
        if good {
            match each(payload) {
                Ok(()) => {}
                Err(FormatError::Corrupt { .. }) => {
                    return Ok(damaged(&mut r, offset, end, len));
                }
                Err(e) => return Err(e),
            }
        } else if end == len || zeros_to_end(path, end, len).map_err(io_err)? {
            // The very last frame (perhaps followed by zeros the file system extended it
            // with) is complete in length but not in content: the crash hit while its bytes
            // were reaching the disk.
            return Ok(End::Torn { offset });
        } else {
            return Ok(damaged(&mut r, offset, end, len));
        }
        offset = end;
    }
}

/// Whether every byte of `path` from `from` to `len` is zero. Only asked on the way out of a
/// scan that met a bad frame, so it opens the file again rather than disturb the reader.
fn zeros_to_end(path: &Path, from: u64, len: u64) -> io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut r = f.take(len.saturating_sub(from));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(true),
            n if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
            _ => {}
        }
    }
}

/// Counts the frames behind a damaged one, by their length fields, for `--repair`'s report.
fn damaged(r: &mut impl Read, offset: u64, mut at: u64, len: u64) -> End {
    let mut frames_after = 0;
    let mut fh = [0u8; FRAME_HEADER_BYTES as usize];
    while at + FRAME_HEADER_BYTES <= len && r.read_exact(&mut fh).is_ok() {
        let n = u64::from(u32::from_le_bytes([fh[0], fh[1], fh[2], fh[3]]));
        if at + FRAME_HEADER_BYTES + n > len || io::copy(&mut r.take(n), &mut io::sink()).is_err() {
            break;
        }
        at += FRAME_HEADER_BYTES + n;
        frames_after += 1;
    }
    End::Corrupt {
        offset,
        frames_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(frames: &[&[u8]]) -> (tempfile::TempDir, PathBuf, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut bytes = Vec::new();
        write_header(&mut bytes, LOG_MAGIC).unwrap();
        let mut offsets = Vec::new();
        for f in frames {
            offsets.push(bytes.len() as u64);
            frame(f, &mut bytes);
        }
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, offsets)
    }

    fn read_all(path: &Path) -> (Vec<Vec<u8>>, End) {
        let mut got = Vec::new();
        let end = scan(path, LOG_MAGIC, "log", |p| {
            got.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        (got, end)
    }

    #[test]
    fn frames_round_trip() {
        let (_d, path, _) = file_with(&[b"one", b"2", b"three"]);
        let (got, end) = read_all(&path);
        assert_eq!(got, vec![b"one".to_vec(), b"2".to_vec(), b"three".to_vec()]);
        assert_eq!(end, End::Clean);
    }

    #[test]
    fn every_cut_inside_the_last_frame_is_a_torn_tail() {
        let (_d, path, offsets) = file_with(&[b"first", b"second record"]);
        let full = std::fs::read(&path).unwrap();
        for cut in offsets[1] + 1..full.len() as u64 {
            std::fs::write(&path, &full[..cut as usize]).unwrap();
            let (got, end) = read_all(&path);
            assert_eq!(got, vec![b"first".to_vec()], "cut at {cut}");
            assert_eq!(end, End::Torn { offset: offsets[1] }, "cut at {cut}");
        }
    }

    #[test]
    fn a_bit_flip_mid_file_is_corruption_with_its_offset() {
        let (_d, path, offsets) = file_with(&[b"first", b"second", b"third", b"fourth"]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offsets[1] as usize + 9] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (got, end) = read_all(&path);
        assert_eq!(got, vec![b"first".to_vec()]);
        assert_eq!(
            end,
            End::Corrupt {
                offset: offsets[1],
                frames_after: 2
            }
        );
    }

    /// Writes `bytes` over `path` and scans it.
    fn rewrite(path: &Path, bytes: &[u8]) -> (Vec<Vec<u8>>, End) {
        std::fs::write(path, bytes).unwrap();
        read_all(path)
    }

    #[test]
    fn an_impossible_length_mid_file_is_damage_not_a_torn_tail() {
        let (_d, path, offsets) = file_with(&[b"first", b"second", b"third"]);
        let good = std::fs::read(&path).unwrap();
        let at = offsets[1] as usize;
        for n in [0u32, MAX_FRAME_BYTES + 1, u32::MAX] {
            let mut bytes = good.clone();
            bytes[at..at + 4].copy_from_slice(&n.to_le_bytes());
            let (got, end) = rewrite(&path, &bytes);
            assert_eq!(got, vec![b"first".to_vec()], "length {n}");
            assert!(
                matches!(end, End::Corrupt { offset, .. } if offset == offsets[1]),
                "length {n}: {end:?}"
            );
        }
    }

    #[test]
    fn a_bad_checksum_followed_by_whole_frames_is_damage() {
        let (_d, path, offsets) = file_with(&[b"first", b"second", b"third"]);
        let mut bytes = std::fs::read(&path).unwrap();
        // The checksum field of the middle frame.
        bytes[offsets[1] as usize + 4] ^= 0xff;
        let (got, end) = rewrite(&path, &bytes);
        assert_eq!(got, vec![b"first".to_vec()]);
        assert_eq!(
            end,
            End::Corrupt {
                offset: offsets[1],
                frames_after: 1
            }
        );
    }

    #[test]
    fn a_zero_filled_tail_is_torn_wherever_the_zeros_start() {
        let (_d, path, offsets) = file_with(&[b"first", b"second record"]);
        let good = std::fs::read(&path).unwrap();
        // Power loss: the file's length reached the disk, some of its data did not.
        for zeros_from in offsets[1] as usize..good.len() {
            for extra in [0usize, 1, 4096] {
                let mut bytes = good[..zeros_from].to_vec();
                bytes.resize(good.len() + extra, 0);
                let (got, end) = rewrite(&path, &bytes);
                assert_eq!(
                    got,
                    vec![b"first".to_vec()],
                    "zeros from {zeros_from}+{extra}"
                );
                assert_eq!(
                    end,
                    End::Torn { offset: offsets[1] },
                    "zeros from {zeros_from}+{extra}"
                );
            }
        }
        // Zeros after the last whole frame.
        let mut bytes = good.clone();
        bytes.resize(good.len() + 100, 0);
        let (got, end) = rewrite(&path, &bytes);
        assert_eq!(got.len(), 2);
        assert_eq!(
            end,
            End::Torn {
                offset: good.len() as u64
            }
        );
    }

    #[test]
    fn zeros_followed_by_data_are_damage() {
        let (_d, path, offsets) = file_with(&[b"first", b"second", b"third"]);
        let mut bytes = std::fs::read(&path).unwrap();
        let (a, b) = (offsets[1] as usize, offsets[2] as usize);
        bytes[a..b].fill(0);
        let (got, end) = rewrite(&path, &bytes);
        assert_eq!(got, vec![b"first".to_vec()]);
        assert!(
            matches!(end, End::Corrupt { offset, .. } if offset == offsets[1]),
            "{end:?}"
        );
    }

    #[test]
    fn newer_versions_and_foreign_files_are_refused() {
        let (_d, path, _) = file_with(&[b"x"]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[6] = 9;
        std::fs::write(&path, &bytes).unwrap();
        let err = scan(&path, LOG_MAGIC, "log", |_| Ok(())).unwrap_err();
        assert!(matches!(err, FormatError::TooNew { found: 9, .. }), "{err}");
        assert!(err.to_string().contains("version 9"));
        let err = scan(&path, SNAPSHOT_MAGIC, "snapshot", |_| Ok(())).unwrap_err();
        assert!(matches!(err, FormatError::BadMagic { .. }), "{err}");
    }
}
