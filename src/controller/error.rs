//! Reconcile errors: one variant per kind of failure, each tagged with the stage it happened
//! in, whose fixed label is used in metrics and logs.

/// A reconcile stage, with the fixed label used in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Role,
    Schema,
    Migrations,
    Credentials,
    Status,
    Cleanup,
    Finalizer,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Role => "role",
            Stage::Schema => "schema",
            Stage::Migrations => "migrations",
            Stage::Credentials => "credentials",
            Stage::Status => "status",
            Stage::Cleanup => "cleanup",
            Stage::Finalizer => "finalizer",
        }
    }
}

/// Why a reconcile failed; retried with backoff ([`super::error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error during {}: {source}", stage.label())]
    Database {
        stage: Stage,
        source: crate::postgres::Error,
    },
    #[error("kubernetes API error during {}: {source}", stage.label())]
    Kube { stage: Stage, source: kube::Error },
    #[error("migrations: {0}")]
    Migration(#[from] crate::postgres::migrations::MigrateError),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Deletion of a paused Tenant waits (an error keeps the finalizer in place).
    #[error("the Tenant is paused (annotation tenantry.dev/paused); its deletion waits until it is resumed")]
    Paused,
    /// The tenant's server is not registered (its PostgresServer is gone or its admin Secret
    /// unusable): its deletion waits.
    #[error("server {0} is not registered (see kubectl get postgresserver {0}); the tenant's deletion waits for it")]
    ServerUnavailable(String),
}

impl Error {
    /// A statement gave up waiting for a lock (`lock_timeout`): someone — possibly the tenant
    /// itself — holds a lock this tenant's reconcile needs.
    pub fn is_lock_timeout(&self) -> bool {
        use crate::postgres::migrations::MigrateError;
        let source = match self {
            Error::Migration(MigrateError::LockTimeout { .. }) => return true,
            Error::Database {
                source: crate::postgres::Error::Database(source),
                ..
            }
            | Error::Migration(MigrateError::Database(source))
            | Error::Migration(MigrateError::Failed { source, .. }) => source,
            _ => return false,
        };
        matches!(source, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
    }

    /// The stage label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Database { stage, .. } | Error::Kube { stage, .. } => stage.label(),
            Error::Migration(_) => Stage::Migrations.label(),
            Error::Paused | Error::ServerUnavailable(_) => Stage::Cleanup.label(),
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => Stage::Finalizer.label(),
            },
        }
    }
}

pub(super) fn db<E: Into<crate::postgres::Error>>(stage: Stage) -> impl FnOnce(E) -> Error {
    move |source| Error::Database {
        stage,
        source: source.into(),
    }
}

pub(super) fn kube_err(stage: Stage) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { stage, source }
}
