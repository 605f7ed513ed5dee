//! Leader election through a `coordination.k8s.io/v1` Lease, so that several operator replicas
//! are safe: only the holder reconciles; a standby takes over once the holder stops renewing
//! for a lease duration. Updates use the Lease's resourceVersion, so two candidates can never
//! both believe they won.

use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (the pod name in a cluster).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

enum Attempt {
    Acquired,
    HeldBy(String),
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let taking_over =
            previous.and_then(|p| p.holder_identity.as_deref()) != Some(self.cfg.identity.as_str());
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs() as i32),
            acquire_time: if taking_over {
                Some(MicroTime(now))
            } else {
                previous.and_then(|p| p.acquire_time.clone())
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0)
                    + i32::from(taking_over && previous.is_some()),
            ),
            ..LeaseSpec::default()
        }
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Acquired),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldBy("another candidate".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(secs)) => {
                now.as_millisecond() > renewed.as_millisecond() + i64::from(secs) * 1000
            }
            _ => true,
        };
        if holder != self.cfg.identity && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldBy(holder));
        }
        let mut updated = lease.clone();
        updated.spec = Some(self.spec(Some(&spec), now));
        // replace() carries the resourceVersion: a concurrent winner makes this fail with 409.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => Ok(Attempt::Acquired),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldBy(holder)),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the lease; returns when the winning attempt began
    /// (the Lease's renewTime is no earlier: [`LeaderElector::keep`] counts from it). Each
    /// attempt is bounded by the renew deadline, so a hung request cannot stall the standby and
    /// a winning attempt leaves the new leader time to renew.
    pub async fn acquire(&self) -> Instant {
        let mut last_holder = String::new();
        loop {
            let started = Instant::now();
            match tokio::time::timeout(self.renew_deadline(), self.try_acquire()).await {
                Ok(Ok(Attempt::Acquired)) => {
                    info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became leader");
                    return started;
                }
                Ok(Ok(Attempt::HeldBy(h))) => {
                    if h != last_holder {
                        info!(lease = %self.cfg.name, holder = %h, "standing by; another replica leads");
                        last_holder = h;
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "leader election failed; retrying"),
                Err(_) => warn!("leader election: the apiserver did not answer; retrying"),
            }
            // At most a second: a standby leads within a second of the lease's expiry.
            tokio::time::sleep(self.cfg.renew_every.min(Duration::from_secs(1))).await;
        }
    }

    /// How long the leader keeps leading without a successful renewal, counted from when the
    /// last successful renewal began: the lease duration less one renew interval. A standby
    /// acquires only after the whole lease duration from the Lease's renewTime (which is no
    /// earlier), so the leader has stopped for at least one renew interval by then (as long as
    /// the two clocks agree within that).
    pub fn renew_deadline(&self) -> Duration {
        self.cfg
            .lease_duration
            .saturating_sub(self.cfg.renew_every)
            .max(self.cfg.renew_every)
    }

    /// Renews the lease every renew interval (a failed renewal is retried sooner) until this
    /// candidate can no longer be sure to hold it: another candidate holds it, or no renewal
    /// succeeded within [`LeaderElector::renew_deadline`] of `renewed` (when the last
    /// successful attempt began; a request that hangs counts as failed at the deadline).
    /// Returns then: the caller must stop writing at once.
    pub async fn keep(&self, mut renewed: Instant) {
        let deadline = self.renew_deadline();
        // After a failure, the next attempt comes sooner than the renew interval.
        let mut retry: Option<Duration> = None;
        loop {
            let give_up = renewed + deadline;
            // The next attempt: one renew interval after the last success began (or sooner
            // after a failure), and in any case half a renew interval before the deadline,
            // so that the request has time to answer.
            let next = match retry {
                Some(w) => Instant::now() + w,
                None => renewed + self.cfg.renew_every,
            };
            let latest = give_up
                .checked_sub(self.cfg.renew_every / 2)
                .unwrap_or(give_up);
            tokio::time::sleep_until(next.min(latest)).await;
            let started = Instant::now();
            if started >= give_up {
                warn!(deadline = ?deadline, "no lease renewal succeeded within the renew deadline; stepping down");
                return;
            }
            match tokio::time::timeout_at(give_up, self.try_acquire()).await {
                Ok(Ok(Attempt::Acquired)) => {
                    renewed = started;
                    retry = None;
                }
                Ok(Ok(Attempt::HeldBy(h))) => {
                    warn!(holder = %h, "lost the lease");
                    return;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "lease renewal failed; retrying");
                    retry = Some((self.cfg.renew_every / 4).max(Duration::from_millis(100)));
                }
                Err(_) => {
                    warn!(deadline = ?deadline, "lease renewal did not answer within the renew deadline; stepping down");
                    return;
                }
            }
        }
    }

    /// Gives the lease up if this candidate holds it (holder cleared), so that a standby
    /// takes over at its next attempt rather than after the lease duration. Best effort,
    /// bounded by one renew interval; call it only once nothing more will be written.
    pub async fn release(&self) {
        let attempt = async {
            let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
                return Ok(false);
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            // The resourceVersion rides along: a lease someone else took meanwhile stays theirs.
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await?;
            Ok::<_, kube::Error>(true)
        };
        let bound = self.cfg.renew_every.max(Duration::from_secs(1));
        match tokio::time::timeout(bound, attempt).await {
            Ok(Ok(true)) => info!(lease = %self.cfg.name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "could not release the lease; a standby takes over once it expires")
            }
            Err(_) => warn!("releasing the lease timed out; a standby takes over once it expires"),
        }
    }
}
