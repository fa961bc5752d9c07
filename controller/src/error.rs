//! The controller's error type. `reason()` is the PascalCase word used for metric labels, Event
//! reasons and condition reasons.

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("DatabaseServer {server} does not exist")]
    ServerGone { server: String },

    #[error("DatabaseServer {server} is not connected yet")]
    ServerNotConnected { server: String },

    #[error("{action} on DatabaseServer {server}: {source}")]
    Sql {
        action: &'static str,
        server: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "{conflict} on DatabaseServer {server}, not to this tenant: it is left alone (rename or remove it, or delete this Tenant)"
    )]
    NameConflict {
        conflict: crate::sql::identity::Conflict,
        server: String,
    },

    #[error("Secret {namespace}/{name}: {message}")]
    Secret {
        namespace: String,
        name: String,
        message: String,
    },

    /// A backup's object could not be reached or deleted.
    #[error("{message}")]
    Backup { message: String },

    /// A deleted tenant's final backup is running: the finalizer stays.
    #[error("the final backup is running")]
    FinalBackupRunning,

    /// A deleted tenant's final backup failed: nothing is dropped, and it is tried again.
    #[error("the final backup failed: {message}")]
    FinalBackupFailed { message: String },
    /// A deleted tenant's final backup waits for a place under the server's backup cap.
    #[error("{message}")]
    FinalBackupWaiting { message: String },

    /// A password rotation could not complete; the Secret is unchanged.
    #[error("password rotation: {message}")]
    Rotation { message: String },

    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn sql(action: &'static str, server: &str, source: sqlx::Error) -> Error {
        Error::Sql {
            action,
            server: server.to_string(),
            source,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            // A write whose precondition failed (the object changed meanwhile): retry soon.
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "Conflict",
            Error::Kube(_) => "KubernetesApiError",
            Error::ServerGone { .. } => "ServerGone",
            Error::ServerNotConnected { .. } => "ServerNotConnected",
            Error::Sql { source, .. } => sql_reason(source),
            Error::NameConflict { .. } => "NameConflict",
            Error::Secret { .. } => "SecretInvalid",
            Error::Backup { .. } => "BackupStore",
            Error::FinalBackupRunning => "FinalBackupRunning",
            Error::FinalBackupFailed { .. } => "FinalBackupFailed",
            Error::FinalBackupWaiting { .. } => "FinalBackupWaiting",
            Error::Rotation { .. } => "RotationFailed",
            Error::Finalizer(e) => match e.as_ref() {
                // The cached object was stale (another reconcile added the finalizer): just retry.
                kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
                    if s.code == 409 || s.code == 422 =>
                {
                    "Conflict"
                }
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerFailed",
            },
        }
    }
}

/// A reason for a failed statement, by SQLSTATE class where the server sent one.
pub fn sql_reason(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => "AuthenticationFailed",
            Some("42501") => "InsufficientPrivilege",
            Some(c) if c.starts_with("53") => "ServerOverloaded",
            Some(c) if c.starts_with("57") => "ServerUnavailable",
            _ => "SqlFailed",
        },
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => "Unreachable",
        _ => "SqlFailed",
    }
}
