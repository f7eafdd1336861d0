//! The page layout and small rendering helpers. maud escapes every `(value)` it
//! interpolates; nothing here uses `PreEscaped` on data.

use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::session::Session;
use crate::registry::now_ms;

/// Which navigation entry is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Apps,
    Nodes,
    Events,
    Account,
    None,
}

/// A whole page: head with the hashed assets, navigation (when logged in), `main`.
/// `live` is the URL of the event stream the page follows (`data-live` on `body`).
pub fn page(
    title: &str,
    session: Option<&Session>,
    nav: Nav,
    live: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · escale" }
                // No favicon request (and no 404 in the console).
                link rel="icon" href="data:,";
                link rel="stylesheet" href=(assets::url("app.css"));
                script src=(assets::url("app.js")) defer {}
            }
            body data-live=[live] {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "escale" }
                    @if let Some(s) = session {
                        nav aria-label="Main" {
                            a href="/" aria-current=[(nav == Nav::Apps).then_some("page")] { "Apps" }
                            @if s.actor.is_admin() {
                                a href="/nodes" aria-current=[(nav == Nav::Nodes).then_some("page")] { "Nodes" }
                            }
                            a href="/events" aria-current=[(nav == Nav::Events).then_some("page")] { "Events" }
                            a href="/account" aria-current=[(nav == Nav::Account).then_some("page")] { "Account" }
                        }
                        form.logout method="post" action="/logout" {
                            (csrf(s))
                            span.who { (s.actor.name) " (" (s.actor.role.as_str()) ", team " (s.actor.team) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" {
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of a session's forms.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// A duration in the past, short: `12s`, `5m`, `3h`, `2d`.
pub fn ago(at_ms: i64) -> String {
    let secs = ((now_ms() - at_ms) / 1000).max(0);
    duration(secs)
}

/// Seconds, short.
pub fn duration(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// An error page (status and what to do).
pub fn error_page(status: axum::http::StatusCode, message: &str) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    page(
        title,
        None,
        Nav::None,
        None,
        html! {
            h1 { (status.as_u16()) " " (title) }
            p.error role="alert" { (message) }
            p { a href="/" { "Back to the apps" } " · " a href="/login" { "Log in" } }
        },
    )
}

/// The login page.
pub fn login_page(token: &str, error: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        Nav::None,
        None,
        html! {
            h1 { "Log in to escale" }
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            form.card.login method="post" action="/login" {
                input type="hidden" name="login_token" value=(token);
                label for="name" { "User name" }
                input id="name" type="text" name="name" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input id="password" type="password" name="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
            p.hint { "The same accounts as the CLI (" code { "escale login" } "). The first admin is made with " code { "escale setup" } "." }
        },
    )
}

/// A badge for a state word (the CSS colours by class).
pub fn badge(state: &str) -> Markup {
    html! { span class={ "badge " (state) } { (state) } }
}

/// A sparkline of requests (and 5xx answers) per step, oldest first, as inline SVG.
pub fn sparkline(points: &[super::rates::Point], w: f64, h: f64) -> Markup {
    use super::rates::polyline;
    let req: Vec<u64> = points.iter().map(|p| p.requests).collect();
    let err: Vec<u64> = points.iter().map(|p| p.errors).collect();
    // One scale for both lines: errors are read against requests.
    let max = req.iter().copied().max().unwrap_or(0);
    let label = format!(
        "requests per {} s over the last {} samples; latest {}, 5xx {}",
        super::rates::STEP.as_secs(),
        points.len(),
        req.last().copied().unwrap_or(0),
        err.last().copied().unwrap_or(0)
    );
    if points.is_empty() {
        return html! { small { "rate: first sample within 30 s" } };
    }
    html! {
        svg.spark xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) role="img" aria-label=(label) {
            polyline.req points=(polyline(&req, max, w, h)) {}
            @if err.iter().any(|e| *e > 0) { polyline.err points=(polyline(&err, max, w, h)) {} }
        }
    }
}

/// The p95 time to the response head per step (ms), oldest first, as inline SVG; steps without
/// answers sit at 0, times above the last bucket at its bound.
pub fn latency_line(points: &[super::rates::Point], w: f64, h: f64) -> Markup {
    use super::rates::polyline;
    let p95: Vec<u64> = points
        .iter()
        .map(|p| {
            p.quantile_ms(0.95)
                .map_or(0, |ms| if ms.is_finite() { ms as u64 } else { 10_000 })
        })
        .collect();
    if p95.iter().all(|v| *v == 0) {
        return html! {};
    }
    let max = p95.iter().copied().max().unwrap_or(0);
    let label = format!(
        "p95 time to response head per {} s, up to {max} ms; latest {} ms",
        super::rates::STEP.as_secs(),
        p95.last().copied().unwrap_or(0)
    );
    html! {
        svg.spark xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) role="img" aria-label=(label) {
            polyline.lat points=(polyline(&p95, max, w, h)) {}
        }
    }
}
