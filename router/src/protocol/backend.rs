//! Messages the router writes to clients, and the few it reads from clients and servers.

use bytes::{BufMut, BytesMut};

use super::{Frame, ProtocolError, read_cstr};

pub fn authentication(code: i32, data: &[u8]) -> Frame {
    let mut body = BytesMut::with_capacity(4 + data.len());
    body.put_i32(code);
    body.put_slice(data);
    Frame::new(b'R', &body)
}

pub fn authentication_ok() -> Frame {
    authentication(0, b"")
}

pub fn authentication_sasl() -> Frame {
    authentication(10, b"SCRAM-SHA-256\0\0")
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut body = BytesMut::new();
    body.put_slice(name.as_bytes());
    body.put_u8(0);
    body.put_slice(value.as_bytes());
    body.put_u8(0);
    Frame::new(b'S', &body)
}

pub fn backend_key_data(pid: i32, key: i32) -> Frame {
    let mut body = BytesMut::new();
    body.put_i32(pid);
    body.put_i32(key);
    Frame::new(b'K', &body)
}

pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(b'Z', &[status])
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: &str, code: &str, message: &str) -> Frame {
    let mut body = BytesMut::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.put_u8(field);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    Frame::new(b'E', &body)
}

/// SASLInitialResponse: mechanism and the client-first message.
pub fn parse_sasl_initial_response(frame: &Frame) -> Result<(String, Vec<u8>), ProtocolError> {
    if frame.tag != b'p' {
        return Err(ProtocolError::Unexpected {
            got: frame.tag as char,
            during: "SASL authentication",
        });
    }
    let mut body = frame.body();
    let mechanism = read_cstr(&mut body, "SASLInitialResponse")?;
    if body.len() < 4 {
        return Err(ProtocolError::Malformed {
            what: "SASLInitialResponse",
        });
    }
    let len = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let data = &body[4..];
    if len < 0 || len as usize != data.len() {
        return Err(ProtocolError::Malformed {
            what: "SASLInitialResponse length",
        });
    }
    Ok((mechanism, data.to_vec()))
}

/// The transaction status of a ReadyForQuery frame: `I` idle, `T` in a transaction, `E` failed.
pub fn ready_status(frame: &Frame) -> Option<u8> {
    (frame.tag == b'Z')
        .then(|| frame.body().first().copied())
        .flatten()
}

/// The SQLSTATE and message of an ErrorResponse.
pub fn error_fields(frame: &Frame) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut body = frame.body();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        body = rest;
        let Ok(value) = read_cstr(&mut body, "error field") else {
            break;
        };
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips() {
        let f = error_response("FATAL", "3D000", "tenant \"x\" does not exist");
        assert_eq!(
            error_fields(&f),
            (
                "3D000".to_string(),
                "tenant \"x\" does not exist".to_string()
            )
        );
    }

    #[test]
    fn sasl_initial_response_is_checked() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&5i32.to_be_bytes());
        body.extend_from_slice(b"n,,n=");
        let f = Frame::new(b'p', &body);
        let (m, data) = parse_sasl_initial_response(&f).unwrap_or_default();
        assert_eq!(
            (m.as_str(), data.as_slice()),
            ("SCRAM-SHA-256", &b"n,,n="[..])
        );
        let mut bad = b"SCRAM-SHA-256\0".to_vec();
        bad.extend_from_slice(&99i32.to_be_bytes());
        assert!(parse_sasl_initial_response(&Frame::new(b'p', &bad)).is_err());
        assert!(parse_sasl_initial_response(&Frame::new(b'Q', &body)).is_err());
    }

    #[test]
    fn ready_status_reads_the_byte() {
        assert_eq!(ready_status(&ready_for_query(b'T')), Some(b'T'));
        assert_eq!(ready_status(&Frame::new(b'Z', b"")), None);
        assert_eq!(ready_status(&Frame::new(b'C', b"I")), None);
    }
}
