//! A small OpenID Connect provider for tests: discovery, a JWKS with an RSA (RS256) and a P-256
//! (ES256) key of its own (generated per provider; keys can be rotated), the authorization
//! endpoint (a sign-in form with a button per user, or straight through with `login_hint`), and
//! the token endpoint (authorization code with PKCE S256, client secret by HTTP Basic). It also
//! mints tokens with chosen defects, for the gateway's refusals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// A signing key and the id it is published under.
struct SigningKey {
    kid: String,
    key: Kind,
}

enum Kind {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl SigningKey {
    fn alg(&self) -> &'static str {
        match self.key {
            Kind::Rsa(_) => "RS256",
            Kind::Ec(_) => "ES256",
        }
    }

    fn jwk(&self) -> Value {
        match &self.key {
            Kind::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
            }
            Kind::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "kid": self.kid, "use": "sig", "alg": "ES256", "crv": "P-256",
                       "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
            }
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            Kind::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .expect("signs");
                sig
            }
            Kind::Ec(k) => k.sign(&rng, msg).expect("signs").as_ref().to_vec(),
        }
    }
}

fn rsa_key(kid: &str) -> SigningKey {
    // ring verifies and signs RSA but does not generate keys: openssl does.
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ])
        .output()
        .expect("openssl (from Debian's openssl package) generates the test provider's RSA key");
    assert!(out.status.success(), "openssl genpkey failed");
    SigningKey {
        kid: kid.into(),
        key: Kind::Rsa(RsaKeyPair::from_der(&out.stdout).expect("an RSAPrivateKey (DER)")),
    }
}

fn ec_key(kid: &str) -> SigningKey {
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generates");
    SigningKey {
        kid: kid.into(),
        key: Kind::Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("parses")),
    }
}

struct Pending {
    client_id: String,
    redirect_uri: String,
    nonce: Option<String>,
    challenge: String,
    user: String,
}

struct Inner {
    issuer: String,
    client_id: String,
    client_secret: String,
    users: HashMap<String, Vec<String>>,
    keys: Vec<SigningKey>,
    codes: HashMap<String, Pending>,
    /// Every token request's form, for tests that check what the gateway sent.
    token_requests: Vec<HashMap<String, String>>,
    jwks_fetches: usize,
}

/// A running provider.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Mutex<Inner>>,
    pub issuer: String,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// A defect to build into a minted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    None,
    /// Signed by a key the provider never published, under a published key id.
    WrongSignature,
    /// A key id the JWKS does not have.
    UnknownKid,
    Expired,
    WrongAudience,
    WrongIssuer,
    /// `alg: none`, no signature.
    AlgNone,
}

fn decode_form(s: &str) -> HashMap<String, String> {
    let dec = |x: &str| {
        let x = x.replace('+', " ");
        let bytes = x.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Ok(b) = u8::from_str_radix(&x[i + 1..i + 3], 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (dec(k), dec(v)))
        .collect()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn random() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

impl Provider {
    /// Starts a provider on a free loopback port, for `client_id` (whose secret is
    /// `client_secret`), with these users and their groups.
    pub async fn start(client_id: &str, client_secret: &str, users: &[(&str, &[&str])]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            issuer: issuer.clone(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            users: users
                .iter()
                .map(|(u, g)| (u.to_string(), g.iter().map(|x| x.to_string()).collect()))
                .collect(),
            keys: vec![rsa_key("rsa-1"), ec_key("ec-1")],
            codes: HashMap::new(),
            token_requests: Vec::new(),
            jwks_fetches: 0,
        }));
        let p = Provider {
            inner: inner.clone(),
            issuer,
        };
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/authorize/approve", post(approve))
            .route("/token", post(token))
            .with_state(p.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        p
    }

    /// Replaces the published keys with new ones (new key ids), as a rotation does.
    pub fn rotate(&self) {
        let mut i = self.inner.lock().unwrap();
        let n = i.keys.len() + 1;
        i.keys = vec![ec_key(&format!("ec-{n}")), rsa_key(&format!("rsa-{n}"))];
    }

    pub fn jwks_fetches(&self) -> usize {
        self.inner.lock().unwrap().jwks_fetches
    }

    pub fn token_requests(&self) -> Vec<HashMap<String, String>> {
        self.inner.lock().unwrap().token_requests.clone()
    }

    /// A token for `user` (their groups), addressed to `aud`, signed with the first key of
    /// algorithm `alg` (`RS256` or `ES256`), with `defect` built in.
    pub fn mint(&self, user: &str, aud: &str, alg: &str, defect: Defect) -> String {
        let i = self.inner.lock().unwrap();
        let groups = i.users.get(user).cloned().unwrap_or_default();
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": if defect == Defect::WrongIssuer { "http://elsewhere.example".to_string() } else { i.issuer.clone() },
            "sub": format!("sub-{user}"),
            "aud": if defect == Defect::WrongAudience { "someone-else".to_string() } else { aud.to_string() },
            "exp": if defect == Defect::Expired { now - 3600 } else { now + 600 },
            "iat": now,
            "preferred_username": user,
            "groups": groups,
        });
        let key = i
            .keys
            .iter()
            .find(|k| k.alg() == alg)
            .expect("a key of that alg");
        sign_claims(key, &claims, defect)
    }
}

fn sign_claims(key: &SigningKey, claims: &Value, defect: Defect) -> String {
    let kid = if defect == Defect::UnknownKid {
        "never-published".to_string()
    } else {
        key.kid.clone()
    };
    let alg = if defect == Defect::AlgNone {
        "none"
    } else {
        key.alg()
    };
    let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = match defect {
        Defect::AlgNone => Vec::new(),
        Defect::WrongSignature => {
            let other = match key.key {
                Kind::Rsa(_) => rsa_key(&key.kid),
                Kind::Ec(_) => ec_key(&key.kid),
            };
            other.sign(signing_input.as_bytes())
        }
        _ => key.sign(signing_input.as_bytes()),
    };
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

async fn discovery(State(p): State<Provider>) -> impl IntoResponse {
    let iss = p.issuer.clone();
    axum::Json(json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/authorize"),
        "token_endpoint": format!("{iss}/token"),
        "jwks_uri": format!("{iss}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
    }))
}

async fn jwks(State(p): State<Provider>) -> impl IntoResponse {
    let mut i = p.inner.lock().unwrap();
    i.jwks_fetches += 1;
    let keys: Vec<Value> = i.keys.iter().map(SigningKey::jwk).collect();
    axum::Json(json!({ "keys": keys }))
}

fn error(status: StatusCode, e: &str, d: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": e, "error_description": d})),
    )
        .into_response()
}

/// The authorization endpoint: checks the client and its redirect, then signs `login_hint` in
/// at once or shows a form with a button per user.
async fn authorize(
    State(p): State<Provider>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let i = p.inner.lock().unwrap();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != i.client_id {
        return error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "unknown client_id",
        );
    }
    if get("response_type") != "code"
        || get("code_challenge_method") != "S256"
        || get("code_challenge").is_empty()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "code flow with PKCE S256 only",
        );
    }
    let hidden: String = [
        "redirect_uri",
        "state",
        "nonce",
        "code_challenge",
        "client_id",
    ]
    .iter()
    .map(|k| {
        format!(
            "<input type=hidden name={k} value=\"{}\">",
            get(k).replace('"', "&quot;")
        )
    })
    .collect();
    drop(i);
    if let Some(user) = q.get("login_hint") {
        let mut form: HashMap<String, String> = q.clone();
        form.insert("user".into(), user.clone());
        return issue_code(&p, &form);
    }
    let users: Vec<String> = p.inner.lock().unwrap().users.keys().cloned().collect();
    let buttons: String = users
        .iter()
        .map(|u| format!("<button type=submit name=user value=\"{u}\" id=\"login-{u}\">Sign in as {u}</button>"))
        .collect();
    Html(format!(
        "<!doctype html><title>Test identity provider</title><h1>Sign in</h1>\
         <form method=post action=\"/authorize/approve\">{hidden}{buttons}</form>"
    ))
    .into_response()
}

async fn approve(State(p): State<Provider>, body: String) -> Response {
    issue_code(&p, &decode_form(&body))
}

fn issue_code(p: &Provider, form: &HashMap<String, String>) -> Response {
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let mut i = p.inner.lock().unwrap();
    let user = get("user");
    if !i.users.contains_key(&user) {
        return error(StatusCode::BAD_REQUEST, "access_denied", "unknown user");
    }
    let code = random();
    i.codes.insert(
        code.clone(),
        Pending {
            client_id: get("client_id"),
            redirect_uri: get("redirect_uri"),
            nonce: form.get("nonce").cloned(),
            challenge: get("code_challenge"),
            user,
        },
    );
    let location = format!(
        "{}?code={}&state={}",
        get("redirect_uri"),
        enc(&code),
        enc(&get("state"))
    );
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

/// The token endpoint: the code once, for its client, redirect and PKCE verifier.
async fn token(State(p): State<Provider>, headers: HeaderMap, body: String) -> Response {
    let form = decode_form(&body);
    let mut i = p.inner.lock().unwrap();
    i.token_requests.push(form.clone());
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", i.client_id, i.client_secret))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(basic.as_str())
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    if get("grant_type") != "authorization_code" {
        return error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "");
    }
    let Some(pending) = i.codes.remove(&get("code")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown or used code",
        );
    };
    if pending.redirect_uri != get("redirect_uri") || pending.client_id != get("client_id") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri or client_id mismatch",
        );
    }
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        get("code_verifier").as_bytes(),
    ));
    if challenge != pending.challenge {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "PKCE verification failed",
        );
    }
    let now = chrono::Utc::now().timestamp();
    let groups = i.users[&pending.user].clone();
    let mut claims = json!({
        "iss": i.issuer, "sub": format!("sub-{}", pending.user), "aud": i.client_id,
        "exp": now + 600, "iat": now, "preferred_username": pending.user, "groups": groups,
    });
    if let Some(n) = &pending.nonce {
        claims["nonce"] = json!(n);
    }
    let id_token = sign_claims(&i.keys[0], &claims, Defect::None);
    axum::Json(json!({
        "access_token": id_token.clone(), "id_token": id_token, "token_type": "Bearer", "expires_in": 600
    }))
    .into_response()
}
