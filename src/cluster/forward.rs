//! HTTP/1.1 request forwarding with protocol-upgrade passthrough, as the API server does towards a node agent and
//! the node agent towards the CRI runtime's streaming server.
//!
//! A plain answer (e.g. a log stream) is relayed as it arrives. A `101 Switching Protocols` answer is relayed to the
//! client and both upgraded connections are then spliced byte for byte, so WebSocket and SPDY sessions (and the
//! SPDY-in-WebSocket tunnel of port-forward) pass through untouched.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::streaming::BoxConnection;

pub type ProxyBody = BoxBody<Bytes, io::Error>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a forwarded request goes.
#[derive(Clone)]
pub struct Upstream {
    /// `host:port`, `[v6]:port` or `ip:port`.
    pub authority: String,
    /// TLS client settings and the name the server certificate must carry; None for plain HTTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connecting to {authority}: {source}")]
    Connect { authority: String, source: io::Error },
    #[error("TLS with {authority}: {source}")]
    Tls { authority: String, source: io::Error },
    #[error("HTTP exchange with {authority}: {source}")]
    Http { authority: String, source: hyper::Error },
    #[error("{authority} switched protocols on a request that asked for no upgrade")]
    UnaskedUpgrade { authority: String },
}

/// Headers that describe one hop only. `Connection` and `Upgrade` are kept for upgrade requests.
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Sends `req` to `upstream` at `path_and_query` and relays the answer; upgrades are spliced in a background task.
///
/// The client's `Host` and `Authorization` headers are dropped; `authorization` replaces the latter when given.
pub async fn forward(
    mut req: Request<Incoming>,
    upstream: &Upstream,
    path_and_query: &str,
    authorization: Option<&str>,
) -> Result<Response<ProxyBody>, ForwardError> {
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();

    let mut out = Request::builder()
        .method(parts.method)
        .uri(path_and_query)
        .body(body.map_err(io::Error::other).boxed())
        .expect("method and path come from a parsed request");
    let headers = out.headers_mut();
    for (name, value) in parts.headers.iter() {
        let keep = !(name == header::HOST
            || name == header::AUTHORIZATION
            || HOP_BY_HOP.contains(&name.as_str())
            || (!upgrade && (name == header::CONNECTION || name == header::UPGRADE)));
        if keep {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(host) = HeaderValue::from_str(&upstream.authority) {
        headers.insert(header::HOST, host);
    }
    if let Some(auth) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(header::AUTHORIZATION, auth);
    }

    let stream = connect(upstream).await?;
    let http_err = |source| ForwardError::Http {
        authority: upstream.authority.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, ProxyBody>(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "forwarded connection ended with an error");
        }
    });
    let mut resp = sender.send_request(out).await.map_err(http_err)?;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ForwardError::UnaskedUpgrade {
                authority: upstream.authority.clone(),
            });
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(e) => return tracing::debug!(error = %e, "upgrade of a forwarded connection failed"),
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        });
        let (parts, _) = resp.into_parts();
        let body = Empty::new().map_err(|never| match never {}).boxed();
        return Ok(Response::from_parts(parts, body));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.map_err(io::Error::other).boxed()))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP.iter().chain(&["connection", "upgrade"]) {
        headers.remove(HeaderName::from_static(name));
    }
}

async fn connect(upstream: &Upstream) -> Result<BoxConnection, ForwardError> {
    let connect_err = |source| ForwardError::Connect {
        authority: upstream.authority.clone(),
        source,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&upstream.authority))
        .await
        .map_err(|_| connect_err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
        .map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    let Some((config, name)) = &upstream.tls else {
        return Ok(Box::new(tcp));
    };
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name.clone(), tcp)
        .await
        .map_err(|source| ForwardError::Tls {
            authority: upstream.authority.clone(),
            source,
        })?;
    Ok(Box::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(is_upgrade(&h));
    }
}
