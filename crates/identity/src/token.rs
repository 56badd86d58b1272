//! Join tokens: how a workload proves which identity it may request before
//! it has a certificate.
//!
//! Format: `mwt1.<base64url(claims JSON)>.<base64url(HMAC-SHA256)>`, no
//! padding. The MAC covers the ASCII bytes `mwt1.<payload>` (prefix
//! included, so a future `mwt2` cannot be confused with this version) and is
//! checked in constant time with `ring::hmac::verify` *before* the JSON is
//! parsed, so forged input never reaches the JSON parser.
//!
//! Tokens are single-use unless [`Claims::reusable`] is set: the control
//! plane records [`Claims::jti`] of spent tokens and refuses replays. That
//! bookkeeping is not in this crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::id::{IdError, SpiffeId, TrustDomain};

/// Version prefix of the token format.
const PREFIX: &str = "mwt1";
/// Length of the secret key in bytes.
pub const TOKEN_KEY_LEN: usize = 32;
/// Tokens longer than this are refused before any decoding.
const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused. [`TokenError::reason`] gives a metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not of the form `mwt1.<payload>.<mac>`, bad base64, or bad claims.
    #[error(
        "malformed join token: {0}; pass the token exactly as `meshwork token create` printed it"
    )]
    Malformed(String),
    /// The MAC does not verify: forged, altered, or issued with another key.
    #[error("join token signature is invalid (forged, altered, or issued by another control plane); create a new token")]
    BadSignature,
    /// The token's expiry has passed.
    #[error("join token expired at unix time {expired_at}; create a new token")]
    Expired {
        /// The token's `exp` claim.
        expired_at: u64,
    },
    /// The token was issued for another trust domain.
    #[error("join token is for trust domain {token}, but this control plane serves {expected}")]
    WrongTrustDomain {
        /// Trust domain in the token.
        token: String,
        /// Trust domain of the verifier.
        expected: String,
    },
    /// The secret key has the wrong length.
    #[error("join token key must be exactly 32 bytes, got {0}")]
    KeyLength(usize),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
}

/// What a join token grants: one identity, until an expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Trust domain of the identity.
    pub trust_domain: String,
    /// Namespace of the identity.
    pub namespace: String,
    /// Service account of the identity.
    pub service_account: String,
    /// Expiry, unix seconds; the token is refused at and after this time.
    pub exp: u64,
    /// Random token id (128 bits, hex) for replay bookkeeping.
    pub jti: String,
    /// Whether the token may be used more than once.
    #[serde(default)]
    pub reusable: bool,
}

/// Issues and verifies join tokens for one trust domain with one HMAC key.
pub struct TokenIssuer {
    trust_domain: TrustDomain,
    key: hmac::Key,
    secret: [u8; TOKEN_KEY_LEN],
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("trust_domain", &self.trust_domain)
            .field("key", &"[secret]")
            .finish()
    }
}

impl Claims {
    /// Claims for `id`, valid for `ttl` from `now`, single-use, with a
    /// fresh random `jti`.
    pub fn new(id: &SpiffeId, now: SystemTime, ttl: Duration) -> Result<Self, TokenError> {
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| TokenError::Random)?;
        Ok(Self {
            trust_domain: id.trust_domain().to_string(),
            namespace: id.namespace().to_owned(),
            service_account: id.service_account().to_owned(),
            exp: unix_secs(now).saturating_add(ttl.as_secs()),
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
            reusable: false,
        })
    }

    /// The identity these claims grant.
    pub fn spiffe_id(&self) -> Result<SpiffeId, IdError> {
        SpiffeId::new(
            TrustDomain::new(&self.trust_domain)?,
            &self.namespace,
            &self.service_account,
        )
    }
}

impl TokenIssuer {
    /// A new issuer with a fresh random 32-byte key.
    pub fn generate(trust_domain: TrustDomain) -> Result<Self, TokenError> {
        let mut secret = [0u8; TOKEN_KEY_LEN];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| TokenError::Random)?;
        Self::from_bytes(trust_domain, &secret)
    }

    /// An issuer from a stored key (exactly 32 bytes).
    pub fn from_bytes(trust_domain: TrustDomain, secret: &[u8]) -> Result<Self, TokenError> {
        let secret: [u8; TOKEN_KEY_LEN] = secret
            .try_into()
            .map_err(|_| TokenError::KeyLength(secret.len()))?;
        Ok(Self {
            trust_domain,
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            secret,
        })
    }

    /// The secret key, for persisting. Handle as a secret.
    pub fn secret_bytes(&self) -> &[u8; TOKEN_KEY_LEN] {
        &self.secret
    }

    /// The trust domain tokens are verified against.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Signs `claims` into a token string. The claims are signed as given;
    /// [`TokenIssuer::verify`] only accepts those of this issuer's trust domain.
    pub fn issue(&self, claims: &Claims) -> String {
        // Serializing a struct of strings, integers and a bool to JSON has
        // no failure path (no maps with non-string keys, no custom impls).
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(claims).expect("claims serialize to JSON");
        let mut token = format!("{PREFIX}.{}", URL_SAFE_NO_PAD.encode(json));
        let tag = hmac::sign(&self.key, token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(tag.as_ref()));
        token
    }

    /// Verifies a token at time `now`: format, MAC (constant time), claims,
    /// trust domain, expiry, in that order. Never panics on any input.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes long, at most {MAX_TOKEN_LEN} allowed",
                token.len()
            )));
        }
        let mut parts = token.split('.');
        let (Some(prefix), Some(payload), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "expected three '.'-separated parts".into(),
            ));
        };
        if prefix != PREFIX {
            return Err(TokenError::Malformed(format!(
                "unknown version prefix, expected {PREFIX:?}"
            )));
        }
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Malformed("signature is not base64url".into()))?;
        let signed_len = prefix.len() + 1 + payload.len();
        let signed = token.get(..signed_len).unwrap_or_default();
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed("payload is not base64url".into()))?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
        if claims.trust_domain != self.trust_domain.as_str() {
            return Err(TokenError::WrongTrustDomain {
                token: claims.trust_domain,
                expected: self.trust_domain.to_string(),
            });
        }
        claims
            .spiffe_id()
            .map_err(|e| TokenError::Malformed(format!("claims name no valid identity: {e}")))?;
        if unix_secs(now) >= claims.exp {
            return Err(TokenError::Expired {
                expired_at: claims.exp,
            });
        }
        Ok(claims)
    }
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::KeyLength(_) => "key_length",
            Self::Random => "random",
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn id(domain: &str) -> SpiffeId {
        SpiffeId::new(td(domain), "default", "web").unwrap()
    }

    #[test]
    fn issue_then_verify_round_trips() {
        let issuer = TokenIssuer::generate(td("cluster.local")).unwrap();
        let now = SystemTime::now();
        let mut claims = Claims::new(&id("cluster.local"), now, Duration::from_secs(600)).unwrap();
        claims.reusable = true;
        let token = issuer.issue(&claims);
        assert!(token.starts_with("mwt1."));
        let got = issuer.verify(&token, now).unwrap();
        assert_eq!(got, claims);
        assert_eq!(got.jti.len(), 32);
        assert_eq!(got.spiffe_id().unwrap(), id("cluster.local"));
        // Keys round-trip through bytes.
        let again = TokenIssuer::from_bytes(td("cluster.local"), issuer.secret_bytes()).unwrap();
        assert_eq!(again.verify(&token, now).unwrap(), claims);
    }

    #[test]
    fn jti_is_random() {
        let now = SystemTime::now();
        let a = Claims::new(&id("t"), now, Duration::from_secs(1)).unwrap();
        let b = Claims::new(&id("t"), now, Duration::from_secs(1)).unwrap();
        assert_ne!(a.jti, b.jti);
        assert!(!a.reusable);
    }

    #[test]
    fn expired_token_is_refused() {
        let issuer = TokenIssuer::generate(td("t")).unwrap();
        let now = SystemTime::now();
        let token = issuer.issue(&Claims::new(&id("t"), now, Duration::from_secs(60)).unwrap());
        assert!(issuer.verify(&token, now + Duration::from_secs(59)).is_ok());
        let err = issuer
            .verify(&token, now + Duration::from_secs(61))
            .unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err:?}");
        assert_eq!(err.reason(), "expired");
    }

    #[test]
    fn forged_token_is_refused() {
        let real = TokenIssuer::generate(td("t")).unwrap();
        let forger = TokenIssuer::generate(td("t")).unwrap();
        let now = SystemTime::now();
        let token = forger.issue(&Claims::new(&id("t"), now, Duration::from_secs(60)).unwrap());
        assert_eq!(real.verify(&token, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampered_payload_is_refused() {
        let issuer = TokenIssuer::generate(td("t")).unwrap();
        let now = SystemTime::now();
        let claims = Claims::new(&id("t"), now, Duration::from_secs(60)).unwrap();
        let token = issuer.issue(&claims);
        let parts: Vec<&str> = token.split('.').collect();
        let mut evil = claims.clone();
        evil.service_account = "admin".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
        assert_eq!(issuer.verify(&tampered, now), Err(TokenError::BadSignature));
        // A flipped MAC character too.
        let mut mac = parts[2].to_string();
        let first = if mac.starts_with('A') { "B" } else { "A" };
        mac.replace_range(0..1, first);
        let tampered = format!("{}.{}.{}", parts[0], parts[1], mac);
        assert_eq!(issuer.verify(&tampered, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn wrong_trust_domain_is_refused() {
        // Same key, different trust domain: e.g. a key reused after the
        // trust domain was renamed.
        let a = TokenIssuer::generate(td("a.example")).unwrap();
        let b = TokenIssuer::from_bytes(td("b.example"), a.secret_bytes()).unwrap();
        let now = SystemTime::now();
        let token = a.issue(&Claims::new(&id("a.example"), now, Duration::from_secs(60)).unwrap());
        let err = b.verify(&token, now).unwrap_err();
        assert!(
            matches!(err, TokenError::WrongTrustDomain { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("a.example"));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let issuer = TokenIssuer::generate(td("t")).unwrap();
        let now = SystemTime::now();
        for bad in [
            "",
            "mwt1",
            "mwt1..",
            "mwt2.e30.AAAA",
            "mwt1.e30",
            "a.b.c.d",
            "mwt1.!!.AAAA",
        ] {
            let err = issuer.verify(bad, now).unwrap_err();
            assert!(
                matches!(err, TokenError::Malformed(_) | TokenError::BadSignature),
                "{bad:?}: {err:?}"
            );
        }
        // Validly signed but not JSON claims: malformed, not a panic.
        let payload = URL_SAFE_NO_PAD.encode(b"[1,2]");
        let signed = format!("mwt1.{payload}");
        let mac = hmac::sign(&issuer.key, signed.as_bytes());
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        assert!(matches!(
            issuer.verify(&token, now),
            Err(TokenError::Malformed(_))
        ));
        // Validly signed claims with an invalid identity.
        let mut claims = Claims::new(&id("t"), now, Duration::from_secs(60)).unwrap();
        claims.namespace = "../x".into();
        let token = issuer.issue(&claims);
        assert!(matches!(
            issuer.verify(&token, now),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            issuer.verify(&"x".repeat(10_000), now),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            TokenIssuer::from_bytes(td("t"), &[0u8; 16]).unwrap_err(),
            TokenError::KeyLength(16)
        );
    }

    #[test]
    fn random_and_truncated_input_never_panics() {
        let issuer = TokenIssuer::generate(td("t")).unwrap();
        let now = SystemTime::now();
        let good = issuer.issue(&Claims::new(&id("t"), now, Duration::from_secs(60)).unwrap());
        // Every prefix and every single-byte mutation of a valid token.
        for i in 0..good.len() {
            assert!(issuer.verify(&good[..i], now).is_err());
        }
        let mut rng = fastrand::Rng::with_seed(0x6d77_7431);
        let alphabet: Vec<char> = "mwt1.-_ABCxyz019=+/\u{e9}\u{0} ".chars().collect();
        for _ in 0..20_000 {
            let s: String = if rng.bool() {
                let mut chars: Vec<char> = good.chars().collect();
                let i = rng.usize(0..chars.len());
                chars[i] = alphabet[rng.usize(0..alphabet.len())];
                chars.into_iter().collect()
            } else {
                (0..rng.usize(0..80))
                    .map(|_| alphabet[rng.usize(0..alphabet.len())])
                    .collect()
            };
            // A mutation may be a no-op (same char); anything else fails.
            if s != good {
                assert!(issuer.verify(&s, now).is_err(), "{s:?} verified");
            }
        }
    }
}
