//! One bounded pool per PostgreSQL server. The pool of `--database-url` (the API's own
//! server) opens at start; another server's pool opens at its tenants' first request, as the
//! same gateway login (the operator gives every server's gateway role the same password) at
//! the host, port and database its PostgresServer reports (`status.endpoint`), with the same
//! TLS parameters and pool settings. At most `--max-servers` pools are open, so the API's
//! connections stay at most `--pool-size` × `--max-servers`.

use std::{collections::HashMap, sync::RwLock};

use kube::{Api, Client};

use super::{
    config::{connect, ConnectError, PoolConfig},
    error::ApiError,
    pool::Pool,
};
use crate::domain::server::PostgresServer;

/// How long a client is asked to wait before retrying a request for a tenant whose server's
/// pool cannot open.
const RETRY_AFTER_SECS: u64 = 10;

/// The pools of the servers other than the API's own.
pub struct ServerPools {
    client: Client,
    /// The gateway URL of the API's own server: its login, password and TLS parameters are
    /// every server's.
    gateway_url: String,
    cfg: PoolConfig,
    allow_privileged: bool,
    /// Pools open at most, the API's own included.
    max_servers: usize,
    open: RwLock<HashMap<String, Pool>>,
    /// One pool opening at a time (a burst of first requests opens it once).
    opening: tokio::sync::Mutex<()>,
}

impl ServerPools {
    pub fn new(
        client: Client,
        gateway_url: String,
        cfg: PoolConfig,
        allow_privileged: bool,
        max_servers: usize,
    ) -> Self {
        Self {
            client,
            gateway_url,
            cfg,
            allow_privileged,
            max_servers: max_servers.max(1),
            open: RwLock::default(),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Pools open besides the API's own, by server.
    pub fn opened(&self) -> Vec<(String, Pool)> {
        let open = self.open.read().expect("server pools lock");
        let mut v: Vec<(String, Pool)> = open.iter().map(|(k, p)| (k.clone(), p.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The pool of server `name`, opened now if it is not open yet.
    pub async fn get(&self, name: &str) -> Result<Pool, ApiError> {
        if let Some(p) = self.open.read().expect("server pools lock").get(name) {
            return Ok(p.clone());
        }
        let _one = self.opening.lock().await;
        if let Some(p) = self.open.read().expect("server pools lock").get(name) {
            return Ok(p.clone());
        }
        let unavailable = |detail: String| {
            ApiError::unavailable("tenant-server-unavailable", detail, RETRY_AFTER_SECS)
        };
        if self.open.read().expect("server pools lock").len() + 1 >= self.max_servers {
            return Err(unavailable(format!(
                "server {name:?}: this API has pools open to {} servers already (--max-servers)",
                self.max_servers
            )));
        }
        let servers: Api<PostgresServer> = Api::all(self.client.clone());
        let ps = servers
            .get_opt(name)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "server {name:?}: cannot read its PostgresServer: {e}"
                ))
            })?
            .ok_or_else(|| unavailable(format!("server {name:?} has no PostgresServer")))?;
        let ep = ps
            .status
            .and_then(|s| s.endpoint)
            .ok_or_else(|| unavailable(format!("server {name:?} reports no endpoint yet")))?;
        let url = at_endpoint(&self.gateway_url, &ep.host, ep.port, &ep.dbname)
            .map_err(|e| unavailable(format!("server {name:?}: {e}")))?;
        let pool = connect(&url, self.cfg, self.allow_privileged)
            .await
            .map_err(|e| match e {
                ConnectError::PrivilegedRole { .. } => ApiError::internal(e),
                e => unavailable(format!("server {name:?}: {e}")),
            })?;
        tracing::info!(server = name, host = %ep.host, port = ep.port, "opened the pool of another server");
        self.open
            .write()
            .expect("server pools lock")
            .insert(name.to_string(), pool.clone());
        Ok(pool)
    }
}

/// `url` with its host, port and database replaced (login, password and parameters kept).
pub fn at_endpoint(url: &str, host: &str, port: u16, dbname: &str) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("the gateway URL does not parse: {e}"))?;
    u.set_host(Some(host))
        .map_err(|e| format!("host {host:?}: {e}"))?;
    u.set_port(Some(port))
        .map_err(|()| format!("the gateway URL takes no port {port}"))?;
    u.set_path(&format!(
        "/{}",
        percent_encoding::utf8_percent_encode(dbname, percent_encoding::NON_ALPHANUMERIC)
    ));
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_server_keeps_the_login_and_parameters() {
        let url = "postgres://tenantry_gateway:p%2Fw@db1.internal:5432/app?sslmode=verify-full&sslrootcert=%2Fca.pem";
        assert_eq!(
            at_endpoint(url, "db2.internal", 6432, "tenants").unwrap(),
            "postgres://tenantry_gateway:p%2Fw@db2.internal:6432/tenants?sslmode=verify-full&sslrootcert=%2Fca.pem"
        );
        assert_eq!(
            at_endpoint(url, "10.0.0.7", 5432, "a b").unwrap(),
            "postgres://tenantry_gateway:p%2Fw@10.0.0.7:5432/a%20b?sslmode=verify-full&sslrootcert=%2Fca.pem"
        );
    }
}
