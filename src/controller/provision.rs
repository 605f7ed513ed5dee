//! The apply pipeline: validate → routing → observe/conflicts → role → schema → migrations →
//! credentials → ready. Each stage sets its condition and returns Ok or a [`Failure`]; the
//! whole run ends in one [`Report`], which the reconcile publishes.

use std::time::{Duration, Instant};

use kube::{runtime::controller::Action, ResourceExt};
use tracing::{info, Span};

use super::{
    context::{Context, Verified},
    credentials::{self, Issued},
    error::db,
    reconcile::{
        now, Failure, Mark, Note, Report, Then, Warning, REQUEUE_CONFLICT,
        REQUEUE_MIGRATION_FAILED, RESYNC,
    },
    rollout::{Admission, Hold},
    Error, Stage,
};
use crate::{
    domain::{
        crd::{condition, Phase, Tenant, UsageStatus},
        limits::{format_bytes, over_quota, usage_worth_writing, TenantLimits, RESUME_PERCENT},
        naming::Ident,
        plan::{self, Plan},
        scram,
        state::{Holder, Observed, Owner},
        status::StatusBuilder,
    },
    postgres::{
        migrations::MigrateError,
        tenant::{Names, Review, SchemaChange},
    },
};

/// Look again this soon after a tenant was suspended: ends a session whose login raced the
/// NOLOGIN.
const REQUEUE_SUSPENDED: Duration = Duration::from_secs(5);

/// Annotation with which an administrator says a schema of the layout before the owner/app
/// split was reviewed and may be converted although it differs from its migrations.
pub const LEGACY_REVIEWED_ANNOTATION: &str = "tenantry.dev/legacy-schema-reviewed";

/// Provisions `tenant`; returns what the reconcile should report.
pub(super) async fn apply(tenant: &Tenant, ctx: &Context) -> Report {
    if let Some(report) = super::reconcile::paused(tenant) {
        return report;
    }
    let mut run = Run {
        tenant,
        b: StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now()),
        previous_phase: tenant.status.as_ref().map(|s| s.phase),
        notices: Vec::new(),
        journal: Vec::new(),
    };
    let end = run.pipeline(ctx).await;
    run.finish(end)
}

/// One apply in progress: the status being built and the Events gathered so far.
struct Run<'t> {
    tenant: &'t Tenant,
    b: StatusBuilder,
    previous_phase: Option<Phase>,
    /// Events about the Tenant as a whole (routing, rollout), published first.
    notices: Vec<Note>,
    /// Steps taken: published as one `Provisioned` Event on first provisioning, or one Event
    /// each otherwise (and before a failure).
    journal: Vec<Note>,
}

/// How a pipeline that did not fail ended.
enum Done {
    /// Verified recently and nothing changed since: no writes; look again when the
    /// verification expires.
    Unchanged(Duration),
    /// Ready (perhaps with migrations held back by the rollout).
    Ready {
        verified: Verified,
        requeue: Duration,
    },
    /// `spec.suspended`: the app login is NOLOGIN and its sessions were ended; look again
    /// after this long.
    Suspended(Duration),
}

/// The role or the schema, which a Tenant creates or adopts alike.
#[derive(Debug, Clone, Copy)]
enum Object {
    Role,
    Schema,
}

impl Object {
    fn what(self) -> &'static str {
        match self {
            Object::Role => "role",
            Object::Schema => "schema",
        }
    }

    fn condition(self) -> &'static str {
        match self {
            Object::Role => condition::ROLE_READY,
            Object::Schema => condition::SCHEMA_READY,
        }
    }
}

impl Run<'_> {
    async fn pipeline(&mut self, ctx: &Context) -> Result<Done, Failure> {
        // Said again unless the quota stage below says otherwise (a run stopping before it
        // leaves the quota's state as it was, and so are the tenant's grants).
        self.b.keep(condition::QUOTA_EXCEEDED);
        let plan = self.validate()?;
        let (id, owner, secret_name) = (&plan.ident, &plan.owner, plan.secret_name.as_str());
        Span::current().record("schema", id.as_str());
        self.routing(ctx);

        // Fast path: nothing relevant changed since a recent full verification (our own Secret
        // and status writes come back as watch events; they need no second look).
        // (Not right after a pause: the Paused condition must go; nor when a new usage
        // measurement is worth showing or moves the tenant across its quota.)
        if self.tenant.condition(condition::PAUSED).is_none() && !ctx.usage_news(self.tenant) {
            if let Some(wait) = ctx.recently_verified(self.tenant, &self.b, secret_name) {
                return Ok(Done::Unchanged(wait));
            }
        }

        // Read what exists, once, before changing anything: conflicts stop us with nothing done.
        let names = Names::new(id.clone());
        let observed = ctx
            .admin
            .observe_tenant(&names)
            .await
            .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?;
        self.no_conflicts([
            (Object::Role, id, observed.role_holder(owner)),
            (
                Object::Role,
                &names.owner,
                observed.owner_role_holder(owner),
            ),
            (Object::Schema, id, observed.schema_holder(owner)),
        ])?;

        let fresh_password = self
            .roles(&names, owner, &observed, &plan.limits, ctx)
            .await?;
        let ended = if self.tenant.is_suspended() {
            // After NOLOGIN is committed, so an ended session cannot log in again.
            Some(
                ctx.admin
                    .terminate(id)
                    .await
                    .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?,
            )
        } else {
            None
        };
        self.schema(&names, owner, &observed, ctx).await?;
        {
            let s = self.b.status_mut();
            s.schema = Some(id.as_str().to_string());
            s.role = Some(id.as_str().to_string());
            s.owner_role = Some(names.owner.as_str().to_string());
        }

        let (version, held) = if ended.is_some() {
            self.no_migrations();
            (None, None)
        } else {
            self.migrations(&names, ctx).await?
        };

        // A suspended tenant's Secret is kept as is (and repaired like any other: its login
        // cannot log in meanwhile).
        let verifier = observed.role.as_ref().and_then(|r| r.verifier.as_deref());
        let secret_version = self
            .credentials(id, secret_name, verifier, fresh_password.as_deref(), ctx)
            .await?;
        // After the migrations: a table they created while over quota got INSERT and UPDATE
        // from the default privileges, and is revoked again here.
        self.quota(&names, &plan.limits, ctx).await?;

        if let Some(ended) = ended {
            return Ok(self.suspended(id, secret_name, ended));
        }
        Ok(self.ready(id, secret_name, version, held, secret_version))
    }

    /// A suspended tenant gets no migration: MigrationsApplied keeps what it said, the schema
    /// stays at `status.migrationVersion`.
    fn no_migrations(&mut self) {
        match self.tenant.condition(condition::MIGRATIONS_APPLIED) {
            Some(c) => {
                let (status, reason, message) =
                    (c.status.clone(), c.reason.clone(), c.message.clone());
                self.b
                    .set(condition::MIGRATIONS_APPLIED, &status, &reason, message);
            }
            None => self.b.set(
                condition::MIGRATIONS_APPLIED,
                "Unknown",
                "Suspended",
                "no migrations are applied while the tenant is suspended",
            ),
        }
    }

    /// Suspended: phase, Ready False, Suspended True, and the Normal Event `Suspended` when it
    /// is news. Looked at again soon after entering (a login racing the NOLOGIN is ended
    /// then), later at the resync.
    fn suspended(&mut self, id: &Ident, secret_name: &str, ended: u64) -> Done {
        self.b.status_mut().secret_name = Some(secret_name.to_string());
        let message = format!(
            "spec.suspended is true: role {} cannot log in, the API answers 423 and no \
             migrations are applied; data and Secret {secret_name} are kept",
            id.as_str()
        );
        self.b.suspend(message.clone());
        let news = self
            .tenant
            .condition(condition::SUSPENDED)
            .is_none_or(|c| c.status != "True");
        if news {
            info!(schema = id.as_str(), ended, "tenant suspended");
            self.journal.push(Note::normal(
                "Suspended",
                "Suspend",
                format!("{message}; ended {ended} open session(s)"),
            ));
            return Done::Suspended(REQUEUE_SUSPENDED);
        }
        if ended > 0 {
            info!(
                schema = id.as_str(),
                ended, "ended sessions of a suspended tenant"
            );
        }
        Done::Suspended(RESYNC)
    }

    /// Validates the spec (pure). Invalid specs wait for a change; nothing touches the
    /// database. The Event is sent when the Tenant becomes Invalid or its spec changed.
    /// A tenant already provisioned is not taken down by an invalid change (one the
    /// apiserver's admission rules let through): the change is refused and the tenant keeps
    /// serving what it was provisioned as.
    fn validate(&self) -> Result<Plan, Failure> {
        plan::plan(self.tenant).map_err(|message| {
            if let Some(schema) = self.tenant.status.as_ref().and_then(|s| s.schema.as_deref()) {
                let message = format!(
                    "change refused, the tenant keeps serving as provisioned (schema {schema}): {message}"
                );
                let news = self
                    .tenant
                    .condition(condition::SPEC_ACCEPTED)
                    .is_none_or(|c| c.message != message);
                return Failure {
                    mark: Mark::Refused,
                    reason: "ChangeRefused",
                    phase: self.previous_phase.unwrap_or_default(),
                    event: news.then_some(Warning {
                        reason: "ChangeRefused",
                        action: "Validate",
                    }),
                    message,
                    then: Then::AwaitChange,
                };
            }
            let news = self.previous_phase != Some(Phase::Invalid)
                || self
                    .tenant
                    .status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    != self.tenant.metadata.generation;
            Failure {
                mark: Mark::NotReady,
                reason: "Invalid",
                phase: Phase::Invalid,
                event: news.then_some(Warning {
                    reason: "InvalidSpec",
                    action: "Validate",
                }),
                message,
                then: Then::AwaitChange,
            }
        })
    }

    /// The Routable condition: the API refuses names and hosts that two Tenants claim; say so
    /// here. Provisioning goes on either way.
    fn routing(&mut self, ctx: &Context) {
        let clashes = ctx.routing_clashes(self.tenant);
        if clashes.is_empty() {
            self.b.set(
                condition::ROUTABLE,
                "True",
                "Unique",
                "no other Tenant has this name or its hosts",
            );
        } else {
            let message = format!(
                "the API will not route to this tenant: {}",
                clashes.join("; ")
            );
            if self
                .tenant
                .condition(condition::ROUTABLE)
                .is_none_or(|c| c.message != message)
            {
                self.notices.push(Note::warning(
                    "AmbiguousRouting",
                    "Validate",
                    message.clone(),
                ));
            }
            self.b
                .set(condition::ROUTABLE, "False", "Ambiguous", message);
        }
        ctx.retrigger_related(self.tenant, false);
    }

    /// Stops, with nothing changed, when either role or the schema is someone else's.
    fn no_conflicts(&self, holders: [(Object, &Ident, Holder); 3]) -> Result<(), Failure> {
        for (object, name, holder) in holders {
            let what = object.what();
            let message = match holder {
                Holder::Unmanaged => format!(
                    "{what} {} already exists and is not managed by tenantry; nothing was changed",
                    name.as_str()
                ),
                Holder::OtherTenant(o) => format!(
                    "{what} {} belongs to Tenant {}/{}; nothing was changed",
                    name.as_str(),
                    o.namespace,
                    o.name
                ),
                Holder::Nobody | Holder::ThisTenant => continue,
            };
            return Err(Failure::conflict(
                object.condition(),
                "Provision",
                message,
                self.previous_phase,
            ));
        }
        Ok(())
    }

    /// The owner role (never logs in) and the app login: created when missing, brought back in
    /// line otherwise (with the connection limit and statement timeout of `spec.limits`).
    /// Returns the app role's password when it was created now.
    async fn roles(
        &mut self,
        names: &Names,
        owner: &Owner,
        observed: &Observed,
        limits: &TenantLimits,
        ctx: &Context,
    ) -> Result<Option<String>, Failure> {
        let id = names.app();
        let password = observed.role.is_none().then(scram::generate_password);
        let settings = ctx
            .admin
            .login_settings(limits.connections, limits.statement_timeout_ms);
        ctx.admin
            .ensure_roles(
                names,
                owner,
                observed,
                password.as_deref(),
                !self.tenant.is_suspended(),
                &settings,
            )
            .await
            .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?;
        let (reason, verb) = if password.is_some() {
            self.journal.push(Note::normal(
                "RoleCreated",
                "Provision",
                format!(
                    "created role {} (owner role {})",
                    id.as_str(),
                    names.owner.as_str()
                ),
            ));
            ("Created", "created")
        } else {
            ("Exists", "exists")
        };
        self.b.ok(
            condition::ROLE_READY,
            reason,
            format!("role {} {verb}", id.as_str()),
        );
        Ok(password)
    }

    /// The schema in the owner/app layout: created, converted from the layout before the
    /// split (with a Warning listing what may have been planted), or repaired.
    async fn schema(
        &mut self,
        names: &Names,
        owner: &Owner,
        observed: &Observed,
        ctx: &Context,
    ) -> Result<(), Failure> {
        let id = names.app();
        let change = ctx
            .admin
            .ensure_schema(
                names,
                owner,
                observed,
                &ctx.migrations,
                self.tenant
                    .annotations()
                    .contains_key(LEGACY_REVIEWED_ANNOTATION),
            )
            .await
            .map_err(|e| Failure::error(condition::SCHEMA_READY, db(Stage::Schema)(e)))?;
        let created = match change {
            SchemaChange::Created => {
                self.journal.push(Note::normal(
                    "SchemaCreated",
                    "Provision",
                    format!(
                        "created schema {} owned by role {}",
                        id.as_str(),
                        names.owner.as_str()
                    ),
                ));
                true
            }
            SchemaChange::HeldForReview(review) => {
                let why = match review {
                    Review::Unreadable(message) => format!("its migration history cannot be read safely ({message})"),
                    Review::Unexpected(items) => format!(
                        "it holds definitions its applied migrations do not create, which may have been planted with the tenant's credentials: {}",
                        items.join("; ")
                    ),
                    Review::Clean => String::new(),
                };
                let message = format!(
                    "schema {} was provisioned before the owner/app split and was not converted: {why}. \
                     Nothing of it runs in the operator's or the API's sessions until it is converted. \
                     Review the schema (drop what does not belong), then annotate the Tenant with \
                     {LEGACY_REVIEWED_ANNOTATION}=<anything> to convert it",
                    id.as_str()
                );
                let before = self.tenant.condition(condition::SCHEMA_READY);
                return Err(Failure {
                    mark: Mark::Step(condition::SCHEMA_READY),
                    reason: "ReviewRequired",
                    phase: Phase::Failed,
                    event: before
                        .is_none_or(|c| c.message != message)
                        .then_some(Warning {
                            reason: "ReviewRequired",
                            action: "Provision",
                        }),
                    message,
                    then: Then::Requeue(REQUEUE_CONFLICT),
                });
            }
            SchemaChange::Converted { untrusted, review } => {
                let list = if untrusted.is_empty() {
                    "none found".to_string()
                } else {
                    untrusted.join(", ")
                };
                let list = if review == Review::Clean {
                    format!("{list} (the schema matches what its applied migrations create)")
                } else {
                    format!("{list} (converted after review, as annotated)")
                };
                self.notices.push(Note::warning(
                    "OwnershipConverted",
                    "Provision",
                    format!(
                        "schema {} now belongs to role {}; role {} keeps read/write access only. \
                         Functions, triggers, views, rules and policies created before the \
                         conversion may have been planted with the tenant credentials and now \
                         run as the owner; review them: {list}",
                        id.as_str(),
                        names.owner.as_str(),
                        id.as_str()
                    ),
                ));
                false
            }
            SchemaChange::Repaired | SchemaChange::Unchanged => false,
        };
        let (reason, verb) = if created {
            ("Created", "created")
        } else {
            ("Exists", "exists")
        };
        self.b.ok(
            condition::SCHEMA_READY,
            reason,
            format!("schema {} {verb}", id.as_str()),
        );
        Ok(())
    }

    /// Migrations, as the tenant's owner role, inside the schema. Returns the schema's version and,
    /// when the rollout holds pending migrations back, why.
    async fn migrations(
        &mut self,
        names: &Names,
        ctx: &Context,
    ) -> Result<(Option<i64>, Option<Hold>), Failure> {
        let before = self.tenant.condition(condition::MIGRATIONS_APPLIED);
        let own_failure = before.filter(|c| c.reason == "MigrationFailed");
        match migrate(names, ctx).await {
            Ok(Migrated {
                version,
                held: Some(_),
                ..
            }) if own_failure.is_some() => {
                // This tenant's own failure is what holds the rollout: keep reporting it (it is
                // also what makes the halt survive a restart).
                self.b.status_mut().migration_version = version;
                Err(Failure {
                    mark: Mark::Step(condition::MIGRATIONS_APPLIED),
                    reason: "MigrationFailed",
                    phase: Phase::Failed,
                    message: own_failure.map(|c| c.message.clone()).unwrap_or_default(),
                    event: None,
                    then: Then::Requeue(REQUEUE_MIGRATION_FAILED),
                })
            }
            Ok(Migrated {
                version,
                held: Some((hold, message)),
                ..
            }) => {
                // The tenant keeps working at its current version meanwhile.
                self.b.status_mut().migration_version = version;
                if hold == Hold::Halted && before.is_none_or(|c| c.reason != hold.reason()) {
                    self.notices
                        .push(Note::warning(hold.reason(), "Migrate", message.clone()));
                }
                self.b.set(
                    condition::MIGRATIONS_APPLIED,
                    "False",
                    hold.reason(),
                    message,
                );
                Ok((version, Some(hold)))
            }
            Ok(Migrated {
                version,
                applied,
                held: None,
            }) => {
                self.b.status_mut().migration_version = version;
                let v = version.map_or("none".to_string(), |v| v.to_string());
                if !applied.is_empty() {
                    let list = applied
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    // A fleet rollout is reported per tenant by status.migrationVersion and in
                    // aggregate by metrics and log lines; an Event per tenant would double the
                    // apiserver writes of a rollout.
                    if self.previous_phase == Some(Phase::Ready) {
                        tracing::debug!(versions = %list, "applied migrations");
                    } else {
                        self.journal.push(Note::normal(
                            "MigrationsApplied",
                            "Provision",
                            format!("applied migrations {list} (schema at version {v})"),
                        ));
                    }
                }
                self.b.ok(
                    condition::MIGRATIONS_APPLIED,
                    "UpToDate",
                    format!("schema at migration version {v}"),
                );
                Ok((version, None))
            }
            Err(Error::Migration(MigrateError::UntrustedHistory { message })) => Err(Failure {
                mark: Mark::Step(condition::MIGRATIONS_APPLIED),
                reason: "UntrustedHistory",
                phase: Phase::Failed,
                event: before
                    .is_none_or(|c| c.message != message)
                    .then_some(Warning {
                        reason: "UntrustedHistory",
                        action: "Migrate",
                    }),
                message,
                then: Then::Requeue(REQUEUE_MIGRATION_FAILED),
            }),
            Err(Error::Migration(e)) if !e.is_transient() => {
                let message = e.to_string();
                Err(Failure {
                    mark: Mark::Step(condition::MIGRATIONS_APPLIED),
                    reason: "MigrationFailed",
                    phase: Phase::Failed,
                    event: before
                        .is_none_or(|c| c.message != message)
                        .then_some(Warning {
                            reason: "MigrationFailed",
                            action: "Migrate",
                        }),
                    message,
                    then: Then::Requeue(REQUEUE_MIGRATION_FAILED),
                })
            }
            Err(e) => Err(Failure::error(condition::MIGRATIONS_APPLIED, e)),
        }
    }

    /// The storage quota: `status.usage` from the last measurement (when worth a write), and
    /// the login role's INSERT and UPDATE taken away while usage is above the quota, given
    /// back once it falls below 90 % of it; condition `QuotaExceeded` and an Event on each
    /// transition. Without a measurement the tenant stays as it was.
    async fn quota(
        &mut self,
        names: &Names,
        limits: &TenantLimits,
        ctx: &Context,
    ) -> Result<(), Failure> {
        let quota = limits.storage_bytes;
        let was_over = self.tenant.is_over_quota();
        let measured = ctx.usage(names.schema.as_str());
        if let Some(m) = &measured {
            let shown = self
                .tenant
                .status
                .as_ref()
                .and_then(|s| s.usage.as_ref())
                .map(|u| (u.bytes.max(0) as u64, u.measured_at.as_str()));
            if usage_worth_writing(shown, m.bytes, &m.at, quota) {
                self.b.status_mut().usage = Some(UsageStatus {
                    bytes: m.bytes.min(i64::MAX as u64) as i64,
                    size: format_bytes(m.bytes),
                    measured_at: m.at.clone(),
                });
            }
        }
        let over = over_quota(was_over, measured.as_ref().map(|m| m.bytes), quota);
        // Every login role of the tenant (today the app role).
        let logins = [names.app()];
        // The grants are the schema's privileges: a failure here is the schema step's.
        let fail = |e| Failure::error(condition::SCHEMA_READY, db(Stage::Schema)(e));
        if over {
            // Entering, or a table that got write rights since (a migration, a hand grant).
            if !was_over
                || ctx
                    .admin
                    .writes_granted(names, &logins)
                    .await
                    .map_err(fail)?
            {
                ctx.admin
                    .set_writes(names, &logins, false)
                    .await
                    .map_err(fail)?;
            }
        } else if was_over {
            ctx.admin
                .set_writes(names, &logins, true)
                .await
                .map_err(fail)?;
        }
        let shown = self
            .b
            .status_mut()
            .usage
            .as_ref()
            .map_or("not measured yet".to_string(), |u| u.size.clone());
        let Some(q) = quota else {
            if self.tenant.condition(condition::QUOTA_EXCEEDED).is_some() {
                self.b.set(
                    condition::QUOTA_EXCEEDED,
                    "False",
                    "NoQuota",
                    "spec.limits.storage is not set: no storage quota",
                );
            }
            if was_over {
                self.notices.push(Note::normal(
                    "QuotaRestored",
                    "EnforceQuota",
                    format!(
                        "spec.limits.storage was removed: role {} may write again",
                        names.app().as_str()
                    ),
                ));
            }
            return Ok(());
        };
        let quota_s = format_bytes(q);
        let resume_s = format_bytes(q / 100 * RESUME_PERCENT);
        if over {
            let message = format!(
                "storage usage {shown} is above the quota {quota_s}: INSERT and UPDATE by role {} \
                 are refused (API: 403 quota-exceeded) until usage falls below {resume_s} \
                 ({RESUME_PERCENT} %); reads and DELETE work",
                names.app().as_str()
            );
            if !was_over {
                info!(schema = names.schema.as_str(), "storage quota exceeded");
                self.notices.push(Note::warning(
                    "QuotaExceeded",
                    "EnforceQuota",
                    message.clone(),
                ));
            }
            self.b
                .set(condition::QUOTA_EXCEEDED, "True", "QuotaExceeded", message);
        } else {
            if was_over {
                info!(schema = names.schema.as_str(), "storage quota restored");
                self.notices.push(Note::normal(
                    "QuotaRestored",
                    "EnforceQuota",
                    format!(
                        "storage usage {shown} is below {resume_s} ({RESUME_PERCENT} % of the \
                         quota {quota_s}): role {} may write again",
                        names.app().as_str()
                    ),
                ));
            }
            self.b.set(
                condition::QUOTA_EXCEEDED,
                "False",
                "WithinQuota",
                format!("storage usage {shown} of quota {quota_s}"),
            );
        }
        Ok(())
    }

    /// The credentials Secret. Returns its resourceVersion.
    async fn credentials(
        &mut self,
        id: &Ident,
        secret_name: &str,
        verifier: Option<&str>,
        fresh_password: Option<&str>,
        ctx: &Context,
    ) -> Result<Option<String>, Failure> {
        let issued =
            credentials::ensure(self.tenant, id, secret_name, verifier, fresh_password, ctx)
                .await
                .map_err(|e| Failure::error(condition::CREDENTIALS_READY, e))?;
        match issued {
            Issued::Ready { version, wrote } => {
                self.journal.extend(wrote);
                self.b.ok(
                    condition::CREDENTIALS_READY,
                    "Issued",
                    format!("credentials in Secret {secret_name}"),
                );
                Ok(version)
            }
            Issued::Conflict(message) => Err(Failure::conflict(
                condition::CREDENTIALS_READY,
                "IssueCredentials",
                message,
                self.previous_phase,
            )),
        }
    }

    /// Ready. On first provisioning the journal becomes one `Provisioned` Event (each
    /// apiserver write costs at fleet scale) whose note lists the steps taken.
    fn ready(
        &mut self,
        id: &Ident,
        secret_name: &str,
        version: Option<i64>,
        held: Option<Hold>,
        secret_version: Option<String>,
    ) -> Done {
        self.b.status_mut().secret_name = Some(secret_name.to_string());
        self.b.ready(format!(
            "schema {} ready with credentials in Secret {secret_name}",
            id.as_str()
        ));
        if self.previous_phase == Some(Phase::Suspended) {
            info!(schema = id.as_str(), "tenant resumed");
            self.journal.push(Note::normal(
                "Resumed",
                "Resume",
                format!(
                    "spec.suspended is false: role {} can log in again and the API serves the tenant",
                    id.as_str()
                ),
            ));
        } else if self.previous_phase != Some(Phase::Ready) {
            info!(schema = id.as_str(), "tenant provisioned");
            let steps = self
                .journal
                .iter()
                .map(|n| n.note.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let note = format!(
                "schema {} at migration version {} with credentials in Secret {secret_name}{}",
                id.as_str(),
                version.map_or("none".into(), |v| v.to_string()),
                if steps.is_empty() {
                    String::new()
                } else {
                    format!(": {steps}")
                }
            );
            self.journal = vec![Note::normal("Provisioned", "Provision", note)];
        }
        Done::Ready {
            verified: Verified {
                generation: self.tenant.metadata.generation,
                secret_version,
                migration_version: version,
                at: Instant::now(),
            },
            requeue: held.map_or(RESYNC, Hold::requeue),
        }
    }

    /// The report of this run: notices, then the journal, then the failure's own Event; the
    /// status unless nothing was looked at.
    fn finish(self, end: Result<Done, Failure>) -> Report {
        let mut events = self.notices;
        events.extend(self.journal);
        match end {
            Ok(Done::Unchanged(wait)) => Report::events(events, Ok(Action::requeue(wait))),
            Ok(Done::Suspended(wait)) => Report {
                events,
                status: Some(self.b.build()),
                verdict: Ok(Action::requeue(wait)),
                verified: None,
            },
            Ok(Done::Ready { verified, requeue }) => Report {
                events,
                status: Some(self.b.build()),
                verdict: Ok(Action::requeue(requeue)),
                verified: Some(verified),
            },
            Err(failure) => failure.report(self.b, events),
        }
    }
}

/// Outcome of the migration step.
struct Migrated {
    version: Option<i64>,
    applied: Vec<i64>,
    /// Pending migrations held back by the rollout, and the condition message.
    held: Option<(Hold, String)>,
}

/// Applies pending migrations; returns the schema's version and the versions applied now.
/// A schema already up to date costs one read and no transaction.
async fn migrate(names: &Names, ctx: &Context) -> Result<Migrated, Error> {
    let applied = ctx.admin.applied_migrations(names).await?;
    let pending = ctx.migrations.pending(&applied)?;
    let current = applied.iter().map(|(v, _)| *v).max();
    if pending.is_empty() {
        return Ok(Migrated {
            version: current,
            applied: Vec::new(),
            held: None,
        });
    }
    // New tenants get the whole set at once; tenants already migrated once follow the rollout.
    let permit = if applied.is_empty() {
        None
    } else {
        match ctx.rollout.admit(
            ctx.fleet.progress(ctx.migrations.latest()),
            ctx.migrations.latest(),
            &ctx.metrics,
        ) {
            Admission::Go(permit) => Some(permit),
            Admission::Hold(hold, message) => {
                return Ok(Migrated {
                    version: current,
                    applied: Vec::new(),
                    held: Some((hold, message)),
                })
            }
        }
    };
    let result = ctx.admin.migrate(names, &ctx.migrations).await;
    if let (Some(permit), Err(e)) = (permit, &result) {
        if !e.is_transient() {
            permit.failed();
        }
    }
    let applied_now = result?;
    let version = current.into_iter().chain(applied_now.iter().copied()).max();
    Ok(Migrated {
        version,
        applied: applied_now,
        held: None,
    })
}
