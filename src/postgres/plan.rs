//! `tenantry migrations plan`: what a migration set would do to every tenant of a database,
//! read without writing anything — one READ ONLY transaction in a session whose default is
//! read-only, catalog reads and the guarded history read ([`migrations::applied`]) only.

use std::collections::BTreeMap;

use sqlx::{ConnectOptions, Connection};

use super::{
    lint::{self, Finding},
    migrations::{self, MigrateError, MigrationSet},
    tenant::Names,
};
use crate::domain::{naming::Ident, state::Owner};

/// Output format of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// What the set would do to one tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Outcome {
    UpToDate,
    /// These versions would run, in this order.
    Migrate {
        versions: Vec<i64>,
    },
    /// The set would refuse the tenant (nothing would run): why.
    Refused {
        reason: String,
    },
    /// A Tenant (from Kubernetes) without an operator-made schema yet: provisioning would
    /// apply the whole set.
    NotProvisioned,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantPlan {
    pub schema: String,
    /// The Tenant's namespace and name, from the schema's ownership mark.
    pub namespace: String,
    pub name: String,
    /// Highest applied version (None: nothing applied, or unreadable history).
    pub current_version: Option<i64>,
    pub outcome: Outcome,
    /// Whether a Tenant of that namespace and name exists (only when Kubernetes was asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_found: Option<bool>,
    /// The Tenant's `status.migrationVersion` (only when Kubernetes was asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_version: Option<i64>,
}

/// A Tenant of the cluster, for a plan that consults Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownTenant {
    pub namespace: String,
    pub name: String,
    pub schema: String,
    pub status_version: Option<i64>,
}

/// The Tenants as the plan needs them (schema as the controller derives it; a Tenant whose
/// schema name is invalid is left out: the operator refuses it anyway).
pub fn known_tenants(tenants: &[crate::domain::crd::Tenant]) -> Vec<KnownTenant> {
    use kube::ResourceExt;
    tenants
        .iter()
        .filter_map(|t| {
            let namespace = t.namespace().unwrap_or_default();
            let name = t.name_any();
            let schema =
                crate::domain::naming::tenant_ident(&namespace, &name, t.spec.schema.as_deref())
                    .ok()?;
            Some(KnownTenant {
                namespace,
                name,
                schema: schema.as_str().to_string(),
                status_version: t.status.as_ref().and_then(|s| s.migration_version),
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetPlan {
    /// The set's highest version.
    pub target_version: Option<i64>,
    pub tenants: Vec<TenantPlan>,
    /// Tenants per current version ("none" for no migration applied, "unknown" for an
    /// unreadable history).
    pub tenants_per_version: BTreeMap<String, usize>,
    pub would_migrate: usize,
    pub up_to_date: usize,
    pub refused: usize,
    /// Tenants without a schema yet (only when Kubernetes was asked).
    pub not_provisioned: usize,
    pub lint: Vec<Finding>,
}

/// Plans `set` against every operator-made tenant schema of the database at `url` (a schema
/// carrying the operator's ownership mark, owned by its owner role). With `tenants` (listed
/// from Kubernetes), each schema is matched with its Tenant, and Tenants without a schema yet
/// are reported as not provisioned.
pub async fn plan(
    url: &str,
    set: &MigrationSet,
    tenants: Option<&[KnownTenant]>,
) -> Result<FleetPlan, sqlx::Error> {
    // Whose code runs in this session: the admin's, for every tenant. search_path is
    // pg_catalog alone; every read is catalog-qualified or the guarded history read; the
    // session is read-only by default and the reads run in a READ ONLY transaction.
    let mut conn = super::connect_options(url)?
        .options([
            ("search_path", "pg_catalog"),
            ("default_transaction_read_only", "on"),
            ("statement_timeout", "30000"),
            ("lock_timeout", "5000"),
        ])
        .connect()
        .await?;
    sqlx::Executor::execute(&mut conn, "BEGIN TRANSACTION READ ONLY").await?;
    let result = read(&mut conn, set).await;
    let _ = sqlx::Executor::execute(&mut conn, "ROLLBACK").await;
    let _ = conn.close().await;
    let mut planned = result?;
    if let Some(known) = tenants {
        for p in planned.iter_mut() {
            let tenant = known
                .iter()
                .find(|k| k.namespace == p.namespace && k.name == p.name && k.schema == p.schema);
            p.tenant_found = Some(tenant.is_some());
            p.status_version = tenant.and_then(|k| k.status_version);
        }
        for k in known {
            if !planned.iter().any(|p| p.schema == k.schema) {
                planned.push(TenantPlan {
                    schema: k.schema.clone(),
                    namespace: k.namespace.clone(),
                    name: k.name.clone(),
                    current_version: None,
                    outcome: Outcome::NotProvisioned,
                    tenant_found: Some(true),
                    status_version: k.status_version,
                });
            }
        }
    }
    Ok(summarize(set, planned))
}

async fn read(
    conn: &mut sqlx::PgConnection,
    set: &MigrationSet,
) -> Result<Vec<TenantPlan>, sqlx::Error> {
    let schemas: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT n.nspname::text, pg_catalog.pg_get_userbyid(n.nspowner)::text,
                pg_catalog.obj_description(n.oid, 'pg_namespace')
           FROM pg_catalog.pg_namespace n
          WHERE pg_catalog.obj_description(n.oid, 'pg_namespace') IS NOT NULL
          ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for (schema, schema_owner, comment) in schemas {
        let Some(mark) = Owner::parse(comment.as_deref()) else {
            continue;
        };
        let Ok(id) = Ident::parse("schema", &schema) else {
            continue;
        };
        let names = Names::new(id);
        // Only the layout the operator makes: the schema owned by its owner role.
        if schema_owner != names.owner.as_str() {
            continue;
        }
        let (current_version, outcome) = match migrations::applied(conn, &names).await {
            Ok(applied) => {
                let current = applied.iter().map(|(v, _)| *v).max();
                let outcome = match set.pending(&applied) {
                    Ok(p) if p.is_empty() => Outcome::UpToDate,
                    Ok(p) => Outcome::Migrate {
                        versions: p.iter().map(|m| m.version).collect(),
                    },
                    Err(e) => Outcome::Refused {
                        reason: e.to_string(),
                    },
                };
                (current, outcome)
            }
            Err(MigrateError::Database(e)) => return Err(e),
            Err(e) => (
                None,
                Outcome::Refused {
                    reason: e.to_string(),
                },
            ),
        };
        out.push(TenantPlan {
            schema,
            namespace: mark.namespace,
            name: mark.name,
            current_version,
            outcome,
            tenant_found: None,
            status_version: None,
        });
    }
    Ok(out)
}

/// The plan with its summary and the set's lint findings.
pub fn summarize(set: &MigrationSet, tenants: Vec<TenantPlan>) -> FleetPlan {
    let mut per_version = BTreeMap::new();
    for t in &tenants {
        let key = match (&t.outcome, t.current_version) {
            (Outcome::NotProvisioned, _) => "not provisioned".to_string(),
            (Outcome::Refused { .. }, None) => "unknown".to_string(),
            (_, None) => "none".to_string(),
            (_, Some(v)) => v.to_string(),
        };
        *per_version.entry(key).or_insert(0) += 1;
    }
    let count = |f: fn(&Outcome) -> bool| tenants.iter().filter(|t| f(&t.outcome)).count();
    FleetPlan {
        target_version: set.latest(),
        tenants_per_version: per_version,
        would_migrate: count(|o| matches!(o, Outcome::Migrate { .. })),
        up_to_date: count(|o| matches!(o, Outcome::UpToDate)),
        refused: count(|o| matches!(o, Outcome::Refused { .. })),
        not_provisioned: count(|o| matches!(o, Outcome::NotProvisioned)),
        lint: lint::lint(set),
        tenants,
    }
}

impl FleetPlan {
    pub fn render(&self, output: Output) -> String {
        match output {
            Output::Json => serde_json::to_string_pretty(self).expect("the plan serializes") + "\n",
            Output::Text => self.text(),
        }
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let target = self
            .target_version
            .map_or("none (empty set)".to_string(), |v| v.to_string());
        let _ = writeln!(s, "Target version: {target}");
        let _ = writeln!(s);
        for t in &self.tenants {
            let what = match &t.outcome {
                Outcome::UpToDate => "up to date".to_string(),
                Outcome::Migrate { versions } => format!(
                    "would run {}",
                    versions
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Outcome::Refused { reason } => format!("REFUSED: {reason}"),
                Outcome::NotProvisioned => {
                    "not provisioned yet: would get the whole set".to_string()
                }
            };
            let mut notes = String::new();
            if t.tenant_found == Some(false) {
                notes.push_str(" [no such Tenant in Kubernetes]");
            }
            if t.tenant_found == Some(true)
                && t.outcome != Outcome::NotProvisioned
                && t.status_version != t.current_version
            {
                let _ = write!(
                    notes,
                    " [its status says version {}]",
                    t.status_version.map_or("-".to_string(), |v| v.to_string())
                );
            }
            let current = t.current_version.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(
                s,
                "{}/{} (schema {}, at {current}): {what}{notes}",
                t.namespace, t.name, t.schema
            );
        }
        if self.tenants.is_empty() {
            let _ = writeln!(s, "No tenant schemas found.");
        }
        let _ = writeln!(s);
        let per_version: Vec<String> = self
            .tenants_per_version
            .iter()
            .map(|(v, n)| format!("{v}: {n}"))
            .collect();
        let _ = writeln!(
            s,
            "Summary: {} tenant(s); {} would migrate, {} up to date, {} refused{}; per current version: {}",
            self.tenants.len(),
            self.would_migrate,
            self.up_to_date,
            self.refused,
            if self.not_provisioned > 0 {
                format!(", {} not provisioned", self.not_provisioned)
            } else {
                String::new()
            },
            if per_version.is_empty() {
                "-".to_string()
            } else {
                per_version.join(", ")
            }
        );
        if self.lint.is_empty() {
            let _ = writeln!(s, "Lint: no findings");
        } else {
            let _ = writeln!(
                s,
                "Lint: {} finding(s) (the operator refuses this set until they are fixed or allowed):",
                self.lint.len()
            );
            for f in &self.lint {
                let _ = writeln!(s, "  {f}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_tenants_by_version_and_outcome() {
        let set = MigrationSet::from_files([
            ("1_a.sql".to_string(), "CREATE TABLE a (x int)".to_string()),
            ("2_b.sql".to_string(), "CREATE INDEX b ON a (x)".to_string()),
        ])
        .unwrap();
        let t = |name: &str, current, outcome| TenantPlan {
            schema: format!("ns_{name}"),
            namespace: "ns".into(),
            name: name.into(),
            current_version: current,
            outcome,
            tenant_found: None,
            status_version: None,
        };
        let plan = summarize(
            &set,
            vec![
                t("a", Some(2), Outcome::UpToDate),
                t("b", Some(1), Outcome::Migrate { versions: vec![2] }),
                t(
                    "c",
                    None,
                    Outcome::Migrate {
                        versions: vec![1, 2],
                    },
                ),
                t(
                    "d",
                    Some(1),
                    Outcome::Refused {
                        reason: "migration 1 was changed".into(),
                    },
                ),
            ],
        );
        assert_eq!(
            (plan.would_migrate, plan.up_to_date, plan.refused),
            (2, 1, 1)
        );
        assert_eq!(
            plan.tenants_per_version,
            BTreeMap::from([("1".into(), 2), ("2".into(), 1), ("none".into(), 1)])
        );
        let text = plan.render(Output::Text);
        assert!(
            text.contains("ns/b (schema ns_b, at 1): would run 2"),
            "{text}"
        );
        assert!(text.contains("ns/d (schema ns_d, at 1): REFUSED: migration 1 was changed"));
        assert!(
            text.contains("2_b.sql:1: [create-index-non-concurrent]"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&plan.render(Output::Json)).unwrap();
        assert_eq!(json["tenants"][1]["outcome"]["state"], "migrate");
        assert_eq!(json["tenants"][1]["outcome"]["versions"][0], 2);
        assert_eq!(json["wouldMigrate"], 2);
        assert_eq!(json["lint"][0]["rule"], "create-index-non-concurrent");
    }
}
