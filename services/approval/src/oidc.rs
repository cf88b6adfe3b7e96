//! Sign-in with the organisation's OpenID Connect provider.
//!
//! - The page: the authorization code flow with PKCE (`/auth/login` → the provider →
//!   `/auth/callback`), ending in a session cookie (HttpOnly, Secure, SameSite=Lax) signed by the
//!   gateway, with a CSRF token the page sends back on every write.
//! - The API: the provider's ID or access tokens (JWTs) as bearer tokens.
//!
//! Tokens are verified against the issuer's JWKS (RS256 or ES256; nothing else, never `none`),
//! cached and fetched again when a token names a key id the cache does not hold (a rotation), at
//! most once per `jwks_min_refresh_secs`. The approver's name and groups come from configurable
//! claims, so approval policies name the provider's groups.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::Utc;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use slipway_core::config::OidcSettings;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "slipway_session";
/// The cookie that carries a sign-in's state, nonce and PKCE verifier to the callback.
const LOGIN_COOKIE: &str = "slipway_login";
/// How long a sign-in may take at the provider.
const LOGIN_SECS: i64 = 600;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 60;

/// Who a token or session says someone is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub groups: Vec<String>,
}

/// A signed-in page session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "g")]
    pub groups: Vec<String>,
    /// The CSRF token writes must carry in `X-CSRF-Token`.
    #[serde(rename = "c")]
    pub csrf: String,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Login {
    #[serde(rename = "s")]
    state: String,
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "v")]
    verifier: String,
    #[serde(rename = "r")]
    return_to: String,
    #[serde(rename = "e")]
    expires: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Clone)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed P-256 point.
    Ec(Vec<u8>),
}

#[derive(Debug, Default)]
struct Jwks {
    keys: HashMap<String, Key>,
    /// The last fetch, whether or not it succeeded (the refresh limit counts both).
    fetched: Option<Instant>,
    /// The last fetch that succeeded: keys older than [`JWKS_MAX_AGE`] are read again, so a key
    /// the provider withdrew stops verifying.
    loaded: Option<Instant>,
}

/// How long fetched keys are trusted before the JWKS is read again.
const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// The provider, as the gateway knows it.
#[derive(Debug)]
pub struct Oidc {
    settings: OidcSettings,
    client_secret: Option<String>,
    session_key: ring::hmac::Key,
    http: reqwest::Client,
    discovery: tokio::sync::RwLock<Option<Discovery>>,
    jwks: tokio::sync::RwLock<Jwks>,
    /// Serialises fetches, so a burst of tokens with one new key id makes one fetch.
    fetching: tokio::sync::Mutex<()>,
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source works");
    URL_SAFE_NO_PAD.encode(b)
}

/// `application/x-www-form-urlencoded` / query component encoding.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The value at a dotted path of the claims (`realm_access.roles`), or the claim whose name
/// has dots in it.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    claims
        .get(path)
        .or_else(|| path.split('.').try_fold(claims, |v, part| v.get(part)))
}

impl Oidc {
    /// # Errors
    /// What is wrong with the settings.
    pub fn new(settings: OidcSettings, derive_from: Option<&str>) -> Result<Self, String> {
        let client_secret = match (&settings.client_secret, &settings.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(
                    "[gateway.oidc] set client_secret or client_secret_file, not both".into(),
                );
            }
            (Some(s), None) => Some(s.clone()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("[gateway.oidc] client_secret_file {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let key_bytes: Vec<u8> = match (&settings.session_key_file, derive_from) {
            (Some(p), _) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("[gateway.oidc] session_key_file {}: {e}", p.display()))?;
                let k = STANDARD.decode(text.trim()).map_err(|e| {
                    format!(
                        "[gateway.oidc] session_key_file {}: not base64: {e}",
                        p.display()
                    )
                })?;
                if k.len() < 32 {
                    return Err("[gateway.oidc] the session key must be at least 32 bytes".into());
                }
                k
            }
            (None, Some(seed)) => {
                // A key of its own, derived so it says nothing about the signing key.
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed.trim().as_bytes());
                ring::hmac::sign(&k, b"slipway gateway session key v1")
                    .as_ref()
                    .to_vec()
            }
            (None, None) => URL_SAFE_NO_PAD
                .decode(random_token())
                .expect("just encoded"),
        };
        if settings.issuer.is_empty() || settings.client_id.is_empty() {
            return Err("[gateway.oidc] issuer and client_id are required".into());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            session_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes),
            settings,
            client_secret,
            http,
            discovery: tokio::sync::RwLock::new(None),
            jwks: tokio::sync::RwLock::new(Jwks::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{url} answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    }

    /// The provider's endpoints, from its discovery document (read once, then kept).
    async fn discovery(&self) -> Result<Discovery, String> {
        if let Some(d) = self.discovery.read().await.as_ref() {
            return Ok(d.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        );
        let d: Discovery = serde_json::from_value(self.get_json(&url).await?)
            .map_err(|e| format!("{url}: {e}"))?;
        if d.issuer.trim_end_matches('/') != self.settings.issuer.trim_end_matches('/') {
            return Err(format!(
                "the discovery document's issuer {} is not the configured {}",
                d.issuer, self.settings.issuer
            ));
        }
        *self.discovery.write().await = Some(d.clone());
        Ok(d)
    }

    /// Fetches the JWKS (unless another task just did).
    async fn refresh_keys(&self, after: Option<Instant>) -> Result<(), String> {
        let _one = self.fetching.lock().await;
        if self.jwks.read().await.fetched != after {
            return Ok(());
        }
        self.jwks.write().await.fetched = Some(Instant::now());
        let d = self.discovery().await?;
        let doc = self.get_json(&d.jwks_uri).await?;
        let mut keys = HashMap::new();
        for k in doc["keys"].as_array().into_iter().flatten() {
            let kid = k["kid"].as_str().unwrap_or_default().to_string();
            let b64 = |name: &str| {
                k[name]
                    .as_str()
                    .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
            };
            let key = match (k["kty"].as_str(), k["crv"].as_str()) {
                (Some("RSA"), _) => match (b64("n"), b64("e")) {
                    (Some(n), Some(e)) => Key::Rsa { n, e },
                    _ => continue,
                },
                (Some("EC"), Some("P-256")) => match (b64("x"), b64("y")) {
                    (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                        let mut point = vec![4u8];
                        point.extend(x);
                        point.extend(y);
                        Key::Ec(point)
                    }
                    _ => continue,
                },
                _ => continue,
            };
            if k["use"].as_str().is_some_and(|u| u != "sig") {
                continue;
            }
            keys.insert(kid, key);
        }
        let mut w = self.jwks.write().await;
        w.keys = keys;
        w.loaded = Some(Instant::now());
        Ok(())
    }

    /// The key a token's header names, fetching the JWKS when the cache lacks it.
    async fn key(&self, kid: &str) -> Result<Key, String> {
        let (fetched, stale) = {
            let r = self.jwks.read().await;
            let stale = r.loaded.is_none_or(|t| t.elapsed() > JWKS_MAX_AGE);
            if !stale && let Some(k) = r.keys.get(kid) {
                return Ok(k.clone());
            }
            (r.fetched, stale)
        };
        if stale && self.refresh_keys(fetched).await.is_err() {
            // The provider is unreachable: the keys it gave last still verify for now.
            tracing::warn!(
                "Cannot read the identity provider's keys again; using those it gave last."
            );
        }
        let fetched = {
            let r = self.jwks.read().await;
            if let Some(k) = r.keys.get(kid) {
                return Ok(k.clone());
            }
            r.fetched
        };
        let may_fetch = fetched.is_none_or(|t| {
            t.elapsed() >= Duration::from_secs(self.settings.jwks_min_refresh_secs)
        });
        if may_fetch {
            self.refresh_keys(fetched)
                .await
                .map_err(|e| format!("cannot read the provider's keys: {e}"))?;
        }
        self.jwks
            .read()
            .await
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| format!("the token's key id {kid:?} is not among the provider's keys"))
    }

    /// Verifies a JWT from the provider: signature, issuer, audience (one of `audiences`),
    /// expiry and, for an ID token from a sign-in, its nonce. The approver it names.
    ///
    /// # Errors
    /// Why the token is refused, for a `401`.
    pub async fn verify(
        &self,
        token: &str,
        audiences: &[String],
        nonce: Option<&str>,
    ) -> Result<Identity, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the token is not a JWT (header.payload.signature)".into());
        };
        let decode = |what: &str, part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| format!("the token's {what} is not base64url: {e}"))
        };
        let header: Value = serde_json::from_slice(&decode("header", h)?)
            .map_err(|e| format!("the token's header is not JSON: {e}"))?;
        let alg = header["alg"].as_str().unwrap_or_default();
        let kid = header["kid"].as_str().unwrap_or_default();
        let key = self.key(kid).await?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let sig = decode("signature", s)?;
        let verified = match (alg, &key) {
            ("RS256", Key::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                .is_ok(),
            ("ES256", Key::Ec(point)) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, &sig)
                    .is_ok()
            }
            ("RS256" | "ES256", _) => {
                return Err(format!("the token's alg {alg} does not fit key {kid:?}"));
            }
            _ => {
                return Err(format!(
                    "the token's alg {alg:?} is not accepted (RS256 or ES256)"
                ));
            }
        };
        if !verified {
            return Err("the token's signature does not verify".into());
        }
        let claims: Value = serde_json::from_slice(&decode("payload", p)?)
            .map_err(|e| format!("the token's payload is not JSON: {e}"))?;
        let iss = claims["iss"].as_str().unwrap_or_default();
        if iss.trim_end_matches('/') != self.settings.issuer.trim_end_matches('/') {
            return Err(format!(
                "the token's issuer {iss:?} is not {}",
                self.settings.issuer
            ));
        }
        let aud: Vec<&str> = match &claims["aud"] {
            Value::String(a) => vec![a.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !aud.iter().any(|a| audiences.iter().any(|x| x == a)) {
            return Err(format!(
                "the token's audience {aud:?} is not one of {audiences:?}"
            ));
        }
        let now = Utc::now().timestamp();
        let Some(exp) = claims["exp"].as_i64() else {
            return Err("the token has no exp".into());
        };
        if now > exp + LEEWAY_SECS {
            return Err(format!("the token expired {} s ago", now - exp));
        }
        if let Some(nbf) = claims["nbf"].as_i64()
            && nbf > now + LEEWAY_SECS
        {
            return Err("the token is not valid yet (nbf)".into());
        }
        if let Some(want) = nonce
            && claims["nonce"].as_str() != Some(want)
        {
            return Err("the ID token's nonce is not this sign-in's".into());
        }
        let name = claim(&claims, &self.settings.name_claim)
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("the token has no {} claim", self.settings.name_claim))?;
        let groups = match claim(&claims, &self.settings.groups_claim) {
            Some(Value::Array(g)) => g
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(g)) => g.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        Ok(Identity {
            name: name.to_string(),
            groups,
        })
    }

    /// What an API bearer token may be addressed to.
    pub fn audiences(&self) -> Vec<String> {
        if self.settings.audiences.is_empty() {
            vec![self.settings.client_id.clone()]
        } else {
            self.settings.audiences.clone()
        }
    }

    fn sign<T: Serialize>(&self, value: &T) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("serialises"));
        let tag = ring::hmac::sign(&self.session_key, payload.as_bytes());
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn open<T: for<'de> Deserialize<'de>>(&self, signed: &str) -> Option<T> {
        let (payload, tag) = signed.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        ring::hmac::verify(&self.session_key, payload.as_bytes(), &tag).ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }

    /// Where `/auth/login` sends the browser, and the cookie that remembers the sign-in.
    ///
    /// # Errors
    /// The provider cannot be discovered.
    pub async fn login(
        &self,
        redirect_uri: &str,
        return_to: &str,
    ) -> Result<(String, String), String> {
        let d = self.discovery().await?;
        let (state, nonce, verifier) = (random_token(), random_token(), random_token());
        let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            verifier.as_bytes(),
        ));
        let login = Login {
            state: state.clone(),
            nonce: nonce.clone(),
            verifier,
            return_to: safe_return(return_to),
            expires: Utc::now().timestamp() + LOGIN_SECS,
        };
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!(
            "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={state}&nonce={nonce}&code_challenge={challenge}&code_challenge_method=S256",
            d.authorization_endpoint,
            encode(&self.settings.client_id),
            encode(redirect_uri),
            encode(&self.settings.scopes.join(" ")),
        );
        let cookie = format!(
            "{LOGIN_COOKIE}={}; Path=/auth; Max-Age={LOGIN_SECS}; HttpOnly; Secure; SameSite=Lax",
            self.sign(&login)
        );
        Ok((location, cookie))
    }

    /// The callback: checks the state against the sign-in's cookie, exchanges the code (with
    /// the PKCE verifier) and verifies the ID token. The session's cookie and where to go.
    ///
    /// # Errors
    /// Why the sign-in failed.
    pub async fn callback(
        &self,
        cookies: &str,
        code: &str,
        state: &str,
        redirect_uri: &str,
    ) -> Result<(Session, String, String), String> {
        let login: Login = cookie(cookies, LOGIN_COOKIE)
            .and_then(|c| self.open(c))
            .ok_or("no sign-in in progress in this browser (or it was tampered with)")?;
        if login.expires < Utc::now().timestamp() {
            return Err("the sign-in took too long; sign in again".into());
        }
        if login.state != state {
            return Err("the state does not match this browser's sign-in".into());
        }
        let d = self.discovery().await?;
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&client_id={}&code_verifier={}",
            encode(code),
            encode(redirect_uri),
            encode(&self.settings.client_id),
            encode(&login.verifier)
        );
        let mut req = self
            .http
            .post(&d.token_endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json");
        if let Some(secret) = &self.client_secret {
            let basic = STANDARD.encode(format!(
                "{}:{}",
                encode(&self.settings.client_id),
                encode(secret)
            ));
            req = req.header("authorization", format!("Basic {basic}"));
        }
        let r = req
            .body(form)
            .send()
            .await
            .map_err(|e| format!("the token endpoint: {e}"))?;
        let status = r.status();
        let body = r
            .bytes()
            .await
            .map_err(|e| format!("the token endpoint: {e}"))?;
        let tokens: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!(
                "the token endpoint answered {status}: {}",
                tokens["error_description"]
                    .as_str()
                    .or(tokens["error"].as_str())
                    .unwrap_or("")
            ));
        }
        let id_token = tokens["id_token"]
            .as_str()
            .ok_or("the token endpoint gave no id_token")?;
        let who = self
            .verify(
                id_token,
                std::slice::from_ref(&self.settings.client_id),
                Some(&login.nonce),
            )
            .await?;
        let session = Session {
            name: who.name,
            groups: who.groups,
            csrf: random_token(),
            expires: Utc::now().timestamp() + self.settings.session_secs as i64,
        };
        let cookie = format!(
            "{SESSION_COOKIE}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.sign(&session),
            self.settings.session_secs
        );
        // Browsers drop a cookie over 4 KiB without a word; say so instead.
        if cookie.len() > 4000 {
            return Err(format!(
                "{} has {} groups, too many for a session cookie: name fewer in the groups claim",
                session.name,
                session.groups.len()
            ));
        }
        Ok((session, cookie, login.return_to))
    }

    /// The request's signed-in session, if it has a valid one.
    pub fn session(&self, cookies: &str) -> Option<Session> {
        let s: Session = self.open(cookie(cookies, SESSION_COOKIE)?)?;
        (s.expires > Utc::now().timestamp()).then_some(s)
    }
}

/// The cookie that ends a session (or a sign-in).
pub fn cleared(name: &str) -> String {
    let path = if name == LOGIN_COOKIE { "/auth" } else { "/" };
    format!("{name}=; Path={path}; Max-Age=0; HttpOnly; Secure; SameSite=Lax")
}

pub fn login_cookie_name() -> &'static str {
    LOGIN_COOKIE
}

/// A cookie's value from a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A path of this gateway to return to after signing in (never another site): `/` and then
/// only the characters of a path and query, so no browser can read it as `//host`.
fn safe_return(r: &str) -> String {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"/-._~%?=&+:@!$'()*,;".contains(&b);
    if r.starts_with('/') && !r.starts_with("//") && r.bytes().all(allowed) {
        r.to_string()
    } else {
        "/".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OidcSettings {
        serde_json::from_value(serde_json::json!({"issuer": "http://idp", "client_id": "slipway"}))
            .unwrap()
    }

    #[test]
    fn sessions_are_signed_and_expire() {
        let o = Oidc::new(settings(), Some("seed")).unwrap();
        let s = Session {
            name: "bob".into(),
            groups: vec!["release-managers".into()],
            csrf: "c".into(),
            expires: Utc::now().timestamp() + 60,
        };
        let signed = o.sign(&s);
        let header = format!("a=b; {SESSION_COOKIE}={signed}; c=d");
        assert_eq!(o.session(&header), Some(s.clone()));
        // Another key (another gateway secret) does not accept it; nor a changed payload.
        let other = Oidc::new(settings(), Some("other seed")).unwrap();
        assert_eq!(other.session(&header), None);
        let forged = o.sign(&Session {
            name: "mallory".into(),
            ..s.clone()
        });
        let (_, tag) = signed.split_once('.').unwrap();
        let (payload, _) = forged.split_once('.').unwrap();
        assert_eq!(
            o.session(&format!("{SESSION_COOKIE}={payload}.{tag}")),
            None
        );
        let old = o.sign(&Session {
            expires: Utc::now().timestamp() - 1,
            ..s
        });
        assert_eq!(o.session(&format!("{SESSION_COOKIE}={old}")), None);
    }

    #[test]
    fn returns_stay_on_this_gateway_and_claims_are_found_by_path() {
        assert_eq!(safe_return("/runs/x?y=1"), "/runs/x?y=1");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "evil",
            "/\t/evil.example",
            "/\r\nx",
        ] {
            assert_eq!(safe_return(bad), "/");
        }
        let c = serde_json::json!({"realm_access": {"roles": ["a"]}, "x.y": 1});
        assert_eq!(claim(&c, "realm_access.roles").unwrap()[0], "a");
        assert_eq!(claim(&c, "x.y").unwrap(), 1);
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
