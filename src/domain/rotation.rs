//! Credential rotation without downtime (pure): a tenant has at most two login identities, the
//! app role and `<schema>_b` ([`super::naming::login_b`]); a rotation moves the credentials
//! Secret to the other identity with a fresh password while the previous one keeps working for
//! a grace period, after which it is retired. This module decides, from the Tenant and what
//! PostgreSQL and the Secret say, which identity is current, whether to rotate or retire now,
//! and when to look again. Doing it is the controller's job.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::crd::{CredentialsStatus, Tenant};

/// Annotation that asks for one rotation whenever its value changes (an annotation rather
/// than a spec field, so that GitOps diffs stay quiet). The last value acted on is kept in
/// `status.credentials.rotateRequest`.
pub const ROTATE_ANNOTATION: &str = "tenantry.dev/rotate";

/// Secret annotation: when the Secret got its identity (RFC 3339). With
/// [`SECRET_REQUEST_ANNOTATION`], what lets a rotation whose status was never written (the
/// operator stopped in between) be recorded as it happened.
pub const SECRET_ROTATED_AT_ANNOTATION: &str = "tenantry.dev/rotated-at";
/// Secret annotation: the value of [`ROTATE_ANNOTATION`] the Secret's identity answered.
pub const SECRET_REQUEST_ANNOTATION: &str = "tenantry.dev/rotate-request";

/// Durations in the spec: hours, minutes and seconds, Go style (`720h`, `1h30m`, `90s`).
pub const DURATION_PATTERN: &str = "^([0-9]+[hms])+$";

/// Default `spec.credentials.gracePeriod`: long enough for the kubelet to refresh a mounted
/// Secret (its sync period plus cache TTL, about a minute each by default).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);
/// Bounds of the durations in the spec.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
pub const MAX_GRACE: Duration = Duration::from_secs(720 * 3600);
pub const MAX_PERIOD: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a duration of [`DURATION_PATTERN`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 720h, 1h30m or 90s");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' => digits.push(c),
            'h' | 'm' | 's' if !digits.is_empty() => {
                let n: u64 = digits.parse().map_err(|_| bad())?;
                let unit = match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                total = n
                    .checked_mul(unit)
                    .and_then(|v| total.checked_add(v))
                    .ok_or_else(bad)?;
                digits.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// When and how long: the rotation settings of a valid spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub period: Option<Duration>,
    pub grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            period: None,
            grace: DEFAULT_GRACE,
        }
    }
}

/// Validates `spec.credentials.rotationPeriod` and `gracePeriod`; the error is the message
/// of the Invalid condition.
pub fn policy(tenant: &Tenant) -> Result<Policy, String> {
    let c = &tenant.spec.credentials;
    let grace = match &c.grace_period {
        None => DEFAULT_GRACE,
        Some(g) => {
            let d = parse_duration(g).map_err(|e| format!("spec.credentials.gracePeriod: {e}"))?;
            if !(MIN_DURATION..=MAX_GRACE).contains(&d) {
                return Err(format!(
                    "spec.credentials.gracePeriod {g:?} must be from 1s to 720h"
                ));
            }
            d
        }
    };
    let period = match &c.rotation_period {
        None => None,
        Some(p) => {
            let d =
                parse_duration(p).map_err(|e| format!("spec.credentials.rotationPeriod: {e}"))?;
            if d > MAX_PERIOD {
                return Err(format!(
                    "spec.credentials.rotationPeriod {p:?} is longer than 100 years"
                ));
            }
            if d <= grace {
                return Err(format!(
                    "spec.credentials.rotationPeriod {p:?} must be longer than the grace period \
                     ({}s): a rotation waits until the previous identity is retired",
                    grace.as_secs()
                ));
            }
            Some(d)
        }
    };
    Ok(Policy { period, grace })
}

/// What triggered a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `rotationPeriod` elapsed since the last rotation.
    Period,
    /// The rotate annotation has a value not acted on yet.
    Request(String),
}

/// Evidence that a rotation happened that the status does not record: the Secret names the
/// other identity, that identity can log in, and its password checks out where it can be
/// checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unrecorded {
    /// The Secret's [`SECRET_ROTATED_AT_ANNOTATION`], if readable.
    pub rotated_at: Option<Timestamp>,
    /// The Secret's [`SECRET_REQUEST_ANNOTATION`].
    pub request: Option<String>,
}

/// What is known when deciding.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The two identities: the app role and its second identity.
    pub a: &'a str,
    pub b: &'a str,
    /// `status.credentials`.
    pub record: Option<&'a CredentialsStatus>,
    /// The rotate annotation's value.
    pub request: Option<&'a str>,
    pub policy: Policy,
    pub suspended: bool,
    /// Set when the Secret holds the identity that is not recorded as current and everything
    /// says a rotation to it happened (see [`Unrecorded`]). Only looked at while no previous
    /// identity is in its grace period.
    pub unrecorded: Option<Unrecorded>,
    pub now: Timestamp,
}

/// What to do about the login identities now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The identity the Secret must hold once this reconcile is done.
    pub current: String,
    /// Set when the Secret moves to `current` now: give it a fresh password and LOGIN, then
    /// write the Secret.
    pub rotate: Option<Trigger>,
    /// Set when the status did not record the rotation to `current` (see [`Unrecorded`]).
    pub recorded_now: bool,
    /// The previous identity and when it stops working, while it still logs in.
    pub previous: Option<(String, Timestamp)>,
    /// The previous identity whose grace period is over: NOLOGIN, password removed,
    /// sessions ended.
    pub retire: Option<String>,
    /// The status record to write once this is done.
    pub record: CredentialsStatus,
    /// When to look again for the next step (end of a grace period, next periodic rotation).
    pub next: Option<Timestamp>,
}

impl Decision {
    /// Counts a rotation done now from `at`, when the Secret was written: the previous
    /// identity works until `at` (rounded up to the second) plus `grace`.
    pub fn rotated_at(&mut self, at: Timestamp, grace: Duration) {
        let at = whole_second(at);
        self.record.rotated_at = at.to_string();
        if let Some((_, until)) = &mut self.previous {
            *until = plus(at, grace);
            self.record.previous_valid_until = Some(until.to_string());
            self.next = Some(*until);
        }
    }

    /// Whether `identity` may log in: the current one and the previous one during its grace
    /// period, unless the tenant is suspended.
    pub fn may_log_in(&self, identity: &str, suspended: bool) -> bool {
        !suspended
            && (identity == self.current
                || self.previous.as_ref().is_some_and(|(p, _)| p == identity))
    }
}

fn parse_time(s: Option<&str>) -> Option<Timestamp> {
    s?.parse().ok()
}

/// `t` plus `d`, saturating at the largest timestamp.
pub fn plus(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The moment of a rotation as recorded: `now` rounded up to the second, so a grace period
/// counted from it is never shorter than configured.
fn whole_second(now: Timestamp) -> Timestamp {
    let secs = now.as_second() + i64::from(now.subsec_nanosecond() > 0);
    Timestamp::from_second(secs).unwrap_or(now)
}

/// Decides what to do about the identities (see [`Decision`]).
pub fn decide(i: &Inputs) -> Decision {
    let other = |x: &str| {
        if x == i.b {
            i.a.to_string()
        } else {
            i.b.to_string()
        }
    };
    let now = i.now;
    // Without a record, credentials are being issued for the first time (or by an operator
    // version before rotation): identity A, from now on; a request already present is taken
    // as answered.
    let first = i.record.is_none();
    let record = i.record.cloned().unwrap_or_else(|| CredentialsStatus {
        identity: i.a.to_string(),
        rotated_at: whole_second(now).to_string(),
        rotate_request: i.request.map(str::to_string),
        ..CredentialsStatus::default()
    });
    let mut current = if record.identity == i.b {
        i.b.to_string()
    } else {
        i.a.to_string()
    };
    let mut rotated_at = parse_time(Some(&record.rotated_at)).unwrap_or(now);
    let mut handled = record.rotate_request.clone();
    let mut previous = record
        .previous_identity
        .as_deref()
        .filter(|p| *p == other(&current))
        .map(|p| {
            let until = parse_time(record.previous_valid_until.as_deref()).unwrap_or(now);
            (p.to_string(), until)
        });

    let mut recorded_now = false;
    if let (None, Some(u)) = (&previous, &i.unrecorded) {
        // The Secret already holds the other identity: the rotation happened, its status was
        // not written. Record it as it happened; the grace period counts from now, which is
        // surely after the Secret was written (clients may have seen it only just now).
        let at = u.rotated_at.filter(|t| *t <= now).unwrap_or(now);
        previous = Some((current.clone(), plus(whole_second(now), i.policy.grace)));
        current = other(&current);
        rotated_at = at;
        if u.request.is_some() {
            handled = u.request.clone();
        }
        recorded_now = true;
    }

    let mut retire = None;
    if previous.as_ref().is_some_and(|(_, until)| *until <= now) {
        retire = previous.take().map(|(p, _)| p);
    }

    let requested = i
        .request
        .filter(|r| !first && handled.as_deref() != Some(*r))
        .map(|r| Trigger::Request(r.to_string()));
    let period_due = i.policy.period.is_some_and(|p| plus(rotated_at, p) <= now);
    let mut rotate = None;
    if !i.suspended && previous.is_none() && !recorded_now {
        rotate = requested.or(period_due.then_some(Trigger::Period));
    }
    if rotate.is_some() {
        let at = whole_second(now);
        previous = Some((current.clone(), plus(at, i.policy.grace)));
        current = other(&current);
        rotated_at = at;
        handled = i.request.map(str::to_string).or(handled);
    }

    // Next look: the end of the grace period, then the next periodic rotation (or a request
    // waiting for the grace period to end).
    let next_rotation = i.policy.period.map(|p| plus(rotated_at, p));
    let next = match (&previous, next_rotation) {
        (Some((_, until)), _) => Some(*until),
        (None, n) => n,
    };
    Decision {
        record: CredentialsStatus {
            identity: current.clone(),
            rotated_at: rotated_at.to_string(),
            previous_identity: previous.as_ref().map(|(p, _)| p.clone()),
            previous_valid_until: previous.as_ref().map(|(_, t)| t.to_string()),
            rotate_request: handled,
        },
        current,
        rotate,
        recorded_now,
        previous,
        retire,
        next,
    }
}

/// When a Ready tenant needs a full reconcile for its credentials, from its status alone: now
/// when a rotation request is pending, else the end of the grace period or the next periodic
/// rotation. Used by the fast path, which must not sleep through these moments.
pub fn next_due(tenant: &Tenant, policy: &Policy, now: Timestamp) -> Option<Timestamp> {
    let record = tenant.status.as_ref()?.credentials.as_ref()?;
    if tenant
        .rotate_request()
        .is_some_and(|r| record.rotate_request.as_deref() != Some(r))
    {
        return Some(now);
    }
    if record.previous_identity.is_some() {
        return Some(parse_time(record.previous_valid_until.as_deref()).unwrap_or(now));
    }
    let at = parse_time(Some(&record.rotated_at)).unwrap_or(now);
    policy.period.map(|p| plus(at, p))
}

/// How long from `now` until `t` (zero when past).
pub fn until(t: Timestamp, now: Timestamp) -> Duration {
    let d = t.duration_since(now);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn inputs<'a>(record: Option<&'a CredentialsStatus>, now: Timestamp) -> Inputs<'a> {
        Inputs {
            a: "acme",
            b: "acme_b",
            record,
            request: None,
            policy: Policy {
                period: Some(Duration::from_secs(100)),
                grace: Duration::from_secs(10),
            },
            suspended: false,
            unrecorded: None,
            now,
        }
    }

    fn rec(identity: &str, at: i64) -> CredentialsStatus {
        CredentialsStatus {
            identity: identity.into(),
            rotated_at: t(at).to_string(),
            ..CredentialsStatus::default()
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("720h"), Ok(Duration::from_secs(720 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        for bad in [
            "",
            "h",
            "5",
            "1d",
            "1.5h",
            "-1s",
            "1h 2m",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies_are_validated() {
        let tenant = |p: Option<&str>, g: Option<&str>| Tenant::test("a").with_rotation(p, g);
        assert_eq!(policy(&tenant(None, None)), Ok(Policy::default()));
        assert_eq!(
            policy(&tenant(Some("720h"), Some("3s"))),
            Ok(Policy {
                period: Some(Duration::from_secs(720 * 3600)),
                grace: Duration::from_secs(3)
            })
        );
        let e = policy(&tenant(Some("2m"), None)).unwrap_err();
        assert!(e.contains("longer than the grace period"), "{e}");
        let e = policy(&tenant(None, Some("0s"))).unwrap_err();
        assert!(e.contains("gracePeriod"), "{e}");
        let e = policy(&tenant(Some("1d"), None)).unwrap_err();
        assert!(e.contains("rotationPeriod"), "{e}");
        assert!(policy(&tenant(None, Some("721h"))).is_err());
    }

    #[test]
    fn first_issue_records_identity_a_and_takes_a_present_request_as_answered() {
        let mut i = inputs(None, t(0));
        i.request = Some("x");
        let d = decide(&i);
        assert_eq!(d.current, "acme");
        assert_eq!(d.rotate, None);
        assert_eq!(d.record.rotate_request.as_deref(), Some("x"));
        assert_eq!(d.next, Some(t(100)));
    }

    #[test]
    fn a_new_request_rotates_to_the_other_identity_with_a_grace_period() {
        let r = rec("acme", 0);
        let mut i = inputs(Some(&r), t(5));
        i.request = Some("1");
        let d = decide(&i);
        assert_eq!(d.rotate, Some(Trigger::Request("1".into())));
        assert_eq!(d.current, "acme_b");
        assert_eq!(d.previous, Some(("acme".into(), t(15))));
        assert_eq!(d.record.previous_valid_until, Some(t(15).to_string()));
        assert_eq!(d.record.rotate_request.as_deref(), Some("1"));
        assert_eq!(d.next, Some(t(15)));
        // Counted from when the Secret was written.
        let mut later = d.clone();
        later.rotated_at(
            Timestamp::from_second(1_800_000_007).unwrap(),
            Duration::from_secs(10),
        );
        assert_eq!(later.previous, Some(("acme".into(), t(17))));
        assert_eq!(later.record.previous_valid_until, Some(t(17).to_string()));
        assert_eq!(later.next, Some(t(17)));
        assert!(d.may_log_in("acme", false) && d.may_log_in("acme_b", false));
        assert!(!d.may_log_in("acme", true) && !d.may_log_in("acme_b", true));
        // The same request again does nothing.
        let mut i2 = inputs(Some(&d.record), t(6));
        i2.request = Some("1");
        let d2 = decide(&i2);
        assert_eq!((d2.rotate, d2.retire), (None, None));
        assert_eq!(d2.record, d.record);
    }

    #[test]
    fn the_previous_identity_is_retired_after_its_grace_and_requests_wait_for_it() {
        let mut r = rec("acme_b", 0);
        r.previous_identity = Some("acme".into());
        r.previous_valid_until = Some(t(10).to_string());
        r.rotate_request = Some("1".into());
        let mut i = inputs(Some(&r), t(9));
        i.request = Some("2");
        let d = decide(&i);
        assert_eq!((d.rotate.clone(), d.retire.clone()), (None, None));
        assert_eq!(d.current, "acme_b");
        assert_eq!(d.next, Some(t(10)), "wakes up when the grace ends");
        // At the end of the grace: retired, and the waiting request goes back to A.
        i.now = t(10);
        let d = decide(&i);
        assert_eq!(d.retire.as_deref(), Some("acme"));
        assert_eq!(d.rotate, Some(Trigger::Request("2".into())));
        assert_eq!(d.current, "acme");
        assert_eq!(d.previous, Some(("acme_b".into(), t(20))));
        // Without a request: retired only.
        i.request = Some("1");
        let d = decide(&i);
        assert_eq!((d.retire.as_deref(), d.rotate), (Some("acme"), None));
        assert_eq!(d.record.previous_identity, None);
        assert_eq!(d.next, Some(t(100)));
    }

    #[test]
    fn the_period_rotates_and_suspension_defers_rotation_not_retirement() {
        let r = rec("acme", 0);
        let d = decide(&inputs(Some(&r), t(100)));
        assert_eq!(d.rotate, Some(Trigger::Period));
        assert_eq!(d.next, Some(t(110)));
        let mut i = inputs(Some(&r), t(100));
        i.suspended = true;
        let d = decide(&i);
        assert_eq!((d.rotate, d.current.as_str()), (None, "acme"));
        let mut r = rec("acme_b", 0);
        r.previous_identity = Some("acme".into());
        r.previous_valid_until = Some(t(10).to_string());
        let mut i = inputs(Some(&r), t(11));
        i.suspended = true;
        assert_eq!(decide(&i).retire.as_deref(), Some("acme"));
    }

    #[test]
    fn an_unrecorded_rotation_is_recorded_not_repeated() {
        let r = rec("acme", 0);
        let mut i = inputs(Some(&r), t(5));
        i.request = Some("1");
        i.unrecorded = Some(Unrecorded {
            rotated_at: Some(t(4)),
            request: Some("1".into()),
        });
        let d = decide(&i);
        assert!(d.recorded_now);
        assert_eq!(d.rotate, None, "the rotation is not done twice");
        assert_eq!(d.current, "acme_b");
        assert_eq!(d.previous, Some(("acme".into(), t(15))));
        assert_eq!(d.record.rotated_at, t(4).to_string());
        assert_eq!(d.record.rotate_request.as_deref(), Some("1"));
        // Evidence is ignored while a previous identity is in its grace period.
        let mut r = rec("acme_b", 0);
        r.previous_identity = Some("acme".into());
        r.previous_valid_until = Some(t(10).to_string());
        let mut i = inputs(Some(&r), t(5));
        i.unrecorded = Some(Unrecorded::default());
        let d = decide(&i);
        assert_eq!((d.current.as_str(), d.recorded_now), ("acme_b", false));
    }

    #[test]
    fn the_fast_path_is_told_when_to_look() {
        let policy = Policy {
            period: Some(Duration::from_secs(100)),
            grace: Duration::from_secs(10),
        };
        let mut tenant = Tenant::test("acme");
        assert_eq!(
            next_due(&tenant, &policy, t(1)),
            None,
            "nothing recorded yet"
        );
        let mut r = rec("acme", 0);
        tenant.status = Some(crate::domain::crd::TenantStatus {
            credentials: Some(r.clone()),
            ..Default::default()
        });
        assert_eq!(next_due(&tenant, &policy, t(1)), Some(t(100)));
        r.previous_identity = Some("acme_b".into());
        r.previous_valid_until = Some(t(10).to_string());
        tenant.status.as_mut().unwrap().credentials = Some(r);
        assert_eq!(next_due(&tenant, &policy, t(1)), Some(t(10)));
        tenant
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ROTATE_ANNOTATION.into(), "new".into());
        assert_eq!(
            next_due(&tenant, &policy, t(1)),
            Some(t(1)),
            "a request is due now"
        );
    }

    #[test]
    fn a_record_naming_a_stranger_falls_back_to_the_app_role() {
        let r = rec("someone_else", 0);
        let d = decide(&inputs(Some(&r), t(1)));
        assert_eq!(d.current, "acme");
        let mut r = rec("acme", 0);
        // A previous identity equal to the current one is not a previous identity.
        r.previous_identity = Some("acme".into());
        r.previous_valid_until = Some(t(10).to_string());
        let d = decide(&inputs(Some(&r), t(1)));
        assert_eq!((d.previous, d.retire), (None, None));
    }
}
