//! The client side: accept loop, startup and SCRAM login, then relaying frames between the client
//! and a pooled server connection (held for the session, or per transaction).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{ScramKeys, ScramServer};
use crate::pool::{PoolError, PooledConn, Pools};
use crate::prepared::ClientStatements;
use crate::protocol::backend::{self, parse_sasl_initial_response};
use crate::protocol::startup::{Startup, read_startup};
use crate::protocol::{Frame, ProtocolError, read_frame, split_frame};
use crate::routing::{
    Lookup, RoutingTable, TenantRoute, TenantState, tenant_from_sni, tenant_from_startup,
};

/// When a server connection goes back to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolMode {
    /// At the end of the client's session, after `DISCARD ALL`.
    Session,
    /// Whenever the server is idle between transactions.
    Transaction,
}

#[derive(Clone)]
pub struct Settings {
    pub mode: PoolMode,
    pub checkout_timeout: Duration,
    pub startup_timeout: Duration,
    /// TLS toward clients, when a certificate is configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// With TLS, SNI `tenant.<domain>` names the tenant.
    pub sni_domain: Option<String>,
}

type CancelTarget = Arc<Mutex<Option<(SocketAddr, i32, i32)>>>;

/// State shared by every client session.
pub struct Shared {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub pools: Pools,
    pub settings: Settings,
    pub metrics: crate::metrics::Metrics,
    scram_keys: Mutex<HashMap<String, (String, ScramKeys)>>,
    cancels: Mutex<HashMap<(i32, i32), CancelTarget>>,
    /// Per tenant, a token its sessions watch: cancelled when the tenant stops being Ready.
    tenant_sessions: Mutex<HashMap<String, CancellationToken>>,
}

impl Shared {
    pub fn new(table: Arc<ArcSwap<RoutingTable>>, settings: Settings) -> Self {
        Shared {
            table,
            pools: Pools::default(),
            settings,
            metrics: Default::default(),
            scram_keys: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            tenant_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Puts a new routing table in force, and ends the sessions of tenants that were Ready and
    /// no longer are (suspended, being deleted, gone).
    pub fn set_table(&self, table: RoutingTable) {
        let old = self.table.swap(Arc::new(table));
        let new = self.table.load();
        let mut sessions = lock(&self.tenant_sessions);
        for route in old.routes().filter(|r| r.state == TenantState::Ready) {
            let still_ready = matches!(new.lookup(&route.key()), Lookup::Found(r) if r.state == TenantState::Ready);
            if !still_ready && let Some(token) = sessions.remove(&route.key()) {
                info!(tenant = %route.key(), "tenant no longer ready; ending its sessions");
                token.cancel();
            }
        }
    }

    fn sessions_of(&self, route: &TenantRoute) -> CancellationToken {
        lock(&self.tenant_sessions)
            .entry(route.key())
            .or_default()
            .child_token()
    }

    /// SCRAM keys for a tenant's current password, derived once (PBKDF2 is deliberately slow).
    fn keys(&self, route: &TenantRoute) -> ScramKeys {
        let mut cache = lock(&self.scram_keys);
        match cache.get(&route.key()) {
            Some((password, keys)) if *password == route.password => keys.clone(),
            _ => {
                let keys = ScramKeys::derive(&route.password);
                cache.insert(route.key(), (route.password.clone(), keys.clone()));
                keys
            }
        }
    }
}

/// A refusal sent to the client as an ErrorResponse.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<PoolError> for Refusal {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Exhausted { .. } | PoolError::ServerBudget { .. } => {
                Refusal::new("53300", e.to_string())
            }
            PoolError::Server(e) => {
                Refusal::new("08001", format!("cannot reach the tenant's database: {e}"))
            }
        }
    }
}

/// Accepts clients until `shutdown`, then waits for open sessions to end.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Err(e) = handle_client(stream, &shared, shutdown).await {
                debug!(%peer, error = %e, "client session ended with an error");
            }
        });
    }
    tracker.close();
    info!(
        sessions = tracker.len(),
        "no longer accepting; waiting for sessions to end"
    );
    tracker.wait().await;
}

/// What the first packets of a connection asked for.
enum Negotiated {
    /// A startup packet in plaintext.
    Plain(Vec<(String, String)>),
    /// TLS was requested and agreed to (`S` sent); the handshake comes next.
    Tls,
    /// A cancel request, handled; nothing more to do.
    Done,
}

async fn negotiate(stream: &mut TcpStream, shared: &Shared) -> Result<Negotiated, ProtocolError> {
    loop {
        match read_startup(stream).await? {
            Startup::Ssl if shared.settings.tls.is_some() => {
                stream.write_all(b"S").await?;
                return Ok(Negotiated::Tls);
            }
            // No certificate configured, or GSSAPI: say no and let the client go on in plaintext
            // (its password never crosses the wire: SCRAM proves it without sending it).
            Startup::Ssl | Startup::GssEnc => stream.write_all(b"N").await?,
            Startup::Cancel { pid, key } => {
                let target = lock(&shared.cancels)
                    .get(&(pid, key))
                    .and_then(|t| *lock(t));
                if let Some((addr, server_pid, server_key)) = target {
                    let _ = crate::server::cancel(addr, server_pid, server_key).await;
                }
                return Ok(Negotiated::Done);
            }
            Startup::Params(params) => return Ok(Negotiated::Plain(params)),
        }
    }
}

async fn handle_client(
    mut stream: TcpStream,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError> {
    let deadline = tokio::time::Instant::now() + shared.settings.startup_timeout;
    let too_slow = Refusal::new("08P01", "startup took too long");
    let negotiated = match tokio::time::timeout_at(deadline, negotiate(&mut stream, shared)).await {
        Err(_) => {
            let _ = stream
                .write_all(
                    &backend::error_response("FATAL", too_slow.code, &too_slow.message).bytes,
                )
                .await;
            return Ok(());
        }
        Ok(result) => result?,
    };
    match negotiated {
        Negotiated::Done => Ok(()),
        Negotiated::Plain(params) => {
            let (reader, writer) = stream.into_split();
            session(reader, writer, params, None, deadline, shared, shutdown).await
        }
        Negotiated::Tls => {
            let Some(acceptor) = shared.settings.tls.clone() else {
                return Ok(());
            };
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Ok(()),
            };
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let (mut reader, mut writer) = tokio::io::split(tls);
            let params = match tokio::time::timeout_at(deadline, read_startup(&mut reader)).await {
                Ok(Ok(Startup::Params(params))) => params,
                Ok(Ok(_)) => {
                    return Err(ProtocolError::Malformed {
                        what: "startup packet after TLS",
                    });
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    let _ = send(
                        &mut writer,
                        &backend::error_response("FATAL", too_slow.code, &too_slow.message),
                    )
                    .await;
                    return Ok(());
                }
            };
            session(reader, writer, params, sni, deadline, shared, shutdown).await
        }
    }
}

/// Login and relay for one client, over plain TCP or TLS.
#[allow(clippy::too_many_arguments)]
async fn session<R, W>(
    mut reader: R,
    mut writer: W,
    params: Vec<(String, String)>,
    sni: Option<String>,
    deadline: tokio::time::Instant,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let login = tokio::time::timeout_at(
        deadline,
        login(&mut reader, &mut writer, shared, params, sni),
    )
    .await;
    let (route, user) = match login {
        Err(_) => {
            let refusal = Refusal::new("08P01", "startup took too long");
            let _ = send(
                &mut writer,
                &backend::error_response("FATAL", refusal.code, &refusal.message),
            )
            .await;
            return Ok(());
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(login))) => login,
    };

    let pool = shared.pools.get(&route);
    let mut server: Option<PooledConn> = None;
    let params = match shared.settings.mode {
        PoolMode::Session => match checkout(shared, &pool).await {
            Ok(mut conn) => {
                let params = conn.conn().params.clone();
                server = Some(conn);
                params
            }
            Err(e) => return refuse(shared, &mut writer, e.into()).await,
        },
        PoolMode::Transaction => match pool.params() {
            Some(params) => params,
            None => match checkout(shared, &pool).await {
                Ok(mut conn) => {
                    let params = conn.conn().params.clone();
                    conn.release();
                    params
                }
                Err(e) => return refuse(shared, &mut writer, e.into()).await,
            },
        },
    };

    // The client's cancel key is the router's own; it maps to whichever server runs its query.
    let (pid, key, target) = register_cancel(shared);
    if let Some(conn) = server.as_mut() {
        let c = conn.conn();
        *lock(&target) = Some((c.addr, c.pid, c.key));
    }
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&backend::authentication_ok().bytes);
    for (name, value) in &params {
        hello.extend_from_slice(&backend::parameter_status(name, value).bytes);
    }
    hello.extend_from_slice(&backend::backend_key_data(pid, key).bytes);
    hello.extend_from_slice(&backend::ready_for_query(b'I').bytes);
    writer.write_all(&hello).await?;
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
        target: &target,
        shutdown,
        ended: shared.sessions_of(&route),
    };
    let result = relay(&mut reader, &mut writer, &mut server, session).await;
    lock(&shared.cancels).remove(&(pid, key));
    shared.metrics.sessions.dec();
    result
}

/// Startup, tenant resolution and SCRAM. `None` when the connection was a cancel request or was
/// refused (the refusal has been sent).
async fn login<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
    params: Vec<(String, String)>,
    sni: Option<String>,
) -> Result<Option<(Arc<TenantRoute>, String)>, ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let Some(user) = Startup::param(&params, "user").map(str::to_string) else {
        refuse(
            shared,
            writer,
            Refusal::new("28000", "no user name in the startup packet"),
        )
        .await?;
        return Ok(None);
    };
    let sni_tenant = sni
        .as_deref()
        .and_then(|name| tenant_from_sni(name, shared.settings.sni_domain.as_deref()));
    let (tenant, _) = tenant_from_startup(&user, Startup::param(&params, "database"), sni_tenant);
    let route = match shared.table.load().lookup(tenant) {
        Lookup::Found(route) => route,
        Lookup::Unknown => {
            refuse(
                shared,
                writer,
                Refusal::new("3D000", format!("tenant \"{tenant}\" does not exist")),
            )
            .await?;
            return Ok(None);
        }
        Lookup::Ambiguous(keys) => {
            let message = format!(
                "tenant name \"{tenant}\" exists in several namespaces; use one of {}",
                keys.join(", ")
            );
            refuse(shared, writer, Refusal::new("3D000", message)).await?;
            return Ok(None);
        }
    };
    let refusal = match route.state {
        TenantState::Ready => None,
        TenantState::Suspended => Some(format!("tenant \"{tenant}\" is suspended")),
        TenantState::Deleting => Some(format!("tenant \"{tenant}\" is being deleted")),
        TenantState::Pending => Some(format!("tenant \"{tenant}\" is not ready yet")),
    };
    if let Some(message) = refusal {
        refuse(shared, writer, Refusal::new("57P03", message)).await?;
        return Ok(None);
    }

    // SCRAM-SHA-256 against the tenant's credentials.
    send(writer, &backend::authentication_sasl()).await?;
    let (mechanism, client_first) = parse_sasl_initial_response(&read_frame(reader).await?)?;
    if mechanism != "SCRAM-SHA-256" {
        refuse(
            shared,
            writer,
            Refusal::new("28000", format!("unsupported SASL mechanism {mechanism}")),
        )
        .await?;
        return Ok(None);
    }
    let bad_password = || {
        Refusal::new(
            "28P01",
            format!("password authentication failed for user \"{user}\""),
        )
    };
    let Ok((exchange, server_first)) = ScramServer::start(shared.keys(&route), &client_first)
    else {
        refuse(shared, writer, bad_password()).await?;
        return Ok(None);
    };
    send(
        writer,
        &backend::authentication(11, server_first.as_bytes()),
    )
    .await?;
    let client_final = read_frame(reader).await?;
    if client_final.tag != b'p' {
        return Err(ProtocolError::Unexpected {
            got: client_final.tag as char,
            during: "SASL authentication",
        });
    }
    match exchange.finish(client_final.body()) {
        Ok(server_final) => {
            send(
                writer,
                &backend::authentication(12, server_final.as_bytes()),
            )
            .await?
        }
        Err(_) => {
            refuse(shared, writer, bad_password()).await?;
            return Ok(None);
        }
    }
    Ok(Some((route, user)))
}

/// What a logged-in session relays with.
struct Session<'a> {
    shared: &'a Shared,
    pool: &'a Arc<crate::pool::TenantPool>,
    /// Where this client's cancel requests go: the server running its query, if any.
    target: &'a CancelTarget,
    shutdown: CancellationToken,
    /// Cancelled when the tenant stops being Ready.
    ended: CancellationToken,
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
    } = session;
    let mode = shared.settings.mode;
    let mut from_client = BytesMut::with_capacity(8 * 1024);
    let mut from_server = BytesMut::with_capacity(64 * 1024);
    let mut to_server = BytesMut::with_capacity(8 * 1024);
    let mut server_idle = true;
    // ReadyForQuery messages still owed by the server: one per Sync, simple Query or FunctionCall
    // sent. A pipelining client can have several in flight; the server is only free at zero.
    let mut owed: usize = 0;
    let mut statements = ClientStatements::default();
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
                    match checkout(shared, pool).await {
                        Ok(mut conn) => {
                            let c = conn.conn();
                            *lock(target) = Some((c.addr, c.pid, c.key));
                            *server = Some(conn);
                        }
                        Err(e) => {
                            let _ = refuse(shared, writer, e.into()).await;
                            return Ok(());
                        }
                    }
                }
                // Fast path: nothing to rewrite or intercept, so forward the buffer as it is.
                if server.is_some() {
                    let mut end = 0;
                    let mut plain = true;
                    let mut syncs = 0;
                    while let Some((tag, len)) = frame_at(&from_client, end)? {
                        match tag {
                            b'X' => plain = false,
                            b'P' | b'B' | b'D' | b'C' if mode == PoolMode::Transaction => plain = false,
                            b'S' | b'Q' | b'F' => syncs += 1,
                            _ => {}
                        }
                        if !plain {
                            break;
                        }
                        end += len;
                    }
                    if plain && end > 0 && let Some(conn) = server.as_mut() {
                        conn.conn().writer.write_all(&from_client[..end]).await?;
                        from_client.advance(end);
                        owed += syncs;
                        if mode == PoolMode::Transaction {
                            for _ in 0..syncs {
                                statements.expect_ready();
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
                            match mode {
                                PoolMode::Transaction => statements.rewrite(frame, &mut conn.prepared, &mut to_server)?,
                                PoolMode::Session => to_server.extend_from_slice(&frame.bytes),
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
                if read? == 0 {
                    *server = None;
                    let refusal = Refusal::new("08006", "the tenant's database server closed the connection");
                    let _ = refuse(shared, writer, refusal).await;
                    return Ok(());
                }
                // Forward whole frames straight from the read buffer; only the completions of
                // messages the router injected are cut out.
                let mut end = 0;
                while let Some((tag, len)) = frame_at(&from_server, end)? {
                    if tag == b'Z' {
                        owed = owed.saturating_sub(1);
                        server_idle = from_server.get(end + 5) == Some(&b'I') && owed == 0;
                    }
                    if mode == PoolMode::Transaction && !statements.forward_tag(tag) {
                        writer.write_all(&from_server[..end]).await?;
                        from_server.advance(end + len);
                        end = 0;
                        continue;
                    }
                    end += len;
                }
                writer.write_all(&from_server[..end]).await?;
                from_server.advance(end);
                if mode == PoolMode::Transaction && server_idle && from_server.is_empty() {
                    if let Some(conn) = server.take() {
                        conn.release();
                    }
                    *lock(target) = None;
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

/// The tag and total length of the complete frame starting at `at`, if the buffer holds one.
fn frame_at(buf: &[u8], at: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(header) = buf.get(at..at + 5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as i64;
    if len < 4 || len as usize > crate::protocol::MAX_FRAME {
        return Err(ProtocolError::BadLength(len));
    }
    let total = len as usize + 1;
    Ok((buf.len() - at >= total).then_some((header[0], total)))
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

/// A server connection from `pool`, timing the wait.
async fn checkout(
    shared: &Shared,
    pool: &Arc<crate::pool::TenantPool>,
) -> Result<PooledConn, PoolError> {
    let started = std::time::Instant::now();
    let result = pool.checkout(shared.settings.checkout_timeout).await;
    shared
        .metrics
        .checkout_wait
        .observe(started.elapsed().as_secs_f64());
    result
}

fn register_cancel(shared: &Shared) -> (i32, i32, CancelTarget) {
    use rand::Rng;
    let target: CancelTarget = Arc::new(Mutex::new(None));
    let mut cancels = lock(&shared.cancels);
    loop {
        let (pid, key) = (rand::rng().random_range(1..i32::MAX), rand::rng().random());
        if let std::collections::hash_map::Entry::Vacant(e) = cancels.entry((pid, key)) {
            e.insert(target.clone());
            return (pid, key, target);
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> std::io::Result<()> {
    writer.write_all(&frame.bytes).await
}

async fn refuse<W: AsyncWrite + Unpin>(
    shared: &Shared,
    writer: &mut W,
    refusal: Refusal,
) -> Result<(), ProtocolError> {
    shared
        .metrics
        .logins
        .get_or_create(&crate::metrics::Outcome {
            result: refusal.code,
        })
        .inc();
    debug!(code = refusal.code, message = %refusal.message, "client refused");
    send(
        writer,
        &backend::error_response("FATAL", refusal.code, &refusal.message),
    )
    .await?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
