//! Holding back the end of a stream. A restore feeds the dump to `pg_restore --single-transaction`
//! while it is still reading it, and only knows whether the dump's sha256 matches at the very end.
//! Keeping the last bytes back until then means pg_restore never has its whole input before the
//! check passed: on a mismatch it is killed mid-read and its transaction never commits.

use bytes::{Bytes, BytesMut};

/// How much of a restore's input is held back until its sha256 is known.
pub const HELD_BACK: usize = 64 * 1024;

/// Passes a stream through, always keeping its last `keep` bytes.
#[derive(Debug)]
pub struct HeldTail {
    keep: usize,
    held: BytesMut,
}

impl HeldTail {
    pub fn new(keep: usize) -> HeldTail {
        HeldTail {
            keep,
            held: BytesMut::with_capacity(keep),
        }
    }

    /// Takes the next chunk; returns what may be passed on now (possibly nothing).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        let release = self.held.len().saturating_sub(self.keep);
        self.held.split_to(release).freeze()
    }

    /// The end of the stream, released once the stream is known to be good.
    pub fn finish(self) -> Bytes {
        self.held.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_bytes_are_held_back_until_the_end_whatever_the_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for chunk_size in [1, 7, 100, 999, 1000, 4096, 10_000] {
            let mut tail = HeldTail::new(1000);
            let mut passed = Vec::new();
            for chunk in data.chunks(chunk_size) {
                passed.extend_from_slice(&tail.push(chunk));
                assert!(passed.len() + 1000 <= data.len().max(1000), "{chunk_size}");
            }
            assert_eq!(passed.len(), data.len() - 1000, "chunks of {chunk_size}");
            passed.extend_from_slice(&tail.finish());
            assert_eq!(passed, data, "chunks of {chunk_size}");
        }
    }

    #[test]
    fn a_stream_shorter_than_the_tail_is_held_back_whole() {
        let mut tail = HeldTail::new(HELD_BACK);
        assert!(tail.push(b"small dump").is_empty());
        assert!(tail.push(&[0; 1000]).is_empty());
        assert_eq!(tail.finish().len(), 1010);
    }
}
