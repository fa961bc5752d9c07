//! The PostgreSQL side of the runner: connections (libpq environment or a URL), the pg_dump /
//! server version check, the exported snapshot, per-table row counts, and the client tools'
//! processes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use url::Url;

use super::RunnerError;
use super::redact::redact_urls;

/// A database to connect to: the libpq environment (PGHOST, PGPORT, PGDATABASE, PGUSER,
/// PGPASSWORD, ...), or a `postgres://` URL. The password of a URL is handed to the client tools
/// in PGPASSWORD, never on their command line.
#[derive(Clone, Debug)]
pub enum DbTarget {
    Env,
    Url {
        /// The URL without its password, as the tools get it in `-d` and errors may show it.
        conninfo: String,
        password: Option<String>,
        options: Box<PgConnectOptions>,
    },
}

impl DbTarget {
    pub fn from_url(url: &str) -> Result<DbTarget, RunnerError> {
        let invalid = |why: String| RunnerError::DatabaseUrl {
            url: redact_urls(url),
            why,
        };
        let mut parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(invalid(
                "expected postgres://user:password@host:port/database".into(),
            ));
        }
        let options = PgConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))?;
        let mut password = parsed
            .password()
            .map(|p| percent_decode(p).unwrap_or_else(|| p.to_string()));
        // A password in the query (`?password=`) moves to PGPASSWORD as well.
        let query: Vec<(String, String)> = parsed
            .query_pairs()
            .filter_map(|(k, v)| {
                if k == "password" {
                    password = Some(v.into_owned());
                    None
                } else {
                    Some((k.into_owned(), v.into_owned()))
                }
            })
            .collect();
        parsed.set_query(None);
        if !query.is_empty() {
            parsed.query_pairs_mut().extend_pairs(query);
        }
        parsed
            .set_password(None)
            .map_err(|()| invalid("the URL has no host".into()))?;
        Ok(DbTarget::Url {
            conninfo: parsed.to_string(),
            password,
            options: Box::new(options),
        })
    }

    /// The password this target carries, to be masked wherever text is shown.
    pub fn secret(&self) -> Option<String> {
        match self {
            DbTarget::Env => None,
            DbTarget::Url { password, .. } => password.clone(),
        }
    }

    pub fn connect_options(&self) -> PgConnectOptions {
        match self {
            DbTarget::Env => PgConnectOptions::new(),
            DbTarget::Url { options, .. } => (**options).clone(),
        }
    }

    pub async fn connect(&self, what: &'static str) -> Result<PgConnection, RunnerError> {
        PgConnection::connect_with(&self.connect_options())
            .await
            .map_err(|source| RunnerError::Connect { what, source })
    }

    /// Points a client tool at this database: `-d` (an empty `-d` lets libpq take PGDATABASE and
    /// the rest from the environment) and the password in PGPASSWORD.
    pub fn apply(&self, command: &mut Command) {
        match self {
            DbTarget::Env => {
                command.arg("-d").arg("");
            }
            DbTarget::Url {
                conninfo, password, ..
            } => {
                command.arg("-d").arg(conninfo);
                if let Some(password) = password {
                    command.env("PGPASSWORD", password);
                }
            }
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> ("15.18", 15).
pub fn parse_tool_version(output: &str) -> Option<(String, u32)> {
    let version = output
        .split_once(')')?
        .1
        .split_whitespace()
        .next()?
        .to_string();
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version, major))
}

/// The version of a client tool (`pg_dump --version`).
pub async fn tool_version(tool: &Path) -> Result<(String, u32), RunnerError> {
    let output = Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| RunnerError::Spawn {
            tool: tool.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_tool_version(&text).ok_or_else(|| RunnerError::ToolVersion {
        tool: tool.display().to_string(),
        output: text.trim().to_string(),
    })
}

/// The server's version: (`server_version`, major).
pub async fn server_version(conn: &mut PgConnection) -> Result<(String, u32), RunnerError> {
    let (version, num): (String, String) = sqlx::query_as(
        "SELECT pg_catalog.current_setting('server_version'), pg_catalog.current_setting('server_version_num')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|source| RunnerError::Query {
        what: "reading the server version",
        source,
    })?;
    let num: u32 = num.parse().map_err(|_| RunnerError::ToolVersion {
        tool: "the server".into(),
        output: num.clone(),
    })?;
    Ok((version, num / 10_000))
}

/// Every user table (not the catalogs', not an extension's), `schema.table` quoted as needed.
const USER_TABLES: &str = r"
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
  AND NOT EXISTS (
    SELECT 1 FROM pg_catalog.pg_depend d
    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1";

/// Rows of every user table, as the connection's transaction sees them.
pub async fn count_rows(conn: &mut PgConnection) -> Result<BTreeMap<String, i64>, RunnerError> {
    let query_error = |source| RunnerError::Query {
        what: "counting rows",
        source,
    };
    let tables: Vec<String> = sqlx::query_scalar(USER_TABLES)
        .fetch_all(&mut *conn)
        .await
        .map_err(query_error)?;
    let mut counts = BTreeMap::new();
    for table in tables {
        // The name comes quoted from format('%I.%I'), so it is safe to splice in.
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM ONLY {table}"))
            .fetch_one(&mut *conn)
            .await
            .map_err(query_error)?;
        counts.insert(table, rows);
    }
    Ok(counts)
}

/// The last `limit` bytes a child wrote to a pipe (its stderr), read until the pipe closes.
pub async fn read_tail(mut pipe: impl AsyncRead + Unpin, limit: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * limit {
                    kept.drain(..kept.len() - limit);
                }
            }
        }
    }
    if kept.len() > limit {
        kept.drain(..kept.len() - limit);
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions_parse() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 17devel"),
            Some(("17devel".into(), 17))
        );
        assert_eq!(parse_tool_version("nonsense"), None);
    }

    #[test]
    fn a_url_password_leaves_the_command_line() {
        let target = DbTarget::from_url("postgres://alice:p%40ss@db:5432/scratch?sslmode=disable")
            .expect("parses");
        let DbTarget::Url {
            conninfo, password, ..
        } = &target
        else {
            panic!("a URL target");
        };
        assert_eq!(conninfo, "postgres://alice@db:5432/scratch?sslmode=disable");
        assert_eq!(password.as_deref(), Some("p@ss"));
        let target =
            DbTarget::from_url("postgresql://db/scratch?user=bob&password=pw").expect("parses");
        let DbTarget::Url {
            conninfo, password, ..
        } = &target
        else {
            panic!("a URL target");
        };
        assert_eq!(conninfo, "postgresql://db/scratch?user=bob");
        assert_eq!(password.as_deref(), Some("pw"));
        let err = DbTarget::from_url("mysql://u:hunter2@h/d").expect_err("not postgres");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
