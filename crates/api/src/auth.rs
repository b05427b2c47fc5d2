//! Who may call the API: `Authorization: Bearer <token>` with an API key (kept as its
//! SHA-256) or an HS256 JWT whose `sub` is the tenant; with neither configured the server
//! runs open, every caller an admin of tenant `local` (the server refuses to run open off
//! loopback). Clients see their tenant only; workers only the pull protocol; admins all.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use batchd_storage::Scope;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ApiError, ApiState};

/// The tenant of every caller of a server that runs open.
pub const OPEN_TENANT: &str = "local";

/// How callers are recognised.
#[derive(Clone, Default)]
pub struct AuthConfig {
    keys: Vec<ApiKey>,
    jwt: Option<JwtConfig>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("keys", &self.keys.iter().map(|k| &k.name).collect::<Vec<_>>())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

#[derive(Clone)]
struct ApiKey {
    name: String,
    tenant: String,
    role: Role,
    sha256: [u8; 32],
    queues: Option<Vec<String>>,
}

#[derive(Clone)]
struct JwtConfig {
    secret: Vec<u8>,
    audience: String,
}

impl AuthConfig {
    /// A server with no keys and no JWT: open.
    pub fn open() -> Self {
        Self::default()
    }

    /// Adds an API key given by the hex SHA-256 of the token (or, for development, the
    /// token itself: pass `sha256_hex(token)`).
    pub fn with_key(
        mut self,
        name: impl Into<String>,
        tenant: impl Into<String>,
        role: Role,
        key_sha256_hex: &str,
        queues: Option<Vec<String>>,
    ) -> Result<Self, String> {
        let bytes = hex::decode(key_sha256_hex.trim()).map_err(|e| format!("key_sha256 is not hex: {e}"))?;
        let sha256: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "key_sha256 must be 32 bytes (64 hex digits)".to_owned())?;
        self.keys.push(ApiKey {
            name: name.into(),
            tenant: tenant.into(),
            role,
            sha256,
            queues,
        });
        Ok(self)
    }

    /// Accepts HS256 JWTs signed with `secret` and carrying `audience`.
    pub fn with_jwt(mut self, secret: impl Into<Vec<u8>>, audience: impl Into<String>) -> Self {
        self.jwt = Some(JwtConfig {
            secret: secret.into(),
            audience: audience.into(),
        });
        self
    }

    /// No keys and no JWT.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && self.jwt.is_none()
    }

    /// Recognises the caller behind an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>, now_unix: i64) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller {
                name: "open".into(),
                tenant: OPEN_TENANT.into(),
                role: Role::Admin,
                queues: None,
            });
        }
        let unauthorized = |m: &str| ApiError::Unauthorized(m.to_owned());
        let header = authorization.ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(key) = self.keys.iter().find(|k| k.sha256 == digest) {
            return Ok(Caller {
                name: key.name.clone(),
                tenant: key.tenant.clone(),
                role: key.role,
                queues: key.queues.clone(),
            });
        }
        if let Some(jwt) = &self.jwt
            && token.matches('.').count() == 2
        {
            let sub =
                verify_jwt(token, jwt, now_unix).map_err(|m| ApiError::Unauthorized(format!("invalid token: {m}")))?;
            return Ok(Caller {
                name: format!("jwt:{sub}"),
                tenant: sub,
                role: Role::Client,
                queues: None,
            });
        }
        Err(unauthorized("invalid token"))
    }
}

/// The hex SHA-256 of a token, as `key_sha256` holds it.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(Deserialize)]
struct JwtClaims {
    sub: Option<String>,
    exp: Option<i64>,
    nbf: Option<i64>,
    aud: Option<serde_json::Value>,
}

/// Checks an HS256 JWT's signature, expiry and audience; returns its `sub`.
fn verify_jwt(token: &str, jwt: &JwtConfig, now_unix: i64) -> Result<String, &'static str> {
    let (signed, signature) = token.rsplit_once('.').ok_or("not a JWT")?;
    let (header, payload) = signed.split_once('.').ok_or("not a JWT")?;
    let header: JwtHeader =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).map_err(|_| "bad header")?).map_err(|_| "bad header")?;
    if header.alg != "HS256" {
        return Err("only HS256 is accepted");
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "bad signature")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&jwt.secret).map_err(|_| "bad secret")?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature).map_err(|_| "bad signature")?;
    let claims: JwtClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).map_err(|_| "bad payload")?)
        .map_err(|_| "bad payload")?;
    match claims.exp {
        Some(exp) if exp > now_unix => {}
        Some(_) => return Err("expired"),
        None => return Err("no exp claim"),
    }
    if claims.nbf.is_some_and(|nbf| nbf > now_unix) {
        return Err("not valid yet");
    }
    let audience_ok = match &claims.aud {
        Some(serde_json::Value::String(a)) => *a == jwt.audience,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&jwt.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err("wrong audience");
    }
    claims.sub.filter(|s| !s.is_empty()).ok_or("no sub claim")
}

/// Who is calling, as the handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (for logs), or `jwt:<sub>`.
    pub name: String,
    pub tenant: String,
    pub role: Role,
    /// Worker keys: the pull queues it may claim from (None: all).
    pub queues: Option<Vec<String>>,
}

impl Caller {
    /// What the caller may read and change: its tenant's data, or (admins) everyone's.
    pub fn scope(&self) -> Scope<'_> {
        match self.role {
            Role::Admin => Scope::All,
            Role::Client | Role::Worker => Scope::Tenant(&self.tenant),
        }
    }

    /// Clients and admins use the batch API; workers only the pull protocol.
    pub fn require_client(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Client | Role::Admin => Ok(()),
            Role::Worker => Err(ApiError::Forbidden(
                "a worker key may only use the pull-worker endpoints".into(),
            )),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(ApiError::Forbidden("this needs an admin key".into())),
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<ApiState>>() else {
            return ready(Err(ApiError::internal("the app has no ApiState")));
        };
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        ready(state.config.auth.authenticate(header, now))
    }
}

/// The role of an API key: what its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits and follows its tenant's batches.
    Client,
    /// Claims and reports on items of the pull queues it is allowed.
    Worker,
    /// Sees every tenant; pauses and resumes queues.
    Admin,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: &'static [Role] = &[Role::Client, Role::Worker, Role::Admin];

    /// The one spelling of this role, as in the config file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = batchd_domain::ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .iter()
            .copied()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| batchd_domain::ParseEnumError {
                what: "role",
                value: s.to_owned(),
                expected: &["client", "worker", "admin"],
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(secret: &[u8], claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("a key");
        mac.update(format!("{header}.{payload}").as_bytes());
        format!(
            "{header}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    fn config() -> AuthConfig {
        AuthConfig::default()
            .with_key("web", "acme", Role::Client, &sha256_hex("k-client"), None)
            .expect("a key")
            .with_key("ops", "acme", Role::Admin, &sha256_hex("k-admin"), None)
            .expect("a key")
            .with_jwt(b"jwt-secret".to_vec(), "authenticated")
    }

    #[test]
    fn api_keys_are_matched_by_their_hash() {
        let c = config();
        let caller = c.authenticate(Some("Bearer k-client"), 0).expect("a client");
        assert_eq!((caller.tenant.as_str(), caller.role), ("acme", Role::Client));
        assert_eq!(caller.scope(), Scope::Tenant("acme"));
        assert_eq!(
            c.authenticate(Some("Bearer k-admin"), 0).expect("an admin").scope(),
            Scope::All
        );
        for bad in [
            None,
            Some("k-client"),
            Some("Bearer "),
            Some("Bearer nope"),
            Some("Basic k-client"),
        ] {
            assert!(
                matches!(c.authenticate(bad, 0), Err(ApiError::Unauthorized(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn jwts_need_signature_audience_and_time() {
        let c = config();
        let good = jwt(
            b"jwt-secret",
            serde_json::json!({"sub": "user-1", "aud": "authenticated", "exp": 2_000}),
        );
        let caller = c.authenticate(Some(&format!("Bearer {good}")), 1_000).expect("valid");
        assert_eq!((caller.tenant.as_str(), caller.role), ("user-1", Role::Client));
        let list_aud = jwt(
            b"jwt-secret",
            serde_json::json!({"sub": "u", "aud": ["x", "authenticated"], "exp": 2_000}),
        );
        assert!(c.authenticate(Some(&format!("Bearer {list_aud}")), 1_000).is_ok());
        let cases = [
            jwt(
                b"other-secret",
                serde_json::json!({"sub": "u", "aud": "authenticated", "exp": 2_000}),
            ),
            jwt(
                b"jwt-secret",
                serde_json::json!({"sub": "u", "aud": "authenticated", "exp": 500}),
            ),
            jwt(
                b"jwt-secret",
                serde_json::json!({"sub": "u", "aud": "anon", "exp": 2_000}),
            ),
            jwt(b"jwt-secret", serde_json::json!({"aud": "authenticated", "exp": 2_000})),
            jwt(b"jwt-secret", serde_json::json!({"sub": "u", "aud": "authenticated"})),
        ];
        for token in cases {
            assert!(matches!(
                c.authenticate(Some(&format!("Bearer {token}")), 1_000),
                Err(ApiError::Unauthorized(_))
            ));
        }
    }

    #[test]
    fn an_open_server_makes_everyone_an_admin_of_local() {
        let caller = AuthConfig::open().authenticate(None, 0).expect("open");
        assert_eq!((caller.tenant.as_str(), caller.role), (OPEN_TENANT, Role::Admin));
    }

    #[test]
    fn roles_have_one_spelling() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(*role));
            assert_eq!(
                serde_json::to_value(role).expect("a role serializes"),
                serde_json::Value::from(role.as_str())
            );
        }
        let err = "owner".parse::<Role>().expect_err("not a role");
        assert_eq!(
            err.to_string(),
            "invalid role `owner`: expected one of client, worker, admin"
        );
    }
}
