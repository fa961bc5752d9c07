//! Logging a client in: from its startup parameters (and TLS server name) to the tenant it means,
//! proved with SCRAM-SHA-256 against the tenant's password ([`auth`]); and the refusals, sent as
//! FATAL errors with a SQLSTATE. The accept stage ([`crate::accept`]) runs [`login`] within the
//! client's startup deadline and hands a [`LoggedIn`] client to the relay stage
//! ([`crate::relay::run`]), which attaches a server and completes the login with the [`hello`].

pub(crate) mod auth;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::protocol::backend::{self, parse_sasl_initial_response};
use crate::protocol::startup::Startup;
use crate::protocol::{Frame, MAX_LOGIN_MESSAGE, ProtocolError, read_frame_limited};
use crate::routing::{Lookup, TenantRoute, TenantState, tenant_from_sni, tenant_from_startup};
use crate::session::params::ClientParams;
use crate::state::Shared;
use auth::ScramServer;

/// A refusal sent to the client as an ErrorResponse.
#[derive(Debug)]
pub(crate) struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Why a connection ends before its session begins. The client is told (as a FATAL error with
/// [`LoginError::sqlstate`]) unless the connection is gone.
#[derive(thiserror::Error, Debug)]
pub(crate) enum LoginError {
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
        TenantState::Restoring => {
            Some("is being restored: it accepts no connections until the restore ends")
        }
        TenantState::Deleting => Some("is being deleted"),
        TenantState::Pending => Some("is not ready yet: its database is still being set up"),
    }
}

/// A client that proved its tenant's password.
pub(crate) struct LoggedIn {
    pub(crate) route: Arc<TenantRoute>,
    pub(crate) user: String,
    /// Its startup packet's parameters.
    pub(crate) startup: Vec<(String, String)>,
}

/// Startup, tenant resolution and SCRAM. Every name gets the same exchange, with a salt made the
/// same way whether or not a tenant answers to it (see [`auth`]); what a name leads to (nothing,
/// several tenants, a suspended one) is told only to a client that proved a password.
pub(crate) async fn login<R, W>(
    reader: &mut R,
    writer: &mut W,
    shared: &Shared,
    params: Vec<(String, String)>,
    sni: Option<String>,
) -> Result<LoggedIn, LoginError>
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
    'routes: for route in candidates {
        // The current password, then during a rotation the others (their keys cached apart, so
        // that clients of each never evict the others').
        for (i, password) in route.passwords().enumerate() {
            let cache_key = match i {
                0 => route.key(),
                i => format!("{} {i}", route.key()),
            };
            let keys = shared
                .scram
                .keys(&cache_key, tenant, password)
                .await
                .map_err(|_| LoginError::Keys)?;
            if let Some(server_final) = proof.verify(&keys) {
                proven = Some((route.clone(), server_final));
                break 'routes;
            }
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
    Ok(LoggedIn {
        route,
        user,
        startup: params,
    })
}

/// The end of a login, in one write: AuthenticationOk, the client's parameters
/// (ParameterStatus), its cancel key (BackendKeyData) and ReadyForQuery.
pub(crate) async fn hello<W: AsyncWrite + Unpin>(
    writer: &mut W,
    params: &ClientParams,
    pid: i32,
    key: i32,
) -> std::io::Result<()> {
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&backend::authentication_ok().bytes);
    for (name, value) in params.reported() {
        hello.extend_from_slice(&backend::parameter_status(name, value).bytes);
    }
    hello.extend_from_slice(&backend::backend_key_data(pid, key).bytes);
    hello.extend_from_slice(&backend::ready_for_query(b'I').bytes);
    writer.write_all(&hello).await
}

/// Tells a client why it is refused, when it can still be told.
pub(crate) async fn refuse_login<W: AsyncWrite + Unpin>(
    shared: &Shared,
    writer: &mut W,
    e: LoginError,
) {
    match e.sqlstate() {
        Some(code) => {
            let _ = refuse(shared, writer, Refusal::new(code, e.to_string())).await;
        }
        None => debug!(error = %e, "client left before logging in"),
    }
}

/// Refuses a client: counted by SQLSTATE, and sent as a FATAL error.
pub(crate) async fn refuse<W: AsyncWrite + Unpin>(
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

pub(crate) async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    writer.write_all(&frame.bytes).await
}
