//! The client side: accept loop, startup and SCRAM login, then the session ([`relay`]): frames
//! relayed between the client and a pooled server connection (held for the session, or per
//! transaction).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{LoginSlot, LoginSlots};
use crate::auth::{Scram, ScramServer};
use crate::pool::Pools;
use crate::protocol::backend::{self, parse_sasl_initial_response};
use crate::protocol::startup::{Startup, read_startup};
use crate::protocol::{Frame, MAX_LOGIN_MESSAGE, ProtocolError, read_frame_limited};
use crate::routing::{
    Lookup, RoutingTable, TenantRoute, TenantState, tenant_from_sni, tenant_from_startup,
};

mod relay;

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
    /// Refuse clients that do not ask for TLS (28000). Cancel requests may still come in
    /// plaintext, as PostgreSQL takes them: their random key is their credential, and libpq
    /// before version 17 sends them unencrypted.
    pub require_tls: bool,
    /// How many connections may be logging in at once (see [`crate::admission`]).
    pub max_logins: usize,
}

type CancelTarget = Arc<Mutex<Option<(SocketAddr, i32, i32)>>>;

/// State shared by every client session.
pub struct Shared {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub pools: Pools,
    pub settings: Settings,
    pub metrics: crate::metrics::Metrics,
    scram: Scram,
    login_slots: Arc<LoginSlots>,
    cancels: Mutex<HashMap<(i32, i32), CancelTarget>>,
    /// Per tenant, a token its sessions watch: cancelled when the tenant stops being Ready.
    tenant_sessions: Mutex<HashMap<String, CancellationToken>>,
}

impl Shared {
    pub fn new(table: Arc<ArcSwap<RoutingTable>>, settings: Settings) -> Self {
        Shared {
            table,
            pools: Pools::default(),
            login_slots: LoginSlots::new(settings.max_logins),
            settings,
            metrics: Default::default(),
            scram: Scram::default(),
            cancels: Mutex::new(HashMap::new()),
            tenant_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Puts a new routing table in force, and ends the sessions of tenants that were Ready and
    /// no longer are (suspended, being deleted, gone).
    pub fn set_table(&self, table: RoutingTable) {
        let old = self.table.swap(Arc::new(table));
        let new = self.table.load();
        let live: std::collections::HashSet<String> = new.routes().map(|r| r.key()).collect();
        self.scram.retain(|tenant| live.contains(tenant));
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

/// Why a connection ends before its session begins. The client is told (as a FATAL error with
/// [`LoginError::sqlstate`]) unless the connection is gone.
#[derive(thiserror::Error, Debug)]
enum LoginError {
    #[error("startup took too long")]
    TimedOut,
    #[error("too many connections logging in; try again")]
    Crowded,
    #[error(
        "TLS is required: this router accepts encrypted connections only (connect with sslmode=require or stronger)"
    )]
    TlsRequired,
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("no user name in the startup packet")]
    NoUser,
    #[error("unsupported SASL mechanism {0}")]
    Mechanism(String),
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    #[error("tenant name \"{tenant}\" exists in several namespaces; use one of {}", .keys.join(", "))]
    Ambiguous { tenant: String, keys: Vec<String> },
    #[error("tenant \"{tenant}\" {why}")]
    Unavailable { tenant: String, why: &'static str },
    #[error("the tenant's credentials could not be prepared")]
    Keys,
    #[error("protocol violation before login: {0}")]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for LoginError {
    fn from(e: std::io::Error) -> Self {
        LoginError::Protocol(e.into())
    }
}

impl LoginError {
    /// What the client is told, or `None` when it cannot be told any more.
    fn sqlstate(&self) -> Option<&'static str> {
        match self {
            LoginError::TimedOut => Some("08P01"),
            LoginError::Crowded => Some("53300"),
            LoginError::TlsRequired | LoginError::NoUser | LoginError::Mechanism(_) => {
                Some("28000")
            }
            LoginError::BadPassword(_) => Some("28P01"),
            LoginError::Ambiguous { .. } => Some("3D000"),
            LoginError::Unavailable { .. } => Some("57P03"),
            LoginError::Keys => Some("XX000"),
            LoginError::Protocol(ProtocolError::Closed | ProtocolError::Io(_))
            | LoginError::Tls(_) => None,
            LoginError::Protocol(_) => Some("08P01"),
        }
    }
}

/// Why a known tenant refuses connections, in words a person understands.
fn unavailable(state: TenantState) -> Option<&'static str> {
    match state {
        TenantState::Ready => None,
        TenantState::Suspended => Some("is suspended: it accepts no connections until resumed"),
        TenantState::Deleting => Some("is being deleted"),
        TenantState::Pending => Some("is not ready yet: its database is still being set up"),
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
        // Taken here, in the accept loop, so that connections are ranked by arrival.
        let slot = shared.login_slots.admit();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Err(e) = handle_client(stream, slot, &shared, shutdown).await {
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

async fn negotiate(stream: &mut TcpStream, shared: &Shared) -> Result<Negotiated, LoginError> {
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
                cancel(shared, pid, key).await;
                return Ok(Negotiated::Done);
            }
            Startup::Params(_) if shared.settings.require_tls => {
                return Err(LoginError::TlsRequired);
            }
            Startup::Params(params) => return Ok(Negotiated::Plain(params)),
        }
    }
}

/// Passes a client's cancel request on to the server running its query, if any.
async fn cancel(shared: &Shared, pid: i32, key: i32) {
    let target = lock(&shared.cancels)
        .get(&(pid, key))
        .and_then(|t| *lock(t));
    if let Some((addr, server_pid, server_key)) = target {
        let _ = crate::server::cancel(addr, server_pid, server_key).await;
    }
}

/// Runs one step of logging in, within the startup deadline and for as long as no newer
/// connection needs the slot.
async fn step<T>(
    slot: &LoginSlot,
    deadline: tokio::time::Instant,
    step: impl Future<Output = Result<T, LoginError>>,
) -> Result<T, LoginError> {
    tokio::select! {
        result = tokio::time::timeout_at(deadline, step) => {
            result.unwrap_or(Err(LoginError::TimedOut))
        }
        _ = slot.evicted() => Err(LoginError::Crowded),
    }
}

/// Tells a client why it is refused, when it can still be told.
async fn refuse_login<W: AsyncWrite + Unpin>(shared: &Shared, writer: &mut W, e: LoginError) {
    match e.sqlstate() {
        Some(code) => {
            let _ = refuse(shared, writer, Refusal::new(code, e.to_string())).await;
        }
        None => debug!(error = %e, "client left before logging in"),
    }
}

async fn handle_client(
    mut stream: TcpStream,
    slot: LoginSlot,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError> {
    let deadline = tokio::time::Instant::now() + shared.settings.startup_timeout;
    let negotiated = match step(&slot, deadline, negotiate(&mut stream, shared)).await {
        Ok(negotiated) => negotiated,
        Err(e) => {
            refuse_login(shared, &mut stream, e).await;
            return Ok(());
        }
    };
    match negotiated {
        Negotiated::Done => Ok(()),
        Negotiated::Plain(params) => {
            let (reader, writer) = stream.into_split();
            let client = LoggingIn {
                params,
                sni: None,
                slot,
                deadline,
            };
            session(reader, writer, client, shared, shutdown).await
        }
        Negotiated::Tls => {
            let Some(acceptor) = shared.settings.tls.clone() else {
                return Ok(());
            };
            let handshake = async { acceptor.accept(stream).await.map_err(LoginError::Tls) };
            // A failed or abandoned handshake cannot be answered in the protocol: just close.
            let tls = match step(&slot, deadline, handshake).await {
                Ok(tls) => tls,
                Err(e) => {
                    debug!(error = %e, "TLS handshake did not complete");
                    return Ok(());
                }
            };
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let (mut reader, mut writer) = tokio::io::split(tls);
            let startup = async { Ok(read_startup(&mut reader).await?) };
            match step(&slot, deadline, startup).await {
                Ok(Startup::Params(params)) => {
                    let client = LoggingIn {
                        params,
                        sni,
                        slot,
                        deadline,
                    };
                    session(reader, writer, client, shared, shutdown).await
                }
                // Clients that encrypt everything send their cancel requests over TLS too.
                Ok(Startup::Cancel { pid, key }) => {
                    cancel(shared, pid, key).await;
                    Ok(())
                }
                Ok(Startup::Ssl | Startup::GssEnc) => {
                    let e = ProtocolError::Malformed {
                        what: "startup packet (a second encryption request, inside TLS)",
                    };
                    refuse_login(shared, &mut writer, e.into()).await;
                    Ok(())
                }
                Err(e) => {
                    refuse_login(shared, &mut writer, e).await;
                    Ok(())
                }
            }
        }
    }
}

/// A client between its startup packet and the end of its login.
struct LoggingIn {
    params: Vec<(String, String)>,
    /// The server name it sent in its TLS handshake, if any.
    sni: Option<String>,
    slot: LoginSlot,
    deadline: tokio::time::Instant,
}

/// Login and relay for one client, over plain TCP or TLS.
async fn session<R, W>(
    mut reader: R,
    mut writer: W,
    client: LoggingIn,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let LoggingIn {
        params,
        sni,
        slot,
        deadline,
    } = client;
    let login = login(&mut reader, &mut writer, shared, params.clone(), sni);
    let (route, user) = match step(&slot, deadline, login).await {
        Ok(login) => login,
        Err(e) => {
            refuse_login(shared, &mut writer, e).await;
            return Ok(());
        }
    };
    // Authenticated: no longer counts against the cap on connections logging in.
    drop(slot);

    let pool = shared.pools.get(&route);
    let (mut server, params) = match relay::attach(shared, &pool, &params).await {
        Ok(attached) => attached,
        Err(refused) => return refused.send(shared, &mut writer).await,
    };

    // The client's cancel key is the router's own; it maps to whichever server runs its query.
    let (pid, key, target) = register_cancel(shared);
    if let Some(conn) = server.as_mut() {
        let c = conn.conn();
        *lock(&target) = Some((c.addr, c.pid, c.key));
    }
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&backend::authentication_ok().bytes);
    for (name, value) in params.reported() {
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

    let session = relay::Session {
        shared,
        pool: &pool,
        target: &target,
        shutdown,
        ended: shared.sessions_of(&route),
        params,
    };
    let result = relay::relay(&mut reader, &mut writer, &mut server, session).await;
    lock(&shared.cancels).remove(&(pid, key));
    shared.metrics.sessions.dec();
    result
}

/// Startup, tenant resolution and SCRAM. Every name gets the same exchange, with a salt made the
/// same way whether or not a tenant answers to it (see [`crate::auth`]); what a name leads to
/// (nothing, several tenants, a suspended one) is told only to a client that proved a password.
async fn login<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
    params: Vec<(String, String)>,
    sni: Option<String>,
) -> Result<(Arc<TenantRoute>, String), LoginError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let user = Startup::param(&params, "user")
        .ok_or(LoginError::NoUser)?
        .to_string();
    let sni_tenant = sni
        .as_deref()
        .and_then(|name| tenant_from_sni(name, shared.settings.sni_domain.as_deref()));
    let (tenant, _) = tenant_from_startup(&user, Startup::param(&params, "database"), sni_tenant);
    // The tenants the name may mean: one, several (a bare name used in several namespaces), or none.
    let (candidates, ambiguous) = {
        let table = shared.table.load();
        match table.lookup(tenant) {
            Lookup::Found(route) => (vec![route], None),
            Lookup::Unknown => (Vec::new(), None),
            Lookup::Ambiguous(keys) => {
                let routes = keys
                    .iter()
                    .filter_map(|key| match table.lookup(key) {
                        Lookup::Found(route) => Some(route),
                        _ => None,
                    })
                    .collect();
                (routes, Some(keys))
            }
        }
    };

    send(writer, &backend::authentication_sasl()).await?;
    let first = read_frame_limited(reader, MAX_LOGIN_MESSAGE).await?;
    let (mechanism, client_first) = parse_sasl_initial_response(&first)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(LoginError::Mechanism(mechanism));
    }
    let bad_password = || LoginError::BadPassword(user.clone());
    let (exchange, server_first) = ScramServer::start(&shared.scram.salt(tenant), &client_first)
        .map_err(|_| bad_password())?;
    send(
        writer,
        &backend::authentication(11, server_first.as_bytes()),
    )
    .await?;
    let client_final = read_frame_limited(reader, MAX_LOGIN_MESSAGE).await?;
    if client_final.tag != b'p' {
        return Err(ProtocolError::Unexpected {
            got: client_final.tag as char,
            during: "SASL authentication",
        }
        .into());
    }
    let proof = exchange
        .finish(client_final.body())
        .map_err(|_| bad_password())?;
    let mut proven = None;
    for route in candidates {
        let keys = shared
            .scram
            .keys(&route.key(), tenant, &route.password)
            .await
            .map_err(|_| LoginError::Keys)?;
        if let Some(server_final) = proof.verify(&keys) {
            proven = Some((route, server_final));
            break;
        }
    }
    let Some((route, server_final)) = proven else {
        return Err(bad_password());
    };
    send(
        writer,
        &backend::authentication(12, server_final.as_bytes()),
    )
    .await?;
    if let Some(keys) = ambiguous {
        return Err(LoginError::Ambiguous {
            tenant: tenant.to_string(),
            keys,
        });
    }
    if let Some(why) = unavailable(route.state) {
        return Err(LoginError::Unavailable {
            tenant: tenant.to_string(),
            why,
        });
    }
    Ok((route, user))
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
