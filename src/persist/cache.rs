//! Keeping files that are written once and not read back out of the page cache.
//!
//! sessiond writes its logs and snapshots to be read at the next start (or, for a Raft
//! snapshot, when a lagging member asks for it), never while it runs: the live state is in
//! memory. Left alone, the kernel keeps every page written in its cache until memory runs
//! short, so a store that writes a 100 MiB snapshot a minute fills the cache with pages nobody
//! reads, pushing out those of the processes beside it (a sidecar's app), and every page it
//! writes is a fresh one to allocate and map in. PostgreSQL drops its WAL from the cache this
//! way, and Redis syncs its rewrites every few MiB ("incremental fsync") for the same reason.
//!
//! Only clean pages can be dropped. A log's pages leave the cache after its fsyncs
//! ([`Behind`]). A snapshot is advised every [`DROP_EVERY`] bytes ([`DropBehind`]): the advice
//! starts the writeback of its dirty pages, as RocksDB's `bytes_per_sync` does, and the next
//! one drops them, without an fsync (and a journal commit) each time; the snapshot is fsynced
//! at its end, as before. It is advice: it can never lose data, and where the kernel ignores
//! it nothing changes but the cache.

use std::fs::File;
use std::io::{self, Write};

/// A snapshot being written is advised out of the cache every this many bytes (Redis syncs
/// its rewrites every 4 MiB).
pub const DROP_EVERY: u64 = 4 << 20;

/// Tells the kernel that `file`'s bytes from `from` to `to` will not be read soon: their clean
/// pages go, and the writeback of dirty ones starts. Advice only: an error is ignored.
pub fn forget(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(from)) {
        let _ = rustix::fs::fadvise(file, from, Some(len), rustix::fs::Advice::DontNeed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

/// An append-only file's drop-behind: what of it is out of the cache. Call
/// [`Behind::synced`] after every fsync.
#[derive(Debug, Default)]
pub struct Behind {
    dropped: u64,
}

/// A log's synced bytes are dropped from the cache once there is at least this much of them.
const DROP_AT_LEAST: u64 = 1 << 20;

impl Behind {
    /// After an fsync of `file` up to `len`: drops the synced bytes from the cache, once there
    /// is at least a MiB of them.
    pub fn synced(&mut self, file: &File, len: u64) {
        if len >= self.dropped + DROP_AT_LEAST {
            forget(file, self.dropped, len);
            // The kernel keeps a page the range ends in: take it next time.
            self.dropped = len & !(PAGE - 1);
        }
    }

    /// The file was replaced by one of `len` bytes, all of them synced.
    pub fn replaced(&mut self, file: &File, len: u64) {
        self.dropped = 0;
        self.synced(file, len);
    }
}

/// The page size the kernel's cache works in, or a divisor of it.
const PAGE: u64 = 4096;

/// A file written front to back and dropped from the cache as it goes, every [`DROP_EVERY`]
/// bytes. Put a `BufWriter` in front of it; [`DropBehind::finish`] fsyncs it.
pub struct DropBehind {
    file: File,
    written: u64,
    /// Where the last advice ended, and where the one before it did.
    advised: u64,
    previous: u64,
}

impl DropBehind {
    /// Writes `file` (a new, empty one) front to back.
    pub fn new(file: File) -> Self {
        DropBehind {
            file,
            written: 0,
            advised: 0,
            previous: 0,
        }
    }

    /// Fsyncs what is written, drops all of it from the cache, and returns the file.
    pub fn finish(self) -> io::Result<File> {
        self.file.sync_all()?;
        forget(&self.file, 0, self.written);
        Ok(self.file)
    }
}

impl Write for DropBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.advised >= DROP_EVERY {
            // On dirty pages the advice starts their writeback; clean ones it drops. The last
            // stretch is advised again next time, by when it has been written back.
            forget(&self.file, self.previous, self.written);
            self.previous = self.advised;
            self.advised = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufWriter, Read, Write};

    use super::*;

    #[test]
    fn what_goes_through_is_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w =
            BufWriter::with_capacity(1 << 16, DropBehind::new(File::create(&path).unwrap()));
        let mut expected = Vec::new();
        for i in 0..(3 * DROP_EVERY / 1000 + 7) {
            let chunk: Vec<u8> = (0..1000).map(|j| (i as usize * 31 + j) as u8).collect();
            w.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        let file = w.into_inner().map_err(|e| e.into_error()).unwrap();
        let mut file = file.finish().unwrap();
        file.write_all(b"after").unwrap();
        expected.extend_from_slice(b"after");
        let mut read = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read.len(), expected.len());
        assert!(
            read == expected,
            "the bytes read back differ from those written"
        );
    }
}
