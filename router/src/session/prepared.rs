//! Named prepared statements in transaction mode. A client's statement may have been prepared on
//! a server connection it no longer holds, so the router renames each statement to a name derived
//! from its text and parameter types (`silo_<hash>`, shared by every client that prepares the same
//! statement), prepares it again on whichever server the client gets, and hides the completions
//! of what it injected. Only Parse, Bind, Describe and Close are re-encoded; everything else is
//! relayed as it came.
//!
//! What is prepared on each server is the router's record (`ServerConn::prepared`). A statement
//! that drops prepared statements (`DEALLOCATE`, `DISCARD ALL`, from whichever client, in a simple
//! Query or a Parse) empties it before the server runs it, and again when the server says it ran
//! it; a statement is then prepared again (Close first, then Parse) where it is next used.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::protocol::{Frame, ProtocolError, read_cstr};

/// A name no statement has: closing it is a no-op that still yields CloseComplete.
const NOOP_NAME: &str = "silo_noop";

/// One client's statements: its names mapped to shared server-side names.
#[derive(Default)]
pub(crate) struct ClientStatements {
    by_name: HashMap<String, Prepared>,
    /// What the server will answer, in order: completions (injected by the router or not) and
    /// the ReadyForQuery that ends each Sync, Query or FunctionCall.
    expected: VecDeque<Expect>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Completion { injected: bool },
    Ready,
}

#[derive(Clone)]
struct Prepared {
    server_name: String,
    parse: Bytes,
}

impl ClientStatements {
    /// Rewrites one client frame for the server whose prepared statements are `on_server`;
    /// appends what to send to `out`.
    pub(crate) fn rewrite(
        &mut self,
        frame: &Frame,
        on_server: &mut HashSet<String>,
        out: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        match frame.tag {
            b'P' => {
                let mut body = frame.body();
                let name = read_cstr(&mut body, "Parse")?;
                if name.is_empty() {
                    self.expected
                        .push_back(Expect::Completion { injected: false });
                    out.extend_from_slice(&frame.bytes);
                    return Ok(());
                }
                let server_name = server_name(body);
                let parse = encode(b'P', &[cstr(&server_name), body.to_vec()]);
                // Close first: the name may already exist on this server (same text, same types).
                out.extend_from_slice(&close_statement(&server_name).bytes);
                self.expected
                    .push_back(Expect::Completion { injected: true });
                out.extend_from_slice(&parse.bytes);
                self.expected
                    .push_back(Expect::Completion { injected: false });
                on_server.insert(server_name.clone());
                self.by_name.insert(
                    name,
                    Prepared {
                        server_name,
                        parse: parse.bytes,
                    },
                );
            }
            b'B' => {
                let mut body = frame.body();
                let portal = read_cstr(&mut body, "Bind")?;
                let statement = read_cstr(&mut body, "Bind")?;
                match self.server_side(&statement, on_server, out) {
                    Some(server_name) => out.extend_from_slice(
                        &encode(b'B', &[cstr(&portal), cstr(&server_name), body.to_vec()]).bytes,
                    ),
                    None => out.extend_from_slice(&frame.bytes),
                }
            }
            b'D' => {
                let (kind, mut body) = frame
                    .body()
                    .split_first()
                    .ok_or(ProtocolError::Malformed { what: "Describe" })?;
                let name = read_cstr(&mut body, "Describe")?;
                match (kind, self.server_side(&name, on_server, out)) {
                    (b'S', Some(server_name)) => out
                        .extend_from_slice(&encode(b'D', &[vec![b'S'], cstr(&server_name)]).bytes),
                    _ => out.extend_from_slice(&frame.bytes),
                }
            }
            b'C' => {
                let (kind, mut body) = frame
                    .body()
                    .split_first()
                    .ok_or(ProtocolError::Malformed { what: "Close" })?;
                let name = read_cstr(&mut body, "Close")?;
                self.expected
                    .push_back(Expect::Completion { injected: false });
                if *kind == b'S' && self.by_name.remove(&name).is_some() {
                    // Other clients may share the server-side statement: close nothing, answer all the same.
                    out.extend_from_slice(&close_statement(NOOP_NAME).bytes);
                } else {
                    out.extend_from_slice(&frame.bytes);
                }
            }
            b'S' | b'Q' | b'F' => {
                self.expected.push_back(Expect::Ready);
                out.extend_from_slice(&frame.bytes);
            }
            _ => out.extend_from_slice(&frame.bytes),
        }
        Ok(())
    }

    /// A Sync, simple Query or FunctionCall the relay forwarded without rewriting: its
    /// ReadyForQuery is expected too, so that an error before it never swallows what later
    /// messages expect.
    pub(crate) fn expect_ready(&mut self) {
        self.expected.push_back(Expect::Ready);
    }

    /// The server-side name of the client's statement `name`, prepared on this server first if
    /// needed (the injected Parse's completion is hidden). None for the unnamed or unknown ones.
    fn server_side(
        &mut self,
        name: &str,
        on_server: &mut HashSet<String>,
        out: &mut BytesMut,
    ) -> Option<String> {
        if name.is_empty() {
            return None;
        }
        let prepared = self.by_name.get(name)?;
        if !on_server.contains(&prepared.server_name) {
            // Closed first: the router's record errs on the side of "not there" (a DEALLOCATE
            // that failed, one seen before the server ran it), and a second Parse would fail.
            out.extend_from_slice(&close_statement(&prepared.server_name).bytes);
            out.extend_from_slice(&prepared.parse);
            for _ in 0..2 {
                self.expected
                    .push_back(Expect::Completion { injected: true });
            }
            on_server.insert(prepared.server_name.clone());
        }
        Some(prepared.server_name.clone())
    }

    /// The client dropped all its prepared statements (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub(crate) fn forget_all(&mut self) {
        self.by_name.clear();
    }

    /// [`Self::forward_tag`] of a whole frame.
    #[cfg(test)]
    fn forward(&mut self, frame: &Frame) -> bool {
        self.forward_tag(frame.tag)
    }

    /// Whether a server frame with this tag is to be forwarded to the client (false for
    /// completions of injected messages).
    pub(crate) fn forward_tag(&mut self, tag: u8) -> bool {
        match tag {
            b'1' | b'3' => match self.expected.front() {
                Some(Expect::Completion { injected }) => {
                    let injected = *injected;
                    self.expected.pop_front();
                    !injected
                }
                _ => true,
            },
            // After an error the server skips to the Sync; what was skipped never completes.
            b'Z' => {
                while let Some(e) = self.expected.pop_front() {
                    if e == Expect::Ready {
                        break;
                    }
                }
                true
            }
            _ => true,
        }
    }
}

fn server_name(parse_rest: &[u8]) -> String {
    let digest = Sha256::digest(parse_rest);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("silo_{hex}")
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn encode(tag: u8, parts: &[Vec<u8>]) -> Frame {
    let mut body = BytesMut::new();
    for p in parts {
        body.put_slice(p);
    }
    Frame::new(tag, &body)
}

fn close_statement(name: &str) -> Frame {
    encode(b'C', &[vec![b'S'], cstr(name)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::split_frame;

    fn parse(name: &str, query: &str) -> Frame {
        encode(b'P', &[cstr(name), cstr(query), vec![0, 0]])
    }

    fn bind(statement: &str) -> Frame {
        encode(
            b'B',
            &[cstr(""), cstr(statement), vec![0, 0, 0, 0, 0, 1, 0, 0]],
        )
    }

    fn frames(mut out: BytesMut) -> Vec<(u8, String)> {
        let mut v = Vec::new();
        while let Ok(Some(f)) = split_frame(&mut out) {
            let mut body = f.body();
            if matches!(f.tag, b'C' | b'D') {
                body = &body[1..];
            }
            if f.tag == b'B' {
                let _ = read_cstr(&mut body, "portal");
            }
            v.push((f.tag, read_cstr(&mut body, "name").unwrap_or_default()));
        }
        v
    }

    #[test]
    fn named_statements_are_renamed_and_reprepared_on_another_server() {
        let mut client = ClientStatements::default();
        let mut server_a = HashSet::new();
        let mut out = BytesMut::new();
        client
            .rewrite(&parse("s1", "SELECT $1"), &mut server_a, &mut out)
            .ok();
        client.rewrite(&bind("s1"), &mut server_a, &mut out).ok();
        let sent = frames(out);
        let shared = sent[1].1.clone();
        assert!(shared.starts_with("silo_"));
        assert_eq!(
            sent,
            vec![
                (b'C', shared.clone()),
                (b'P', shared.clone()),
                (b'B', shared.clone())
            ]
        );

        // Completions: the injected Close's is hidden, the client's Parse's is not.
        assert!(!client.forward(&Frame::new(b'3', b"")));
        assert!(client.forward(&Frame::new(b'1', b"")));
        assert!(client.forward(&Frame::new(b'Z', b"I")));

        // On another server, Bind first prepares the statement again, and hides those completions.
        let mut server_b = HashSet::new();
        let mut out = BytesMut::new();
        client.rewrite(&bind("s1"), &mut server_b, &mut out).ok();
        assert_eq!(
            frames(out),
            vec![
                (b'C', shared.clone()),
                (b'P', shared.clone()),
                (b'B', shared.clone())
            ]
        );
        assert!(!client.forward(&Frame::new(b'3', b"")));
        assert!(!client.forward(&Frame::new(b'1', b"")));
        assert!(client.forward(&Frame::new(b'2', b"")));
        assert!(server_b.contains(&shared));
    }

    #[test]
    fn same_text_shares_a_name_and_close_leaves_it_for_others() {
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        let mut server = HashSet::new();
        let (mut out_a, mut out_b) = (BytesMut::new(), BytesMut::new());
        a.rewrite(&parse("x", "SELECT 1"), &mut server, &mut out_a)
            .ok();
        b.rewrite(&parse("y", "SELECT 1"), &mut server, &mut out_b)
            .ok();
        assert_eq!(frames(out_a)[1], frames(out_b)[1]);
        let mut out = BytesMut::new();
        a.rewrite(
            &encode(b'C', &[vec![b'S'], cstr("x")]),
            &mut server,
            &mut out,
        )
        .ok();
        assert_eq!(frames(out), vec![(b'C', NOOP_NAME.to_string())]);
    }

    #[test]
    fn pipelined_syncs_keep_their_own_completions() {
        // Close + Sync, then Parse + Sync, sent before any answer: the Ready of the first Sync
        // must not swallow the expectations of the second.
        let mut c = ClientStatements::default();
        let mut server = HashSet::new();
        let mut out = BytesMut::new();
        c.rewrite(&parse("a", "SELECT 1"), &mut server, &mut out)
            .ok();
        c.rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        assert!(!c.forward(&Frame::new(b'3', b"")));
        assert!(c.forward(&Frame::new(b'1', b"")));
        assert!(c.forward(&Frame::new(b'Z', b"I")));
        c.rewrite(
            &encode(b'C', &[vec![b'S'], cstr("a")]),
            &mut server,
            &mut out,
        )
        .ok();
        c.rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        c.rewrite(&parse("b", "SELECT 2"), &mut server, &mut out)
            .ok();
        c.rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        assert!(c.forward(&Frame::new(b'3', b"")), "the client's Close");
        assert!(c.forward(&Frame::new(b'Z', b"I")));
        assert!(!c.forward(&Frame::new(b'3', b"")), "the injected Close");
        assert!(c.forward(&Frame::new(b'1', b"")));
        assert!(c.forward(&Frame::new(b'Z', b"I")));
    }

    #[test]
    fn an_error_skips_to_the_sync() {
        let mut c = ClientStatements::default();
        let mut server = HashSet::new();
        let mut out = BytesMut::new();
        c.rewrite(&parse("bad", "SELEC"), &mut server, &mut out)
            .ok();
        c.rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        c.rewrite(&parse("good", "SELECT 1"), &mut server, &mut out)
            .ok();
        c.rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        assert!(!c.forward(&Frame::new(b'3', b"")));
        assert!(c.forward(&Frame::new(b'E', b"")));
        assert!(
            c.forward(&Frame::new(b'Z', b"I")),
            "the failed Parse never completes"
        );
        assert!(!c.forward(&Frame::new(b'3', b"")));
        assert!(c.forward(&Frame::new(b'1', b"")));
    }

    #[test]
    fn unnamed_statements_pass_through() {
        let mut c = ClientStatements::default();
        let mut server = HashSet::new();
        let p = parse("", "SELECT 1");
        let mut out = BytesMut::new();
        c.rewrite(&p, &mut server, &mut out).ok();
        c.rewrite(&bind(""), &mut server, &mut out).ok();
        let mut expected = BytesMut::new();
        expected.extend_from_slice(&p.bytes);
        expected.extend_from_slice(&bind("").bytes);
        assert_eq!(out, expected);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let mut c = ClientStatements::default();
        let mut out = BytesMut::new();
        assert!(
            c.rewrite(
                &Frame::new(b'P', b"no-terminator"),
                &mut HashSet::new(),
                &mut out
            )
            .is_err()
        );
        assert!(
            c.rewrite(&Frame::new(b'D', b""), &mut HashSet::new(), &mut out)
                .is_err()
        );
    }

    #[test]
    fn an_error_in_a_query_forwarded_as_is_does_not_swallow_what_follows() {
        // A simple Query that fails, relayed as it came (the fast path), then a named Parse
        // pipelined behind it before the server answered.
        let mut client = ClientStatements::default();
        let mut server = HashSet::new();
        let mut out = BytesMut::new();
        client.expect_ready();
        client
            .rewrite(&parse("s1", "SELECT 1"), &mut server, &mut out)
            .ok();
        client
            .rewrite(&Frame::new(b'S', b""), &mut server, &mut out)
            .ok();
        // The Query's error and ReadyForQuery...
        assert!(client.forward(&Frame::new(b'E', b"")));
        assert!(client.forward(&Frame::new(b'Z', b"I")));
        // ...leave the Parse's expectations in place: the injected Close's completion stays hidden.
        assert!(!client.forward(&Frame::new(b'3', b"")));
        assert!(client.forward(&Frame::new(b'1', b"")));
        assert!(client.forward(&Frame::new(b'Z', b"I")));
    }
}
