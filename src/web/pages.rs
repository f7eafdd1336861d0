//! The dashboard's pages and the forms they post. Each handler reads and writes through the
//! same registry calls (scoped by the actor) and [`crate::service::Services`] methods as the
//! API handler of the same operation, validating input with the same [`crate::validate`]
//! rules; a form's answer is a redirect back to its page (post/redirect/get), or a page saying
//! what was refused and why.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use super::session::{Action, Session};
use super::view::{self, ago, badge, csrf, page, Nav};
use super::{WebError, WebState};
use crate::http::{ApiError, Path};
use crate::registry::{Actor, LatestRelease, ReleaseStatus, Schedulable};
use crate::scheduler::{ClusterView, InstanceView};
use crate::validate;

type PageResult = Result<Response, WebError>;

/// An app name from a path: an invalid one cannot exist, so it is a 404 like any unknown app.
fn app_name(name: &str) -> Result<(), WebError> {
    validate::app_name(name).map_err(|e| WebError::Api(ApiError::NotFound(e.0)))
}

fn cluster_view(s: &WebState) -> std::sync::Arc<ClusterView> {
    match &s.scheduler {
        Some(sched) => sched.view.load_full(),
        None => Default::default(),
    }
}

fn back_to_app(app: &str) -> Response {
    Redirect::to(&format!("/apps/{}", app)).into_response()
}

/// What the overview says of an app.
fn app_state(
    latest: Option<&LatestRelease>,
    crashing: bool,
    healthy: u32,
    desired: u32,
) -> &'static str {
    match latest.map(|r| r.status) {
        None => "new",
        Some(ReleaseStatus::Deploying) => "deploying",
        Some(ReleaseStatus::Failed) => "failed",
        _ if crashing => "crashing",
        _ if healthy < desired => "degraded",
        _ => "running",
    }
}

// ---------------------------------------------------------------- overview

/// `GET /`: the apps the actor can see.
pub async fn overview(State(s): State<WebState>, session: Session) -> PageResult {
    let table = apps_table(&s, &session.actor).await?;
    let create = html! {
        section.card aria-labelledby="new-app" {
            h2 id="new-app" { "New app" }
            form.inline method="post" action="/apps" {
                (csrf(&session))
                label for="app-name" { "Name" }
                input id="app-name" name="name" required pattern="[a-z0-9][a-z0-9\\-]*" maxlength="63" placeholder="my-app";
                @if session.actor.is_admin() {
                    label for="app-team" { "Team" }
                    input id="app-team" name="team" placeholder=(session.actor.team);
                }
                button type="submit" { "Create app" }
            }
        }
    };
    Ok(page(
        "Apps",
        Some(&session),
        Nav::Apps,
        Some("/live"),
        html! {
            h1 { "Apps" }
            div id="apps" data-refresh="/overview/apps" { (table) }
            (create)
        },
    )
    .into_response())
}

/// `GET /overview/apps`: the overview's table alone (what the page's script swaps in when
/// an event arrives).
pub async fn apps_fragment(State(s): State<WebState>, session: Session) -> PageResult {
    Ok(apps_table(&s, &session.actor).await?.into_response())
}

/// The overview's table: state, healthy/desired per process, domains, release and traffic.
pub async fn apps_table(s: &WebState, actor: &Actor) -> Result<Markup, WebError> {
    // The dashboard shows every app the actor can see (one page of all).
    let apps = s.registry.list_apps(actor, None, i64::MAX).await?;
    if apps.is_empty() {
        return Ok(html! {
            div.empty {
                p { "No apps yet. Create one below, then deploy it with " code { "git push" } " or " code { "escale deploy" } "." }
            }
        });
    }
    let latest = s.registry.latest_releases(actor).await?;
    let view = cluster_view(s);
    // (app, process) -> healthy instances; apps with crash-looping slots.
    let mut healthy: HashMap<(&str, &str), u32> = HashMap::new();
    for i in &view.instances {
        if i.health == crate::events::HealthStatus::Healthy {
            *healthy.entry((&i.app, &i.process)).or_default() += 1;
        }
    }
    let crashing: std::collections::HashSet<&str> =
        view.crashing.iter().map(|c| c.app.as_str()).collect();
    Ok(html! {
        table.apps {
            caption.visually-hidden { "Apps, their state and traffic" }
            thead { tr {
                th scope="col" { "App" } th scope="col" { "State" } th scope="col" { "Instances" }
                th scope="col" { "Domains" } th scope="col" { "Release" } th scope="col" { "Requests" }
            } }
            tbody {
                @for a in &apps {
                    @let desired: u32 = a.processes.iter().map(|p| p.instances).sum();
                    @let up: u32 = a.processes.iter().map(|p| healthy.get(&(a.name.as_str(), p.name.as_str())).copied().unwrap_or(0)).sum();
                    @let l = latest.get(&a.name);
                    tr {
                        th scope="row" { a href={ "/apps/" (a.name) } { (a.name) } @if actor.is_admin() { " " small.team { (a.team) } } }
                        td { (badge(app_state(l, crashing.contains(a.name.as_str()), up, desired))) }
                        td { @for p in &a.processes {
                            span.proc { (p.name) " " (healthy.get(&(a.name.as_str(), p.name.as_str())).copied().unwrap_or(0)) "/" (p.instances) } " "
                        } }
                        td { @for d in &a.domains { span.domain { (d) } " " } }
                        td { @if let Some(l) = l {
                            "v" (l.version) " " small { (ago(l.created_at)) " ago" }
                        } @else { "never deployed" } }
                        td { @let series = s.rates.series(&a.name);
                            @match s.metrics.app_totals(&a.name) {
                            Some(t) => {
                                @if !series.is_empty() { (format!("{:.1}", super::rates::per_second(&series))) " req/s" }
                                @if let Some(p) = series.last() { @if p.errors > 0 { " " span.err { (format!("{:.1}", p.errors as f64 / super::rates::STEP.as_secs_f64())) " 5xx/s" } } }
                                br; (view::sparkline(&series, 120.0, 24.0))
                                small.total { (t.requests) " total" @if t.errors > 0 { ", " (t.errors) " 5xx" } }
                            }
                            None => { "no traffic yet" }
                        } }
                    }
                }
            }
        }
    })
}

/// `POST /apps`: creates an app (as `POST /api/v1/apps`).
pub async fn create_app(State(s): State<WebState>, a: Action) -> PageResult {
    let name = a.field("name").trim();
    validate::app_name(name)?;
    let team = Some(a.field("team").trim()).filter(|t| !t.is_empty());
    if let Some(t) = team {
        validate::account_name(t, "team name")?;
    }
    s.registry
        .create_app(a.actor(), name, team, s.config.scheduler.default_port)
        .await?;
    Ok(back_to_app(name))
}

// ---------------------------------------------------------------- app page

#[derive(Debug, Deserialize)]
pub struct AppQuery {
    #[serde(default)]
    reveal: Option<String>,
}

/// `GET /apps/{app}`: instances (live), processes with their scale control, deploy,
/// config, domains, releases with rollback, activity and logs (live).
pub async fn app_page(
    State(s): State<WebState>,
    session: Session,
    Path(app): Path<String>,
    Query(q): Query<AppQuery>,
    headers: axum::http::HeaderMap,
) -> PageResult {
    app_name(&app)?;
    let actor = &session.actor;
    let info = s.registry.app_info(actor, &app).await?;
    // Secrets are shown only to an admin who asks (as `?reveal=true` on the API).
    let reveal = q.reveal.is_some() && actor.is_admin();
    let config = s.registry.config(actor, &app, reveal).await?;
    let releases = s.registry.releases(actor, &app, None, i64::MAX).await?;
    let domains = s.registry.domains(actor, &app).await?;
    let mut certs = crate::certs::store::states(&s.registry)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let instances = instances_table(&s, &app);
    let current = info.release;
    // The git remote is on this listener: the host the browser reached.
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("HOST:PORT");
    let body = html! {
        h1 { (info.name) " " small.team { "team " (info.team) } }
        @if releases.is_empty() {
            section.card.empty aria-labelledby="first-deploy" {
                h2 id="first-deploy" { "Deploy it for the first time" }
                p { "From the app's git repository:" }
                pre { code { "git remote add escale http://" (host) "/git/" (info.name) ".git\ngit push escale main" } }
                p { "Or deploy an image with the form below, or " code { "escale deploy " (info.name) " --image IMAGE" } "." }
            }
        }
        section.card aria-labelledby="instances-h" {
            h2 id="instances-h" { "Instances" }
            div id="instances" data-refresh={ "/apps/" (info.name) "/instances" } { (instances) }
        }
        section.card aria-labelledby="traffic-h" {
            h2 id="traffic-h" { "Traffic" }
            @match s.metrics.app_totals(&info.name) {
                None => { p.empty { "No request reached this app through the proxy since escale started." } }
                Some(t) => {
                    @let series = s.rates.series(&info.name);
                    p { (format!("{:.1}", super::rates::per_second(&series))) " requests/s now · "
                        (t.requests) " since start · mean time to response head "
                        (format!("{:.1}", if t.requests > 0 { t.sum_us as f64 / t.requests as f64 / 1000.0 } else { 0.0 })) " ms" }
                    @let hour = super::rates::summed(&series);
                    @for (when, totals) in [("Last hour", &hour), ("Since start", &t)] {
                        p { (when) ", time to response head: "
                            @for (label, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
                                (label) " " @match totals.quantile_ms(q) {
                                    Some(ms) if ms.is_finite() => { "≤ " (ms) " ms" }
                                    Some(_) => { "> 10 s" }
                                    None => { "–" }
                                } " · "
                            }
                            small { "(by histogram bucket)" } }
                    }
                    p { "By status: "
                        @for (i, n) in t.status.iter().enumerate() { @if *n > 0 { (i + 1) "xx " (n) " · " } } }
                    (view::sparkline(&series, 600.0, 60.0))
                    p.hint { "Requests (blue) and 5xx answers (red) per 30 s, last hour." }
                    (view::latency_line(&series, 600.0, 60.0))
                    p.hint { "p95 time to the response head per 30 s, last hour." }
                }
            }
        }
        section.card aria-labelledby="processes-h" {
            h2 id="processes-h" { "Processes" }
            @if info.processes.is_empty() { p.empty { "No process types yet: the first deploy makes " code { "web" } "." } }
            @for p in &info.processes {
                form.inline.scale method="post" action={ "/apps/" (info.name) "/scale" } {
                    (csrf(&session))
                    input type="hidden" name="process" value=(p.name);
                    label for={ "scale-" (p.name) } { "Instances of " strong { (p.name) } }
                    input id={ "scale-" (p.name) } type="number" name="instances" min="0" max=(s.config.max_instances) value=(p.instances) required;
                    button type="submit" { "Scale" }
                    small { "port " (p.port)
                        @if let Some(m) = p.memory_bytes { " · " (m >> 20) " MiB" }
                        @if let Some(c) = p.nano_cpus { " · " (format!("{:.2}", c as f64 / 1e9)) " CPU" }
                        " · health " (p.health.kind.as_str()) }
                }
            }
        }
        section.card aria-labelledby="deploy-h" {
            h2 id="deploy-h" { "Deploy an image" }
            form.inline method="post" action={ "/apps/" (info.name) "/deploy" } {
                (csrf(&session))
                label for="deploy-image" { "Image" }
                input id="deploy-image" name="image" required placeholder="registry.example/app:tag";
                button type="submit" { "Deploy" }
            }
            h3 { "Activity" }
            ol id="activity" class="activity" aria-live="polite" {}
        }
        section.card aria-labelledby="config-h" {
            h2 id="config-h" { "Config" }
            @if config.is_empty() { p.empty { "No config vars. Set one below; each change is a new release." } }
            @else {
                table.config {
                    thead { tr { th scope="col" { "Key" } th scope="col" { "Value" } th scope="col" { span.visually-hidden { "Actions" } } } }
                    tbody { @for v in &config { tr {
                        td { code { (v.key) } }
                        td { @if v.secret { @if let Some(val) = &v.value { code.secret { (val) } } @else { span.masked { "•••••• (secret)" } } } @else { code { (v.value.as_deref().unwrap_or("")) } } }
                        td { form method="post" action={ "/apps/" (info.name) "/config/unset" } {
                            (csrf(&session))
                            input type="hidden" name="key" value=(v.key);
                            button.danger type="submit" data-confirm={ "Unset " (v.key) "?" } { "Unset" span.visually-hidden { " " (v.key) } }
                        } }
                    } } }
                }
                @if actor.is_admin() && !reveal && config.iter().any(|v| v.secret) {
                    p { a href={ "/apps/" (info.name) "?reveal=1#config-h" } { "Reveal secrets" } }
                }
            }
            form.inline method="post" action={ "/apps/" (info.name) "/config" } {
                (csrf(&session))
                label for="cfg-key" { "Key" }
                input id="cfg-key" name="key" required pattern="[A-Za-z_][A-Za-z0-9_]*" placeholder="DATABASE_URL";
                label for="cfg-value" { "Value" }
                input id="cfg-value" name="value";
                label.check for="cfg-secret" { input id="cfg-secret" type="checkbox" name="secret" value="1"; " Secret" }
                button type="submit" { "Set" }
            }
        }
        section.card aria-labelledby="domains-h" {
            h2 id="domains-h" { "Domains" }
            ul.domains {
                li { code { (info.name) "." (s.config.apps_domain) } " (default)" }
                @for d in &domains {
                    @let c = certs.remove(&d.domain);
                    li {
                        code { (d.domain) } " "
                        @match c {
                            Some(c) if c.has_certificate => { "certificate " @if let Some(t) = c.not_after { "until " (fmt_date(t)) } @if let Some(i) = &c.issuer { " by " (i) } }
                            Some(c) => { "no certificate" @if let Some(e) = &c.last_error { " (" (e) ")" } }
                            None => { "no certificate" }
                        }
                        form.inline method="post" action={ "/apps/" (info.name) "/domains/remove" } {
                            (csrf(&session))
                            input type="hidden" name="domain" value=(d.domain);
                            button.danger type="submit" data-confirm={ "Remove " (d.domain) "?" } { "Remove" span.visually-hidden { " " (d.domain) } }
                        }
                    }
                }
            }
            form.inline method="post" action={ "/apps/" (info.name) "/domains" } {
                (csrf(&session))
                label for="domain" { "Domain" }
                input id="domain" name="domain" required placeholder="www.example.com";
                button type="submit" { "Add domain" }
            }
        }
        section.card aria-labelledby="releases-h" id="releases" data-refresh={ "/apps/" (info.name) } {
            h2 id="releases-h" { "Releases" }
            @if releases.is_empty() { p.empty { "No releases yet." } }
            @else {
                table.releases {
                    thead { tr { th scope="col" { "Version" } th scope="col" { "Status" } th scope="col" { "Source" } th scope="col" { "Description" } th scope="col" { "By" } th scope="col" { "When" } th scope="col" { span.visually-hidden { "Actions" } } } }
                    tbody { @for r in &releases { tr {
                        td { "v" (r.version) @if current == Some(r.version) { " " small { "(current)" } } }
                        td { (badge(status_word(r.status))) @if let Some(why) = &r.status_reason { details { summary { "why" } pre { (why) } } } }
                        td { (r.source) br; small { code { (r.image) } }
                            @if r.source.starts_with("git") { br; a href={ "/apps/" (info.name) "/releases/" (r.version) "/build-log" } { "build log" span.visually-hidden { " of v" (r.version) } } } }
                        td.desc { (r.description) }
                        td { (r.created_by) }
                        td { (ago(r.created_at)) " ago" }
                        td { @if current != Some(r.version) {
                            form method="post" action={ "/apps/" (info.name) "/rollback" } {
                                (csrf(&session))
                                input type="hidden" name="version" value=(r.version);
                                button type="submit" data-confirm={ "Roll back to v" (r.version) "?" } { "Roll back to v" (r.version) }
                            }
                        } }
                    } } }
                }
            }
        }
        section.card aria-labelledby="logs-h" {
            h2 id="logs-h" { "Logs" }
            label for="log-filter" { "Filter" }
            input id="log-filter" type="search" data-filter="logs" placeholder="text to keep";
            pre id="logs" class="logs" data-src={ "/apps/" (info.name) "/logs/live" } aria-live="off" tabindex="0" {}
        }
    };
    Ok(page(
        &info.name,
        Some(&session),
        Nav::Apps,
        Some(&format!("/live?app={}", info.name)),
        body,
    )
    .into_response())
}

fn status_word(s: ReleaseStatus) -> &'static str {
    match s {
        ReleaseStatus::Deploying => "deploying",
        ReleaseStatus::Active => "active",
        ReleaseStatus::Failed => "failed",
        ReleaseStatus::Superseded => "superseded",
    }
}

fn fmt_date(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `GET /apps/{app}/instances`: the instances table alone (swapped in live by the page).
pub async fn instances_fragment(
    State(s): State<WebState>,
    session: Session,
    Path(app): Path<String>,
) -> PageResult {
    app_name(&app)?;
    s.registry.app(&session.actor, &app).await?;
    Ok(instances_table(&s, &app).into_response())
}

fn instances_table(s: &WebState, app: &str) -> Markup {
    let view = cluster_view(s);
    let mut list: Vec<&InstanceView> = view.instances.iter().filter(|i| i.app == app).collect();
    list.sort_by(|a, b| (&a.process, a.slot, a.release).cmp(&(&b.process, b.slot, b.release)));
    let crashing: Vec<_> = view.crashing.iter().filter(|c| c.app == app).collect();
    let unplaced: Vec<_> = view.unplaced.iter().filter(|u| u.app == app).collect();
    let now = crate::registry::now_ms();
    html! {
        @if list.is_empty() { p.empty { "No instances running." } }
        @else {
            table.instances data-count=(list.len()) {
                thead { tr {
                    th scope="col" { "Instance" } th scope="col" { "Release" } th scope="col" { "Node" }
                    th scope="col" { "State" } th scope="col" { "Health" } th scope="col" { "Address" }
                    th scope="col" { "Uptime" } th scope="col" { "Restarts" }
                } }
                tbody { @for i in &list { tr.instance {
                    td { (i.process) "." (i.slot) br; small { code title="the container's name on its node (docker inspect, logs, exec)" { (i.container) } } }
                    td { "v" (i.release) }
                    td { (i.node) }
                    td { (badge(&enum_word(&i.state))) }
                    td { (badge(&enum_word(&i.health))) }
                    td { code { (i.address.as_deref().unwrap_or("–")) } }
                    td { (view::duration((now - i.created_at) / 1000)) }
                    td { (i.restarts) }
                } } }
            }
        }
        @for c in &crashing {
            div.crash role="status" {
                strong { (c.process) "." (c.slot) " is crash-looping" } " (" (c.crashes) " crashes"
                @if let Some(code) = c.last_exit_code { ", last exit " (code) } @if c.oom { ", out of memory" } ")"
                @if !c.last_logs.is_empty() { pre { @for l in &c.last_logs { (l) "\n" } } }
            }
        }
        @for u in &unplaced {
            div.crash role="status" {
                strong { (u.process) "." (u.slot) " cannot be placed" }
                ul { @for r in &u.reasons { li { (r) } } }
            }
        }
    }
}

/// An enum's serde name (`running`, `healthy`).
fn enum_word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// `POST /apps/{app}/scale`: one process's instance count (as `PATCH .../formation`).
pub async fn scale(State(s): State<WebState>, Path(app): Path<String>, a: Action) -> PageResult {
    app_name(&app)?;
    let process = a.field("process");
    validate::process_name(process)?;
    let n: i64 = a.field("instances").trim().parse().map_err(|_| {
        ApiError::Unprocessable(format!(
            "`{}` is not a number of instances",
            validate::printable(a.field("instances"))
        ))
    })?;
    let mut counts = BTreeMap::new();
    counts.insert(
        process.to_string(),
        validate::instances(process, n, s.config.max_instances)?,
    );
    s.services.scale(a.actor(), &app, &counts).await?;
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/deploy`: an image deploy (as `POST .../releases`); progress shows on
/// the page as its events arrive.
pub async fn deploy(State(s): State<WebState>, Path(app): Path<String>, a: Action) -> PageResult {
    app_name(&app)?;
    let image = a.field("image").trim().to_string();
    validate::image_ref(&image)?;
    let req = crate::service::ImageDeploy {
        description: format!("Deploy {image}"),
        image,
        port: None,
    };
    s.services.deploy_image(a.actor(), &app, &req).await?;
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/rollback`: a rollback to `version` (as `POST .../rollback`).
pub async fn rollback(State(s): State<WebState>, Path(app): Path<String>, a: Action) -> PageResult {
    app_name(&app)?;
    let raw = a.field("version");
    let v = raw
        .strip_prefix('v')
        .unwrap_or(raw)
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "`{}` is not a release version; write e.g. `v3` or `3`",
                validate::printable(raw)
            ))
        })?;
    s.services.rollback(a.actor(), &app, v).await?;
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/config`: sets one var (as `PATCH .../config`).
pub async fn set_config(
    State(s): State<WebState>,
    Path(app): Path<String>,
    a: Action,
) -> PageResult {
    app_name(&app)?;
    let key = a.field("key").trim();
    let value = a.field("value");
    validate::env_key(key)?;
    validate::env_value(key, value)?;
    let secret = !a.field("secret").is_empty();
    s.registry
        .update_config(
            a.actor(),
            &app,
            &[(key.to_string(), value.to_string())],
            secret,
            &[],
        )
        .await?;
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/config/unset`: unsets one var.
pub async fn unset_config(
    State(s): State<WebState>,
    Path(app): Path<String>,
    a: Action,
) -> PageResult {
    app_name(&app)?;
    let key = a.field("key");
    validate::env_key(key)?;
    s.registry
        .update_config(a.actor(), &app, &[], false, &[key.to_string()])
        .await?;
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/domains`: adds a custom domain (as `POST .../domains`).
pub async fn add_domain(
    State(s): State<WebState>,
    Path(app): Path<String>,
    a: Action,
) -> PageResult {
    app_name(&app)?;
    let domain = validate::domain(a.field("domain"))?;
    let apps_domain = &s.config.apps_domain;
    validate::custom_domain(&domain, &app, apps_domain).map_err(|e| {
        if validate::is_apps_domain_or_above(&domain, apps_domain) {
            ApiError::Unprocessable(e.0)
        } else {
            ApiError::Conflict(e.0)
        }
    })?;
    s.registry.add_domain(a.actor(), &app, &domain).await?;
    s.certs.wake_acme();
    Ok(back_to_app(&app))
}

/// `POST /apps/{app}/domains/remove`: removes a custom domain.
pub async fn remove_domain(
    State(s): State<WebState>,
    Path(app): Path<String>,
    a: Action,
) -> PageResult {
    app_name(&app)?;
    let domain = validate::domain(a.field("domain"))?;
    s.registry.remove_domain(a.actor(), &app, &domain).await?;
    s.certs
        .forget(&domain)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(back_to_app(&app))
}

// ---------------------------------------------------------------- nodes

/// `GET /nodes` (admins): state, capacity and use, instances, labels, certificate expiry,
/// with cordon, uncordon and drain.
pub async fn nodes_page(State(s): State<WebState>, session: Session) -> PageResult {
    let nodes = s.services.node_list(&session.actor).await?;
    let gib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 30) as f64);
    let cpus = |n: u64| format!("{:.1}", n as f64 / 1e9);
    let body = html! {
        h1 { "Nodes" }
        @if nodes.is_empty() {
            p.empty { "No nodes. Register one with " code { "escale nodes add NAME --address HOST:2376" } " and install the bundle it gives on that machine." }
        } @else {
            table.nodes {
                thead { tr {
                    th scope="col" { "Node" } th scope="col" { "State" } th scope="col" { "CPUs used / placed / capacity" }
                    th scope="col" { "Memory used / placed / capacity (GiB)" } th scope="col" { "Disk" }
                    th scope="col" { "Instances" } th scope="col" { "Labels" }
                    th scope="col" { "Certificate" } th scope="col" { span.visually-hidden { "Actions" } }
                } }
                tbody { @for n in &nodes { tr {
                    th scope="row" { (n.name) br; small { code { (n.address) } } }
                    td { (badge(&enum_word(&n.state))) @if n.cordoned { " " (badge("cordoned")) } @if n.draining { " " (badge("draining")) }
                        @if let Some(e) = &n.error { br; small.err { (e) } } }
                    td { @if let Some(u) = &n.used { (format!("{:.1}", u.cpus)) } @else { "–" } " / "
                        (cpus(n.placed.nano_cpus)) " / " @if let Some(c) = &n.capacity { (cpus(c.nano_cpus)) } @else { "?" } }
                    td { @if let Some(u) = &n.used { (gib(u.memory_bytes)) } @else { "–" } " / "
                        (gib(n.placed.memory_bytes)) " / " @if let Some(c) = &n.capacity { (gib(c.memory_bytes)) } @else { "?" } }
                    td { @match n.used.as_ref().and_then(|u| u.disk.as_ref()) {
                        Some(d) => {
                            @if let Some(f) = &d.filesystem { (f.used_percent) "% used " }
                            @if d.level != crate::events::DiskLevel::Ok { (badge(&enum_word(&d.level))) " " }
                            small { (crate::service::upkeep::human_bytes(d.images_bytes + d.containers_bytes)) " escale" }
                        }
                        None => { "–" }
                    } }
                    td { (n.instances) }
                    td { @for (k, v) in &n.labels { code { (k) "=" (v) } " " } }
                    td { @match &n.certificate {
                        Some(c) => { (c.days_left) " days" @if c.expiring { " " (badge("expiring")) } }
                        None => { "–" }
                    } }
                    td.actions { @if n.name != crate::service::nodes::LOCAL_NODE {
                        @for (action, label) in [("cordon", "Cordon"), ("uncordon", "Uncordon"), ("drain", "Drain")] {
                            form.inline method="post" action={ "/nodes/" (n.name) "/" (action) } {
                                (csrf(&session))
                                button type="submit" data-confirm={ (label) " " (n.name) "?" } { (label) span.visually-hidden { " " (n.name) } }
                            }
                        }
                    } }
                } } }
            }
        }
    };
    Ok(page("Nodes", Some(&session), Nav::Nodes, Some("/live"), body).into_response())
}

/// `POST /nodes/{node}/{cordon|uncordon|drain}` (admins).
pub async fn node_action(
    State(s): State<WebState>,
    Path((node, action)): Path<(String, String)>,
    a: Action,
) -> PageResult {
    let to = match action.as_str() {
        "cordon" => Schedulable::Cordoned,
        "uncordon" => Schedulable::Yes,
        "drain" => Schedulable::Draining,
        _ => return Err(ApiError::NotFound("no such node action".into()).into()),
    };
    s.services.set_schedulable(a.actor(), &node, to).await?;
    Ok(Redirect::to("/nodes").into_response())
}

// ---------------------------------------------------------------- events

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    app: Option<String>,
    /// Only events whose action or detail contains this text.
    #[serde(default)]
    text: Option<String>,
}

/// `GET /events`: the audit log (filterable by app), new events prepended live.
pub async fn events_page(
    State(s): State<WebState>,
    session: Session,
    Query(q): Query<EventsQuery>,
) -> PageResult {
    let app = q.app.filter(|a| !a.is_empty());
    if let Some(a) = &app {
        app_name(a)?;
    }
    let text = q.text.filter(|t| !t.is_empty());
    let mut events = s
        .registry
        .events(
            &session.actor,
            app.as_deref(),
            None,
            if text.is_some() { 2000 } else { 200 },
        )
        .await?;
    if let Some(t) = &text {
        events.retain(|e| e.action.contains(t.as_str()) || e.detail.contains(t.as_str()));
        events.truncate(200);
    }
    let live = match &app {
        Some(a) => format!("/live?app={a}"),
        None => "/live".to_string(),
    };
    let body = html! {
        h1 { "Events" }
        form.inline method="get" action="/events" {
            label for="ev-app" { "App" }
            input id="ev-app" name="app" value=(app.as_deref().unwrap_or(""));
            label for="ev-text" { "Action or detail contains" }
            input id="ev-text" name="text" type="search" value=(text.as_deref().unwrap_or(""));
            button type="submit" { "Filter" }
        }
        h2 { "Live" }
        ol id="activity" class="activity" aria-live="polite" {}
        h2 { "Audit log" }
        @if events.is_empty() { p.empty { "Nothing recorded yet." } }
        @else {
            table.events {
                thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "App" } th scope="col" { "Action" } th scope="col" { "Detail" } } }
                tbody { @for e in &events { tr {
                    td { (fmt_date(e.at)) }
                    td { (e.actor) }
                    td { @if let Some(a) = &e.app { a href={ "/apps/" (a) } { (a) } } }
                    td { code { (e.action) } }
                    td.desc { (e.detail) }
                } } }
            }
        }
    };
    Ok(page("Events", Some(&session), Nav::Events, Some(&live), body).into_response())
}

// ---------------------------------------------------------------- account

/// `GET /account`: the user's tokens; for admins, users and teams.
pub async fn account_page(State(s): State<WebState>, session: Session) -> PageResult {
    Ok(account(&s, &session, None).await?.into_response())
}

async fn account(
    s: &WebState,
    session: &Session,
    new_token: Option<(&str, &str)>,
) -> Result<Markup, WebError> {
    let actor = &session.actor;
    let tokens = s.registry.list_tokens(actor).await?;
    let (users, teams) = if actor.is_admin() {
        (
            s.registry.list_users(actor).await?,
            s.registry.list_teams(actor).await?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let body = html! {
        h1 { "Account" }
        p { "Logged in as " strong { (actor.name) } " (" (actor.role.as_str()) ", team " (actor.team) ")." }
        @if let Some((name, secret)) = new_token {
            div.card.notice role="status" {
                p { "Token " strong { (name) } " created. Copy it now: it is not shown again." }
                pre { code id="new-token" { (secret) } }
            }
        }
        section.card aria-labelledby="tokens-h" {
            h2 id="tokens-h" { "API tokens" }
            @if tokens.is_empty() { p.empty { "No tokens. Create one for the CLI or CI below." } }
            @else { table { thead { tr { th scope="col" { "Name" } th scope="col" { "Prefix" } th scope="col" { "Created" } th scope="col" { "Last used" } th scope="col" { span.visually-hidden { "Actions" } } } }
                tbody { @for t in &tokens { tr {
                    td { (t.name) } td { code { (t.prefix) "…" } } td { (ago(t.created_at)) " ago" }
                    td { @if let Some(u) = t.last_used_at { (ago(u)) " ago" } @else { "never" } }
                    td { form method="post" action="/account/tokens/revoke" {
                        (csrf(session))
                        input type="hidden" name="name" value=(t.name);
                        button.danger type="submit" data-confirm={ "Revoke " (t.name) "?" } { "Revoke" span.visually-hidden { " " (t.name) } }
                    } }
                } } } }
            }
            form.inline method="post" action="/account/tokens" {
                (csrf(session))
                label for="token-name" { "Token name" }
                input id="token-name" name="name" required placeholder="ci";
                button type="submit" { "Create token" }
            }
        }
        @if actor.is_admin() {
            section.card aria-labelledby="users-h" {
                h2 id="users-h" { "Users" }
                table { thead { tr { th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Team" } } }
                    tbody { @for u in &users { tr { td { (u.name) } td { (u.role.as_str()) } td { (u.team) } } } } }
                form.inline method="post" action="/account/users" {
                    (csrf(session))
                    label for="user-name" { "Name" } input id="user-name" name="name" required;
                    label for="user-password" { "Password" } input id="user-password" type="password" name="password" autocomplete="new-password";
                    label for="user-role" { "Role" } select id="user-role" name="role" { option value="member" { "member" } option value="admin" { "admin" } }
                    label for="user-team" { "Team" } input id="user-team" name="team" placeholder="default";
                    button type="submit" { "Create user" }
                }
            }
            section.card aria-labelledby="teams-h" {
                h2 id="teams-h" { "Teams" }
                ul { @for t in &teams { li { (t.name) } } }
                form.inline method="post" action="/account/teams" {
                    (csrf(session))
                    label for="team-name" { "Name" } input id="team-name" name="name" required;
                    button type="submit" { "Create team" }
                }
            }
        }
    };
    Ok(page("Account", Some(session), Nav::Account, None, body))
}

/// `POST /account/tokens`: a new token, shown once on the answer page.
pub async fn create_token(State(s): State<WebState>, a: Action) -> PageResult {
    let name = a.field("name").trim();
    validate::token_name(name)?;
    let token = crate::auth::generate_token();
    s.registry
        .create_token(
            a.actor(),
            crate::registry::NewToken {
                name,
                prefix: &token.prefix,
                hash: &token.hash,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        account(&s, &a.session, Some((name, &token.secret))).await?,
    )
        .into_response())
}

/// `POST /account/tokens/revoke`.
pub async fn revoke_token(State(s): State<WebState>, a: Action) -> PageResult {
    s.registry.delete_token(a.actor(), a.field("name")).await?;
    Ok(Redirect::to("/account").into_response())
}

/// `POST /account/users` (admins).
pub async fn create_user(State(s): State<WebState>, a: Action) -> PageResult {
    a.actor().require_admin("creating users")?;
    let name = a.field("name").trim();
    validate::account_name(name, "user name")?;
    let team = match a.field("team").trim() {
        "" => "default",
        t => t,
    };
    validate::account_name(team, "team name")?;
    let role = match a.field("role") {
        "admin" => crate::registry::Role::Admin,
        _ => crate::registry::Role::Member,
    };
    let hash = match a.field("password") {
        "" => None,
        p => Some(s.hashing.hash(p).await?),
    };
    s.registry
        .create_user(a.actor(), name, hash.as_deref(), role, team)
        .await?;
    Ok(Redirect::to("/account").into_response())
}

/// `POST /account/teams` (admins).
pub async fn create_team(State(s): State<WebState>, a: Action) -> PageResult {
    a.actor().require_admin("creating teams")?;
    let name = a.field("name").trim();
    validate::account_name(name, "team name")?;
    s.registry.create_team(a.actor(), name).await?;
    Ok(Redirect::to("/account").into_response())
}

/// `GET /apps/{app}/releases/{version}/build-log`: a pushed release's build output.
pub async fn build_log(
    State(s): State<WebState>,
    session: Session,
    Path((app, version)): Path<(String, u32)>,
) -> PageResult {
    app_name(&app)?;
    let log = s
        .registry
        .release_build_log(&session.actor, &app, version)
        .await?;
    let title = format!("{app} v{version} build log");
    Ok(page(
        &title,
        Some(&session),
        Nav::Apps,
        None,
        html! {
            h1 { a href={ "/apps/" (app) } { (app) } " · v" (version) " build log" }
            @match &log {
                Some(l) => { pre.logs tabindex="0" { (l) } }
                None => { p.empty { "This release was not built by escale (an image deploy, a config change or a rollback)." } }
            }
        },
    )
    .into_response())
}
