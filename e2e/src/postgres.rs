//! Real PostgreSQL servers for tests: `initdb` + `pg_ctl` on a free loopback port, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub const ADMIN_USER: &str = "silo_admin";

/// What [`PgServer::exists`] looks for.
#[derive(Clone, Copy, Debug)]
pub enum Catalog {
    Role,
    Database,
}

/// A running PostgreSQL server owned by one test.
pub struct PgServer {
    /// The address the cluster reaches it at: the node link's host address when the e2e cluster
    /// has a node (`SILO_E2E_NODE_HOST`, so pods can connect), else loopback. It listens on both.
    pub host: String,
    pub port: u16,
    pub admin_password: String,
    data: PathBuf,
    bin: PathBuf,
    as_postgres_user: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl PgServer {
    /// Starts a server under the e2e work directory (`SILO_E2E_DIR`, else a temp folder).
    pub fn start() -> anyhow::Result<PgServer> {
        Self::start_with(false)
    }

    /// Starts a server that offers TLS, with a self-signed certificate made by openssl.
    pub fn start_tls() -> anyhow::Result<PgServer> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> anyhow::Result<PgServer> {
        let bin = pg_bin_dir()?;
        let root = std::env::var_os("SILO_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = root.join(format!(
            "pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // PostgreSQL refuses to run as root; as root, run it as the `postgres` user.
        let as_postgres_user = is_root();
        if as_postgres_user {
            run(Command::new("chown").args(["postgres:", &dir.display().to_string()]))?;
        }
        let admin_password = random_password();
        let pwfile = dir.join("pwfile");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&pwfile)?;
            file.write_all(admin_password.as_bytes())?;
        }
        if as_postgres_user {
            run(Command::new("chown").args(["postgres:", &pwfile.display().to_string()]))?;
        }
        let data = dir.join("data");
        let host = std::env::var("SILO_E2E_NODE_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let mut server = PgServer {
            host,
            port: 0,
            admin_password,
            data,
            bin,
            as_postgres_user,
        };
        server.pg(
            "initdb",
            &[
                "-D",
                &server.data.display().to_string(),
                "-U",
                ADMIN_USER,
                &format!("--pwfile={}", pwfile.display()),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        if server.host != "127.0.0.1" {
            // Pods reach the server from the node's address (their traffic is masqueraded).
            let hba = server.data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba)?;
            rules.push_str(&format!("host all all {}/15 scram-sha-256\n", server.host));
            std::fs::write(&hba, rules)?;
        }
        let mut extra = String::new();
        if tls {
            let (cert, key) = self_signed_cert(&dir, "localhost")?;
            run(Command::new("chmod").arg("600").arg(&key))?;
            if server.as_postgres_user {
                run(Command::new("chown").arg("postgres:").arg(&cert).arg(&key))?;
            }
            extra = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        for _ in 0..5 {
            server.port = free_port()?;
            // Free on the node address too: PostgreSQL only warns when one address fails to bind.
            if server.host != "127.0.0.1"
                && std::net::TcpListener::bind((server.host.as_str(), server.port)).is_err()
            {
                continue;
            }
            if server.start_on_port(&dir, &extra).is_ok() {
                return Ok(server);
            }
        }
        bail!(
            "PostgreSQL did not start; see {}",
            dir.join("log").display()
        )
    }

    fn start_on_port(&self, dir: &Path, extra: &str) -> anyhow::Result<()> {
        let listen = if self.host == "127.0.0.1" {
            self.host.clone()
        } else {
            format!("127.0.0.1,{}", self.host)
        };
        let options = format!(
            "-c port={} -c listen_addresses={listen} -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB{extra}",
            self.port,
            dir.display()
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &dir.join("log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
    }

    fn pg(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.args(args);
        run(&mut cmd)
    }

    /// Admin connection options to database `postgres`.
    pub fn admin_options(&self) -> PgConnectOptions {
        self.options(ADMIN_USER, &self.admin_password, "postgres")
    }

    pub fn options(&self, user: &str, password: &str, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(user)
            .password(password)
            .database(database)
            .disable_statement_logging()
    }

    /// A small admin pool for assertions.
    pub async fn admin_pool(&self) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(2)
            .connect_with(self.admin_options())
            .await?)
    }

    /// Whether a role (`pg_roles`) or database (`pg_database`) of that name exists on the server.
    pub async fn exists(&self, catalog: Catalog, name: &str) -> anyhow::Result<bool> {
        let admin = self.admin_pool().await?;
        let sql = match catalog {
            Catalog::Role => "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            Catalog::Database => "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        };
        let found = sqlx::query_scalar(sql).bind(name).fetch_one(&admin).await?;
        admin.close().await;
        Ok(found)
    }

    /// The server's log file (`pg_ctl -l`).
    pub fn log_path(&self) -> PathBuf {
        self.data
            .parent()
            .map(|dir| dir.join("log"))
            .unwrap_or_else(|| self.data.join("log"))
    }

    /// The folder holding the server's data (for its size, or the free space left there).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `ALTER SYSTEM SET log_statement = <value>` and a configuration reload: `all` makes the
    /// server log every statement it receives to [`PgServer::log_path`], `none` stops it.
    pub async fn set_log_statement(&self, value: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            ["none", "ddl", "mod", "all"].contains(&value),
            "log_statement has no value {value}"
        );
        let admin = self.admin_pool().await?;
        sqlx::raw_sql(&format!("ALTER SYSTEM SET log_statement = '{value}'"))
            .execute(&admin)
            .await?;
        sqlx::raw_sql("SELECT pg_reload_conf()")
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(())
    }

    /// Stops the server at once (used to simulate an outage as well as on drop).
    pub fn stop(&self) {
        let _ = self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.data.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The PostgreSQL binaries of the newest installed version (or `SILO_PG_BIN`).
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SILO_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries not found in /usr/lib/postgresql (apt-get install postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no PostgreSQL version with initdb in /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A self-signed certificate and key (PEM) for `dns_names` (the first is the CN), made by
/// openssl in `dir`.
pub fn self_signed_cert(dir: &Path, dns_names: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let cn = dns_names.split(',').next().unwrap_or(dns_names);
    let san: Vec<String> = dns_names.split(',').map(|d| format!("DNS:{d}")).collect();
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName={}", san.join(",")),
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    Ok((cert, key))
}

/// A free loopback port: bound once by the OS, then released for the server to take.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn random_password() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..24)
        .map(|_| char::from(b"abcdefghijkmnopqrstuvwxyz23456789"[rng.random_range(0..33)]))
        .collect()
}
