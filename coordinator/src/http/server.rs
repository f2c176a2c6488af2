//! The HTTP server under the router: connections from [`crate::listen`] (limits, TLS)
//! served by hyper (HTTP/1.1 and HTTP/2, header size and count limits, header read
//! timeout), graceful shutdown, and [`read_body`], which bounds what a client may upload
//! and how slowly.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::service::Service;

/// Serves the HTTP API (HTTP/1.1 and HTTP/2, TLS when configured) on `listener` until
/// `shutdown`, then waits for the connections to finish what they serve. Connections come
/// from [`crate::listen`]; hyper enforces the header limits and the header read timeout.
pub async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;

    let limits = service.config.server.clone();
    let tls = service.config.tls.clone();
    let app = super::router(service);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let mut conns = crate::listen::incoming(listener, tls, limits.conn(), "http", shutdown.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = conns.next() => match next {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let remote = conn.remote_addr();
        let hyper_service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), hyper_service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(conns);
    graceful.shutdown().await;
    Ok(())
}

/// Reads the request body before the handler sees it: over `--max-body-bytes` gets 413
/// after reading (and dropping) up to `--body-drain-bytes` more, so a client that is
/// still uploading reads the answer instead of a reset; a body slower than
/// `--body-read-timeout-s` gets 408.
pub(super) async fn read_body(
    State(service): State<Service>,
    request: Request,
    next: Next,
) -> Response {
    use futures::StreamExt;
    let limit = service.config.max_body_bytes;
    let limits = &service.config.server;
    let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    let too_large = |drained: bool| {
        let mut response = ApiError::TooLarge { limit }.into_response();
        if !drained {
            // The rest of the upload is not read: this connection cannot carry another
            // request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    };
    let drain = |mut stream: axum::body::BodyDataStream, mut seen: usize| async move {
        let cap = limit.saturating_add(limits.body_drain_bytes);
        while seen <= cap {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(chunk))) => seen += chunk.len(),
                Ok(None) => return true,
                _ => return false,
            }
        }
        false
    };
    if let Some(n) = declared
        && n > limit as u64
    {
        if n > (limit as u64).saturating_add(limits.body_drain_bytes as u64) {
            return too_large(false);
        }
        let drained = drain(stream, 0).await;
        return too_large(drained);
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                let error = ApiError::invalid(
                    "body",
                    format!(
                        "the request body did not arrive within {} s (--body-read-timeout-s)",
                        limits.body_read_timeout.as_secs_f64()
                    ),
                );
                let mut response =
                    (StatusCode::REQUEST_TIMEOUT, axum::Json(error.to_body())).into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return ApiError::Invalid {
                    param: None,
                    message: format!("cannot read the request body: {e}"),
                }
                .into_response();
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    let seen = buf.len() + chunk.len();
                    drop(buf);
                    let drained = drain(stream, seen).await;
                    return too_large(drained);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    if let Err(depth) = check_depth(&buf, limits.max_json_depth) {
        return ApiError::Invalid {
            param: None,
            message: format!(
                "the request body nests arrays and objects {depth} deep; at most {} (--max-json-depth)",
                limits.max_json_depth
            ),
        }
        .into_response();
    }
    let request = Request::from_parts(parts, axum::body::Body::from(buf));
    next.run(request).await
}

/// How deep `body` nests JSON arrays and objects, counted without parsing (brackets in
/// strings do not count): `Err(depth)` as soon as it passes `max`. Malformed JSON is the
/// parser's to report.
pub fn check_depth(body: &[u8], max: usize) -> Result<(), usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(depth);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_depth;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(check_depth(br#"{"a":[1,{"b":2}]}"#, 3), Ok(()));
        assert_eq!(check_depth(br#"{"a":[1,{"b":2}]}"#, 2), Err(3));
        assert_eq!(check_depth(br#"{"a":"[[[[\"{{{{"}"#, 1), Ok(()));
        assert_eq!(check_depth(&[b'['; 10_000], 32), Err(33));
    }
}
