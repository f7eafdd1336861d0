//! The dashboard's assets: `web/app.css` and `web/app.js`, embedded in the binary and served
//! at `/assets/<stem>.<hash>.<ext>`, the hash being the first 12 hex digits of the file's
//! SHA-256. A hashed name never changes meaning, so it is cached for a year (`immutable`); a
//! new binary with other assets links other names.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

#[derive(rust_embed::RustEmbed)]
#[folder = "web/"]
struct Files;

/// One embedded asset.
pub struct Asset {
    /// `app.css`
    pub name: &'static str,
    /// `app.0123456789ab.css`
    pub hashed: String,
    pub data: Vec<u8>,
    pub mime: &'static str,
}

/// The files the pages link (nothing else in `web/` is served).
const SERVED: [(&str, &str); 2] = [
    ("app.css", "text/css; charset=utf-8"),
    ("app.js", "text/javascript; charset=utf-8"),
];

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    SERVED
        .iter()
        .map(|(name, mime)| {
            let data = Files::get(name)
                .unwrap_or_else(|| panic!("web/{name} is embedded"))
                .data
                .into_owned();
            let hash = hex::encode(&Sha256::digest(&data)[..6]);
            let (stem, ext) = name
                .rsplit_once('.')
                .expect("asset names have an extension");
            Asset {
                name,
                hashed: format!("{stem}.{hash}.{ext}"),
                data,
                mime,
            }
        })
        .collect()
});

/// Every served asset.
pub fn all() -> &'static [Asset] {
    &ASSETS
}

/// The URL of asset `name` (`/assets/app.<hash>.css`).
pub fn url(name: &str) -> String {
    let a = ASSETS
        .iter()
        .find(|a| a.name == name)
        .expect("only embedded assets are linked");
    format!("/assets/{}", a.hashed)
}

/// `GET /assets/{file}`: an asset by its hashed name.
pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.hashed == file) else {
        return super::not_found_page();
    };
    let etag = format!("\"{}\"", a.hashed);
    let cached = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        ),
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("hex etag"),
        ),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return (StatusCode::NOT_MODIFIED, cached).into_response();
    }
    (
        cached,
        [(header::CONTENT_TYPE, HeaderValue::from_static(a.mime))],
        a.data.clone(),
    )
        .into_response()
}
