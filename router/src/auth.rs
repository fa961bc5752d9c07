//! SCRAM-SHA-256, server side (RFC 5802/7677), against a tenant's password. No plaintext password
//! ever crosses the wire; the salted password is derived once per (tenant, password) and cached.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const ITERATIONS: u32 = 4096;

/// The keys derived from a password, reusable across logins.
#[derive(Clone)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramKeys {
    pub fn derive(password: &str) -> ScramKeys {
        use rand::Rng;
        let salt: Vec<u8> = (0..16).map(|_| rand::rng().random()).collect();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        ScramKeys {
            salt,
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
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported here")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// One server-side exchange.
pub struct ScramServer {
    keys: ScramKeys,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Takes the client-first message; returns the exchange and the server-first message.
    pub fn start(
        keys: ScramKeys,
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
        let server_nonce: Vec<u8> = (0..18).map(|_| rand::rng().random()).collect();
        let nonce = format!("{client_nonce}{}", STANDARD.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", STANDARD.encode(&keys.salt));
        let server = ScramServer {
            keys,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((server, server_first))
    }

    /// Verifies the client-final message; returns the server-final message (`v=...`).
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
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
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof encoding"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.keys.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant time is not needed for a comparison of hashes of secret-derived values, but cheap.
        if stored
            .iter()
            .zip(self.keys.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let keys = ScramKeys::derive(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (server, server_first) = ScramServer::start(keys, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client update"))?;
        let server_final = server.finish(client.message())?;
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
        let keys = ScramKeys::derive("x");
        assert!(ScramServer::start(keys.clone(), b"garbage").is_err());
        assert_eq!(
            ScramServer::start(keys.clone(), b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        let (server, _) =
            ScramServer::start(keys, b"n,,n=,r=abc").unwrap_or_else(|_| unreachable!());
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }
}
