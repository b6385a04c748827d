//! External authentication (`then.auth`): before a request is queued, the
//! front asks an auth service, the way THR's users did.
//!
//! The service gets a GET with the named request fields plus
//! `X-Original-Method`, `X-Original-URI` and `X-Real-IP`. A 2xx lets the
//! request go on, with the named fields of the answer copied onto it (so that
//! quotas can key on `X-User`); a 401 or 403 is returned to the client as it
//! is; anything else — refused, timed out, 5xx — is a 503, never a silent
//! pass. Answers are cached per forwarded values for `cache`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use thr_core::headers::strip_hop_by_hop;
use thr_core::rules::{AuthSpec, RuleRequest};

/// Most cached answers kept; beyond it the cache is pruned.
const CACHE_CAP: usize = 10_000;

/// What the auth service said.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Go on, with these fields set on the request.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// Refused: answer the client with this.
    Deny {
        /// 401 or 403.
        status: StatusCode,
        /// The service's response fields.
        headers: HeaderMap,
        /// The service's body.
        body: Bytes,
    },
}

/// The auth service could not give a verdict.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Client and cache for every auth service the rules name.
pub struct AuthClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl Default for AuthClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        AuthClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl AuthClient {
    /// Asks the service of `spec` about `req` (or answers from the cache).
    pub async fn check(&self, spec: &AuthSpec, req: &RuleRequest) -> Result<Verdict, Unavailable> {
        let key = cache_key(spec, req);
        if !spec.cache.is_zero()
            && let Some((at, verdict)) = self.lock().get(&key)
            && at.elapsed() < spec.cache
        {
            return Ok(verdict.clone());
        }
        let verdict = tokio::time::timeout(spec.timeout, self.ask(spec, req))
            .await
            .map_err(|_| {
                Unavailable(format!(
                    "no answer from {} within {:?}",
                    spec.url, spec.timeout
                ))
            })??;
        if !spec.cache.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= CACHE_CAP {
                cache.retain(|_, (at, _)| at.elapsed() < spec.cache);
                if cache.len() >= CACHE_CAP {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), verdict.clone()));
        }
        Ok(verdict)
    }

    async fn ask(&self, spec: &AuthSpec, req: &RuleRequest) -> Result<Verdict, Unavailable> {
        let mut builder = Request::builder().method("GET").uri(spec.url.clone());
        for name in &spec.forward_headers {
            for value in req.headers.get_all(name) {
                builder = builder.header(name, value);
            }
        }
        builder = builder
            .header("x-original-method", req.method.as_str())
            .header("x-original-uri", req.target.as_str());
        if let Some(ip) = req.real_ip {
            builder = builder.header("x-real-ip", ip.to_string());
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| Unavailable(format!("cannot build the auth request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| Unavailable(format!("auth service {} unreachable: {e}", spec.url)))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Unavailable(format!("auth service {}: {e}", spec.url)))?
            .to_bytes();
        match parts.status {
            s if s.is_success() => Ok(Verdict::Allow(
                spec.copy_headers
                    .iter()
                    .flat_map(|name| {
                        parts
                            .headers
                            .get_all(name)
                            .iter()
                            .map(move |v| (name.clone(), v.clone()))
                    })
                    .collect(),
            )),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                let mut headers = parts.headers;
                strip_hop_by_hop(&mut headers);
                Ok(Verdict::Deny {
                    status: s,
                    headers,
                    body,
                })
            }
            s => Err(Unavailable(format!(
                "auth service {} answered {s}",
                spec.url
            ))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Verdict)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The service and the forwarded values: two requests with the same
/// credentials get the same verdict.
fn cache_key(spec: &AuthSpec, req: &RuleRequest) -> String {
    let mut key = spec.url.to_string();
    for name in &spec.forward_headers {
        key.push('\n');
        key.push_str(name.as_str());
        for value in req.headers.get_all(name) {
            key.push('\0');
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}
