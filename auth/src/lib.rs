//! `godwit-auth`: who may read what Godwit's daemons serve, decided by the
//! Kubernetes API server.
//!
//! - [`Delegated`] authenticates a bearer token with a `TokenReview` and
//!   authorizes the user it names with a `SubjectAccessReview`, as
//!   kube-rbac-proxy and every aggregated API server do, with a short cache
//!   so that a scrape every few seconds costs no API call.
//! - [`serve_metrics`] serves `/metrics` behind it and `/healthz` (open:
//!   kubelet's probes carry no token), for the operator and the node daemon.
//!
//! A Prometheus that scrapes Godwit needs a token (its service account's) and
//! RBAC `get` on the non-resource URL `/metrics` (the chart's
//! `godwit-metrics-reader` ClusterRole).

mod delegated;
mod metrics;

pub use delegated::{Delegated, Refusal};
pub use metrics::{serve_metrics, Render};
