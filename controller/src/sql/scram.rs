//! SCRAM-SHA-256 password verifiers. Silo sends PostgreSQL the verifier, never the password, so a
//! statement log cannot leak it; and it checks a stored verifier against the Secret's password to
//! find drift without logging in.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// A new verifier (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`) with a random salt.
pub fn verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// Whether `stored` (a `pg_authid.rolpassword` value) is a SCRAM verifier of `password`.
pub fn matches(stored: &str, password: &str) -> bool {
    let Some(rest) = stored.strip_prefix("SCRAM-SHA-256$") else {
        return false;
    };
    let Some((params, keys)) = rest.split_once('$') else {
        return false;
    };
    let (Some((iterations, salt)), Some((stored_key, _server_key))) =
        (params.split_once(':'), keys.split_once(':'))
    else {
        return false;
    };
    let (Ok(iterations), Ok(salt), Ok(stored_key)) = (
        iterations.parse::<u32>(),
        STANDARD.decode(salt),
        STANDARD.decode(stored_key),
    ) else {
        return false;
    };
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&salted) else {
        return false;
    };
    mac.update(b"Client Key");
    let client_key = mac.finalize().into_bytes();
    Sha256::digest(client_key).as_slice() == stored_key.as_slice()
}

/// Verifiers already checked against a password, so a resync does not pay PBKDF2's 4096 rounds
/// again for every tenant. Keyed by role; the value is a digest of (verifier, password), so a
/// changed verifier or password is checked afresh.
#[derive(Default)]
pub struct VerifiedPasswords(std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>);

impl VerifiedPasswords {
    pub fn matches(&self, role: &str, stored: &str, password: &str) -> bool {
        let mut digest = Sha256::new();
        digest.update(stored.as_bytes());
        digest.update([0]);
        digest.update(password.as_bytes());
        let key: [u8; 32] = digest.finalize().into();
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.get(role) == Some(&key) {
            return true;
        }
        let ok = matches(stored, password);
        if ok {
            cache.insert(role.to_string(), key);
        } else {
            cache.remove(role);
        }
        ok
    }
}

/// A new random password: 32 characters from an alphabet that needs no escaping in a URI.
pub fn generate_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_matches_its_password_only() {
        let v = verifier("s3cret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"));
        assert!(matches(&v, "s3cret"));
        assert!(!matches(&v, "other"));
    }

    #[test]
    fn malformed_or_md5_verifiers_never_match() {
        assert!(!matches("md5abcdef", "x"));
        assert!(!matches("SCRAM-SHA-256$x:y$z", "x"));
        assert!(!matches("", "x"));
    }

    #[test]
    fn cache_remembers_only_matching_pairs() {
        let cache = VerifiedPasswords::default();
        let v = verifier("pw");
        assert!(cache.matches("r", &v, "pw"));
        assert!(cache.matches("r", &v, "pw"), "second check from the cache");
        assert!(
            !cache.matches("r", &v, "other"),
            "a different password is checked afresh"
        );
        assert!(
            !cache.matches("r", &verifier("new"), "pw"),
            "a different verifier is checked afresh"
        );
    }

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let a = generate_password();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, generate_password());
    }
}
