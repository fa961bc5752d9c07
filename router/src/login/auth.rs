//! SCRAM-SHA-256, server side (RFC 5802/7677), against a tenant's password. No plaintext password
//! ever crosses the wire; the salted password is derived once per (tenant, name, password) and
//! cached.
//!
//! Every name a client gives gets the same exchange, whether or not a tenant answers to it: the
//! salt is an HMAC of the name under a secret of this process (stable across tries, as PostgreSQL's
//! mock authentication is, and made the same way for every name), and a name that leads nowhere
//! simply has no keys a proof could match. Only a client that proved a password learns anything
//! about the tenant behind a name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

const ITERATIONS: u32 = 4096;
const SALT_LEN: usize = 16;

/// The keys derived from a password and a salt, reusable across logins.
#[derive(Clone)]
pub(crate) struct ScramKeys {
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramKeys {
    /// PBKDF2 with [`ITERATIONS`] rounds: slow on purpose, milliseconds of CPU.
    fn derive(password: &str, salt: &[u8]) -> ScramKeys {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramKeys {
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub(crate) enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported here")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
    #[error("the tenant's SCRAM keys could not be derived")]
    KeysUnavailable,
}

/// Salts and derived keys for the life of this process.
pub(crate) struct Scram {
    secret: [u8; 32],
    /// By (tenant key, name the client gave): the salt depends on the name, so a tenant reached
    /// as `acme` and as `ns.acme` has two entries, and a name several tenants share has one per
    /// tenant.
    keys: Mutex<HashMap<(String, String), Cached>>,
}

struct Cached {
    password: String,
    keys: Arc<OnceCell<ScramKeys>>,
}

impl Default for Scram {
    fn default() -> Self {
        use rand::Rng;
        Scram {
            secret: rand::rng().random(),
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl Scram {
    /// The salt offered to a client that names `name`.
    pub(crate) fn salt(&self, name: &str) -> [u8; SALT_LEN] {
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&hmac(&self.secret, name.as_bytes())[..SALT_LEN]);
        salt
    }

    /// The keys of `tenant`'s `password` under the salt of `name`, derived on first use.
    pub(crate) async fn keys(
        &self,
        tenant: &str,
        name: &str,
        password: &str,
    ) -> Result<ScramKeys, ScramError> {
        let salt = self.salt(name);
        let owned = password.to_string();
        self.keys_with(tenant, name, password, move || {
            ScramKeys::derive(&owned, &salt)
        })
        .await
    }

    async fn keys_with(
        &self,
        tenant: &str,
        name: &str,
        password: &str,
        derive: impl FnOnce() -> ScramKeys + Send + 'static,
    ) -> Result<ScramKeys, ScramError> {
        let cell = {
            let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let cached = cache
                .entry((tenant.to_string(), name.to_string()))
                .or_insert_with(|| Cached {
                    password: password.to_string(),
                    keys: Arc::default(),
                });
            if cached.password != password {
                *cached = Cached {
                    password: password.to_string(),
                    keys: Arc::default(),
                };
            }
            cached.keys.clone()
        };
        // No lock is held from here: PBKDF2 takes milliseconds, and first logins to other
        // tenants must not queue behind it. Concurrent first logins to this tenant share the
        // one derivation, on a blocking thread so that no client's relay stalls either.
        let keys = cell
            .get_or_try_init(|| tokio::task::spawn_blocking(derive))
            .await
            .map_err(|e| {
                tracing::warn!(tenant, error = %e, "deriving SCRAM keys failed");
                ScramError::KeysUnavailable
            })?;
        Ok(keys.clone())
    }

    /// Forgets the keys of tenants `live` says are gone.
    pub(crate) fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(tenant, _), _| live(tenant));
    }
}

/// One server-side exchange, up to the client's proof.
pub(crate) struct ScramServer {
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Takes the client-first message; returns the exchange and the server-first message.
    pub(crate) fn start(
        salt: &[u8],
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let client_first =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2 header: "n,," (no binding) or "y,," (client supports it, we did not offer it).
        let bare = if let Some(rest) = client_first
            .strip_prefix("n,,")
            .or_else(|| client_first.strip_prefix("y,,"))
        {
            rest
        } else if client_first.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed("gs2 header"));
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("client nonce"))?;
        use rand::Rng;
        let server_nonce: [u8; 18] = rand::rng().random();
        let nonce = format!("{client_nonce}{}", STANDARD.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", STANDARD.encode(salt));
        let server = ScramServer {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((server, server_first))
    }

    /// Reads the client-final message: the proof, to be checked against the keys of whichever
    /// tenants the client's name may mean.
    pub(crate) fn finish(self, client_final: &[u8]) -> Result<ClientProof, ScramError> {
        let client_final =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client proof"))?;
        let nonce = without_proof
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("final nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::BadProof);
        }
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof encoding"))?
            .try_into()
            .map_err(|_| ScramError::BadProof)?;
        Ok(ClientProof {
            auth_message: format!(
                "{},{},{without_proof}",
                self.client_first_bare, self.server_first
            ),
            proof,
        })
    }
}

/// A client's proof of a password, not yet checked.
pub(crate) struct ClientProof {
    auth_message: String,
    proof: [u8; 32],
}

impl ClientProof {
    /// The server-final message (`v=...`) when the proof was made with the password behind `keys`.
    pub(crate) fn verify(&self, keys: &ScramKeys) -> Option<String> {
        let signature = hmac(&keys.stored_key, self.auth_message.as_bytes());
        let client_key: Vec<u8> = self
            .proof
            .iter()
            .zip(signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant time is not needed for a comparison of hashes of secret-derived values, but cheap.
        let differs = stored
            .iter()
            .zip(keys.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (differs == 0).then(|| {
            let server_signature = hmac(&keys.server_key, self.auth_message.as_bytes());
            format!("v={}", STANDARD.encode(server_signature))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    const SALT: [u8; SALT_LEN] = [7; SALT_LEN];

    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let keys = ScramKeys::derive(server_password, &SALT);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (server, server_first) = ScramServer::start(&SALT, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client update"))?;
        let proof = server.finish(client.message())?;
        let server_final = proof.verify(&keys).ok_or(ScramError::BadProof)?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("server signature"))
    }

    #[test]
    fn right_password_completes_with_a_valid_server_signature() {
        assert_eq!(exchange("s3cret", "s3cret"), Ok(()));
    }

    #[test]
    fn wrong_password_fails() {
        assert_eq!(exchange("s3cret", "guess"), Err(ScramError::BadProof));
    }

    #[test]
    fn malformed_messages_fail() {
        assert!(ScramServer::start(&SALT, b"garbage").is_err());
        assert_eq!(
            ScramServer::start(&SALT, b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        let (server, _) =
            ScramServer::start(&SALT, b"n,,n=,r=abc").unwrap_or_else(|_| unreachable!());
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn salts_are_stable_per_name_and_differ_between_names_and_processes() {
        let (one, other) = (Scram::default(), Scram::default());
        assert_eq!(one.salt("acme"), one.salt("acme"));
        assert_ne!(one.salt("acme"), one.salt("ns.acme"));
        assert_ne!(one.salt("acme"), other.salt("acme"));
    }

    fn keys_for(password: &str) -> ScramKeys {
        ScramKeys::derive(password, &SALT)
    }

    /// PBKDF2 for one tenant must not hold up another tenant's first login. Made observable:
    /// tenant a's derivation waits until tenant b's keys are ready. Were a lock held across a
    /// derivation (as the router once did), b could not even start, a would give up after 5 s,
    /// and `overlapped` would stay false.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_tenants_derivation_does_not_hold_up_another() {
        let scram = Arc::new(Scram::default());
        let overlapped = Arc::new(AtomicBool::new(false));
        let (a_started, a_started_rx) = tokio::sync::oneshot::channel();
        let (b_ready, b_ready_rx) = std::sync::mpsc::channel::<()>();
        let a = tokio::spawn({
            let (scram, overlapped) = (scram.clone(), overlapped.clone());
            async move {
                scram
                    .keys_with("ns.a", "a", "pw-a", move || {
                        let _ = a_started.send(());
                        let b_done = b_ready_rx.recv_timeout(Duration::from_secs(5)).is_ok();
                        overlapped.store(b_done, Ordering::SeqCst);
                        keys_for("pw-a")
                    })
                    .await
            }
        });
        a_started_rx
            .await
            .unwrap_or_else(|_| panic!("a's derivation never started"));
        let b = scram
            .keys_with("ns.b", "b", "pw-b", || keys_for("pw-b"))
            .await;
        assert!(b.is_ok());
        let _ = b_ready.send(());
        assert!(matches!(a.await, Ok(Ok(_))));
        assert!(
            overlapped.load(Ordering::SeqCst),
            "b's keys waited for a's derivation to end"
        );
    }

    #[tokio::test]
    async fn keys_are_derived_once_per_password() {
        let scram = Scram::default();
        let derivations = Arc::new(AtomicUsize::new(0));
        let derive = |password: &'static str| {
            let derivations = derivations.clone();
            move || {
                derivations.fetch_add(1, Ordering::SeqCst);
                keys_for(password)
            }
        };
        let logins = (0..8).map(|_| scram.keys_with("ns.a", "a", "one", derive("one")));
        for keys in futures::future::join_all(logins).await {
            assert!(keys.is_ok());
        }
        assert_eq!(
            derivations.load(Ordering::SeqCst),
            1,
            "concurrent first logins"
        );
        let _ = scram.keys_with("ns.a", "a", "two", derive("two")).await;
        assert_eq!(derivations.load(Ordering::SeqCst), 2, "a new password");
        scram.retain(|tenant| tenant != "ns.a");
        let _ = scram.keys_with("ns.a", "a", "two", derive("two")).await;
        assert_eq!(derivations.load(Ordering::SeqCst), 3, "a forgotten tenant");
    }

    #[tokio::test]
    async fn cached_keys_verify_the_password_under_the_names_salt() {
        let scram = Scram::default();
        let keys = scram.keys("ns.a", "a", "pw").await.ok();
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let (server, server_first) = ScramServer::start(&scram.salt("a"), client.message())
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .update(server_first.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let proof = server
            .finish(client.message())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(keys.is_some_and(|k| proof.verify(&k).is_some()));
    }
}
