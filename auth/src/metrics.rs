//! The HTTP endpoint both daemons serve: `/metrics` behind [`Delegated`],
//! `/healthz` open, on hyper (HTTP/1.1 with keep-alive).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::delegated::Delegated;

/// Renders the metrics text (OpenMetrics). It may block (reading `/proc`):
/// it runs on Tokio's blocking pool.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` (for users `auth` allows) and `/healthz` on `listener`
/// until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, auth: Arc<Delegated>, render: Render) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (auth, render) = (auth.clone(), render.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (auth, render) = (auth.clone(), render.clone());
                async move { Ok::<_, Infallible>(respond(request, &auth, render).await) }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    auth: &Delegated,
    render: Render,
) -> Response<Full<Bytes>> {
    let text = |status: u16, body: String| {
        Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if request.method() != Method::GET {
        return text(405, "GET only\n".into());
    }
    match request.uri().path() {
        "/healthz" => text(200, "ok\n".into()),
        "/metrics" => {
            let authorization = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if let Err(refusal) = auth.authorize(authorization, "/metrics", "get").await {
                tracing::debug!(
                    status = refusal.status(),
                    "metrics refused: {}",
                    refusal.message()
                );
                let mut response = text(refusal.status(), format!("{}\n", refusal.message()));
                if refusal.status() == 401 {
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                }
                return response;
            }
            let body = tokio::task::spawn_blocking(move || render())
                .await
                .unwrap_or_default();
            Response::builder()
                .header(header::CONTENT_TYPE, OPENMETRICS)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts")
        }
        _ => text(
            404,
            "not found: this endpoint serves /metrics and /healthz\n".into(),
        ),
    }
}
