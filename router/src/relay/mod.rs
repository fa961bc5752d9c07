//! A logged-in client's session: frames relayed between the client and a server connection held
//! for the whole session, or checked out per transaction. The accept stage hands over a client
//! that proved its password ([`crate::login::LoggedIn`]); [`run`] attaches a server, sends the
//! hello that ends the login, and relays until either side ends the session. Client frames that
//! need nothing rewritten or intercepted are forwarded as they came ([`forward`]). In transaction
//! pooling the client takes with it, from server to server, what its session carries
//! ([`crate::session`]).

mod forward;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::backend::{ServerConn, ServerError, parameter_status};
use crate::login::{LoggedIn, Refusal, hello, refuse, send};
use crate::pools::{PoolError, PooledConn, TenantPool};
use crate::protocol::{ProtocolError, backend, read_cstr, split_frame};
use crate::routing::Lookup;
use crate::session::inspect::{Deallocate, Effects, Pin, Reading, inspect};
use crate::session::params::{ClientParams, startup_settings};
use crate::session::prepared::ClientStatements;
use crate::state::{CancelTarget, PoolMode, Shared};
use forward::frame_at;

/// A logged-in client's session, from the server attached for it to its end: the hello that
/// ends its login carries the client's cancel key, which leads to whichever server runs its query.
pub(crate) async fn run<R, W>(
    mut reader: R,
    mut writer: W,
    client: LoggedIn,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let LoggedIn {
        route,
        user,
        startup,
    } = client;
    let pool = shared.pools.get(&route);
    let (mut server, params) = match attach(shared, &pool, &startup).await {
        Ok(attached) => attached,
        Err(refused) => return refused.send(shared, &mut writer).await,
    };

    // The client's cancel key is the router's own; it maps to whichever server runs its query.
    let cancel = shared.cancels.register(|| shared.peers.cancel_key());
    if let Some(conn) = server.as_mut() {
        let c = conn.conn();
        cancel.target.set(c.addr, c.pid, c.key);
    }
    hello(&mut writer, &params, cancel.pid, cancel.key).await?;
    debug!(tenant = %route.key(), user = %user, "client logged in");
    shared
        .metrics
        .logins
        .get_or_create(&crate::metrics::Outcome { result: "ok" })
        .inc();
    shared.metrics.sessions.inc();

    let session = Session {
        shared,
        pool: &pool,
        target: &cancel.target,
        shutdown,
        ended: shared.sessions_of(&route),
        params,
    };
    let result = relay(&mut reader, &mut writer, &mut server, session).await;
    shared.metrics.sessions.dec();
    result
}

/// Why a client gets no server connection: a refusal of the router's own, or the server's own
/// error, passed on as PostgreSQL would have sent it to a direct client.
#[derive(Debug)]
enum Refused {
    Router(Refusal),
    Server { code: String, message: String },
}

impl Refused {
    /// Tells the client, as a FATAL error.
    async fn send<W: AsyncWrite + Unpin>(
        self,
        shared: &Shared,
        writer: &mut W,
    ) -> Result<(), ProtocolError> {
        match self {
            Refused::Router(refusal) => refuse(shared, writer, refusal).await,
            Refused::Server { code, message } => {
                shared
                    .metrics
                    .logins
                    .get_or_create(&crate::metrics::Outcome { result: "server" })
                    .inc();
                debug!(%code, %message, "server refused the client");
                send(writer, &backend::error_response("FATAL", &code, &message)).await?;
                Ok(())
            }
        }
    }
}

impl From<ServerError> for Refused {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::Rejected { code, message } => Refused::Server { code, message },
            // The server's own word when it cannot take connections now (starting, shutting
            // down, out of connections); the tenant's credentials are the router's business.
            ServerError::Refused { code, message } if code.starts_with("57") || code == "53300" => {
                Refused::Server { code, message }
            }
            e => Refused::Router(Refusal::new(
                "08001",
                format!("cannot reach the tenant's database: {e}"),
            )),
        }
    }
}

impl From<PoolError> for Refused {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Exhausted { .. } | PoolError::ServerBudget { .. } => {
                Refused::Router(Refusal::new("53300", e.to_string()))
            }
            PoolError::Server(e) => e.into(),
        }
    }
}

/// Gets a logged-in client its session parameters: its startup settings, taken by a server
/// (which refuses what it would refuse at a direct login), with the values the server reports.
/// In session pooling the server, set up for the client, comes with them; in transaction pooling
/// a client sending settings already taken needs no server.
async fn attach(
    shared: &Shared,
    pool: &Arc<TenantPool>,
    startup: &[(String, String)],
) -> Result<(Option<PooledConn>, ClientParams), Refused> {
    let settings = startup_settings(startup)
        .map_err(|e| Refused::Router(Refusal::new(e.sqlstate(), e.to_string())))?;
    let mode = shared.settings.mode;
    if mode == PoolMode::Transaction
        && let Some(params) = pool.established(&settings)
    {
        return Ok((None, params));
    }
    let mut conn = checkout(shared, pool, None).await?;
    let params = match conn.conn().establish(&settings).await {
        Ok(params) => params,
        Err(e @ ServerError::Rejected { .. }) => {
            // Refused and rolled back: the connection is as it was.
            conn.release();
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    match mode {
        PoolMode::Session => Ok((Some(conn), params)),
        PoolMode::Transaction => {
            pool.remember(settings, &params);
            conn.release();
            Ok((None, params))
        }
    }
}

/// What a logged-in session relays with.
struct Session<'a> {
    shared: &'a Shared,
    pool: &'a Arc<TenantPool>,
    /// Where this client's cancel requests go: the server running its query, if any.
    target: &'a CancelTarget,
    shutdown: CancellationToken,
    /// Cancelled when the tenant stops being Ready.
    ended: CancellationToken,
    /// The client's session parameters, from [`attach`].
    params: ClientParams,
}

/// What a client takes from one server connection to the next in transaction pooling.
struct Carried {
    params: ClientParams,
    statements: ClientStatements,
    /// Why the server stays with this client until it leaves, if it does.
    pinned: Option<Pin>,
}

impl Carried {
    /// A simple Query's or a Parse's SQL, before it is sent to `conn`.
    fn client_sql(&mut self, sql: &[u8], conn: &mut ServerConn, shared: &Shared) {
        let params = &self.params;
        let reported = |name: &str| params.is_reported(name);
        let effects = inspect(
            sql,
            &Reading {
                standard_strings: params.standard_conforming_strings(),
                reported: &reported,
            },
        );
        if effects == Effects::default() {
            return;
        }
        if let Some(pin) = effects.pin {
            self.pin(pin, shared);
        }
        // Forgotten before the server runs it, so that what follows is prepared again.
        match effects.deallocate {
            Some(Deallocate::All) => {
                conn.prepared.clear();
                self.statements.forget_all();
            }
            Some(Deallocate::One) => conn.prepared.clear(),
            None => {}
        }
        if effects.resets {
            conn.params.forget_applied();
        }
    }

    fn pin(&mut self, pin: Pin, shared: &Shared) {
        if self.pinned.is_none() {
            debug!(
                reason = pin.reason(),
                "session state that cannot move to another server: the server stays with this client"
            );
            shared
                .metrics
                .pinned
                .get_or_create(&crate::metrics::PinReason {
                    reason: pin.reason(),
                })
                .inc();
            self.pinned = Some(pin);
        }
    }

    /// A CommandComplete from the server: what the statement did, as the server says it.
    fn command_complete(&mut self, tag: &[u8], conn: &mut ServerConn, shared: &Shared) {
        let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
        match tag {
            b"DEALLOCATE" | b"DEALLOCATE ALL" => conn.prepared.clear(),
            b"DISCARD ALL" => {
                conn.prepared.clear();
                conn.params.forget_applied();
            }
            b"RESET" => conn.params.forget_applied(),
            // In case the scan of the SQL missed them.
            b"LISTEN" => self.pin(Pin::Listen, shared),
            b"PREPARE" => self.pin(Pin::Prepare, shared),
            _ => {}
        }
    }
}

/// The SQL of a simple Query or a Parse.
fn statement_sql(tag: u8, body: &[u8]) -> Option<&[u8]> {
    let sql = match tag {
        b'Q' => body,
        b'P' => {
            let mut rest = body;
            read_cstr(&mut rest, "Parse").ok()?;
            rest
        }
        _ => return None,
    };
    let end = sql.iter().position(|c| *c == 0).unwrap_or(sql.len());
    Some(&sql[..end])
}

/// Whether an ErrorResponse ends the session (FATAL, PANIC): the server closes next. Read from
/// the `V` field, never localized, else (before PostgreSQL 9.6) the `S` field.
fn is_fatal(body: &[u8]) -> bool {
    let mut severity = None;
    for field in body.split(|b| *b == 0).take_while(|f| !f.is_empty()) {
        match field.split_first() {
            Some((b'V', value)) => severity = Some(value),
            Some((b'S', value)) => {
                severity.get_or_insert(value);
            }
            _ => {}
        }
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

async fn relay<R, W>(
    reader: &mut R,
    writer: &mut W,
    server: &mut Option<PooledConn>,
    session: Session<'_>,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let Session {
        shared,
        pool,
        target,
        shutdown,
        ended,
        params,
    } = session;
    let pooled = shared.settings.mode == PoolMode::Transaction;
    let mut from_client = BytesMut::with_capacity(8 * 1024);
    let mut from_server = BytesMut::with_capacity(64 * 1024);
    let mut to_server = BytesMut::with_capacity(8 * 1024);
    let mut server_idle = true;
    // ReadyForQuery messages still owed by the server: one per Sync, simple Query or FunctionCall
    // sent. A pipelining client can have several in flight; the server is only free at zero.
    let mut owed: usize = 0;
    let mut carried = Carried {
        params,
        statements: ClientStatements::default(),
        pinned: None,
    };
    // The server ended the session with an error of its own, which the client has been sent.
    let mut server_ended = false;
    // Registered once, not on every turn of the loop.
    let shutting_down = shutdown.cancelled();
    let tenant_gone = ended.cancelled();
    tokio::pin!(shutting_down, tenant_gone);
    loop {
        tokio::select! {
            read = reader.read_buf(&mut from_client) => {
                if read? == 0 {
                    break;
                }
                // A server for the next transaction, unless the client is leaving.
                if server.is_none() && matches!(frame_at(&from_client, 0)?, Some((tag, _)) if tag != b'X') {
                    match checkout(shared, pool, Some(&carried.params)).await {
                        Ok(mut conn) => {
                            let c = conn.conn();
                            target.set(c.addr, c.pid, c.key);
                            *server = Some(conn);
                        }
                        Err(refused) => {
                            let _ = refused.send(shared, writer).await;
                            return Ok(());
                        }
                    }
                }
                // Fast path: nothing to rewrite or intercept, so forward the buffer as it is.
                if let Some(conn) = server.as_mut() {
                    let plan = forward::plan(&from_client, pooled)?;
                    if plan.forward > 0 {
                        let conn = conn.conn();
                        for frame in &plan.statements {
                            let frame = &from_client[frame.clone()];
                            if let Some(sql) = statement_sql(frame[0], &frame[5..]) {
                                carried.client_sql(sql, conn, shared);
                            }
                        }
                        conn.writer.write_all(&from_client[..plan.forward]).await?;
                        from_client.advance(plan.forward);
                        owed += plan.syncs;
                        if pooled {
                            for _ in 0..plan.syncs {
                                carried.statements.expect_ready();
                            }
                        }
                        server_idle = false;
                        continue;
                    }
                }
                let mut frames = Vec::new();
                let mut terminate = false;
                while let Some(frame) = split_frame(&mut from_client)? {
                    if frame.tag == b'X' {
                        terminate = true;
                        break;
                    }
                    frames.push(frame);
                }
                // The server was checked out above when the first frame was not a Terminate.
                if !frames.is_empty() {
                    if let Some(conn) = server.as_mut() {
                        let conn = conn.conn();
                        for frame in &frames {
                            if matches!(frame.tag, b'S' | b'Q' | b'F') {
                                owed += 1;
                            }
                            if pooled {
                                if let Some(sql) = statement_sql(frame.tag, frame.body()) {
                                    carried.client_sql(sql, conn, shared);
                                }
                                carried.statements.rewrite(frame, &mut conn.prepared, &mut to_server)?;
                            } else {
                                to_server.extend_from_slice(&frame.bytes);
                            }
                        }
                        conn.writer.write_all(&to_server).await?;
                        server_idle = false;
                    }
                    to_server.clear();
                }
                if terminate {
                    break;
                }
            }
            read = read_server(server, &mut from_server) => {
                let read = read.unwrap_or_else(|e| {
                    debug!(error = %e, "reading from the server");
                    0
                });
                if read == 0 {
                    *server = None;
                    // After a FATAL error of its own (terminated, shut down, timed out), the
                    // client has heard what a direct client hears; else say what happened.
                    if !server_ended {
                        let message = "the tenant's database server closed the connection";
                        let _ = send(writer, &backend::error_response("FATAL", "08006", message)).await;
                    }
                    return Ok(());
                }
                let Some(conn) = server.as_mut() else {
                    continue;
                };
                let conn = conn.conn();
                // Forward whole frames straight from the read buffer; only the completions of
                // messages the router injected are cut out.
                let mut end = 0;
                while let Some((tag, len)) = frame_at(&from_server, end)? {
                    let body = &from_server[end + 5..end + len];
                    match tag {
                        b'Z' => {
                            owed = owed.saturating_sub(1);
                            server_idle = body.first() == Some(&b'I') && owed == 0;
                        }
                        b'S' => {
                            // The client's own SET: its session's value from now on.
                            let (name, value) = parameter_status(body)?;
                            conn.params.observe(&name, &value);
                            carried.params.observe(&name, &value);
                        }
                        b'C' if pooled => carried.command_complete(body, conn, shared),
                        b'E' => server_ended |= is_fatal(body),
                        _ => {}
                    }
                    if pooled && !carried.statements.forward_tag(tag) {
                        writer.write_all(&from_server[..end]).await?;
                        from_server.advance(end + len);
                        end = 0;
                        continue;
                    }
                    end += len;
                }
                writer.write_all(&from_server[..end]).await?;
                from_server.advance(end);
                if pooled && server_idle && from_server.is_empty() && carried.pinned.is_none() {
                    if let Some(conn) = server.take() {
                        conn.release();
                    }
                    target.clear();
                }
            }
            _ = &mut shutting_down, if server.is_none() || server_idle => break,
            _ = &mut tenant_gone => {
                let state = match shared.table.load().lookup(&pool.route.key()) {
                    Lookup::Found(r) => format!("{:?}", r.state).to_lowercase(),
                    _ => "deleted".to_string(),
                };
                let message = format!("terminating connection: tenant \"{}\" is {state}", pool.route.name);
                let _ = send(writer, &backend::error_response("FATAL", "57P01", &message)).await;
                // The server may be mid-transaction: close it rather than reuse it.
                *server = None;
                return Ok(());
            }
        }
    }
    // Session over: an idle server goes back, reset; one mid-transaction is closed.
    if let Some(mut conn) = server.take()
        && server_idle
        && from_server.is_empty()
        && conn.conn().reset().await
    {
        conn.release();
    }
    Ok(())
}

/// Reads from the checked-out server, or waits forever when there is none.
async fn read_server(
    server: &mut Option<PooledConn>,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    match server.as_mut() {
        Some(conn) => conn.conn().reader.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// A server connection from `pool`, timing the wait, with its session parameters made the
/// client's when given. An idle connection the server has ended meanwhile (terminated, timed
/// out, restarted) is closed and another taken: the client never hears of it.
async fn checkout(
    shared: &Shared,
    pool: &Arc<TenantPool>,
    params: Option<&ClientParams>,
) -> Result<PooledConn, Refused> {
    let started = Instant::now();
    let timeout = shared.settings.checkout_timeout;
    let result = async {
        // Each idle connection at most once, then a new one.
        let mut attempts = pool.route.connection_limit.max(1) + 1;
        loop {
            attempts -= 1;
            let left = timeout.saturating_sub(started.elapsed());
            let prefer = params.map(ClientParams::fingerprint);
            let mut conn = pool
                .checkout(left.max(Duration::from_millis(1)), prefer)
                .await?;
            let lost = if !conn.conn().is_alive() {
                Err(ServerError::Protocol(ProtocolError::Closed))
            } else if let Some(params) = params {
                conn.conn().sync(params).await
            } else {
                Ok(())
            };
            match lost {
                Ok(()) => return Ok(conn),
                Err(ServerError::Protocol(e)) if attempts > 0 => {
                    debug!(error = %e, "idle server connection ended by the server; taking another");
                }
                Err(e @ ServerError::Rejected { .. }) => {
                    // Refused and rolled back: the connection is as it was.
                    conn.release();
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    .await;
    shared
        .metrics
        .checkout_wait
        .observe(started.elapsed().as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(fields: &[(u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in fields {
            body.push(*field);
            body.extend_from_slice(value);
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn fatal_errors_are_told_by_their_unlocalized_severity() {
        let terminated = error(&[
            (b'S', "致命的エラー".as_bytes()),
            (b'V', b"FATAL"),
            (b'C', b"57P01"),
        ]);
        assert!(is_fatal(&terminated));
        assert!(is_fatal(&error(&[(b'S', b"PANIC"), (b'C', b"XX000")])));
        assert!(!is_fatal(&error(&[
            (b'S', b"ERROR"),
            (b'V', b"ERROR"),
            (b'C', b"42P01")
        ])));
        assert!(!is_fatal(b""));
    }

    #[test]
    fn statement_text_of_queries_and_parses() {
        assert_eq!(statement_sql(b'Q', b"LISTEN x\0"), Some(&b"LISTEN x"[..]));
        assert_eq!(
            statement_sql(b'P', b"s1\0SELECT 1\0\0\0"),
            Some(&b"SELECT 1"[..])
        );
        assert_eq!(statement_sql(b'B', b"\0s1\0"), None);
    }
}
