//! JWT authentication. Each tenant's tokens are HS256-signed with the `jwt-key` of its
//! credentials Secret; one optional platform issuer signs with RS256, ES256 or HS256. Each key
//! accepts exactly one algorithm (no `none`, no HS/RS confusion); `exp` is required, `nbf` and
//! (when configured) `iss`/`aud` are checked with a small leeway.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use axum::http::{header, HeaderMap};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hashlink::LruCache;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::error::ApiError;
use crate::registry::Entry;

/// The claim carrying the tenant's id (its metadata.name).
pub const TENANT_CLAIM: &str = "tenant";

/// The platform issuer's verification key.
#[derive(Clone)]
pub struct PlatformKey {
    pub key: DecodingKey,
    pub alg: Algorithm,
}

/// Why a platform key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading platform key {}: {error}", path.display())]
    Read {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("an HS256 platform key must be at least 32 bytes")]
    ShortSecret,
    #[error("unsupported platform key algorithm {0:?}; use RS256, ES256 or HS256")]
    UnsupportedAlgorithm(String),
}

impl PlatformKey {
    /// Reads a key file: a PEM public key for RS256/ES256, the raw secret bytes for HS256.
    pub fn from_file(path: &std::path::Path, alg: &str) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|error| KeyError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let (key, alg) = match alg {
            "RS256" => (DecodingKey::from_rsa_pem(&bytes)?, Algorithm::RS256),
            "ES256" => (DecodingKey::from_ec_pem(&bytes)?, Algorithm::ES256),
            "HS256" => {
                if bytes.len() < 32 {
                    return Err(KeyError::ShortSecret);
                }
                (DecodingKey::from_secret(&bytes), Algorithm::HS256)
            }
            other => return Err(KeyError::UnsupportedAlgorithm(other.to_string())),
        };
        Ok(Self { key, alg })
    }
}

#[derive(Clone, Default)]
pub struct AuthConfig {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    pub platform: Option<PlatformKey>,
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The tenant claim of a token, read without verification: only used to pick the key that
/// will verify it.
pub fn peek_tenant(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get(TENANT_CLAIM)?.as_str().map(str::to_string)
}

/// What a token must carry for `alg` under `cfg`. A configured issuer or audience is also a
/// required claim: jsonwebtoken only compares `iss`/`aud` when they are present and of a type
/// it reads (a string or a list), so a token that left them out, or sent `"aud": 123`,
/// would pass unchecked.
fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = cfg.leeway_secs;
    v.validate_nbf = true;
    let mut required = HashSet::from(["exp".to_string()]);
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.insert("aud".to_string());
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.insert("iss".to_string());
    }
    v.required_spec_claims = required;
    v
}

/// Refuses claims of a type RFC 7519 does not allow even when they are not checked against a
/// configured value: the claims must be an object, `iss` a string, `aud` a string or a list
/// of strings. Whatever reads them later then reads what was verified.
fn check_claim_types(claims: &Value) -> Result<(), ApiError> {
    let obj = claims
        .as_object()
        .ok_or_else(|| invalid("the token's claims are not a JSON object"))?;
    match obj.get("iss") {
        None | Some(Value::String(_)) => {}
        Some(_) => return Err(invalid("malformed claim iss: must be a string")),
    }
    match obj.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(invalid(
                "malformed claim aud: must be a string or a list of strings",
            ))
        }
    }
    Ok(())
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::unauthorized(detail, "invalid_token")
}

/// Verifies `token` with the tenant's key or the platform key, and returns its claims.
pub fn verify(token: &str, tenant_key: Option<&[u8]>, cfg: &AuthConfig) -> Result<Value, ApiError> {
    let header = decode_header(token).map_err(|e| invalid(format!("malformed token: {e}")))?;
    let mut candidates: Vec<(DecodingKey, Algorithm)> = Vec::new();
    if header.alg == Algorithm::HS256 {
        if let Some(k) = tenant_key {
            candidates.push((DecodingKey::from_secret(k), Algorithm::HS256));
        }
    }
    if let Some(p) = &cfg.platform {
        if p.alg == header.alg {
            candidates.push((p.key.clone(), p.alg));
        }
    }
    if candidates.is_empty() {
        return Err(invalid(format!(
            "tokens signed with {:?} are not accepted",
            header.alg
        )));
    }
    let mut last = None;
    for (key, alg) in candidates {
        match decode::<Value>(token, &key, &validation(alg, cfg)) {
            Ok(data) => {
                check_claim_types(&data.claims)?;
                return Ok(data.claims);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one candidate");
    use jsonwebtoken::errors::ErrorKind as K;
    Err(invalid(match e.kind() {
        K::ExpiredSignature => "token expired".to_string(),
        K::ImmatureSignature => "token not valid yet".to_string(),
        K::InvalidSignature => "invalid signature".to_string(),
        K::InvalidAudience => "wrong audience".to_string(),
        K::InvalidIssuer => "wrong issuer".to_string(),
        K::MissingRequiredClaim(c) => format!("missing or malformed claim {c}"),
        K::InvalidClaimFormat(c) => format!("malformed claim {c}"),
        other => format!("invalid token: {other:?}"),
    }))
}

/// Verified tokens kept by [`TokenCache`].
pub const TOKEN_CACHE_ENTRIES: usize = 10_000;

/// Longer tokens are verified every time, never cached: the cache's memory stays bounded by
/// entries × (this + the claims parsed from it).
pub const MAX_CACHED_TOKEN_BYTES: usize = 2048;

/// Tokens that verified, so that a client sending the same token again is not verified again
/// (an HMAC, or an RSA/ECDSA verification for platform tokens, plus JSON parsing). An entry
/// answers only for the tenant key it was verified with — a rotated or different key misses
/// and verifies afresh — and only while `now < exp`: stricter than verification itself,
/// which grants `exp` the leeway, and `nbf`, once passed, stays passed. Nothing else that
/// [`verify`] depends on can change while the process runs (the issuer, audience, leeway and
/// platform key are fixed at start). Failures are not cached. Least recently used entries
/// are evicted beyond the capacity.
pub struct TokenCache {
    entries: Mutex<LruCache<String, Verified>>,
}

struct Verified {
    tenant_key: Option<Arc<[u8]>>,
    exp: u64,
    claims: Value,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new(TOKEN_CACHE_ENTRIES)
    }
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    /// [`verify`], answered from the cache when `token` verified before with `tenant_key`
    /// and has not expired at `now` (seconds since the epoch).
    pub fn verify(
        &self,
        token: &str,
        tenant_key: Option<&Arc<[u8]>>,
        cfg: &AuthConfig,
        now: u64,
    ) -> Result<Value, ApiError> {
        if let Some(claims) = self.lookup(token, tenant_key, now) {
            return Ok(claims);
        }
        let claims = verify(token, tenant_key.map(|k| &k[..]), cfg)?;
        let exp = claims.get("exp").and_then(Value::as_u64);
        if let Some(exp) = exp.filter(|e| *e > now) {
            if token.len() <= MAX_CACHED_TOKEN_BYTES {
                self.entries.lock().expect("token cache lock").insert(
                    token.to_string(),
                    Verified {
                        tenant_key: tenant_key.cloned(),
                        exp,
                        claims: claims.clone(),
                    },
                );
            }
        }
        Ok(claims)
    }

    fn lookup(&self, token: &str, tenant_key: Option<&Arc<[u8]>>, now: u64) -> Option<Value> {
        if token.len() > MAX_CACHED_TOKEN_BYTES {
            return None;
        }
        let mut entries = self.entries.lock().expect("token cache lock");
        let v = entries.get(token)?;
        let same_key = match (&v.tenant_key, tenant_key) {
            (None, None) => true,
            (Some(a), Some(b)) => a[..] == b[..],
            _ => false,
        };
        if !same_key {
            return None;
        }
        if now >= v.exp {
            entries.remove(token);
            return None;
        }
        Some(v.claims.clone())
    }

    /// Tokens cached now.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("token cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Authorizes a request for the tenant it was resolved to: a bearer token is required, it must
/// verify with that tenant's key (or the platform key), and its tenant claim must name that
/// tenant. Returns the verified claims.
pub fn authorize(token: Option<&str>, entry: &Entry, cfg: &AuthConfig) -> Result<Value, ApiError> {
    let token = required(token)?;
    for_tenant(verify(token, entry.jwt_key.as_deref(), cfg)?, entry)
}

/// [`authorize`], verifying through `cache`.
pub fn authorize_cached(
    token: Option<&str>,
    entry: &Entry,
    cfg: &AuthConfig,
    cache: &TokenCache,
) -> Result<Value, ApiError> {
    let token = required(token)?;
    for_tenant(
        cache.verify(token, entry.jwt_key.as_ref(), cfg, unix_now())?,
        entry,
    )
}

fn required(token: Option<&str>) -> Result<&str, ApiError> {
    token.ok_or_else(|| ApiError::unauthorized("a bearer token is required", "invalid_request"))
}

/// The claims, when their tenant claim names the entry's tenant.
fn for_tenant(claims: Value, entry: &Entry) -> Result<Value, ApiError> {
    let name = &entry.info.name;
    match claims.get(TENANT_CLAIM).and_then(Value::as_str) {
        Some(t) if t == name => Ok(claims),
        Some(t) => Err(ApiError::forbidden(
            "tenant-mismatch",
            format!("the token is for tenant {t:?}, not {name:?}"),
        )),
        None => Err(ApiError::forbidden(
            "tenant-mismatch",
            "the token carries no tenant claim",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: Value, key: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_tenant_token() {
        let t = token(json!({"tenant": "acme", "exp": now() + 60}), KEY);
        assert_eq!(peek_tenant(&t).as_deref(), Some("acme"));
        let claims = verify(&t, Some(KEY), &AuthConfig::default()).unwrap();
        assert_eq!(claims["tenant"], "acme");
    }

    #[test]
    fn rejects_forged_expired_and_unsigned_tokens() {
        let cfg = AuthConfig::default();
        let wrong = token(
            json!({"tenant": "acme", "exp": now() + 60}),
            b"another key of thirty-two bytes!",
        );
        assert!(verify(&wrong, Some(KEY), &cfg)
            .unwrap_err()
            .detail
            .contains("signature"));
        let expired = token(json!({"tenant": "acme", "exp": now() - 3600}), KEY);
        assert!(verify(&expired, Some(KEY), &cfg)
            .unwrap_err()
            .detail
            .contains("expired"));
        let no_exp = token(json!({"tenant": "acme"}), KEY);
        assert!(verify(&no_exp, Some(KEY), &cfg).is_err());
        let future = token(
            json!({"tenant": "acme", "exp": now() + 7200, "nbf": now() + 3600}),
            KEY,
        );
        assert!(verify(&future, Some(KEY), &cfg).is_err());
        // alg: none, hand-made.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(format!(r#"{{"tenant":"acme","exp":{}}}"#, now() + 60))
        );
        assert_eq!(verify(&none, Some(KEY), &cfg).unwrap_err().status, 401);
        // RS256 header against an HMAC key (algorithm confusion).
        let mut h = Header::new(Algorithm::HS256);
        h.alg = Algorithm::HS256;
        let parts: Vec<String> = token(json!({"tenant": "acme", "exp": now() + 60}), KEY)
            .split('.')
            .map(str::to_string)
            .collect();
        let rs_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let confused = format!("{rs_header}.{}.{}", parts[1], parts[2]);
        assert!(verify(&confused, Some(KEY), &cfg)
            .unwrap_err()
            .detail
            .contains("not accepted"));
        assert!(verify("garbage", Some(KEY), &cfg).is_err());
    }

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let cfg = AuthConfig {
            issuer: Some("https://idp".into()),
            audience: Some("tenantry".into()),
            ..AuthConfig::default()
        };
        let ok = token(
            json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": "tenantry"}),
            KEY,
        );
        assert!(verify(&ok, Some(KEY), &cfg).is_ok());
        let bad = token(
            json!({"tenant": "a", "exp": now() + 60, "iss": "https://evil", "aud": "tenantry"}),
            KEY,
        );
        assert!(verify(&bad, Some(KEY), &cfg)
            .unwrap_err()
            .detail
            .contains("issuer"));
        let listed = token(
            json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": ["x", "tenantry"]}),
            KEY,
        );
        assert!(verify(&listed, Some(KEY), &cfg).is_ok());
        // Configured claims are required, and must have a type that is checked.
        for (claims, word) in [
            (
                json!({"tenant": "a", "exp": now() + 60, "aud": "tenantry"}),
                "iss",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp"}),
                "aud",
            ),
            (json!({"tenant": "a", "exp": now() + 60}), ""),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": 123}),
                "aud",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": {"tenantry": 1}}),
                "aud",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": [1]}),
                "aud",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": "https://idp", "aud": []}),
                "audience",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": 7, "aud": "tenantry"}),
                "iss",
            ),
            (
                json!({"tenant": "a", "exp": now() + 60, "iss": ["https://idp"], "aud": "tenantry"}),
                "iss",
            ),
        ] {
            let e = verify(&token(claims.clone(), KEY), Some(KEY), &cfg).unwrap_err();
            assert_eq!(e.status, 401, "{claims}");
            assert!(e.detail.contains(word), "{claims}: {}", e.detail);
        }
    }

    #[test]
    fn malformed_claims_are_refused_even_when_not_configured() {
        let cfg = AuthConfig::default();
        let now = now();
        for claims in [
            json!({"tenant": "a", "exp": now.to_string()}),
            json!({"tenant": "a", "exp": [now + 60]}),
            json!({"tenant": "a", "exp": null}),
            json!({"tenant": "a", "exp": now + 60, "nbf": "0"}),
            json!({"tenant": "a", "exp": now + 60, "aud": 123}),
            json!({"tenant": "a", "exp": now + 60, "aud": null}),
            json!({"tenant": "a", "exp": now + 60, "aud": ["x", 1]}),
            json!({"tenant": "a", "exp": now + 60, "iss": {"x": 1}}),
            json!(["a"]),
        ] {
            let e = verify(&token(claims.clone(), KEY), Some(KEY), &cfg).unwrap_err();
            assert_eq!(e.status, 401, "{claims}");
        }
        for claims in [
            json!({"tenant": "a", "exp": now + 60, "aud": "anyone"}),
            json!({"tenant": "a", "exp": now + 60, "aud": ["x", "y"], "iss": "someone"}),
        ] {
            assert!(
                verify(&token(claims.clone(), KEY), Some(KEY), &cfg).is_ok(),
                "{claims}"
            );
        }
    }

    #[test]
    fn platform_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let missing = PlatformKey::from_file(&path, "HS256").err().unwrap();
        assert!(
            missing.to_string().starts_with("reading platform key "),
            "{missing}"
        );
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            PlatformKey::from_file(&path, "HS256"),
            Err(KeyError::ShortSecret)
        ));
        assert!(matches!(
            PlatformKey::from_file(&path, "RS256"),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(
            PlatformKey::from_file(&path, "none"),
            Err(KeyError::UnsupportedAlgorithm(a)) if a == "none"
        ));
        std::fs::write(&path, KEY).unwrap();
        assert_eq!(
            PlatformKey::from_file(&path, "HS256").unwrap().alg,
            Algorithm::HS256
        );
    }

    #[test]
    fn cached_tokens_expire_and_answer_only_for_the_key_that_verified_them() {
        let cfg = AuthConfig::default();
        let cache = TokenCache::new(10);
        let key: Arc<[u8]> = Arc::from(KEY);
        let other: Arc<[u8]> = Arc::from(&b"another key of thirty-two bytes!"[..]);
        let exp = now() + 60;
        let t = token(json!({"tenant": "acme", "exp": exp}), KEY);
        let t_now = now();
        assert_eq!(
            cache.verify(&t, Some(&key), &cfg, t_now).unwrap()["tenant"],
            "acme"
        );
        assert_eq!(cache.len(), 1);
        assert!(cache.lookup(&t, Some(&key), t_now).is_some());
        assert!(cache.lookup(&t, Some(&key), exp - 1).is_some());
        // Expired: not answered from the cache, and dropped from it.
        assert!(cache.lookup(&t, Some(&key), exp).is_none());
        assert!(cache.is_empty());
        cache.verify(&t, Some(&key), &cfg, t_now).unwrap();
        // Another (rotated) key, or none, misses and verifies afresh: refused.
        assert!(cache.lookup(&t, Some(&other), t_now).is_none());
        assert!(cache.lookup(&t, None, t_now).is_none());
        let e = cache.verify(&t, Some(&other), &cfg, t_now).unwrap_err();
        assert!(e.detail.contains("signature"), "{}", e.detail);
        let e = cache.verify(&t, None, &cfg, t_now).unwrap_err();
        assert_eq!(e.status, 401);
        // The entry verified with the right key is still there and still answers.
        assert!(cache.lookup(&t, Some(&key), t_now).is_some());
        // Failures are not cached; neither are tokens past exp (accepted within the leeway)
        // nor oversized ones.
        let wrong = token(json!({"tenant": "acme", "exp": exp}), &other);
        assert!(cache.verify(&wrong, Some(&key), &cfg, t_now).is_err());
        let leeway = AuthConfig {
            leeway_secs: 30,
            ..AuthConfig::default()
        };
        let late = token(json!({"tenant": "acme", "exp": now() - 5}), KEY);
        cache.verify(&late, Some(&key), &leeway, now()).unwrap();
        let big = token(
            json!({"tenant": "acme", "exp": exp, "pad": "x".repeat(MAX_CACHED_TOKEN_BYTES)}),
            KEY,
        );
        cache.verify(&big, Some(&key), &cfg, t_now).unwrap();
        assert_eq!(cache.len(), 1);
        // Bounded: least recently used first out.
        let small = TokenCache::new(2);
        let ts: Vec<String> = (0..3)
            .map(|i| token(json!({"tenant": "acme", "exp": exp, "i": i}), KEY))
            .collect();
        for t in &ts {
            small.verify(t, Some(&key), &cfg, t_now).unwrap();
        }
        assert_eq!(small.len(), 2);
        assert!(small.lookup(&ts[0], Some(&key), t_now).is_none());
        assert!(small.lookup(&ts[2], Some(&key), t_now).is_some());
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
