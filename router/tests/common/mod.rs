//! For the pooling tests: a real PostgreSQL with one tenant, `acme`, and a router process in front
//! of it; and a small protocol client that sends exactly the startup packet a test asks for and
//! shows everything the router answers (ParameterStatus included).

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use silo_e2e::PgServer;
use silo_e2e::postgres::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const USER: &str = "t_acme";
pub const PASSWORD: &str = "pw-acme";

pub struct Router {
    pub pg: PgServer,
    pub port: u16,
    file: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Child,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
        if std::env::var_os("SILO_KEEP_ROUTER_LOG").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl Router {
    /// PostgreSQL with tenant `acme` (role and database `t_acme`), and a router in `mode` giving
    /// the tenant at most `connections` server connections.
    pub async fn start(mode: &str, connections: usize) -> anyhow::Result<Router> {
        let pg = PgServer::start()?;
        let admin = pg.admin_pool().await?;
        for sql in [
            format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"),
            format!("CREATE DATABASE {USER} OWNER {USER}"),
        ] {
            sqlx::raw_sql(&sql).execute(&admin).await?;
        }
        let port = free_port()?;
        let file = std::env::temp_dir().join(format!("silo-router-{port}.yaml"));
        std::fs::write(
            &file,
            format!(
                "tenants:\n- {{name: acme, host: 127.0.0.1, port: {}, database: {USER}, user: {USER}, password: {PASSWORD}, connectionLimit: {connections}}}\n",
                pg.port
            ),
        )?;
        let log = std::env::temp_dir().join(format!("silo-router-{port}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_silo-router"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--pool-mode", mode, "--checkout-timeout", "1"])
            .args(["--startup-timeout", "10", "--log-filter", "debug"])
            .arg("--config")
            .arg(&file)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "router did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Router {
            pg,
            port,
            file,
            log,
            child,
        })
    }

    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=acme",
            self.port
        )
    }

    /// A tokio-postgres client, and its connection's end (the error that ended it, if any).
    pub async fn connect(
        &self,
    ) -> anyhow::Result<(
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    )> {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls).await?;
        Ok((client, tokio::spawn(connection)))
    }

    /// A client sending `params` in its startup packet, besides user and database.
    pub async fn raw(&self, params: &[(&str, &str)]) -> anyhow::Result<RawClient> {
        RawClient::connect(self.port, params).await
    }

    /// Server backends of the tenant's role, as PostgreSQL counts them.
    pub async fn backends(&self) -> anyhow::Result<Vec<i32>> {
        let admin = self.pg.admin_pool().await?;
        Ok(
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE usename = $1 ORDER BY pid")
                .bind(USER)
                .fetch_all(&admin)
                .await?,
        )
    }

    /// Terminates every server backend of the tenant's role.
    pub async fn terminate_backends(&self) -> anyhow::Result<usize> {
        let admin = self.pg.admin_pool().await?;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
        )
        .bind(USER)
        .fetch_all(&admin)
        .await?;
        Ok(ended.len())
    }
}

/// An ErrorResponse, as a test error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity} {code}: {message}")]
pub struct DbError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
#[error("the router closed the connection")]
pub struct Closed;

pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// Every ParameterStatus received, the latest value of each.
    pub params: HashMap<String, String>,
}

impl RawClient {
    async fn connect(port: u16, extra: &[(&str, &str)]) -> anyhow::Result<RawClient> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let mut client = RawClient {
            stream,
            buf: BytesMut::new(),
            params: HashMap::new(),
        };
        let mut params = vec![("user", USER), ("database", "acme")];
        params.extend_from_slice(extra);
        let mut out = BytesMut::new();
        frontend::startup_message(params, &mut out)?;
        client.stream.write_all(&out).await?;
        let mut scram = None;
        loop {
            let (tag, body) = client.read().await?;
            match tag {
                b'R' => {
                    let code = (&body[..4]).get_i32();
                    out.clear();
                    match code {
                        0 => continue,
                        10 => {
                            let s = ScramSha256::new(
                                PASSWORD.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut out,
                            )?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().context("SASL continue first")?;
                            s.update(&body[4..])?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        12 => {
                            scram
                                .as_mut()
                                .context("SASL final first")?
                                .finish(&body[4..])?;
                            continue;
                        }
                        other => bail!("authentication request {other}"),
                    }
                    client.stream.write_all(&out).await?;
                }
                b'E' => return Err(error(&body).into()),
                b'Z' => return Ok(client),
                _ => {}
            }
        }
    }

    /// Runs a simple query; the rows of all its results, as text.
    pub async fn query(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'D' => rows.push(data_row(&body)?),
                b'E' => failed = Some(error(&body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// The first column of the first row.
    pub async fn value(&mut self, sql: &str) -> anyhow::Result<String> {
        let rows = self.query(sql).await?;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .with_context(|| format!("no value from {sql}"))
    }

    /// The next error the router sends, unasked; `None` when it closes the connection first.
    pub async fn next_error(&mut self) -> anyhow::Result<Option<DbError>> {
        loop {
            match self.read().await {
                Ok((b'E', body)) => return Ok(Some(error(&body))),
                Ok(_) => {}
                Err(e) if e.downcast_ref::<Closed>().is_some() => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message's tag and body; ParameterStatus is recorded on the way.
    async fn read(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_i32() as usize;
                if self.buf.len() > len {
                    let frame = self.buf.split_to(len + 1);
                    let (tag, body) = (frame[0], frame[5..].to_vec());
                    if tag == b'S' {
                        let mut parts = body.split(|b| *b == 0);
                        let name = String::from_utf8_lossy(parts.next().unwrap_or_default());
                        let value = String::from_utf8_lossy(parts.next().unwrap_or_default());
                        self.params.insert(name.into_owned(), value.into_owned());
                    }
                    return Ok((tag, body));
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(Closed.into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Closed.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn error(body: &[u8]) -> DbError {
    let mut e = DbError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            _ => {}
        }
    }
    e
}

fn data_row(mut body: &[u8]) -> anyhow::Result<Vec<Option<String>>> {
    let columns = body.get_i16();
    let mut row = Vec::new();
    for _ in 0..columns {
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let (value, rest) = body.split_at(len as usize);
            row.push(Some(String::from_utf8_lossy(value).into_owned()));
            body = rest;
        }
    }
    Ok(row)
}
