//! The PostgreSQL v3 wire protocol, as far as the router needs to understand it. Everything else is
//! relayed as opaque frames (`type byte, i32 length, body`), never re-encoded.

pub mod backend;
pub mod startup;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame the router accepts from anyone (PostgreSQL's own limit for most messages is 1 GB;
/// a router has no business buffering that much).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Largest message read before a client has logged in: startup packets (PostgreSQL's own limit,
/// 10,000 bytes) and SASL messages (a few hundred bytes for SCRAM). Whoever has not proved a
/// password gets no more of the router's memory than this per connection.
pub const MAX_LOGIN_MESSAGE: usize = 10_000;

/// Protocol errors: malformed input is an error for that connection only.
#[derive(thiserror::Error, Debug)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message length {0} is out of range")]
    BadLength(i64),
    #[error("a message of {len} bytes is more than the {max} accepted here")]
    TooLarge { len: i64, max: usize },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("unexpected message {got:?} while {during}")]
    Unexpected { got: char, during: &'static str },
}

/// One regular message: its type byte and its whole encoding (header included), ready to forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The body, after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(body.len() + 5);
        b.put_u8(tag);
        b.put_i32((body.len() + 4) as i32);
        b.put_slice(body);
        Frame {
            tag,
            bytes: b.freeze(),
        }
    }
}

/// Reads one regular message of at most [`MAX_FRAME`] bytes. A clean EOF before the first byte
/// is `Closed`.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtocolError> {
    read_frame_limited(r, MAX_FRAME).await
}

/// Reads one regular message of at most `max` bytes (length header included, as in the header).
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut header[1..]).await?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as i64;
    let body_len = checked_length(len, 4, max)?;
    let mut bytes = header.to_vec();
    read_exactly(r, body_len, &mut bytes).await?;
    Ok(Frame {
        tag: header[0],
        bytes: bytes.into(),
    })
}

/// The body length a length header announces (the header counts itself, `header` bytes), if it
/// is at least `header` and at most `max`.
fn checked_length(len: i64, header: usize, max: usize) -> Result<usize, ProtocolError> {
    if len > max as i64 {
        return Err(ProtocolError::TooLarge { len, max });
    }
    if len < header as i64 {
        return Err(ProtocolError::BadLength(len));
    }
    Ok(len as usize - header)
}

/// Appends exactly `n` bytes from `r` to `buf`. The buffer grows with the bytes that arrive, not
/// with the length a peer announced: a header alone costs nothing.
async fn read_exactly<R: AsyncRead + Unpin>(
    r: &mut R,
    n: usize,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let wanted = buf.len() + n;
    r.take(n as u64).read_to_end(buf).await?;
    if buf.len() < wanted {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// Splits a complete frame out of `buf` if one is there (for decoding from a buffer in tests and fuzzing).
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    let total = checked_length(len, 4, MAX_FRAME)? + 5;
    if buf.len() < total {
        return Ok(None);
    }
    let bytes = buf.split_to(total).freeze();
    Ok(Some(Frame {
        tag: bytes[0],
        bytes,
    }))
}

/// Reads a NUL-terminated string from `buf`.
pub fn read_cstr(buf: &mut &[u8], what: &'static str) -> Result<String, ProtocolError> {
    let end = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(ProtocolError::Malformed { what })?;
    let s = std::str::from_utf8(&buf[..end])
        .map_err(|_| ProtocolError::Malformed { what })?
        .to_string();
    buf.advance(end + 1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let f = Frame::new(b'Q', b"SELECT 1\0");
        let mut r: &[u8] = &f.bytes;
        assert_eq!(read_frame(&mut r).await.ok(), Some(f.clone()));
        assert_eq!(f.body(), b"SELECT 1\0");
    }

    #[tokio::test]
    async fn truncated_and_oversized_frames_are_errors() {
        let f = Frame::new(b'Q', b"SELECT 1\0");
        let mut short: &[u8] = &f.bytes[..7];
        assert!(matches!(
            read_frame(&mut short).await,
            Err(ProtocolError::Io(_))
        ));
        let mut huge: &[u8] = &[b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut huge).await,
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut negative: &[u8] = &[b'Q', 0, 0, 0, 2];
        assert!(matches!(
            read_frame(&mut negative).await,
            Err(ProtocolError::BadLength(2))
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut empty).await,
            Err(ProtocolError::Closed)
        ));
    }

    #[tokio::test]
    async fn login_messages_are_limited() {
        let body = vec![b'x'; MAX_LOGIN_MESSAGE - 4];
        let f = Frame::new(b'p', &body);
        let mut r: &[u8] = &f.bytes;
        let read = read_frame_limited(&mut r, MAX_LOGIN_MESSAGE).await;
        assert_eq!(read.ok(), Some(f), "a message of exactly the limit");

        let f = Frame::new(b'p', &[body.as_slice(), b"x"].concat());
        let mut r: &[u8] = &f.bytes;
        assert!(matches!(
            read_frame_limited(&mut r, MAX_LOGIN_MESSAGE).await,
            Err(ProtocolError::TooLarge { len, max: MAX_LOGIN_MESSAGE }) if len == MAX_LOGIN_MESSAGE as i64 + 1
        ));
        // A header claiming 64 MiB is refused before a byte of its body is awaited.
        let mut r: &[u8] = &[b'p', 4, 0, 0, 0];
        assert!(matches!(
            read_frame_limited(&mut r, MAX_LOGIN_MESSAGE).await,
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn split_frame_waits_for_a_whole_frame() {
        let f = Frame::new(b'Z', b"I");
        let mut buf = BytesMut::from(&f.bytes[..3]);
        assert!(matches!(split_frame(&mut buf), Ok(None)));
        buf.extend_from_slice(&f.bytes[3..]);
        buf.extend_from_slice(&f.bytes);
        assert_eq!(split_frame(&mut buf).ok().flatten(), Some(f.clone()));
        assert_eq!(split_frame(&mut buf).ok().flatten(), Some(f));
        assert!(buf.is_empty());
    }

    /// A bounded property run: arbitrary bytes never panic the decoder, and whatever it returns
    /// is consistent with the length header.
    #[test]
    fn decoder_survives_arbitrary_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random_bool(0.5) && bytes.len() >= 5 {
                let body = (bytes.len() - 1) as i32;
                bytes[1..5].copy_from_slice(&body.to_be_bytes());
            }
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = split_frame(&mut buf) {
                let declared = i32::from_be_bytes([
                    frame.bytes[1],
                    frame.bytes[2],
                    frame.bytes[3],
                    frame.bytes[4],
                ]);
                assert_eq!(frame.bytes.len(), declared as usize + 1);
            }
            let mut cursor: &[u8] = &bytes;
            let _ = startup::parse_startup_body(&mut cursor);
        }
    }
}
