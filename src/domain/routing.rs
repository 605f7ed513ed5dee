//! The routing rule, in one place for both of its users: the operator's `Routable` condition
//! and the API registry. A Tenant claims its name (the tenant id in tokens and `X-Tenant`) and
//! its hosts; a claim held by two live Tenants routes to neither. A Tenant being deleted yields
//! to any live claimant, and is found only when nobody else claims the name or host (so the
//! API can answer "not ready" for it rather than "unknown"). With a base domain, the host
//! `<name>.<base domain>` belongs to the Tenant called `<name>`: another Tenant listing it in
//! `spec.hosts` does not get it, and is told so.

use std::collections::HashMap;

use super::crd::Tenant;

/// A Tenant's identity: (namespace, name).
pub type Key = (String, String);

/// What a Tenant claims on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    /// Lowercased host names.
    pub hosts: Vec<String>,
    /// Being deleted: yields to every live claimant.
    pub deleting: bool,
}

impl Claims {
    pub fn of(t: &Tenant) -> Self {
        Self {
            name: t.metadata.name.clone().unwrap_or_default(),
            hosts: t
                .spec
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            deleting: t.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// Who a name or host routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Nobody,
    One(&'a Key),
    /// Several live Tenants claim it; sorted.
    Ambiguous(Vec<&'a Key>),
}

/// Claims of many Tenants, indexed by name and by host. Updated one Tenant at a time, so that
/// a lookup or a clash check costs the same whatever the fleet size.
#[derive(Debug, Default, Clone)]
pub struct RoutingIndex {
    /// Lowercase, without leading or trailing dots.
    base_domain: Option<String>,
    claims: HashMap<Key, Claims>,
    by_name: HashMap<String, Vec<Key>>,
    by_host: HashMap<String, Vec<Key>>,
}

impl RoutingIndex {
    /// An index in which `<name>.<base_domain>` routes to the Tenant called `<name>`.
    pub fn with_base_domain(base_domain: Option<&str>) -> Self {
        Self {
            base_domain: base_domain
                .map(|d| d.trim_matches('.').to_ascii_lowercase())
                .filter(|d| !d.is_empty()),
            ..Self::default()
        }
    }

    /// An index with the same base domain and no claims (to build a relist aside).
    pub fn empty_like(&self) -> Self {
        Self {
            base_domain: self.base_domain.clone(),
            ..Self::default()
        }
    }

    /// The tenant name a host stands for under the base domain: `acme` for `acme.<base>`.
    pub fn name_under_base<'h>(&self, host: &'h str) -> Option<&'h str> {
        let base = self.base_domain.as_deref()?;
        host.strip_suffix(base)?
            .strip_suffix('.')
            .filter(|label| !label.is_empty() && !label.contains('.'))
    }

    /// Records (or replaces) the claims of `key`.
    pub fn set(&mut self, key: Key, claims: Claims) {
        if self.claims.get(&key) == Some(&claims) {
            return;
        }
        self.remove(&key);
        self.by_name
            .entry(claims.name.clone())
            .or_default()
            .push(key.clone());
        for h in &claims.hosts {
            self.by_host.entry(h.clone()).or_default().push(key.clone());
        }
        self.claims.insert(key, claims);
    }

    /// Forgets the claims of `key`.
    pub fn remove(&mut self, key: &Key) {
        if let Some(old) = self.claims.remove(key) {
            unlink(&mut self.by_name, &old.name, key);
            for h in &old.hosts {
                unlink(&mut self.by_host, h, key);
            }
        }
    }

    /// The claims recorded for `key`.
    pub fn claims(&self, key: &Key) -> Option<&Claims> {
        self.claims.get(key)
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.claims.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.claims.keys()
    }

    pub fn by_name(&self, name: &str) -> Route<'_> {
        self.route(self.by_name.get(name))
    }

    /// Who `host` (lowercase, as every claim is) routes to: under the base domain, the Tenant
    /// of that name first; otherwise, or when no Tenant has that name, the Tenants listing the
    /// host in `spec.hosts`.
    pub fn by_host(&self, host: &str) -> Route<'_> {
        if let Some(name) = self.name_under_base(host) {
            match self.by_name(name) {
                Route::Nobody => {}
                named => return named,
            }
        }
        self.route(self.by_host.get(host))
    }

    fn route<'a>(&'a self, keys: Option<&'a Vec<Key>>) -> Route<'a> {
        let Some(keys) = keys else {
            return Route::Nobody;
        };
        let mut live: Vec<&Key> = keys.iter().filter(|k| !self.deleting(k)).collect();
        match live.len() {
            0 => keys.first().map_or(Route::Nobody, Route::One),
            1 => Route::One(live[0]),
            _ => {
                live.sort();
                Route::Ambiguous(live)
            }
        }
    }

    fn deleting(&self, key: &Key) -> bool {
        self.claims.get(key).is_some_and(|c| c.deleting)
    }

    /// Why the API would not route to a Tenant with `claims` at `me`: one sorted message per
    /// other live Tenant sharing its name or one of its hosts. Empty when it is routable.
    pub fn clashes(&self, me: &Key, claims: &Claims) -> Vec<String> {
        if claims.deleting {
            return Vec::new();
        }
        let others = |keys: Option<&Vec<Key>>| -> Vec<Key> {
            keys.into_iter()
                .flatten()
                .filter(|k| *k != me && !self.deleting(k))
                .cloned()
                .collect()
        };
        let mut out = Vec::new();
        for (ns, name) in others(self.by_name.get(&claims.name)) {
            out.push(format!("Tenant {ns}/{name} has the same name"));
        }
        for h in &claims.hosts {
            for (ns, name) in others(self.by_host.get(h)) {
                out.push(format!("Tenant {ns}/{name} also claims host {h}"));
            }
            if let Some(label) = self.name_under_base(h) {
                for (ns, name) in others(self.by_name.get(label)) {
                    out.push(format!(
                        "Tenant {ns}/{name} is routed at host {h} by its name under the base domain"
                    ));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Tenants whose routing depends on `claims`: those sharing its name or a host.
    pub fn neighbours(&self, me: &Key, claims: &Claims) -> Vec<Key> {
        let own_base_host = self
            .base_domain
            .as_ref()
            .map(|b| format!("{}.{b}", claims.name));
        let under_base = claims
            .hosts
            .iter()
            .filter_map(|h| self.name_under_base(h))
            .map(|n| self.by_name.get(n));
        let mut out: Vec<Key> = std::iter::once(self.by_name.get(&claims.name))
            .chain(claims.hosts.iter().map(|h| self.by_host.get(h)))
            .chain(own_base_host.iter().map(|h| self.by_host.get(h)))
            .chain(under_base)
            .flatten()
            .flatten()
            .filter(|k| *k != me)
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn unlink(map: &mut HashMap<String, Vec<Key>>, k: &str, key: &Key) {
    if let Some(v) = map.get_mut(k) {
        v.retain(|x| x != key);
        if v.is_empty() {
            map.remove(k);
        }
    }
}

/// [`RoutingIndex::clashes`] of `me` among `others`, for callers without a standing index.
pub fn clashes_among<'a>(me: &Tenant, others: impl IntoIterator<Item = &'a Tenant>) -> Vec<String> {
    let mut idx = RoutingIndex::default();
    for o in others {
        idx.set(key(o), Claims::of(o));
    }
    let me_key = key(me);
    idx.set(me_key.clone(), Claims::of(me));
    idx.clashes(&me_key, &Claims::of(me))
}

/// The key of a Tenant.
pub fn key(t: &Tenant) -> Key {
    (
        t.metadata.namespace.clone().unwrap_or_default(),
        t.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(ns: &str, n: &str) -> Key {
        (ns.into(), n.into())
    }

    fn c(name: &str, hosts: &[&str], deleting: bool) -> Claims {
        Claims {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            deleting,
        }
    }

    #[test]
    fn names_and_hosts_claimed_twice_route_to_nobody() {
        let mut idx = RoutingIndex::default();
        idx.set(k("a", "acme"), c("acme", &["x.io"], false));
        assert_eq!(idx.by_name("acme"), Route::One(&k("a", "acme")));
        idx.set(k("b", "acme"), c("acme", &[], false));
        idx.set(k("c", "other"), c("other", &["x.io"], false));
        assert!(matches!(idx.by_name("acme"), Route::Ambiguous(v) if v.len() == 2));
        assert!(matches!(idx.by_host("x.io"), Route::Ambiguous(_)));
        assert_eq!(
            idx.clashes(&k("a", "acme"), &c("acme", &["x.io"], false)),
            [
                "Tenant b/acme has the same name",
                "Tenant c/other also claims host x.io"
            ]
        );
        idx.remove(&k("b", "acme"));
        assert_eq!(idx.by_name("acme"), Route::One(&k("a", "acme")));
    }

    #[test]
    fn a_tenant_being_deleted_yields_but_is_still_found_alone() {
        let mut idx = RoutingIndex::default();
        idx.set(k("a", "acme"), c("acme", &["x.io"], true));
        assert_eq!(idx.by_name("acme"), Route::One(&k("a", "acme")));
        idx.set(k("b", "acme"), c("acme", &["x.io"], false));
        assert_eq!(idx.by_name("acme"), Route::One(&k("b", "acme")));
        assert_eq!(idx.by_host("x.io"), Route::One(&k("b", "acme")));
        assert!(idx
            .clashes(&k("b", "acme"), &c("acme", &["x.io"], false))
            .is_empty());
        assert_eq!(
            idx.neighbours(&k("b", "acme"), &c("acme", &[], false)),
            [k("a", "acme")]
        );
    }

    #[test]
    fn the_base_domain_host_belongs_to_the_tenant_of_that_name() {
        let mut idx = RoutingIndex::with_base_domain(Some(".tenants.test."));
        idx.set(k("a", "acme"), c("acme", &["globex.tenants.test"], false));
        // No Tenant is called globex yet: the explicit claim routes.
        assert_eq!(
            idx.by_host("globex.tenants.test"),
            Route::One(&k("a", "acme"))
        );
        idx.set(k("b", "globex"), c("globex", &[], false));
        assert_eq!(
            idx.by_host("globex.tenants.test"),
            Route::One(&k("b", "globex"))
        );
        assert_eq!(
            idx.by_host("acme.tenants.test"),
            Route::One(&k("a", "acme"))
        );
        assert_eq!(
            idx.clashes(&k("a", "acme"), &c("acme", &["globex.tenants.test"], false)),
            ["Tenant b/globex is routed at host globex.tenants.test by its name under the base domain"]
        );
        assert!(idx
            .clashes(&k("b", "globex"), &c("globex", &[], false))
            .is_empty());
        assert_eq!(
            idx.neighbours(&k("b", "globex"), &c("globex", &[], false)),
            [k("a", "acme")]
        );
        assert_eq!(idx.name_under_base("x.y.tenants.test"), None);
        assert_eq!(idx.name_under_base("tenants.test"), None);
    }

    #[test]
    fn updates_replace_old_claims() {
        let mut idx = RoutingIndex::default();
        idx.set(k("a", "acme"), c("acme", &["old.io"], false));
        idx.set(k("a", "acme"), c("acme", &["new.io"], false));
        assert_eq!(idx.by_host("old.io"), Route::Nobody);
        assert_eq!(idx.by_host("new.io"), Route::One(&k("a", "acme")));
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn clashes_on_name_or_host() {
        let me = Tenant::test("acme")
            .in_namespace("team-a")
            .with_hosts(&["a.io"]);
        let same = Tenant::test("acme").in_namespace("team-a");
        let other_ns = Tenant::test("acme").in_namespace("team-b");
        let host = Tenant::test("x")
            .in_namespace("team-c")
            .with_hosts(&["A.io"]);
        let fine = Tenant::test("y")
            .in_namespace("team-c")
            .with_hosts(&["b.io"]);
        let c = clashes_among(&me, [&same, &other_ns, &host, &fine]);
        assert_eq!(
            c,
            [
                "Tenant team-b/acme has the same name",
                "Tenant team-c/x also claims host a.io"
            ]
        );
    }
}
