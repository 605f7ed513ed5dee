//! Pure construction of a Tenant's status: conditions keep their transition time while their
//! status stays the same, and the phase follows from the conditions.

use crate::domain::crd::{condition, Condition, Phase, TenantStatus};

/// Builds the next status from the previous one.
#[derive(Debug, Clone)]
pub struct StatusBuilder {
    previous: Vec<Condition>,
    status: TenantStatus,
    generation: Option<i64>,
    now: String,
}

impl StatusBuilder {
    pub fn new(previous: Option<&TenantStatus>, generation: Option<i64>, now: String) -> Self {
        let previous_status = previous.cloned().unwrap_or_default();
        let status = TenantStatus {
            phase: previous_status.phase,
            observed_generation: generation,
            schema: previous_status.schema.clone(),
            server: previous_status.server.clone(),
            role: previous_status.role.clone(),
            owner_role: previous_status.owner_role.clone(),
            secret_name: previous_status.secret_name.clone(),
            migration_version: previous_status.migration_version,
            usage: previous_status.usage.clone(),
            credentials: previous_status.credentials.clone(),
            recreate_schema_request: previous_status.recreate_schema_request.clone(),
            conditions: Vec::new(),
        };
        Self {
            previous: previous_status.conditions,
            status,
            generation,
            now,
        }
    }

    pub fn status_mut(&mut self) -> &mut TenantStatus {
        &mut self.status
    }

    /// Sets condition `type_`; the transition time only moves when the status changes.
    pub fn set(&mut self, type_: &str, status: &str, reason: &str, message: impl Into<String>) {
        let mut message = message.into();
        if message.is_empty() {
            // Some apiservers reject empty strings in server-side-applied status.
            message = reason.to_string();
        }
        let last_transition_time = self
            .previous
            .iter()
            .chain(self.status.conditions.iter())
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        let cond = Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            last_transition_time,
            observed_generation: self.generation,
        };
        match self.status.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => *c = cond,
            None => self.status.conditions.push(cond),
        }
    }

    pub fn ok(&mut self, type_: &str, reason: &str, message: impl Into<String>) {
        self.set(type_, "True", reason, message)
    }

    /// Marks `failed_step` False and every later step Unknown, then Ready False.
    pub fn fail(
        &mut self,
        failed_step: &str,
        reason: &str,
        message: impl Into<String>,
        phase: Phase,
    ) {
        let message = message.into();
        let mut after = false;
        for step in condition::STEPS {
            if step == failed_step {
                self.set(step, "False", reason, message.clone());
                after = true;
            } else if after {
                self.set(
                    step,
                    "Unknown",
                    "Waiting",
                    format!("waiting for {failed_step}"),
                );
            }
        }
        self.set(condition::READY, "False", reason, message);
        self.status.phase = phase;
    }

    /// Ready False for a reason that is not one step's (invalid spec, unreachable database).
    pub fn not_ready(&mut self, reason: &str, message: impl Into<String>, phase: Phase) {
        let message = message.into();
        // Keep the step conditions already known; say nothing new about them.
        for c in &self.previous {
            if c.type_ != condition::READY
                && !self.status.conditions.iter().any(|x| x.type_ == c.type_)
            {
                self.status.conditions.push(c.clone());
            }
        }
        self.set(condition::READY, "False", reason, message);
        self.status.phase = phase;
    }

    /// SpecAccepted False: the current spec is refused and everything else stays as the last
    /// accepted spec left it (phase, Ready, the steps), so a tenant that served keeps serving.
    pub fn refuse(&mut self, reason: &str, message: impl Into<String>) {
        self.keep_all_but(condition::SPEC_ACCEPTED, "False", reason, message);
    }

    /// Placed False: the tenant's server is not known now; everything else stays as it was.
    pub fn unplaced(&mut self, reason: &str, message: impl Into<String>) {
        self.keep_all_but(condition::PLACED, "False", reason, message);
    }

    /// Paused True: nothing is reconciled, so everything else stays as it was.
    pub fn pause(&mut self, message: impl Into<String>) {
        self.keep_all_but(condition::PAUSED, "True", "ReconcilePaused", message);
    }

    /// Sets `type_` to what the previous status said, if it said anything (a condition that a
    /// later stage may set anew, kept should the run stop before it).
    pub fn keep(&mut self, type_: &str) {
        if let Some(c) = self.previous.iter().find(|c| c.type_ == type_).cloned() {
            self.set(type_, &c.status, &c.reason, c.message);
        }
    }

    /// Keeps every previous condition but `type_`, which is set.
    fn keep_all_but(
        &mut self,
        type_: &str,
        status: &str,
        reason: &str,
        message: impl Into<String>,
    ) {
        for c in &self.previous {
            if c.type_ != type_ && !self.status.conditions.iter().any(|x| x.type_ == c.type_) {
                self.status.conditions.push(c.clone());
            }
        }
        self.set(type_, status, reason, message);
    }

    pub fn ready(&mut self, message: impl Into<String>) {
        self.set(condition::READY, "True", "Provisioned", message);
        self.status.phase = Phase::Ready;
        if self
            .previous
            .iter()
            .any(|c| c.type_ == condition::SUSPENDED)
        {
            // Once suspended, the condition stays (False) to say when service came back.
            self.set(
                condition::SUSPENDED,
                "False",
                "Resumed",
                "spec.suspended is false: the tenant is served again",
            );
        }
    }

    /// Suspended True and Ready False (reason `Suspended`), phase Suspended: `spec.suspended`
    /// holds. The step conditions say what the pipeline found.
    pub fn suspend(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.set(condition::SUSPENDED, "True", "Suspended", message.clone());
        self.set(condition::READY, "False", "Suspended", message);
        self.status.phase = Phase::Suspended;
    }

    pub fn build(mut self) -> TenantStatus {
        // Stable order: steps, then Ready.
        let rank = |t: &str| {
            condition::STEPS
                .iter()
                .position(|s| *s == t)
                .unwrap_or(condition::STEPS.len())
        };
        self.status.conditions.sort_by_key(|c| rank(&c.type_));
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let mut b = StatusBuilder::new(None, Some(1), "t1".into());
        b.ok(condition::ROLE_READY, "Created", "role x");
        let first = b.build();
        let mut b = StatusBuilder::new(Some(&first), Some(2), "t2".into());
        b.ok(condition::ROLE_READY, "Exists", "role x");
        let second = b.build();
        assert_eq!(second.conditions[0].last_transition_time, "t1");
        assert_eq!(second.conditions[0].observed_generation, Some(2));
        let mut b = StatusBuilder::new(Some(&second), Some(2), "t3".into());
        b.fail(
            condition::ROLE_READY,
            "DatabaseUnavailable",
            "down",
            Phase::Provisioning,
        );
        let third = b.build();
        assert_eq!(third.conditions[0].last_transition_time, "t3");
        assert_eq!(third.phase, Phase::Provisioning);
    }

    #[test]
    fn failure_marks_later_steps_unknown_and_orders_conditions() {
        let mut b = StatusBuilder::new(None, Some(1), "t".into());
        b.ok(condition::ROLE_READY, "Created", "r");
        b.ok(condition::SCHEMA_READY, "Created", "s");
        b.fail(
            condition::MIGRATIONS_APPLIED,
            "MigrationFailed",
            "boom",
            Phase::Failed,
        );
        let s = b.build();
        let got: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("RoleReady", "True"),
                ("SchemaReady", "True"),
                ("MigrationsApplied", "False"),
                ("CredentialsReady", "Unknown"),
                ("Ready", "False")
            ]
        );
        assert_eq!(s.phase, Phase::Failed);
    }

    #[test]
    fn a_refused_change_keeps_the_last_accepted_status() {
        let mut b = StatusBuilder::new(None, Some(1), "t1".into());
        b.ok(condition::ROLE_READY, "Created", "r");
        b.ready("serving");
        let served = b.build();
        let mut b = StatusBuilder::new(Some(&served), Some(2), "t2".into());
        b.refuse("ChangeRefused", "spec.schema cannot change");
        let s = b.build();
        assert_eq!(s.phase, Phase::Ready);
        assert_eq!(s.observed_generation, Some(2));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.observed_generation),
            ("True", Some(1))
        );
        let refused = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition::SPEC_ACCEPTED)
            .unwrap();
        assert_eq!(
            (refused.status.as_str(), refused.reason.as_str()),
            ("False", "ChangeRefused")
        );
        // Accepted again: the condition goes away with the next full status.
        let mut b = StatusBuilder::new(Some(&s), Some(3), "t3".into());
        b.ready("serving");
        assert!(b
            .build()
            .conditions
            .iter()
            .all(|c| c.type_ != condition::SPEC_ACCEPTED));
    }

    #[test]
    fn suspension_and_resumption_show_in_phase_ready_and_suspended() {
        let mut b = StatusBuilder::new(None, Some(1), "t1".into());
        b.ready("serving");
        let served = b.build();
        assert!(served
            .conditions
            .iter()
            .all(|c| c.type_ != condition::SUSPENDED));
        let mut b = StatusBuilder::new(Some(&served), Some(2), "t2".into());
        b.suspend("suspended");
        let s = b.build();
        assert_eq!(s.phase, Phase::Suspended);
        let get = |s: &TenantStatus, t: &str| {
            let c = s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
            (c.status, c.reason, c.last_transition_time)
        };
        assert_eq!(
            get(&s, condition::SUSPENDED),
            ("True".into(), "Suspended".into(), "t2".into())
        );
        assert_eq!(get(&s, condition::READY).1, "Suspended");
        let mut b = StatusBuilder::new(Some(&s), Some(3), "t3".into());
        b.ready("serving");
        let r = b.build();
        assert_eq!(r.phase, Phase::Ready);
        assert_eq!(
            get(&r, condition::SUSPENDED),
            ("False".into(), "Resumed".into(), "t3".into())
        );
    }

    #[test]
    fn empty_messages_are_replaced() {
        let mut b = StatusBuilder::new(None, None, "t".into());
        b.ok(condition::READY, "Provisioned", "");
        assert_eq!(b.build().conditions[0].message, "Provisioned");
    }
}
