//! Accepting clients: the accept loop, a login slot per connection ([`admission`]), the first
//! packets (an encryption request, answered; a cancel request, passed on; the startup packet),
//! and the TLS handshake. Everything until the client has logged in runs within the startup
//! deadline, for as long as no newer connection needs the slot ([`step`]). The startup parameters
//! go to the login stage ([`crate::login`]); a client that proved its password goes on to the
//! relay stage ([`crate::relay::run`]).

pub(crate) mod admission;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::login::{self, LoginError, refuse_login};
use crate::protocol::ProtocolError;
use crate::protocol::startup::{Startup, read_startup};
use crate::state::Shared;
use admission::LoginSlot;

/// Accepts clients until `shutdown`, then waits for open sessions to end.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
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

/// Passes a client's cancel request on to the server running its query, if this replica holds
/// the client; else to the replica that does (the key's tag says which), which does the same. A
/// replica passes on only requests carrying another tag than its own, so a request is passed on
/// at most once. (Two replicas whose pod IPs give the same tag, one chance in 32,767 per pair, lose
/// the cancels that reach the other one: they cannot be told from requests passed on already.)
async fn cancel(shared: &Shared, pid: i32, key: i32) {
    if shared.peers.is_own(pid) {
        if let Some((addr, server_pid, server_key)) = shared.cancels.lookup(pid, key) {
            let _ = crate::backend::cancel(addr, server_pid, server_key).await;
        }
        return;
    }
    for peer in shared.peers.owners_of(pid) {
        let forwarded = tokio::time::timeout(
            Duration::from_secs(2),
            crate::backend::cancel(peer, pid, key),
        );
        if !matches!(forwarded.await, Ok(Ok(()))) {
            debug!(%peer, "passing a cancel request on to another replica failed");
        }
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

/// Login, then the session, for one client over plain TCP or TLS.
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
    let login = login::login(&mut reader, &mut writer, shared, params, sni);
    let client = match step(&slot, deadline, login).await {
        Ok(client) => client,
        Err(e) => {
            refuse_login(shared, &mut writer, e).await;
            return Ok(());
        }
    };
    // Authenticated: no longer counts against the cap on connections logging in.
    drop(slot);
    crate::relay::run(reader, writer, client, shared, shutdown).await
}
