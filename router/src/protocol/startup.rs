//! The untyped first message of a connection: startup, SSLRequest, GSSENCRequest or CancelRequest.

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{MAX_LOGIN_MESSAGE, ProtocolError, checked_length, read_cstr, read_exactly};

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Params(Vec<(String, String)>),
}

impl Startup {
    pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len) as i64;
    let body_len = checked_length(len, 4, MAX_LOGIN_MESSAGE)?;
    if body_len < 4 {
        return Err(ProtocolError::BadLength(len));
    }
    let mut body = Vec::new();
    read_exactly(r, body_len, &mut body).await?;
    let mut cursor: &[u8] = &body;
    let code = cursor.get_i32();
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST if cursor.len() == 8 => Ok(Startup::Cancel {
            pid: cursor.get_i32(),
            key: cursor.get_i32(),
        }),
        PROTOCOL_3_0 => Ok(Startup::Params(parse_startup_body(&mut cursor)?)),
        _ => Err(ProtocolError::Malformed {
            what: "startup packet (unsupported protocol version)",
        }),
    }
}

/// `name\0value\0 ... \0`
pub fn parse_startup_body(buf: &mut &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = read_cstr(buf, "startup parameter")?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = read_cstr(buf, "startup parameter value")?;
        params.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[tokio::test]
    async fn parses_each_kind() {
        let mut r: &[u8] = &packet(SSL_REQUEST, b"");
        assert_eq!(read_startup(&mut r).await.ok(), Some(Startup::Ssl));
        let mut r: &[u8] = &packet(GSSENC_REQUEST, b"");
        assert_eq!(read_startup(&mut r).await.ok(), Some(Startup::GssEnc));
        let mut r: &[u8] = &packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            read_startup(&mut r).await.ok(),
            Some(Startup::Cancel { pid: 7, key: 9 })
        );
        let mut r: &[u8] = &packet(PROTOCOL_3_0, b"user\0bob\0database\0acme\0\0");
        let Ok(Startup::Params(p)) = read_startup(&mut r).await else {
            panic!("params")
        };
        assert_eq!(Startup::param(&p, "database"), Some("acme"));
        assert_eq!(Startup::param(&p, "user"), Some("bob"));
    }

    #[tokio::test]
    async fn rejects_bad_packets() {
        let mut r: &[u8] = &packet(PROTOCOL_3_0, b"user\0bob");
        assert!(read_startup(&mut r).await.is_err(), "unterminated");
        let mut r: &[u8] = &packet(12345, b"");
        assert!(read_startup(&mut r).await.is_err(), "unknown version");
        let mut r: &[u8] = &[0, 1, 0, 0, 0, 3, 0, 0];
        assert!(
            matches!(
                read_startup(&mut r).await,
                Err(ProtocolError::TooLarge { .. })
            ),
            "oversized"
        );
        let mut r: &[u8] = &[0, 0, 0, 7, 0, 0, 0];
        assert!(
            matches!(read_startup(&mut r).await, Err(ProtocolError::BadLength(7))),
            "too short for a code"
        );
    }
}
