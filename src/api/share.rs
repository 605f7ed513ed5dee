//! Fair share of the pool: each tenant may have at most a few data requests in flight (each
//! holding or waiting for a pool connection). A tenant flooding the API, or one whose
//! requests are slow because it locked its own tables, then delays only itself: beyond its
//! share, its requests wait [`SLOT_WAIT`] for a slot and are refused with 429
//! `too-many-requests`, while other tenants still find free connections.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Semaphore;

use super::error::ApiError;

/// How long a request waits for one of its tenant's slots before 429.
pub const SLOT_WAIT: Duration = Duration::from_millis(100);

/// The slots of every tenant with a request in flight or waiting. An entry exists only while
/// some [`Slot`] of that tenant does, so the map holds at most one entry per request in
/// flight, never one per tenant ever seen.
pub(super) struct TenantSlots {
    per_tenant: usize,
    wait: Duration,
    /// Each tenant's semaphore and the share it was made for.
    map: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

/// A request's claim on one of its tenant's slots, held for the length of its data access.
pub(super) struct Slot {
    slots: Arc<TenantSlots>,
    key: String,
    /// This slot's handle on the tenant's semaphore; the map's and the slots' handles are the
    /// only ones, so the map's is the last exactly when no request of the tenant is left.
    sem: Option<Arc<Semaphore>>,
    held: bool,
    /// Whether another request of the tenant held a slot when this one got it.
    crowded: bool,
}

impl Slot {
    /// Whether the tenant had another request in flight when this one got its slot: such a
    /// request takes a free connection of the least busy pool group (see
    /// [`super::pool::Pool::get`]), so that a busy tenant spreads over the pool instead of
    /// filling its home group. (Counted on the tenant's current share: right after a live
    /// change of `spec.api.maxConcurrency`, requests still in flight on the old share are not
    /// counted.)
    pub(super) fn crowded(&self) -> bool {
        self.crowded
    }
}

impl TenantSlots {
    pub(super) fn new(per_tenant: usize, wait: Duration) -> Self {
        Self {
            per_tenant: per_tenant.max(1),
            wait,
            map: Mutex::default(),
        }
    }

    /// One slot of tenant `key`, whose share is `own` (its `spec.api.maxConcurrency`) or else
    /// the default, waiting at most the configured time for it. A changed share takes effect
    /// at once for new requests; those already in flight finish on the old one.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        key: &str,
        own: Option<u32>,
    ) -> Result<Slot, ApiError> {
        let share = own.map_or(self.per_tenant, |n| (n as usize).max(1));
        let sem = {
            let mut map = self.map.lock().expect("slots lock");
            let entry = map
                .entry(key.to_string())
                .or_insert_with(|| (share, Arc::new(Semaphore::new(share))));
            if entry.0 != share {
                *entry = (share, Arc::new(Semaphore::new(share)));
            }
            entry.1.clone()
        };
        // Made before waiting, so that the entry is cleaned up however this ends (slot
        // dropped, wait timed out, or the request cancelled while waiting).
        let mut slot = Slot {
            slots: self.clone(),
            key: key.to_string(),
            sem: Some(sem),
            held: false,
            crowded: false,
        };
        let acquired = {
            let sem = slot.sem.as_ref().expect("semaphore");
            match tokio::time::timeout(self.wait, sem.acquire()).await {
                Ok(Ok(permit)) => {
                    // Given back by hand in `Drop`, so that no permit holds an `Arc` clone.
                    permit.forget();
                    slot.crowded = sem.available_permits() + 1 < share;
                    true
                }
                _ => false,
            }
        };
        slot.held = acquired;
        match acquired {
            true => Ok(slot),
            false => Err(ApiError::too_many_requests(
                format!("this tenant already has {share} requests in flight; retry shortly"),
                1,
            )),
        }
    }

    /// Tenants with a request in flight or waiting.
    #[cfg(test)]
    fn tenants(&self) -> usize {
        self.map.lock().expect("slots lock").len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(sem) = self.sem.take() {
            if self.held {
                sem.add_permits(1);
            }
            drop(sem);
        }
        let mut map = self.slots.map.lock().expect("slots lock");
        // Handles are cloned only under this lock: a count of 1 means no slot of this tenant
        // exists or waits, and none can appear before the lock is released.
        if map
            .get(&self.key)
            .is_some_and(|(_, s)| Arc::strong_count(s) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_gets_its_share_and_no_more_and_idle_tenants_leave_no_entry() {
        let slots = Arc::new(TenantSlots::new(2, Duration::from_millis(20)));
        let a1 = slots.acquire("acme", None).await.unwrap();
        let a2 = slots.acquire("acme", None).await.unwrap();
        let e = slots.acquire("acme", None).await.err().unwrap();
        assert_eq!((e.status.as_u16(), e.kind), (429, "too-many-requests"));
        assert_eq!(e.retry_after, Some(1));
        // Another tenant is not affected.
        let g = slots.acquire("globex", None).await.unwrap();
        assert_eq!(slots.tenants(), 2);
        drop(g);
        assert_eq!(slots.tenants(), 1);
        // A waiter gets the slot freed while it waits.
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("acme", None).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(a1);
        waiter.await.unwrap().unwrap();
        drop(a2);
        assert_eq!(slots.tenants(), 0);
    }

    #[tokio::test]
    async fn timed_out_and_cancelled_waiters_leave_no_entry() {
        let slots = Arc::new(TenantSlots::new(1, Duration::from_secs(5)));
        let held = slots.acquire("acme", None).await.unwrap();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("acme", None).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(slots.tenants(), 0);

        let slots = Arc::new(TenantSlots::new(1, Duration::from_millis(10)));
        let held = slots.acquire("acme", None).await.unwrap();
        assert!(slots.acquire("acme", None).await.is_err());
        assert_eq!(slots.tenants(), 1);
        drop(held);
        assert_eq!(slots.tenants(), 0);
        // Freed slots are reusable: the permits came back.
        let a = slots.acquire("acme", None).await.unwrap();
        drop(a);
        let _b = slots.acquire("acme", None).await.unwrap();
    }

    #[tokio::test]
    async fn a_tenants_own_share_overrides_the_default_and_changes_live() {
        let slots = Arc::new(TenantSlots::new(1, Duration::from_millis(10)));
        let a1 = slots.acquire("acme", Some(2)).await.unwrap();
        let a2 = slots.acquire("acme", Some(2)).await.unwrap();
        let e = slots.acquire("acme", Some(2)).await.err().unwrap();
        assert_eq!(e.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        // Lowered to 1 while two are in flight: new requests get the new share.
        let b1 = slots.acquire("acme", Some(1)).await.unwrap();
        assert!(slots.acquire("acme", Some(1)).await.is_err());
        drop((a1, a2, b1));
        assert_eq!(slots.tenants(), 0);
        let _g = slots.acquire("globex", None).await.unwrap();
        assert!(slots.acquire("globex", None).await.is_err());
    }
}
