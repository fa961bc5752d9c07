//! The relay's fast path: what of the bytes a client sent can go to its server as they came.
//! Most reads hold whole frames the router need not rewrite or intercept; those are written on
//! in one piece, straight from the read buffer. A read holding a frame that must be (see [`plan`])
//! takes the slow path, frame by frame.

use std::ops::Range;

use crate::protocol::{MAX_FRAME, ProtocolError};

/// What to do with a client's read buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// How many bytes, from the start of the buffer, go to the server as they are: whole frames,
    /// none of which the router rewrites or intercepts. Zero when the buffer holds no whole frame,
    /// or holds one the router must handle: then it all takes the slow path.
    pub(super) forward: usize,
    /// How many of those frames the server answers with a ReadyForQuery: Sync, Query,
    /// FunctionCall.
    pub(super) syncs: usize,
    /// Where those whose SQL is inspected before they are sent lie: in transaction mode, the
    /// simple Queries (a Parse takes the slow path).
    pub(super) statements: Vec<Range<usize>>,
}

/// How much of `buf` can be forwarded as it is, with `pooled` for transaction mode. A Terminate
/// always takes the slow path (the session ends there); in transaction mode so do Parse, Bind,
/// Describe and Close, whose statement names are the server's own (see
/// [`crate::session::prepared`]).
pub(super) fn plan(buf: &[u8], pooled: bool) -> Result<Plan, ProtocolError> {
    let mut plan = Plan::default();
    let mut end = 0;
    while let Some((tag, len)) = frame_at(buf, end)? {
        match tag {
            b'X' => return Ok(Plan::default()),
            b'P' | b'B' | b'D' | b'C' if pooled => return Ok(Plan::default()),
            b'Q' => {
                plan.syncs += 1;
                if pooled {
                    plan.statements.push(end..end + len);
                }
            }
            b'S' | b'F' => plan.syncs += 1,
            _ => {}
        }
        end += len;
    }
    plan.forward = end;
    Ok(plan)
}

/// The tag and total length of the complete frame starting at `at`, if the buffer holds one.
pub(super) fn frame_at(buf: &[u8], at: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(header) = buf.get(at..at + 5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as i64;
    if len < 4 || len as usize > MAX_FRAME {
        return Err(ProtocolError::BadLength(len));
    }
    let total = len as usize + 1;
    Ok((buf.len() - at >= total).then_some((header[0], total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frame;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        Frame::new(tag, body).bytes.to_vec()
    }

    /// Forward `forward` bytes holding `syncs` Syncs (Queries, FunctionCalls), with the SQL of
    /// the frames at `statements` inspected first.
    fn forward(forward: usize, syncs: usize, statements: &[Range<usize>]) -> Result<Plan, i64> {
        Ok(Plan {
            forward,
            syncs,
            statements: statements.to_vec(),
        })
    }

    /// Nothing forwarded as it is: the slow path, if there is anything.
    fn nothing() -> Result<Plan, i64> {
        Ok(Plan::default())
    }

    /// What, the client's buffer, whether in transaction mode, and the plan (or the bad length).
    type Case = (&'static str, Vec<u8>, bool, Result<Plan, i64>);

    #[test]
    #[expect(
        clippy::single_range_in_vec_init,
        reason = "a statement is the range of its frame"
    )]
    fn plans_what_goes_to_the_server_as_it_is() {
        let query = frame(b'Q', b"SELECT 1\0");
        let sync = frame(b'S', b"");
        let parse = frame(b'P', b"s1\0SELECT 1\0\0\0");
        let bind = frame(b'B', b"\0s1\0\0\0\0\0\0\0");
        let execute = frame(b'E', b"\0\0\0\0\0");
        let terminate = frame(b'X', b"");
        let (q, s, p, b, e) = (
            query.len(),
            sync.len(),
            parse.len(),
            bind.len(),
            execute.len(),
        );
        let extended = [&parse[..], &bind, &execute, &sync].concat();
        let (session, transaction) = (false, true);
        let cases: [Case; 20] = [
            ("an empty buffer", vec![], transaction, nothing()),
            (
                "part of a header",
                query[..3].to_vec(),
                transaction,
                nothing(),
            ),
            (
                "a header alone",
                query[..5].to_vec(),
                transaction,
                nothing(),
            ),
            (
                "a Query",
                query.clone(),
                transaction,
                forward(q, 1, &[0..q]),
            ),
            (
                "a Query, in session mode",
                query.clone(),
                session,
                forward(q, 1, &[]),
            ),
            (
                "a Query, then part of a Sync",
                [&query[..], &sync[..3]].concat(),
                transaction,
                forward(q, 1, &[0..q]),
            ),
            (
                "pipelined Queries and Syncs",
                [&query[..], &sync, &query, &sync].concat(),
                transaction,
                forward(2 * (q + s), 4, &[0..q, q + s..2 * q + s]),
            ),
            (
                "Execute and Sync, with no statement name",
                [&execute[..], &sync].concat(),
                transaction,
                forward(e + s, 1, &[]),
            ),
            ("Terminate first", terminate.clone(), session, nothing()),
            (
                "Terminate after a Query",
                [&query[..], &terminate].concat(),
                session,
                nothing(),
            ),
            (
                "Terminate between Queries",
                [&query[..], &terminate, &query].concat(),
                transaction,
                nothing(),
            ),
            (
                "Parse, Bind, Execute, Sync in session mode",
                extended.clone(),
                session,
                forward(p + b + e + s, 1, &[]),
            ),
            (
                "Parse in transaction mode",
                extended,
                transaction,
                nothing(),
            ),
            (
                "a Query, then Bind in transaction mode",
                [&query[..], &bind, &execute, &sync].concat(),
                transaction,
                nothing(),
            ),
            (
                "Describe in transaction mode",
                frame(b'D', b"Ss1\0"),
                transaction,
                nothing(),
            ),
            (
                "Close in transaction mode",
                frame(b'C', b"Ss1\0"),
                transaction,
                nothing(),
            ),
            (
                "a length below the header's own",
                vec![b'Q', 0, 0, 0, 3],
                transaction,
                Err(3),
            ),
            (
                "a negative length",
                vec![b'Q', 0xff, 0xff, 0xff, 0xfe],
                session,
                Err(-2),
            ),
            (
                "a length past the largest frame, after a Query",
                [&query[..], &[b'Q', 0x7f, 0xff, 0xff, 0xff]].concat(),
                transaction,
                Err(i32::MAX.into()),
            ),
            (
                "a bad length after a Terminate, not read",
                [&terminate[..], &[b'Q', 0, 0, 0, 0]].concat(),
                transaction,
                nothing(),
            ),
        ];
        for (what, buf, pooled, expected) in cases {
            let planned = plan(&buf, pooled).map_err(|e| match e {
                ProtocolError::BadLength(len) => len,
                e => panic!("{what}: {e}"),
            });
            assert_eq!(planned, expected, "{what}");
        }
    }

    #[test]
    fn frames_are_found_by_their_length_header() {
        let query = frame(b'Q', b"SELECT 1\0");
        let two = [&query[..], &query].concat();
        assert_eq!(frame_at(&two, 0).ok(), Some(Some((b'Q', query.len()))));
        let second = frame_at(&two, query.len()).ok();
        assert_eq!(second, Some(Some((b'Q', query.len()))));
        assert_eq!(frame_at(&two, two.len()).ok(), Some(None));
        assert_eq!(
            frame_at(&two[..two.len() - 1], query.len()).ok(),
            Some(None)
        );
    }
}
