//! The apply pipeline: validate → routing → observe/conflicts → role → schema → migrations →
//! credentials → ready. Each stage sets its condition and returns Ok or a [`Failure`]; the
//! whole run ends in one [`Report`], which the reconcile publishes.

use std::time::{Duration, Instant};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{runtime::controller::Action, ResourceExt};
use tracing::{info, Span};

use super::{
    context::{Context, Verified},
    credentials::{self, Issued},
    error::db,
    reconcile::{
        now, Failure, Mark, Note, Report, Then, Warning, REQUEUE_CONFLICT, REQUEUE_MIGRATION_FAILED,
    },
    rollout::{Admission, Hold},
    Error, Stage,
};
use crate::{
    domain::{
        crd::{
            condition, CredentialsStatus, Phase, Tenant, UsageStatus, RECREATE_SCHEMA_ANNOTATION,
        },
        credentials::Login,
        limits::{format_bytes, over_quota, usage_worth_writing, TenantLimits, RESUME_PERCENT},
        naming::{quote_literal, Ident},
        plan::{self, Plan},
        rotation, scram,
        server::PlacementSpec,
        state::{Holder, Observed, Owner},
        status::StatusBuilder,
    },
    postgres::{
        migrations::MigrateError,
        tenant::{Logins, Names, Review, SchemaChange},
        Admin,
    },
};

/// Look again this soon at a tenant no server can take (or whose server is not registered).
const REQUEUE_UNPLACED: Duration = Duration::from_secs(15);

/// Writes `status.server` on its own, before anything is created on the server (a crash
/// right after must not let the next reconcile pick another one).
async fn write_placement(tenant: &Tenant, server: &str, ctx: &Context) -> Result<(), Error> {
    super::reconcile::apply_status(
        tenant,
        serde_json::json!({ "server": server }),
        PLACEMENT_MANAGER,
        ctx,
    )
    .await
}

/// Field manager of the placement write (the status's other fields are the reconcile's).
const PLACEMENT_MANAGER: &str = "tenantry-placement";

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
    let mut b = StatusBuilder::new(tenant.status.as_ref(), tenant.metadata.generation, now());
    // Recorded by any status write (a tenant of an operator without servers gets its server
    // written even when this run stops early).
    b.status_mut().server = ctx.servers.server_of(tenant);
    let mut run = Run {
        tenant,
        admin: ctx.servers.admin_of(tenant),
        b,
        previous_phase: tenant.status.as_ref().map(|s| s.phase),
        seen_ready: ctx.verified_once(tenant),
        notices: Vec::new(),
        journal: Vec::new(),
        resync: ctx.resync,
    };
    let end = run.pipeline(ctx).await;
    run.finish(end)
}

/// One apply in progress: the status being built and the Events gathered so far.
struct Run<'t> {
    tenant: &'t Tenant,
    /// The admin of the tenant's server: known before anything is looked at in PostgreSQL
    /// ([`Run::place`]).
    admin: Option<Admin>,
    b: StatusBuilder,
    previous_phase: Option<Phase>,
    /// This process found the tenant Ready before (whatever the status read now says).
    seen_ready: bool,
    /// Events about the Tenant as a whole (routing, rollout), published first.
    notices: Vec<Note>,
    /// Steps taken: published as one `Provisioned` Event on first provisioning, or one Event
    /// each otherwise (and before a failure).
    journal: Vec<Note>,
    /// When a Ready or suspended tenant is looked at again ([`Context::resync`]).
    resync: Duration,
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

/// Which of the tenant's objects the status says this Tenant provisioned (so that one found
/// missing or unmarked was dropped or changed out of band).
#[derive(Debug, Clone, Copy, Default)]
struct Provisioned {
    schema: bool,
    app: bool,
    owner: bool,
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

    fn sql(self) -> &'static str {
        match self {
            Object::Role => "ROLE",
            Object::Schema => "SCHEMA",
        }
    }
}

impl Run<'_> {
    /// The admin of the tenant's server. Only after [`Run::place`] (or for a tenant placed
    /// before this run).
    fn admin(&self) -> &Admin {
        self.admin.as_ref().expect("the tenant was placed first")
    }

    /// Which server the tenant lives on: `status.server` once chosen (never changed here),
    /// the default server for a tenant provisioned before servers were recorded, otherwise
    /// one picked by `spec.placement` and written to `status.server` before anything is
    /// created. No server that can take it: condition Placed False, nothing created.
    async fn place(&mut self, id: &Ident, ctx: &Context) -> Result<(), Failure> {
        let servers = &ctx.servers;
        let default = PlacementSpec::default();
        let placement = self.tenant.spec.placement.as_ref().unwrap_or(&default);
        let key = (
            self.tenant.namespace().unwrap_or_default(),
            self.tenant.name_any(),
        );
        let name = match servers.server_of(self.tenant) {
            Some(name) => name,
            None => {
                // A schema name is one tenant's on every server: another Tenant claiming it
                // that is placed already, or comes first (and is neither invalid nor being
                // deleted), keeps it.
                let rivals = ctx.fleet.schema_rivals(&key, id.as_str());
                let first = |k: &crate::domain::routing::Key| {
                    *k < key
                        && ctx.fleet.get_key(k).is_some_and(|t| {
                            t.metadata.deletion_timestamp.is_none()
                                && t.status.as_ref().map(|s| s.phase) != Some(Phase::Invalid)
                        })
                };
                if let Some((rival, on)) = rivals.iter().find(|(k, on)| on.is_some() || first(k)) {
                    let message = format!(
                        "schema {id} belongs to Tenant {}/{}{}; choose another spec.schema",
                        rival.0,
                        rival.1,
                        on.as_ref()
                            .map(|s| format!(" (on server {s})"))
                            .unwrap_or_default()
                    );
                    return Err(Failure {
                        mark: Mark::NotReady,
                        reason: "Conflict",
                        phase: Phase::Conflict,
                        event: (self.previous_phase != Some(Phase::Conflict)).then_some(Warning {
                            reason: "Conflict",
                            action: "Place",
                        }),
                        message,
                        then: Then::Requeue(REQUEUE_CONFLICT),
                    });
                }
                let picked = servers.pick(
                    &key,
                    placement,
                    || ctx.fleet.per_server(),
                    |k| ctx.fleet.placed(k).is_some() || ctx.fleet.get_key(k).is_none(),
                );
                let name = match picked {
                    Ok(name) => name,
                    Err(no) => {
                        let message =
                            format!("{no}; nothing is created until a server can take it");
                        self.b
                            .set(condition::PLACED, "False", no.reason(), message.clone());
                        return Err(Failure {
                            mark: Mark::NotReady,
                            reason: no.reason(),
                            phase: Phase::Pending,
                            event: (self
                                .tenant
                                .condition(condition::PLACED)
                                .map(|c| c.reason.as_str())
                                != Some(no.reason()))
                            .then_some(Warning {
                                reason: "NoServer",
                                action: "Place",
                            }),
                            message,
                            then: Then::Requeue(REQUEUE_UNPLACED),
                        });
                    }
                };
                if let Err(e) = write_placement(self.tenant, &name, ctx).await {
                    servers.unpick(&key);
                    let mut f = Failure::error(condition::ROLE_READY, e);
                    // No step condition: a tenant with one counts as worked on before servers
                    // were recorded (see `Servers::server_of`).
                    f.mark = Mark::NotReady;
                    return Err(f);
                }
                self.journal.push(Note::normal(
                    "Placed",
                    "Place",
                    format!("placed on server {name}"),
                ));
                name
            }
        };
        self.b.status_mut().server = Some(name.clone());
        // Found when the run began for a tenant placed before it.
        let Some(admin) = self.admin.take().or_else(|| servers.admin(&name)) else {
            let message = format!(
                "server {name} is not registered (no PostgresServer of that name, or its admin Secret is unusable): see kubectl get postgresserver {name}"
            );
            // Everything else stays as it was: a server not seen now (its PostgresServer
            // deleted, the list failing) takes no tenant out of service.
            return Err(Failure {
                mark: Mark::Unplaced,
                reason: "ServerUnavailable",
                phase: self.previous_phase.unwrap_or_default(),
                event: None,
                message,
                then: Then::Requeue(REQUEUE_UNPLACED),
            });
        };
        self.admin = Some(admin);
        if servers.satisfies(&name, placement) == Some(false) {
            self.b.set(
                condition::PLACED,
                "False",
                "PlacementChanged",
                format!(
                    "spec.placement no longer matches server {name}; tenants are not moved between servers: it stays on {name}"
                ),
            );
        } else {
            self.b.set(
                condition::PLACED,
                "True",
                "Placed",
                format!("on server {name}"),
            );
        }
        Ok(())
    }

    async fn pipeline(&mut self, ctx: &Context) -> Result<Done, Failure> {
        // Said again unless the quota stage below says otherwise (a run stopping before it
        // leaves the quota's state as it was, and so are the tenant's grants).
        self.b.keep(condition::QUOTA_EXCEEDED);
        self.b.keep(condition::SCHEMA_DRIFT);
        let plan = match self.validate() {
            Ok(plan) => plan,
            // A refused change leaves the tenant as provisioned, but never keeps a previous
            // login alive past its grace period.
            Err(refused) if refused.mark == Mark::Refused => {
                return Err(self.retire_despite_refusal(refused).await)
            }
            Err(invalid) => return Err(invalid),
        };
        let (id, owner, secret_name) = (&plan.ident, &plan.owner, plan.secret_name.as_str());
        Span::current().record("schema", id.as_str());
        self.place(id, ctx).await?;
        self.routing(ctx);

        // Fast path: nothing relevant changed since a recent full verification (our own Secret
        // and status writes come back as watch events; they need no second look).
        // (Not right after a pause: the Paused condition must go; nor when a new usage
        // measurement is worth showing or moves the tenant across its quota; nor when a
        // rotation step is due: a rotation request, the end of a grace period, the rotation
        // period.)
        let now = Timestamp::now();
        let due = rotation::next_due(self.tenant, &plan.rotation, now);
        if self.tenant.condition(condition::PAUSED).is_none()
            && !ctx.usage_news(self.tenant)
            && !ctx.drift_news(self.tenant)
            && due.is_none_or(|t| t > now)
        {
            if let Some(wait) = ctx.recently_verified(self.tenant, &self.b, secret_name) {
                return Ok(Done::Unchanged(until_due(wait, due, now)));
            }
        }

        // Read what exists, once, before changing anything: conflicts stop us with nothing done.
        let names = Names::new(id.clone());
        let observed = self
            .admin()
            .observe_tenant(&names)
            .await
            .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?;
        let provisioned = self.provisioned(&names);
        self.no_conflicts(
            [
                (
                    Object::Role,
                    id,
                    observed.role_holder(owner),
                    provisioned.app,
                ),
                (
                    Object::Role,
                    &names.owner,
                    observed.owner_role_holder(owner),
                    provisioned.owner,
                ),
                (
                    Object::Schema,
                    id,
                    observed.schema_holder(owner),
                    provisioned.schema,
                ),
            ],
            owner,
        )?;

        // The second login identity is only ever touched when it is this Tenant's.
        let b_holder = observed.login_b_holder(owner);
        let mut observed = observed;
        if b_holder != Holder::ThisTenant {
            observed.login_b = None;
        }
        let mut ids = self
            .identities(&names, &observed, &b_holder, &plan, secret_name, now, ctx)
            .await?;
        let fresh_password = self
            .roles(&names, owner, &observed, &ids, &plan.limits)
            .await?;
        let ended = if self.tenant.is_suspended() {
            // After NOLOGIN is committed, so an ended session cannot log in again.
            let mut ended = 0;
            for identity in [Some(id), observed.login_b.as_ref().map(|_| &names.login_b)]
                .into_iter()
                .flatten()
            {
                ended += self
                    .admin()
                    .terminate(identity)
                    .await
                    .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?;
            }
            Some(ended)
        } else {
            None
        };
        if let Some(retired) = ids.retire.as_deref().and_then(|r| names.identity(r)) {
            self.retired(retired).await?;
        }
        // A rotation happens before the schema and migration steps, so that neither a held
        // nor a failing migration holds it up.
        let rotated = match (ids.rotate.clone(), names.identity(&ids.current)) {
            (Some(trigger), Some(target)) => Some(
                self.rotate(
                    &names,
                    owner,
                    &observed,
                    &mut ids,
                    target,
                    Some((&trigger, plan.rotation.grace)),
                    secret_name,
                    ctx,
                )
                .await?,
            ),
            // The current identity was dropped by hand: made again, with a new password.
            (None, Some(target))
                if target == &names.login_b
                    && observed.login_b.is_none()
                    && !self.tenant.is_suspended() =>
            {
                Some(
                    self.rotate(
                        &names,
                        owner,
                        &observed,
                        &mut ids,
                        target,
                        None,
                        secret_name,
                        ctx,
                    )
                    .await?,
                )
            }
            _ => None,
        };
        if ids.recorded_now {
            info!(
                identity = ids.current.as_str(),
                "recorded an unrecorded rotation"
            );
            self.journal.push(Note::normal(
                "CredentialsRotated",
                "Rotate",
                format!(
                    "recorded the rotation to identity {} that Secret {secret_name} already \
                     holds (the operator stopped before writing the status){}",
                    ids.current,
                    match &ids.previous {
                        Some((p, until)) => format!("; identity {p} keeps working until {until}"),
                        None => String::new(),
                    }
                ),
            ));
        }
        if rotated.is_some() || ids.recorded_now || ids.retire.is_some() {
            // Recorded now, so that a later step's failure does not hide it.
            self.b.status_mut().credentials = Some(ids.record.clone());
        }
        // The app role made again (dropped out of band) gets its rights on the existing
        // objects back with the schema step.
        let app_recreated = fresh_password.is_some() && observed.schema.is_some();
        self.schema(&names, owner, &observed, app_recreated, ctx)
            .await?;
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
        let current = names.identity(&ids.current).unwrap_or(id);
        let login = Login {
            schema: id,
            user: current,
            rotated_at: Some(&ids.record.rotated_at),
            request: ids.record.rotate_request.as_deref(),
        };
        let secret_version = match rotated {
            Some(version) => {
                self.b.ok(
                    condition::CREDENTIALS_READY,
                    "Issued",
                    format!("credentials in Secret {secret_name}"),
                );
                version
            }
            None => {
                let state = if current == &names.login_b {
                    observed.login_b.as_ref()
                } else {
                    observed.role.as_ref()
                };
                let verifier = state.and_then(|r| r.verifier.as_deref());
                let fresh = fresh_password.as_deref().filter(|_| current == id);
                self.credentials(&login, secret_name, verifier, fresh, ctx)
                    .await?
            }
        };
        self.b.status_mut().credentials = Some(ids.record.clone());
        // After the migrations: a table they created while over quota got INSERT and UPDATE
        // from the default privileges, and is revoked again here.
        self.quota(&names, &plan.limits, ctx).await?;
        self.drift(id, ctx);

        let next = ids.next;
        if let Some(ended) = ended {
            return Ok(self.suspended(id, secret_name, ended, next));
        }
        Ok(self.ready(id, secret_name, version, held, secret_version, next))
    }

    /// Which login identity is current, and whether to rotate or retire one now (see
    /// [`rotation::decide`]). A rotation into a second identity someone else holds stops here,
    /// with nothing changed.
    #[allow(clippy::too_many_arguments)]
    async fn identities(
        &mut self,
        names: &Names,
        observed: &Observed,
        b_holder: &Holder,
        plan: &Plan,
        secret_name: &str,
        now: Timestamp,
        ctx: &Context,
    ) -> Result<rotation::Decision, Failure> {
        let record = self
            .tenant
            .status
            .as_ref()
            .and_then(|s| s.credentials.as_ref());
        let unrecorded = match record {
            Some(r) if r.previous_identity.is_none() => {
                self.unrecorded(names, observed, r, secret_name, ctx)
                    .await?
            }
            _ => None,
        };
        let d = rotation::decide(&rotation::Inputs {
            a: names.app().as_str(),
            b: names.login_b.as_str(),
            record,
            request: self.tenant.rotate_request(),
            policy: plan.rotation,
            suspended: self.tenant.is_suspended(),
            unrecorded,
            now,
        });
        if d.current == names.login_b.as_str() {
            let message = match b_holder {
                Holder::Unmanaged => Some(format!(
                    "cannot rotate the credentials: role {} (the tenant's second login identity) \
                     already exists and is not managed by tenantry; nothing was changed",
                    names.login_b.as_str()
                )),
                Holder::OtherTenant(o) => Some(format!(
                    "cannot rotate the credentials: role {} (the tenant's second login identity) \
                     belongs to Tenant {}/{}; nothing was changed",
                    names.login_b.as_str(),
                    o.namespace,
                    o.name
                )),
                Holder::Nobody | Holder::ThisTenant => None,
            };
            if let Some(message) = message {
                return Err(Failure::conflict(
                    condition::CREDENTIALS_READY,
                    "Rotate",
                    message,
                    self.previous_phase,
                ));
            }
        }
        Ok(d)
    }

    /// Evidence of a rotation the status does not record: the operator stopped after writing
    /// the Secret and before writing the status. Then the Secret names the identity that is
    /// not recorded as current, that identity can log in (nothing else gives it LOGIN outside
    /// a grace period), and its password checks out where the verifier is readable. Costs
    /// nothing in the common case (the other identity cannot log in).
    async fn unrecorded(
        &self,
        names: &Names,
        observed: &Observed,
        record: &CredentialsStatus,
        secret_name: &str,
        ctx: &Context,
    ) -> Result<Option<rotation::Unrecorded>, Failure> {
        let (other, state) = if record.identity == names.login_b.as_str() {
            (names.app(), observed.role.as_ref())
        } else {
            (&names.login_b, observed.login_b.as_ref())
        };
        let Some(state) = state.filter(|s| s.can_login) else {
            return Ok(None);
        };
        let value = |s: &Secret, key: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(|b| std::str::from_utf8(&b.0).ok().map(str::to_string))
        };
        let names_other = |s: &Secret| value(s, "username").as_deref() == Some(other.as_str());
        let fail = |e| Failure::error(condition::CREDENTIALS_READY, e);
        let cached = credentials::read(self.tenant, secret_name, false, ctx)
            .await
            .map_err(fail)?;
        if !cached.as_ref().is_some_and(names_other) {
            return Ok(None);
        }
        let Some(secret) = credentials::read(self.tenant, secret_name, true, ctx)
            .await
            .map_err(fail)?
            .filter(names_other)
        else {
            return Ok(None);
        };
        let password_ok = match (&state.verifier, value(&secret, "password")) {
            (Some(v), Some(p)) => scram::verify(&p, v),
            (Some(_), None) => false,
            // Without the verifier, the digest written beside the password (if any) decides.
            (None, Some(p)) => secret
                .annotations()
                .get(crate::domain::credentials::PASSWORD_DIGEST_ANNOTATION)
                .is_none_or(|d| {
                    *d == crate::domain::credentials::password_digest(other.as_str(), &p)
                }),
            (None, None) => true,
        };
        if !password_ok {
            return Ok(None);
        }
        let annotation = |k: &str| secret.annotations().get(k).cloned();
        Ok(Some(rotation::Unrecorded {
            rotated_at: annotation(rotation::SECRET_ROTATED_AT_ANNOTATION)
                .and_then(|t| t.parse().ok()),
            request: annotation(rotation::SECRET_REQUEST_ANNOTATION),
        }))
    }

    /// While a spec change is refused (the tenant keeps serving as provisioned), the previous
    /// login recorded in the status is still retired when its grace period ends: from the
    /// status alone (the refused spec is not read), only a role that is one of this tenant's
    /// two logins, carries this Tenant's mark and is not the Secret's current login. Before
    /// the end of the grace, the refusal is looked at again then.
    async fn retire_despite_refusal(&mut self, mut refused: Failure) -> Failure {
        let Some(status) = self.tenant.status.as_ref() else {
            return refused;
        };
        let (Some(schema), Some(record)) = (status.schema.as_deref(), status.credentials.clone())
        else {
            return refused;
        };
        let (Some(previous), Some(until)) = (
            record.previous_identity.as_deref(),
            record.previous_valid_until.as_deref(),
        ) else {
            return refused;
        };
        let Ok(schema) = Ident::parse("schema", schema) else {
            return refused;
        };
        let names = Names::new(schema);
        let (Some(retired), Ok(until)) = (names.identity(previous), until.parse::<Timestamp>())
        else {
            return refused;
        };
        if retired.as_str() == record.identity {
            return refused;
        }
        let now = Timestamp::now();
        if until > now {
            let wait = Duration::try_from(until.duration_since(now)).unwrap_or_default();
            refused.then = Then::Requeue(wait + Duration::from_secs(1));
            return refused;
        }
        let owner = Owner::new(
            &self.tenant.namespace().unwrap_or_default(),
            &self.tenant.name_any(),
            self.tenant.metadata.uid.as_deref().unwrap_or_default(),
        );
        // A server that is gone keeps the refusal as it is.
        if self.admin.is_none() {
            return refused;
        }
        let fail = |e| Failure::error(condition::CREDENTIALS_READY, db(Stage::Credentials)(e));
        let observed = match self.admin().observe_tenant(&names).await {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let ours = if retired == names.app() {
            observed.role_holder(&owner) == Holder::ThisTenant
        } else {
            observed.login_b_holder(&owner) == Holder::ThisTenant
        };
        if ours {
            if let Err(e) = self.admin().retire_login(retired).await {
                return fail(e);
            }
            if let Err(f) = self.retired(retired).await {
                return f;
            }
        }
        let mut record = record;
        record.previous_identity = None;
        record.previous_valid_until = None;
        self.b.status_mut().credentials = Some(record);
        refused
    }

    /// The previous identity's grace period is over: it lost LOGIN and its password in the
    /// role step; its sessions end now.
    async fn retired(&mut self, retired: &Ident) -> Result<(), Failure> {
        let ended =
            self.admin().terminate(retired).await.map_err(|e| {
                Failure::error(condition::CREDENTIALS_READY, db(Stage::Credentials)(e))
            })?;
        info!(
            identity = retired.as_str(),
            ended, "previous credentials retired"
        );
        self.journal.push(Note::normal(
            "PreviousCredentialsRetired",
            "Rotate",
            format!(
                "the grace period is over: identity {} can no longer log in (its password was \
                 removed); ended {ended} open session(s)",
                retired.as_str()
            ),
        ));
        Ok(())
    }

    /// Rotates the credentials to `target`: a fresh password and LOGIN on it (created when
    /// missing), then the Secret; the grace period of the previous identity counts from the
    /// moment the Secret was written (clients cannot see the new credentials earlier; on a busy
    /// machine that can be seconds after the reconcile began). `trigger` (with the grace period)
    /// is `None` when the current identity, dropped by hand, is made again. Returns the
    /// Secret's resourceVersion.
    #[allow(clippy::too_many_arguments)]
    async fn rotate(
        &mut self,
        names: &Names,
        owner: &Owner,
        observed: &Observed,
        ids: &mut rotation::Decision,
        target: &Ident,
        trigger: Option<(&rotation::Trigger, Duration)>,
        secret_name: &str,
        ctx: &Context,
    ) -> Result<Option<String>, Failure> {
        let fail = |e| Failure::error(condition::CREDENTIALS_READY, e);
        let password = scram::generate_password();
        // The tenant's limits apply to a second identity made now (plan() validated them).
        let limits = TenantLimits::of(&self.tenant.spec.limits).unwrap_or_default();
        let settings = self
            .admin()
            .login_settings(limits.connections, limits.statement_timeout_ms);
        self.admin()
            .rotate_to(names, owner, observed, target, &password, &settings)
            .await
            .map_err(|e| fail(db(Stage::Credentials)(e)))?;
        let login = Login {
            schema: &names.schema,
            user: target,
            rotated_at: Some(&ids.record.rotated_at),
            request: ids.record.rotate_request.as_deref(),
        };
        let issued = credentials::ensure(
            self.tenant,
            &login,
            secret_name,
            None,
            Some(&password),
            self.admin(),
            ctx,
        )
        .await
        .map_err(fail)?;
        let version = match issued {
            Issued::Ready { version, .. } => version,
            Issued::Conflict(message) => {
                return Err(Failure::conflict(
                    condition::CREDENTIALS_READY,
                    "Rotate",
                    message,
                    self.previous_phase,
                ))
            }
        };
        if let Some((_, grace)) = trigger {
            ids.rotated_at(Timestamp::now(), grace);
        }
        let trigger = trigger.map(|(t, _)| t);
        let note = match (trigger, &ids.previous) {
            (Some(trigger), Some((previous, until))) => {
                let why = match trigger {
                    rotation::Trigger::Period => {
                        "spec.credentials.rotationPeriod elapsed".to_string()
                    }
                    rotation::Trigger::Request(v) => {
                        format!("requested by {}={v:?}", rotation::ROTATE_ANNOTATION)
                    }
                };
                info!(
                    identity = target.as_str(),
                    previous = previous.as_str(),
                    "credentials rotated"
                );
                Note::normal(
                    "CredentialsRotated",
                    "Rotate",
                    format!(
                        "{why}: Secret {secret_name} now holds identity {} with a new password; \
                         identity {previous} keeps working until {until}",
                        target.as_str()
                    ),
                )
            }
            _ => Note::normal(
                "CredentialsRepaired",
                "Provision",
                format!(
                    "identity {} was missing: made it again with a new password and wrote Secret \
                     {secret_name}",
                    target.as_str()
                ),
            ),
        };
        self.journal.push(note);
        Ok(version)
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
    fn suspended(
        &mut self,
        id: &Ident,
        secret_name: &str,
        ended: u64,
        next: Option<Timestamp>,
    ) -> Done {
        match self.suspended_wait(id, secret_name, ended) {
            Done::Suspended(wait) => Done::Suspended(until_due(wait, next, Timestamp::now())),
            other => other,
        }
    }

    fn suspended_wait(&mut self, id: &Ident, secret_name: &str, ended: u64) -> Done {
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
        Done::Suspended(self.resync)
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

    /// Which of the tenant's objects the status says this Tenant provisioned.
    fn provisioned(&self, names: &Names) -> Provisioned {
        let Some(status) = self.tenant.status.as_ref() else {
            return Provisioned::default();
        };
        let said = |v: &Option<String>, want: &Ident| v.as_deref() == Some(want.as_str());
        Provisioned {
            schema: said(&status.schema, &names.schema),
            app: said(&status.role, names.app()),
            owner: said(&status.owner_role, &names.owner),
        }
    }

    /// Stops, with nothing changed, when either role or the schema is someone else's. When the
    /// status says this Tenant provisioned the object, its mark was removed or changed out of
    /// band: `OwnershipMarkChanged`, with the statement that restores it; the object is not
    /// marked again, since whoever changed the mark may have meant it.
    fn no_conflicts(
        &self,
        holders: [(Object, &Ident, Holder, bool); 3],
        mark: &Owner,
    ) -> Result<(), Failure> {
        for (object, name, holder, provisioned) in holders {
            let what = object.what();
            if provisioned && matches!(holder, Holder::Unmanaged | Holder::OtherTenant(_)) {
                let now = match &holder {
                    Holder::OtherTenant(o) => format!(
                        "changed to name Tenant {}/{} (uid {})",
                        o.namespace, o.name, o.uid
                    ),
                    _ => {
                        "removed, or replaced by something that is not a tenantry mark".to_string()
                    }
                };
                let message = format!(
                    "the ownership mark (COMMENT) of {what} {}, which this Tenant provisioned, \
                     was {now} out of band: the operator changes nothing on it, does not mark it \
                     again and will not drop it at deletion. If it is still this tenant's, \
                     restore the mark: COMMENT ON {} {name} IS {}",
                    name.as_str(),
                    object.sql(),
                    quote_literal(&mark.comment()).unwrap_or_default(),
                );
                let before = self.tenant.condition(object.condition());
                return Err(Failure {
                    mark: Mark::Step(object.condition()),
                    reason: "OwnershipMarkChanged",
                    phase: Phase::Conflict,
                    event: before
                        .is_none_or(|c| c.message != message)
                        .then_some(Warning {
                            reason: "OwnershipMarkChanged",
                            action: "Provision",
                        }),
                    message,
                    then: Then::Requeue(REQUEUE_CONFLICT),
                });
            }
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
        ids: &rotation::Decision,
        limits: &TenantLimits,
    ) -> Result<Option<String>, Failure> {
        let id = names.app();
        let password = observed.role.is_none().then(scram::generate_password);
        let suspended = self.tenant.is_suspended();
        let retire = ids
            .retire
            .as_deref()
            .and_then(|r| names.identity(r))
            .filter(|r| {
                if *r == id {
                    observed.role.is_some()
                } else {
                    observed.login_b.is_some()
                }
            });
        let logins = Logins {
            app: ids.may_log_in(id.as_str(), suspended),
            b: ids.may_log_in(names.login_b.as_str(), suspended),
            retire,
        };
        let settings = self
            .admin()
            .login_settings(limits.connections, limits.statement_timeout_ms);
        self.admin()
            .ensure_roles(
                names,
                owner,
                observed,
                password.as_deref(),
                &logins,
                &settings,
            )
            .await
            .map_err(|e| Failure::error(condition::ROLE_READY, db(Stage::Role)(e)))?;
        let provisioned = self.provisioned(names);
        let mut recreated = Vec::new();
        if observed.owner_role.is_none() && provisioned.owner {
            recreated.push(format!("owner role {}", names.owner.as_str()));
        }
        if observed.role.is_none() && provisioned.app {
            recreated.push(if ids.current == id.as_str() {
                format!(
                    "app role {} (with a new password, written to the credentials Secret, and \
                     its rights on the schema)",
                    id.as_str()
                )
            } else {
                format!(
                    "app role {} (with its rights on the schema; the Secret's login {} is \
                     its member again)",
                    id.as_str(),
                    ids.current
                )
            });
        }
        if !recreated.is_empty() {
            let message = format!(
                "{} did not exist (dropped out of band) and {} created again with this \
                 Tenant's mark; sessions of the dropped role were lost",
                recreated.join(" and "),
                if recreated.len() == 1 { "was" } else { "were" }
            );
            info!(schema = id.as_str(), "{message}");
            self.notices
                .push(Note::warning("RoleRecreated", "Provision", message.clone()));
            self.b.ok(condition::ROLE_READY, "Recreated", message);
            return Ok(password);
        }
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
        app_recreated: bool,
        ctx: &Context,
    ) -> Result<(), Failure> {
        let id = names.app();
        // A schema this Tenant provisioned that no longer exists: its data is gone. Not made
        // again unless asked, so that the loss is never hidden behind an empty schema.
        let recreate = if observed.schema.is_none() && self.provisioned(names).schema {
            Some(self.schema_missing(id)?)
        } else {
            None
        };
        let change = self
            .admin()
            .ensure_schema(
                names,
                owner,
                observed,
                &ctx.migrations(),
                self.tenant
                    .annotations()
                    .contains_key(LEGACY_REVIEWED_ANNOTATION),
                app_recreated,
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
        if let Some(request) = recreate {
            let message = format!(
                "schema {} was missing (dropped out of band; its data is lost) and was created \
                 again, empty, owned by role {}, as {RECREATE_SCHEMA_ANNOTATION}={request:?} \
                 asked; the migrations are applied to it now",
                id.as_str(),
                names.owner.as_str()
            );
            info!(schema = id.as_str(), "schema recreated on request");
            self.notices.push(Note::warning(
                "SchemaRecreated",
                "Provision",
                message.clone(),
            ));
            self.b.status_mut().recreate_schema_request = Some(request);
            self.b.ok(condition::SCHEMA_READY, "Recreated", message);
            return Ok(());
        }
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

    /// The provisioned schema is gone. With a `tenantry.dev/recreate-schema` value not acted
    /// on before, returns it (the schema is created again, empty); otherwise stops with
    /// `SchemaReady=False reason=SchemaMissing` and a Warning Event when that is news.
    fn schema_missing(&self, id: &Ident) -> Result<String, Failure> {
        let acted = self
            .tenant
            .status
            .as_ref()
            .and_then(|s| s.recreate_schema_request.as_deref());
        let request = self.tenant.recreate_schema_request();
        if let Some(r) = request.filter(|r| Some(*r) != acted) {
            return Ok(r.to_string());
        }
        let version = self
            .tenant
            .status
            .as_ref()
            .and_then(|s| s.migration_version)
            .map_or("none".to_string(), |v| v.to_string());
        let stale = match request {
            Some(r) => format!(
                " (the annotation's value {r:?} was acted on before, for an earlier loss: set a \
                 new value)"
            ),
            None => String::new(),
        };
        let message = format!(
            "schema {} was provisioned by this Tenant (at migration version {version}) and no \
             longer exists: it was dropped out of band and its data is gone. It is not created \
             again on its own, so that the loss is not hidden behind an empty schema. Restore it \
             from a backup (with its owner and ownership mark), or annotate the Tenant with \
             {RECREATE_SCHEMA_ANNOTATION}=<a new value> to create it again, empty, and apply \
             the migrations{stale}",
            id.as_str()
        );
        let before = self.tenant.condition(condition::SCHEMA_READY);
        Err(Failure {
            mark: Mark::Step(condition::SCHEMA_READY),
            reason: "SchemaMissing",
            phase: Phase::Failed,
            event: before
                .is_none_or(|c| c.message != message)
                .then_some(Warning {
                    reason: "SchemaMissing",
                    action: "Provision",
                }),
            message,
            then: Then::Requeue(REQUEUE_CONFLICT),
        })
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
        match migrate(names, self.admin(), ctx).await {
            Ok(Migrated {
                version,
                failed: Some(message),
                ..
            }) => {
                self.b.status_mut().migration_version = version;
                Err(migration_failed(before, message))
            }
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
                failed: None,
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
            Err(Error::Migration(MigrateError::HistoryMissing { message })) => {
                let message = format!(
                    "{message}; status.migrationVersion says {}",
                    self.tenant
                        .status
                        .as_ref()
                        .and_then(|s| s.migration_version)
                        .map_or("none".to_string(), |v| v.to_string())
                );
                Err(Failure {
                    mark: Mark::Step(condition::MIGRATIONS_APPLIED),
                    reason: "HistoryMissing",
                    phase: Phase::Failed,
                    event: before
                        .is_none_or(|c| c.message != message)
                        .then_some(Warning {
                            reason: "HistoryMissing",
                            action: "Migrate",
                        }),
                    message,
                    then: Then::Requeue(REQUEUE_MIGRATION_FAILED),
                })
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
            Err(e @ Error::Migration(_))
                if e.is_lock_timeout() && self.previous_phase == Some(Phase::Ready) =>
            {
                // The tenant's own long transaction (typically) holds a lock a migration
                // needs: it keeps serving at its version, and the migration is retried.
                let version = self
                    .tenant
                    .status
                    .as_ref()
                    .and_then(|s| s.migration_version);
                self.b.status_mut().migration_version = version;
                let message = format!(
                    "a migration gave up waiting for a lock another session (the tenant's own long transaction?) holds on this tenant's tables; it is retried with backoff and the tenant keeps serving at version {}: {e}",
                    version.map_or("none".to_string(), |v| v.to_string())
                );
                if before.is_none_or(|c| c.reason != Hold::Locked.reason()) {
                    self.notices.push(Note::warning(
                        Hold::Locked.reason(),
                        "Migrate",
                        message.clone(),
                    ));
                }
                self.b.set(
                    condition::MIGRATIONS_APPLIED,
                    "False",
                    Hold::Locked.reason(),
                    message,
                );
                Ok((version, Some(Hold::Locked)))
            }
            Err(Error::Migration(e)) if !e.is_transient() => {
                Err(migration_failed(before, e.to_string()))
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
        // The app role: it holds the grants, and the second login identity has none of its
        // own (it inherits the app role's), so revoking from the app role covers both.
        let logins = [names.app()];
        // The grants are the schema's privileges: a failure here is the schema step's.
        let fail = |e| Failure::error(condition::SCHEMA_READY, db(Stage::Schema)(e));
        if over {
            // Entering, or a table that got write rights since (a migration, a hand grant).
            if !was_over
                || self
                    .admin()
                    .writes_granted(names, &logins)
                    .await
                    .map_err(fail)?
            {
                self.admin()
                    .set_writes(names, &logins, false)
                    .await
                    .map_err(fail)?;
            }
        } else if was_over {
            self.admin()
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

    /// The `SchemaDrift` condition from the last drift scan (see [`super::drift`]): Warning
    /// Event `SchemaDriftDetected` when it turns True, Normal `SchemaDriftResolved` when it
    /// clears. Without a scan the condition stays as it was. A report only: nothing in the
    /// schema is changed, and `Ready` does not depend on it.
    fn drift(&mut self, schema: &Ident, ctx: &Context) {
        let Some(found) = ctx.drift(schema.as_str()) else {
            return;
        };
        let (status, reason, message) = found.condition();
        let was_drifted = self
            .tenant
            .condition(condition::SCHEMA_DRIFT)
            .is_some_and(|c| c.status == "True");
        if status == "True" && !was_drifted {
            info!(schema = schema.as_str(), "schema drift detected");
            self.notices.push(Note::warning(
                "SchemaDriftDetected",
                "DetectDrift",
                message.clone(),
            ));
        } else if status == "False" && was_drifted {
            info!(schema = schema.as_str(), "schema drift resolved");
            self.notices.push(Note::normal(
                "SchemaDriftResolved",
                "DetectDrift",
                message.clone(),
            ));
        }
        self.b.set(condition::SCHEMA_DRIFT, status, reason, message);
    }

    /// The credentials Secret. Returns its resourceVersion.
    async fn credentials(
        &mut self,
        login: &Login<'_>,
        secret_name: &str,
        verifier: Option<&str>,
        fresh_password: Option<&str>,
        ctx: &Context,
    ) -> Result<Option<String>, Failure> {
        let issued = credentials::ensure(
            self.tenant,
            login,
            secret_name,
            verifier,
            fresh_password,
            self.admin(),
            ctx,
        )
        .await
        .map_err(|e| Failure::error(condition::CREDENTIALS_READY, e))?;
        match issued {
            Issued::Ready { version, wrote } => {
                // A repair says so in the condition too (until the next full verification).
                let (reason, message) = match &wrote {
                    Some(n) if n.reason == "CredentialsRepaired" => ("Repaired", n.note.clone()),
                    _ => ("Issued", format!("credentials in Secret {secret_name}")),
                };
                self.journal.extend(wrote);
                self.b.ok(condition::CREDENTIALS_READY, reason, message);
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
        next: Option<Timestamp>,
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
        } else if self.previous_phase != Some(Phase::Ready) && !self.seen_ready {
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
            requeue: until_due(
                held.map_or(self.resync, Hold::requeue),
                next,
                Timestamp::now(),
            ),
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
            Err(mut failure) => {
                // Waiting for someone to resolve it (a conflict, a missing schema or history):
                // looked at again at least every resync.
                if let Then::Requeue(after) = failure.then {
                    failure.then = Then::Requeue(after.min(self.resync));
                }
                failure.report(self.b, events)
            }
        }
    }
}

/// `wait`, or less when a credentials step is due earlier (a little after it, so that the
/// look finds it due).
fn until_due(wait: Duration, due: Option<Timestamp>, now: Timestamp) -> Duration {
    match due {
        Some(t) => wait.min(rotation::until(t, now) + Duration::from_millis(100)),
        None => wait,
    }
}

/// A migration failed for a reason retrying will not fix: the tenant is Failed until a fixed
/// set applies (a Warning Event when the message is news).
fn migration_failed(before: Option<&crate::domain::crd::Condition>, message: String) -> Failure {
    Failure {
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
    }
}

/// Outcome of the migration step.
struct Migrated {
    version: Option<i64>,
    applied: Vec<i64>,
    /// Pending migrations held back by the rollout, and the condition message.
    held: Option<(Hold, String)>,
    /// The rollout's own attempt at this schema failed, and why (reported once; the next
    /// reconcile tries again).
    failed: Option<String>,
}

/// Applies pending migrations; returns the schema's version and the versions applied now.
/// A schema already up to date costs one read and no transaction.
async fn migrate(names: &Names, admin: &Admin, ctx: &Context) -> Result<Migrated, Error> {
    let set = ctx.migrations();
    let applied = admin.applied_migrations(names).await?;
    let pending = set.pending(&applied)?;
    let current = applied.iter().map(|(v, _)| *v).max();
    if pending.is_empty() {
        return Ok(Migrated {
            version: current,
            applied: Vec::new(),
            held: None,
            failed: None,
        });
    }
    // A schema without history (a new one, or one whose history was lost) is not the
    // rollout's: a failure the rollout recorded for it is dropped, and the run below says why.
    if let Some(message) = ctx
        .rollout
        .take_failure(names.schema.as_str())
        .filter(|_| !applied.is_empty())
    {
        return Ok(Migrated {
            version: current,
            applied: Vec::new(),
            held: None,
            failed: Some(message),
        });
    }
    // New tenants get the whole set at once; tenants already migrated once follow the rollout.
    let permit = if applied.is_empty() {
        None
    } else {
        match ctx.rollout.admit(
            names.schema.as_str(),
            ctx.fleet.progress(set.latest()),
            set.latest(),
            &ctx.metrics,
        ) {
            Admission::Go(permit) => Some(permit),
            Admission::Hold(hold, message) => {
                return Ok(Migrated {
                    version: current,
                    applied: Vec::new(),
                    held: Some((hold, message)),
                    failed: None,
                })
            }
        }
    };
    let result = admin.migrate(names, &set).await;
    match (permit, &result) {
        (Some(permit), Ok(_)) => permit.succeeded(),
        (Some(permit), Err(e)) if !e.is_transient() => permit.failed(),
        _ => {}
    }
    let applied_now = result?;
    let version = current.into_iter().chain(applied_now.iter().copied()).max();
    Ok(Migrated {
        version,
        applied: applied_now,
        held: None,
        failed: None,
    })
}
