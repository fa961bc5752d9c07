//! Connections to PostgreSQL servers, as the pools open them: TLS as the server's `sslMode` says
//! ([`tls`]), startup and SCRAM login as the tenant's role; then, for the relay stage, a client's
//! session parameters set, a reset and a liveness check before reuse; and cancel requests passed
//! on to the server running a client's query.

mod tls;

use std::time::Instant;

use bytes::BytesMut;
use futures::FutureExt;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::protocol::backend::error_fields;
use crate::protocol::{Frame, ProtocolError, read_cstr, read_frame};
use crate::routing::TenantRoute;
use crate::session::params::{ClientParams, Reported, ServerParams, Setting, establish_query};
pub use tls::UpstreamTls;

#[derive(thiserror::Error, Debug)]
pub(crate) enum ServerError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("server protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server refused the login ({code}): {message}")]
    Refused { code: String, message: String },
    /// A query the router sent for a client (its parameters), refused: the client is told.
    #[error("server refused the session's parameters ({code}): {message}")]
    Rejected { code: String, message: String },
    #[error("server asked for an authentication method the router does not speak ({0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM with the server: {0}")]
    Scram(std::io::Error),
    #[error("the server does not accept TLS, and its sslMode is Require")]
    TlsRefused,
    #[error("TLS with the server: {0}")]
    Tls(std::io::Error),
}

type ServerReader = BufReader<Box<dyn AsyncRead + Unpin + Send>>;
type ServerWriter = Box<dyn AsyncWrite + Unpin + Send>;

/// A logged-in server connection.
pub(crate) struct ServerConn {
    pub(crate) reader: ServerReader,
    pub(crate) writer: ServerWriter,
    pub(crate) params: ServerParams,
    pub(crate) pid: i32,
    pub(crate) key: i32,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) last_used: Instant,
    /// Statements the router prepared here (transaction mode), by server-side name.
    pub(crate) prepared: std::collections::HashSet<String>,
}

impl ServerConn {
    pub(crate) async fn connect(route: &TenantRoute) -> Result<ServerConn, ServerError> {
        let addr = format!("{}:{}", route.host, route.port);
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| ServerError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map_err(|source| ServerError::Connect { addr, source })?;
        let (r, mut writer) = tls::negotiate(stream, route).await?;
        let mut reader = BufReader::with_capacity(64 * 1024, r);

        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", route.user.as_str()),
                ("database", route.database.as_str()),
                ("application_name", "silo-router"),
            ],
            &mut buf,
        )
        .map_err(ServerError::Scram)?;
        writer.write_all(&buf).await.map_err(ProtocolError::from)?;

        let mut scram: Option<ScramSha256> = None;
        let mut params = Reported::default();
        let (mut pid, mut key) = (0, 0);
        loop {
            let frame = read_frame(&mut reader).await?;
            match frame.tag {
                b'R' => {
                    let body = frame.body();
                    if body.len() < 4 {
                        return Err(ProtocolError::Malformed {
                            what: "authentication request",
                        }
                        .into());
                    }
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    let data = &body[4..];
                    buf.clear();
                    match code {
                        0 => continue,
                        10 => {
                            let s = ScramSha256::new(
                                route.password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut buf)
                                .map_err(ServerError::Scram)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or(ProtocolError::Malformed {
                                what: "SASL continue",
                            })?;
                            s.update(data).map_err(ServerError::Scram)?;
                            frontend::sasl_response(s.message(), &mut buf)
                                .map_err(ServerError::Scram)?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or(ProtocolError::Malformed { what: "SASL final" })?;
                            s.finish(data).map_err(ServerError::Scram)?;
                            continue;
                        }
                        other => return Err(ServerError::UnsupportedAuth(other)),
                    }
                    writer.write_all(&buf).await.map_err(ProtocolError::from)?;
                }
                b'S' => {
                    let (name, value) = parameter_status(frame.body())?;
                    params.set(&name, &value);
                }
                b'K' => {
                    let b = frame.body();
                    if b.len() >= 8 {
                        pid = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        key = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                    }
                }
                b'Z' => {
                    return Ok(ServerConn {
                        reader,
                        writer,
                        params: ServerParams::new(params),
                        pid,
                        key,
                        addr: peer,
                        last_used: Instant::now(),
                        prepared: Default::default(),
                    });
                }
                b'E' => {
                    let (code, message) = error_fields(&frame);
                    return Err(ServerError::Refused { code, message });
                }
                b'N' => {}
                other => {
                    return Err(ProtocolError::Unexpected {
                        got: other as char,
                        during: "server login",
                    }
                    .into());
                }
            }
        }
    }

    /// Resets session state before the connection serves another client (`DISCARD ALL`), and
    /// waits for the server to be idle again. False when the connection is not reusable.
    pub(crate) async fn reset(&mut self) -> bool {
        self.prepared.clear();
        let reset = self.run("DISCARD ALL").await.is_ok();
        self.params.reset();
        reset
    }

    /// Starts a client's session here: every parameter back to the server's default, then the
    /// client's startup `settings`, which the server may refuse as it would at a direct login.
    /// The client's parameters as the server then reports them.
    pub(crate) async fn establish(
        &mut self,
        settings: &[Setting],
    ) -> Result<ClientParams, ServerError> {
        let startup = self.params.startup();
        let unreported: Vec<Setting> = settings
            .iter()
            .filter(|s| !startup.contains(&s.name))
            .cloned()
            .collect();
        if settings.is_empty() {
            return Ok(ClientParams::new(startup.clone(), unreported));
        }
        self.run(&establish_query(settings)).await?;
        let client = ClientParams::new(self.params.reported().clone(), unreported);
        self.params.applied(&client);
        Ok(client)
    }

    /// Makes this session's parameters the client's, with one query when any differ.
    pub(crate) async fn sync(&mut self, client: &ClientParams) -> Result<(), ServerError> {
        if let Some(query) = self.params.sync_query(client) {
            // Whatever the query got to do before an error is rolled back with it.
            self.run(&query).await?;
            self.params.applied(client);
        }
        Ok(())
    }

    /// Runs a query of the router's own to its end, following the parameters it changes.
    async fn run(&mut self, query: &str) -> Result<(), ServerError> {
        let mut body = Vec::with_capacity(query.len() + 1);
        body.extend_from_slice(query.as_bytes());
        body.push(0);
        self.writer
            .write_all(&Frame::new(b'Q', &body).bytes)
            .await
            .map_err(ProtocolError::from)?;
        let mut refused = None;
        loop {
            let frame = read_frame(&mut self.reader).await?;
            match frame.tag {
                b'S' => {
                    let (name, value) = parameter_status(frame.body())?;
                    self.params.observe(&name, &value);
                }
                b'E' => refused = Some(error_fields(&frame)),
                b'Z' if frame.body() != b"I" => {
                    return Err(ProtocolError::Unexpected {
                        got: 'Z',
                        during: "a query of the router's own (left a transaction open)",
                    }
                    .into());
                }
                b'Z' => {
                    return match refused {
                        Some((code, message)) => Err(ServerError::Rejected { code, message }),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }

    /// Whether an idle connection is still usable: the server has sent nothing since (a server
    /// ending a backend sends its FATAL error, then closes). Polled once, without waiting: the
    /// runtime knows the socket's readiness, so this rarely costs a system call.
    pub(crate) fn is_alive(&mut self) -> bool {
        self.reader.fill_buf().now_or_never().is_none()
    }
}

/// The name and value of a ParameterStatus message's body.
pub(crate) fn parameter_status(mut body: &[u8]) -> Result<(String, String), ProtocolError> {
    let name = read_cstr(&mut body, "parameter status")?;
    let value = read_cstr(&mut body, "parameter status")?;
    Ok((name, value))
}

/// Sends a CancelRequest for (pid, key) to the server at `addr`.
pub(crate) async fn cancel(addr: std::net::SocketAddr, pid: i32, key: i32) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut packet = Vec::with_capacity(16);
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&crate::protocol::startup::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    stream.write_all(&packet).await
}
