//! The request API: apps POST an image (binary PGM) to `/infer` (optionally `?id=…`) and get
//! the worker's answer as JSON, the same object `results.jsonl` records. Loopback unless the
//! worker is told otherwise; bodies are capped.

use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};

use crate::input::{Sample, decode_pgm};

/// The largest image accepted.
pub(crate) const MAX_BODY: usize = 16 << 20;

fn reply(status: StatusCode, body: String) -> Response<Full<bytes::Bytes>> {
    let mut response = Response::new(Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    samples: mpsc::Sender<Sample>,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<bytes::Bytes>>, std::convert::Infallible> {
    let error = |status: StatusCode, message: String| {
        Ok(reply(
            status,
            serde_json::json!({"error": message}).to_string(),
        ))
    };
    if request.uri().path() != "/infer" {
        return error(
            StatusCode::NOT_FOUND,
            "use POST /infer with a PGM image".into(),
        );
    }
    if request.method() != hyper::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST".into());
    }
    let id = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
        .filter(|id| !id.is_empty() && id.len() <= 256)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "request-{:08}",
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        });
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
    };
    let image = match decode_pgm(&body) {
        Ok(image) => image,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (tx, rx) = oneshot::channel();
    if samples
        .send(Sample {
            id,
            image: Ok(image),
            reply: Some(tx),
        })
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is stopping".into(),
        );
    }
    match rx.await {
        Ok(answer) if answer.get("error").is_some() => {
            Ok(reply(StatusCode::UNPROCESSABLE_ENTITY, answer.to_string()))
        }
        Ok(answer) => Ok(reply(StatusCode::OK, answer.to_string())),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is stopping".into(),
        ),
    }
}

/// Serves the request API until the worker stops.
pub(crate) async fn serve(listener: tokio::net::TcpListener, samples: mpsc::Sender<Sample>) {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (samples, counter) = (samples.clone(), counter.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(samples.clone(), counter.clone(), request)
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}
