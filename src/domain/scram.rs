//! Passwords for tenant roles: generation and SCRAM-SHA-256 verifiers (RFC 5802/7677, the
//! format PostgreSQL stores in `pg_authid.rolpassword`). Sending the verifier instead of the
//! password keeps the password out of PostgreSQL's statement log and `pg_stat_activity`.

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, Mac};
use rand::{distr::Alphanumeric, Rng, RngCore};
use sha2::{Digest, Sha256};

const ITERATIONS: u32 = 4096;

/// A new password: 40 alphanumeric characters from the thread-local CSPRNG (ChaCha, seeded from
/// the OS), about 238 bits of entropy. Alphanumeric keeps it safe in URIs and shells.
pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn keys(password: &str, salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    (stored_key, server_key)
}

/// The `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` verifier for `password`.
pub fn verifier(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let (stored, server) = keys(password, &salt, ITERATIONS);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored),
        STANDARD.encode(server)
    )
}

/// Whether `password` matches a stored SCRAM-SHA-256 verifier. Anything that is not a
/// well-formed SCRAM verifier (an MD5 hash, NULL) does not match.
pub fn verify(password: &str, stored_verifier: &str) -> bool {
    let parse = || -> Option<bool> {
        let rest = stored_verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys_part) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys_part.split_once(':')?;
        let iterations: u32 = iter.parse().ok()?;
        // The operator always writes 4096; a verifier costing more (which a role can set on
        // itself) would make every verification a CPU burden, so it counts as a mismatch and
        // the password is rotated.
        if iterations == 0 || iterations > ITERATIONS {
            return None;
        }
        let salt = STANDARD.decode(salt).ok()?;
        let (want_stored, want_server) = keys(password, &salt, iterations);
        Some(
            STANDARD.decode(stored).ok()? == want_stored
                && STANDARD.decode(server).ok()? == want_server,
        )
    };
    parse().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_and_distinct() {
        let a = generate_password();
        let b = generate_password();
        assert!(a.len() >= 32 && a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn verifier_round_trip() {
        let v = verifier("s3cret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"));
        assert!(verify("s3cret", &v));
        assert!(!verify("other", &v));
        assert!(!verify("s3cret", "md5abcdef"));
        // A verifier costing more than the operator's own is refused unverified.
        let salt = [7u8; 16];
        let (stored, server) = keys("s3cret", &salt, 100_000);
        let costly = format!(
            "SCRAM-SHA-256$100000:{}${}:{}",
            STANDARD.encode(salt),
            STANDARD.encode(stored),
            STANDARD.encode(server)
        );
        assert!(!verify("s3cret", &costly));
    }

    #[test]
    fn matches_rfc7677_test_vector_keys() {
        // RFC 7677 section 3: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let (_, server) = keys("pencil", &salt, 4096);
        // ServerSignature from the RFC is HMAC(ServerKey, AuthMessage); check ServerKey via it.
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let sig = hmac(&server, auth.as_bytes());
        assert_eq!(
            STANDARD.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }
}
