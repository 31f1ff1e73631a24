//! Bearer token to user (`TokenReview`), user to decision
//! (`SubjectAccessReview`), with a cache of recent decisions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// How long an allowed decision is reused (kube-rbac-proxy keeps them 5 min;
/// a shorter time makes a removed RoleBinding take effect sooner).
const ALLOWED_TTL: Duration = Duration::from_secs(60);
/// How long a refusal is reused, so that a client retrying with a bad token
/// does not turn each try into two API calls.
const DENIED_TTL: Duration = Duration::from_secs(10);
/// Decisions kept at most; the cache is emptied when it is full.
const CACHE_ENTRIES: usize = 1024;

/// Why a request is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token, or one the API server does not accept: `401`.
    Unauthenticated(String),
    /// The user may not do this: `403`.
    Forbidden(String),
    /// The API server could not be asked: `503` (not cached).
    Unavailable(String),
}

impl Refusal {
    /// The HTTP status code for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unauthenticated(_) => 401,
            Refusal::Forbidden(_) => 403,
            Refusal::Unavailable(_) => 503,
        }
    }

    /// What the client is told, with what to do about it.
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthenticated(m) | Refusal::Forbidden(m) | Refusal::Unavailable(m) => m,
        }
    }
}

type Decision = Result<String, Refusal>;

/// Token, path and verb of a decision.
type CacheKey = (String, String, String);

/// Delegated authentication and authorization for non-resource paths.
pub struct Delegated {
    client: Client,
    cache: Mutex<HashMap<CacheKey, (Instant, Decision)>>,
}

impl Delegated {
    /// Asks the API server that `client` talks to.
    pub fn new(client: Client) -> Self {
        Delegated {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The user that `authorization` (an HTTP `Authorization` header value)
    /// names, if it may `verb` the non-resource URL `path`.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        path: &str,
        verb: &str,
    ) -> Result<String, Refusal> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!(
                    "{path} needs a bearer token (a service account's) whose user has RBAC \
                     `get` on the non-resource URL {path}, e.g. the godwit-metrics-reader \
                     ClusterRole"
                ))
            })?;
        let key = (token.to_string(), path.to_string(), verb.to_string());
        if let Some((at, decision)) = self.cache.lock().expect("auth cache").get(&key) {
            let ttl = if decision.is_ok() {
                ALLOWED_TTL
            } else {
                DENIED_TTL
            };
            if at.elapsed() < ttl {
                return decision.clone();
            }
        }
        let decision = self.decide(token, path, verb).await;
        if !matches!(decision, Err(Refusal::Unavailable(_))) {
            let mut cache = self.cache.lock().expect("auth cache");
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), decision.clone()));
        }
        decision
    }

    async fn decide(&self, token: &str, path: &str, verb: &str) -> Decision {
        let unavailable = |what: &str, e: kube::Error| {
            Refusal::Unavailable(format!(
                "could not ask the Kubernetes API server ({what}): {e}; the daemon's service \
                 account needs `create` on {what}"
            ))
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let review = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("tokenreviews.authentication.k8s.io", e))?;
        let status = review.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                return Err(Refusal::Unauthenticated(format!(
                    "the bearer token was not accepted by the API server{}",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                )))
            }
        };
        let name = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let access = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(|e| unavailable("subjectaccessreviews.authorization.k8s.io", e))?;
        match access.status {
            Some(s) if s.allowed => Ok(name),
            s => Err(Refusal::Forbidden(format!(
                "user {name:?} may not {verb} {path}{}: grant it with a ClusterRoleBinding \
                 to the godwit-metrics-reader ClusterRole",
                s.and_then(|s| s.reason)
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ))),
        }
    }
}
