//! API keys (`Authorization: Bearer`, compared in constant time) and CORS.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use super::error::ApiError;
use super::AppState;

/// Whether `presented` equals one of `keys`. Both sides are hashed first so that the
/// comparison takes the same time whatever the lengths, and every key is compared.
pub fn key_matches(keys: &[String], presented: &str) -> bool {
    let presented = Sha256::digest(presented.as_bytes());
    keys.iter().fold(false, |found, key| {
        let key = Sha256::digest(key.as_bytes());
        found | bool::from(key.ct_eq(&presented))
    })
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 §11.1), so `bearer` and `BEARER` work as clients send them.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.0.config.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(token) if key_matches(keys, token) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Checks `--allowed-origins`: each `*` or an origin (`scheme://host[:port]`, no path), so a
/// typo fails at start-up instead of silently allowing nothing.
pub fn check_origins(origins: &[String]) -> Result<(), String> {
    for o in origins {
        if o == "*" {
            continue;
        }
        let rest = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"));
        let ok = rest.is_some_and(|host| {
            !host.is_empty()
                && !host.contains(['/', '?', '#', ' '])
                && HeaderValue::from_str(o).is_ok()
        });
        if !ok {
            return Err(format!(
                "--allowed-origins: {o:?} is not an origin (scheme://host[:port], or *)"
            ));
        }
    }
    Ok(())
}

/// CORS for the given origins ("*" allows any); None when no origin is configured.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, check_origins, key_matches};

    #[test]
    fn origins_are_checked() {
        let ok = |o: &[&str]| check_origins(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["*"]).is_ok());
        assert!(ok(&["https://app.example.com", "http://localhost:3000"]).is_ok());
        for bad in [
            "app.example.com",
            "https://a.com/",
            "https://",
            "ftp://a.com",
            "http://a b",
        ] {
            assert!(ok(&["*", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k1", "bearer k1", "BEARER  k1 ", " Bearer k1"] {
            assert_eq!(bearer_token(v), Some("k1"), "{v:?}");
        }
        for v in ["Basic k1", "Bearerk1", "Bearer ", "k1", ""] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn keys() {
        let keys = vec!["secret-1".to_string(), "secret-2".to_string()];
        assert!(key_matches(&keys, "secret-1"));
        assert!(key_matches(&keys, "secret-2"));
        assert!(!key_matches(&keys, "secret-3"));
        assert!(!key_matches(&keys, "secret-"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "secret-1"));
    }
}
