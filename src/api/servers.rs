//! One bounded pool per PostgreSQL server. The pool of `--database-url` (the API's own
//! server) opens at start; another server's pool opens at its tenants' first request, as the
//! gateway role with that server's own password (derived from the API's own, as the operator
//! derives it: [`server_gateway_password`]) at the host, port and database its PostgresServer
//! reports (`status.endpoint`), with the same TLS parameters and pool settings. At most
//! `--max-servers` pools are open, so the API's connections stay at most `--pool-size` ×
//! `--max-servers`. A server whose pool could not open is not tried again for
//! [`RETRY_AFTER_SECS`]: its tenants get 503 at once, and other servers' first requests never
//! wait behind it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use kube::{Api, Client};

use super::{
    config::{connect, PoolConfig},
    error::ApiError,
    pool::Pool,
};
use crate::domain::{credentials::server_gateway_password, server::PostgresServer};

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
    /// One opening at a time per server (a burst of first requests opens it once).
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When each server's pool last failed to open, and why.
    failed: Mutex<HashMap<String, (Instant, String)>>,
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
            opening: Mutex::default(),
            failed: Mutex::default(),
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
        let unavailable = |detail: String| {
            ApiError::unavailable("tenant-server-unavailable", detail, RETRY_AFTER_SECS)
        };
        let recent = |failed: &Mutex<HashMap<String, (Instant, String)>>| {
            failed
                .lock()
                .expect("server pools lock")
                .get(name)
                .filter(|(at, _)| at.elapsed().as_secs() < RETRY_AFTER_SECS)
                .map(|(_, why)| why.clone())
        };
        if let Some(why) = recent(&self.failed) {
            return Err(unavailable(why));
        }
        let gate = self
            .opening
            .lock()
            .expect("server pools lock")
            .entry(name.to_string())
            .or_default()
            .clone();
        let _one = gate.lock().await;
        if let Some(p) = self.open.read().expect("server pools lock").get(name) {
            return Ok(p.clone());
        }
        if let Some(why) = recent(&self.failed) {
            return Err(unavailable(why));
        }
        match self.open_pool(name).await {
            Ok(pool) => {
                self.failed.lock().expect("server pools lock").remove(name);
                Ok(pool)
            }
            Err(why) => {
                self.failed
                    .lock()
                    .expect("server pools lock")
                    .insert(name.to_string(), (Instant::now(), why.clone()));
                Err(unavailable(why))
            }
        }
    }

    async fn open_pool(&self, name: &str) -> Result<Pool, String> {
        if self.open.read().expect("server pools lock").len() + 1 >= self.max_servers {
            return Err(format!(
                "server {name:?}: this API has pools open to {} servers already (--max-servers)",
                self.max_servers
            ));
        }
        let servers: Api<PostgresServer> = Api::all(self.client.clone());
        let ps = servers
            .get_opt(name)
            .await
            .map_err(|e| format!("server {name:?}: cannot read its PostgresServer: {e}"))?
            .ok_or_else(|| format!("server {name:?} has no PostgresServer"))?;
        let ep = ps
            .status
            .and_then(|s| s.endpoint)
            .ok_or_else(|| format!("server {name:?} reports no endpoint yet"))?;
        let url = at_endpoint(&self.gateway_url, name, &ep.host, ep.port, &ep.dbname)
            .map_err(|e| format!("server {name:?}: {e}"))?;
        let pool = connect(&url, self.cfg, self.allow_privileged)
            .await
            .map_err(|e| format!("server {name:?}: {e}"))?;
        tracing::info!(server = name, host = %ep.host, port = ep.port, "opened the pool of another server");
        self.open
            .write()
            .expect("server pools lock")
            .insert(name.to_string(), pool.clone());
        Ok(pool)
    }
}

/// The gateway URL `url` of the API's own server made that of server `server`: its host, port
/// and database, and the gateway's password there (login and parameters kept).
pub fn at_endpoint(
    url: &str,
    server: &str,
    host: &str,
    port: u16,
    dbname: &str,
) -> Result<String, String> {
    let mut u = url::Url::parse(url).map_err(|e| format!("the gateway URL does not parse: {e}"))?;
    let own = percent_encoding::percent_decode_str(u.password().unwrap_or_default())
        .decode_utf8()
        .map_err(|_| "the gateway URL's password is not UTF-8".to_string())?
        .into_owned();
    u.set_password(Some(&server_gateway_password(&own, server)))
        .map_err(|()| "the gateway URL takes no password".to_string())?;
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
    fn another_server_keeps_the_login_and_parameters_with_its_own_password() {
        let url = "postgres://tenantry_gateway:p%2Fw@db1.internal:5432/app?sslmode=verify-full&sslrootcert=%2Fca.pem";
        let db2 = server_gateway_password("p/w", "db2");
        assert_eq!(
            at_endpoint(url, "db2", "db2.internal", 6432, "tenants").unwrap(),
            format!("postgres://tenantry_gateway:{db2}@db2.internal:6432/tenants?sslmode=verify-full&sslrootcert=%2Fca.pem")
        );
        let db3 = server_gateway_password("p/w", "db3");
        assert_eq!(
            at_endpoint(url, "db3", "10.0.0.7", 5432, "a b").unwrap(),
            format!("postgres://tenantry_gateway:{db3}@10.0.0.7:5432/a%20b?sslmode=verify-full&sslrootcert=%2Fca.pem")
        );
    }
}
