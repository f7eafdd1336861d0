//! The `escale.toml` app manifest: an app's process types, formation, resources, health
//! checks, custom domains and non-secret config vars, declared in one TOML file.
//!
//! ```toml
//! app = "shop"                      # optional; `escale apply --app` can name it instead
//! domains = ["shop.example.eu"]     # the app's custom domains, exactly (absent: left alone)
//!
//! [env]                             # non-secret config vars, exactly (absent: left alone)
//! LOG_LEVEL = "info"
//!
//! [processes.web]
//! command = ["bundle", "exec", "puma"]   # argv; absent: the image's default command
//! port = 8080                       # absent: unchanged (new process type: server default)
//! instances = 2                     # absent: unchanged (new process type: 0)
//! memory = "256m"                   # absent: no limit
//! cpus = 0.5                        # absent: no limit
//! surge = 1                         # absent: 1
//! constraints = { disk = "ssd" }    # node labels it needs; absent: any node
//! overcommit = false                # may use node resources given to others; absent: false
//!
//! [processes.web.health]            # absent fields: http, "/", 5s, 2s, 30s
//! kind = "http"
//! path = "/healthz"
//! interval = "5s"
//! timeout = "2s"
//! grace = "30s"
//! ```
//!
//! [`Manifest::parse`] walks the document itself (with `toml_edit`, which keeps byte spans) so
//! that every error names its line, column and field, and unknown keys are errors. Values are
//! checked with [`crate::validate`], as the API checks them. Process types not in the file are
//! left as they are (there is no way to delete one yet); secrets are never in a manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use toml_edit::{Item, TableLike};

use crate::model::{App, ConfigVar, HealthCheck, HealthKind};
use crate::validate::{self, printable};

/// A manifest problem at one place of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The field, e.g. `processes.web.memory`; empty for a TOML syntax error.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{} {}: {}",
                self.line, self.column, self.field, self.message
            )
        }
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not TOML.
    #[error("{0} (TOML syntax)")]
    Syntax(Located),
    /// Fields that do not fit, in file order (at least one).
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Located>),
}

fn join_lines(v: &[Located]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ManifestError {
    /// The first problem in file order.
    pub fn first(&self) -> &Located {
        match self {
            ManifestError::Syntax(l) => l,
            ManifestError::Invalid(v) => &v[0],
        }
    }
}

/// Defaults of a process type's fields when the manifest leaves them out (the registry's).
pub const DEFAULT_SURGE: u32 = 1;

/// The health check a process type gets when the manifest has no `[health]` (the registry's
/// defaults).
pub fn default_health() -> HealthCheck {
    HealthCheck {
        kind: HealthKind::Http,
        path: "/".into(),
        interval_ms: 5_000,
        timeout_ms: 2_000,
        grace_ms: 30_000,
    }
}

/// One process type as the manifest declares it; every field is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv; `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    /// `None` keeps the current port (the server's default for a new process type).
    pub port: Option<u16>,
    /// `None` keeps the current count (0 for a new process type).
    pub instances: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub nano_cpus: Option<i64>,
    pub surge: u32,
    pub health: HealthCheck,
    /// Node labels its instances need; empty: any node.
    pub constraints: BTreeMap<String, String>,
    pub overcommit: bool,
}

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The `app` key, if any.
    pub app: Option<String>,
    pub processes: BTreeMap<String, ProcessSpec>,
    /// Canonical domain names, sorted; `None` when the file has no `domains` key (left alone).
    pub domains: Option<Vec<String>>,
    /// Non-secret config vars; `None` when the file has no `[env]` table (left alone).
    pub env: Option<BTreeMap<String, String>>,
}

/// What the server knows and a manifest must agree with; `None` skips the check.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checks<'a> {
    /// The app the manifest is applied to: an `app` key must name it.
    pub app: Option<&'a str>,
    /// The server's `max_instances`.
    pub max_instances: Option<u32>,
    /// The server's `apps_domain`: domains must not be the apps domain or another app's name
    /// under it.
    pub apps_domain: Option<&'a str>,
}

/// The most instances a manifest may ask for when the server's limit is not known.
const MAX_INSTANCES_UNKNOWN: u32 = 10_000;

const TOP_KEYS: &[&str] = &["app", "domains", "env", "processes"];
const PROCESS_KEYS: &[&str] = &[
    "command",
    "port",
    "instances",
    "memory",
    "cpus",
    "surge",
    "health",
    "constraints",
    "overcommit",
];
const HEALTH_KEYS: &[&str] = &["kind", "path", "interval", "timeout", "grace"];

impl Manifest {
    /// Parses and validates a manifest without server context.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse_with(text, &Checks::default())
    }

    /// Parses and validates a manifest, also against what the server knows.
    pub fn parse_with(text: &str, checks: &Checks<'_>) -> Result<Manifest, ManifestError> {
        let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            let (line, column) = line_col(text, at);
            ManifestError::Syntax(Located {
                line,
                column,
                field: String::new(),
                message: e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        })?;
        let mut w = Walker {
            text,
            problems: Vec::new(),
        };
        let m = w.manifest(doc.as_table(), checks);
        if w.problems.is_empty() {
            Ok(m)
        } else {
            w.problems.sort_by_key(|(at, _)| *at);
            Err(ManifestError::Invalid(
                w.problems.into_iter().map(|(_, l)| l).collect(),
            ))
        }
    }

    /// The manifest of an app's current state: its process types, domains and non-secret
    /// config vars (secret ones are left out).
    pub fn from_app(app: &App, config: &[ConfigVar]) -> Manifest {
        Manifest {
            app: Some(app.name.clone()),
            processes: app
                .processes
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        ProcessSpec {
                            command: p.command.clone().filter(|c| !c.is_empty()),
                            port: Some(p.port),
                            instances: Some(p.instances),
                            memory_bytes: p.memory_bytes,
                            nano_cpus: p.nano_cpus,
                            surge: p.surge,
                            health: p.health.clone(),
                            constraints: p.constraints.clone(),
                            overcommit: p.overcommit,
                        },
                    )
                })
                .collect(),
            domains: Some({
                let mut d = app.domains.clone();
                d.sort();
                d
            }),
            env: Some(
                config
                    .iter()
                    .filter(|v| !v.secret)
                    .filter_map(|v| Some((v.key.clone(), v.value.clone()?)))
                    .collect(),
            ),
        }
    }

    /// The manifest as TOML text that [`Manifest::parse`] reads back to an equal manifest.
    /// Fields at their defaults are left out, but for `port` and `instances`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        if let Some(app) = &self.app {
            out.push_str(&format!("app = {}\n", quote(app)));
        }
        if let Some(domains) = &self.domains {
            let list: Vec<String> = domains.iter().map(|d| quote(d)).collect();
            out.push_str(&format!("domains = [{}]\n", list.join(", ")));
        }
        if let Some(env) = &self.env {
            out.push_str("\n[env]\n");
            for (k, v) in env {
                out.push_str(&format!("{} = {}\n", key(k), quote(v)));
            }
        }
        for (name, p) in &self.processes {
            out.push_str(&format!("\n[processes.{}]\n", key(name)));
            if let Some(argv) = &p.command {
                let list: Vec<String> = argv.iter().map(|a| quote(a)).collect();
                out.push_str(&format!("command = [{}]\n", list.join(", ")));
            }
            if let Some(port) = p.port {
                out.push_str(&format!("port = {port}\n"));
            }
            if let Some(n) = p.instances {
                out.push_str(&format!("instances = {n}\n"));
            }
            if let Some(m) = p.memory_bytes {
                out.push_str(&format!("memory = {}\n", quote(&memory_text(m))));
            }
            if let Some(c) = p.nano_cpus {
                out.push_str(&format!("cpus = {}\n", cpus_text(c)));
            }
            if p.surge != DEFAULT_SURGE {
                out.push_str(&format!("surge = {}\n", p.surge));
            }
            if !p.constraints.is_empty() {
                let pairs: Vec<String> = p
                    .constraints
                    .iter()
                    .map(|(k, v)| format!("{} = {}", key(k), quote(v)))
                    .collect();
                out.push_str(&format!("constraints = {{ {} }}\n", pairs.join(", ")));
            }
            if p.overcommit {
                out.push_str("overcommit = true\n");
            }
            if p.health != default_health() {
                let h = &p.health;
                out.push_str(&format!("\n[processes.{}.health]\n", key(name)));
                out.push_str(&format!("kind = {}\n", quote(h.kind.as_str())));
                out.push_str(&format!("path = {}\n", quote(&h.path)));
                out.push_str(&format!(
                    "interval = {}\n",
                    quote(&duration_text(h.interval_ms))
                ));
                out.push_str(&format!(
                    "timeout = {}\n",
                    quote(&duration_text(h.timeout_ms))
                ));
                out.push_str(&format!("grace = {}\n", quote(&duration_text(h.grace_ms))));
            }
        }
        out
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_string()
}

/// A TOML key: bare when it can be, quoted otherwise.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        quote(k)
    }
}

/// Bytes as `256m`, `1g`, `512k` when exact, else plain bytes.
pub(crate) fn memory_text(bytes: u64) -> String {
    for (unit, shift) in [("t", 40), ("g", 30), ("m", 20), ("k", 10)] {
        if bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Billionths of a CPU as a TOML number: `0.5`, `2`.
pub(crate) fn cpus_text(nano: i64) -> String {
    let whole = nano / 1_000_000_000;
    let frac = nano % 1_000_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Milliseconds as `5s`, `1m 30s`, `500ms`.
pub(crate) fn duration_text(ms: u32) -> String {
    humantime::format_duration(std::time::Duration::from_millis(u64::from(ms))).to_string()
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[start..].chars().count() + 1)
}

/// A field path with `name` appended (quoted when it is not a bare key).
fn path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        key(name)
    } else {
        format!("{parent}.{}", key(name))
    }
}

/// A key of a table, its item, the key's span and the value's span.
type Entry<'d> = (
    &'d str,
    &'d Item,
    Option<Range<usize>>,
    Option<Range<usize>>,
);

/// Walks the document, collecting every problem with its byte offset.
struct Walker<'t> {
    text: &'t str,
    problems: Vec<(usize, Located)>,
}

impl Walker<'_> {
    fn problem(&mut self, span: Option<Range<usize>>, field: &str, message: impl Into<String>) {
        let at = span.map(|s| s.start).unwrap_or(0);
        let (line, column) = line_col(self.text, at);
        self.problems.push((
            at,
            Located {
                line,
                column,
                field: field.to_string(),
                message: message.into(),
            },
        ));
    }

    /// The keys of a table with their items and the best span for each (the value's, else
    /// the key's, else the table's); unknown keys are reported.
    fn entries<'d>(
        &mut self,
        table: &'d dyn TableLike,
        table_span: Option<Range<usize>>,
        field: &str,
        allowed: Option<&[&str]>,
    ) -> Vec<Entry<'d>> {
        let mut out = Vec::new();
        for (k, item) in table.iter() {
            let key_span = table
                .key(k)
                .and_then(|k| k.span())
                .or_else(|| table_span.clone());
            let value_span = item_span(item).or_else(|| key_span.clone());
            if let Some(allowed) = allowed {
                if !allowed.contains(&k) {
                    self.problem(
                        key_span,
                        &path(field, k),
                        format!(
                            "unknown key `{}`; {} accepts: {}",
                            printable(k),
                            if field.is_empty() {
                                "the top level".to_string()
                            } else {
                                format!("`{field}`")
                            },
                            allowed.join(", ")
                        ),
                    );
                    continue;
                }
            }
            out.push((k, item, key_span, value_span));
        }
        out
    }

    fn manifest(&mut self, root: &toml_edit::Table, checks: &Checks<'_>) -> Manifest {
        let mut m = Manifest::default();
        for (k, item, key_span, span) in self.entries(root, Some(0..0), "", Some(TOP_KEYS)) {
            match k {
                "app" => match item.as_str() {
                    Some(name) => match validate::app_name(name) {
                        Err(e) => self.problem(span, "app", e.0),
                        Ok(()) => match checks.app {
                            Some(want) if want != name => self.problem(
                                span,
                                "app",
                                format!(
                                    "this manifest is for app `{name}`, not `{want}`: change or remove `app`, or apply it to `{name}`"
                                ),
                            ),
                            _ => m.app = Some(name.to_string()),
                        },
                    },
                    None => self.problem(span, "app", type_message(item, "a string: app = \"shop\"")),
                },
                "domains" => m.domains = self.domains(item, span, checks),
                "env" => m.env = self.env(item, span),
                "processes" => match item.as_table_like() {
                    Some(t) => {
                        let t_span = item_span(item).or(key_span);
                        for (name, p, name_span, p_span) in self.entries(t, t_span, "processes", None)
                        {
                            let field = path("processes", name);
                            if let Err(e) = validate::process_name(name) {
                                self.problem(name_span, &field, e.0);
                                continue;
                            }
                            if let Some(spec) = self.process(name, p, p_span, name_span, checks) {
                                m.processes.insert(name.to_string(), spec);
                            }
                        }
                    }
                    None => self.problem(
                        span,
                        "processes",
                        type_message(item, "a table of process types: [processes.web]"),
                    ),
                },
                _ => unreachable!("entries() keeps allowed keys only"),
            }
        }
        m
    }

    fn domains(
        &mut self,
        item: &Item,
        span: Option<Range<usize>>,
        checks: &Checks<'_>,
    ) -> Option<Vec<String>> {
        let Some(arr) = item.as_array() else {
            self.problem(
                span,
                "domains",
                type_message(
                    item,
                    "an array of domain names: domains = [\"shop.example.eu\"]",
                ),
            );
            return None;
        };
        let mut seen = BTreeSet::new();
        for (i, v) in arr.iter().enumerate() {
            let field = format!("domains[{i}]");
            let vspan = v.span().or_else(|| span.clone());
            let Some(d) = v.as_str() else {
                self.problem(
                    vspan,
                    &field,
                    format!("expected a string, found {}", v.type_name()),
                );
                continue;
            };
            let canonical = match validate::domain(d) {
                Ok(c) => c,
                Err(e) => {
                    self.problem(vspan, &field, e.0);
                    continue;
                }
            };
            if let (Some(app), Some(apps_domain)) = (checks.app, checks.apps_domain) {
                if let Err(e) = validate::custom_domain(&canonical, app, apps_domain) {
                    self.problem(vspan, &field, e.0);
                    continue;
                }
            }
            if !seen.insert(canonical.clone()) {
                self.problem(vspan, &field, format!("`{canonical}` is listed twice"));
            }
        }
        Some(seen.into_iter().collect())
    }

    fn env(&mut self, item: &Item, span: Option<Range<usize>>) -> Option<BTreeMap<String, String>> {
        let Some(t) = item.as_table_like() else {
            self.problem(
                span,
                "env",
                type_message(
                    item,
                    "a table of config vars: [env] then KEY = \"value\" lines",
                ),
            );
            return None;
        };
        let mut out = BTreeMap::new();
        let t_span = item_span(item).or(span);
        for (k, v, key_span, vspan) in self.entries(t, t_span.clone(), "env", None) {
            let field = path("env", k);
            if let Err(e) = validate::env_key(k) {
                self.problem(key_span, &field, e.0);
                continue;
            }
            let Some(value) = v.as_str() else {
                let shown = v
                    .as_value()
                    .map(|x| x.to_string().trim().to_string())
                    .unwrap_or_default();
                self.problem(
                    vspan,
                    &field,
                    format!("config values are strings: write {k} = {}", quote(&shown)),
                );
                continue;
            };
            if let Err(e) = validate::env_value(k, value) {
                self.problem(vspan, &field, e.0);
                continue;
            }
            out.insert(k.to_string(), value.to_string());
        }
        if out.len() > validate::MAX_VARS {
            self.problem(
                t_span,
                "env",
                format!(
                    "{} config vars; the limit is {}",
                    out.len(),
                    validate::MAX_VARS
                ),
            );
        }
        Some(out)
    }

    /// `constraints = { disk = "ssd" }`: node labels, checked as the API checks them.
    fn constraints(
        &mut self,
        item: &Item,
        span: Option<Range<usize>>,
        field: &str,
    ) -> Option<BTreeMap<String, String>> {
        let Some(t) = item.as_table_like() else {
            self.problem(
                span,
                field,
                type_message(
                    item,
                    "a table of node labels: constraints = { disk = \"ssd\" }",
                ),
            );
            return None;
        };
        let before = self.problems.len();
        let mut out = BTreeMap::new();
        let t_span = item_span(item).or(span);
        for (k, v, _, vspan) in self.entries(t, t_span, field, None) {
            let f = path(field, k);
            let Some(value) = v.as_str() else {
                self.problem(vspan, &f, type_message(v, "a string: disk = \"ssd\""));
                continue;
            };
            match validate::node_label(&format!("{k}={value}")) {
                Ok((k, v)) => {
                    out.insert(k, v);
                }
                Err(e) => self.problem(vspan, &f, e.0),
            }
        }
        (self.problems.len() == before).then_some(out)
    }

    fn process(
        &mut self,
        name: &str,
        item: &Item,
        span: Option<Range<usize>>,
        name_span: Option<Range<usize>>,
        checks: &Checks<'_>,
    ) -> Option<ProcessSpec> {
        let field = path("processes", name);
        let Some(t) = item.as_table_like() else {
            self.problem(
                span,
                &field,
                type_message(item, &format!("a table: [processes.{name}]")),
            );
            return None;
        };
        let before = self.problems.len();
        let mut spec = ProcessSpec {
            command: None,
            port: None,
            instances: None,
            memory_bytes: None,
            nano_cpus: None,
            surge: DEFAULT_SURGE,
            health: default_health(),
            constraints: BTreeMap::new(),
            overcommit: false,
        };
        let t_span = item_span(item).or(name_span);
        for (k, v, _, vspan) in self.entries(t, t_span, &field, Some(PROCESS_KEYS)) {
            let f = path(&field, k);
            match k {
                "command" => spec.command = self.command(v, vspan, &f),
                "port" => {
                    if let Some(n) = self.integer(v, vspan.clone(), &f, "port = 8080") {
                        match validate::port(n) {
                            Ok(p) => spec.port = Some(p),
                            Err(e) => self.problem(vspan, &f, e.0),
                        }
                    }
                }
                "instances" => {
                    if let Some(n) = self.integer(v, vspan.clone(), &f, "instances = 2") {
                        let max = checks.max_instances.unwrap_or(MAX_INSTANCES_UNKNOWN);
                        match validate::instances(name, n, max) {
                            Ok(n) => spec.instances = Some(n),
                            Err(e) => self.problem(vspan, &f, e.0),
                        }
                    }
                }
                "memory" => {
                    let text = match (v.as_str(), v.as_integer()) {
                        (Some(s), _) => Some(s.to_string()),
                        (None, Some(n)) => Some(n.to_string()),
                        _ => None,
                    };
                    match text {
                        None => self.problem(
                            vspan,
                            &f,
                            type_message(
                                v,
                                "a size: memory = \"256m\" (leave it out for no limit)",
                            ),
                        ),
                        Some(text) => match validate::memory_limit(&text) {
                            Ok(b) => spec.memory_bytes = Some(b),
                            Err(e) => self.problem(vspan, &f, e.0),
                        },
                    }
                }
                "cpus" => {
                    let text = match (v.as_str(), v.as_integer(), v.as_float()) {
                        (Some(s), _, _) => Some(s.to_string()),
                        (_, Some(n), _) => Some(n.to_string()),
                        (_, _, Some(x)) => Some(x.to_string()),
                        _ => None,
                    };
                    match text {
                        None => self.problem(
                            vspan,
                            &f,
                            type_message(v, "a number: cpus = 0.5 (leave it out for no limit)"),
                        ),
                        Some(text) => match validate::cpus(&text) {
                            Ok(c) => spec.nano_cpus = Some(c),
                            Err(e) => self.problem(vspan, &f, e.0),
                        },
                    }
                }
                "surge" => {
                    if let Some(n) = self.integer(v, vspan.clone(), &f, "surge = 1") {
                        match validate::surge(n) {
                            Ok(n) => spec.surge = n,
                            Err(e) => self.problem(vspan, &f, e.0),
                        }
                    }
                }
                "health" => {
                    if let Some(h) = self.health(v, vspan, &f) {
                        spec.health = h;
                    }
                }
                "constraints" => {
                    if let Some(c) = self.constraints(v, vspan, &f) {
                        spec.constraints = c;
                    }
                }
                "overcommit" => match v.as_bool() {
                    Some(b) => spec.overcommit = b,
                    None => self.problem(vspan, &f, type_message(v, "true or false")),
                },
                _ => unreachable!("entries() keeps allowed keys only"),
            }
        }
        (self.problems.len() == before).then_some(spec)
    }

    fn integer(
        &mut self,
        v: &Item,
        span: Option<Range<usize>>,
        field: &str,
        example: &str,
    ) -> Option<i64> {
        let n = v.as_integer();
        if n.is_none() {
            self.problem(
                span,
                field,
                type_message(v, &format!("a whole number: {example}")),
            );
        }
        n
    }

    fn command(
        &mut self,
        v: &Item,
        span: Option<Range<usize>>,
        field: &str,
    ) -> Option<Vec<String>> {
        if let Some(s) = v.as_str() {
            let words: Vec<String> = s.split_whitespace().map(quote).collect();
            self.problem(
                span,
                field,
                format!(
                    "a command is an array of arguments, not a string (escale runs no shell): write command = [{}]",
                    words.join(", ")
                ),
            );
            return None;
        }
        let Some(arr) = v.as_array() else {
            self.problem(
                span,
                field,
                type_message(
                    v,
                    "an array of arguments: command = [\"./server\", \"--port\", \"8080\"]",
                ),
            );
            return None;
        };
        let mut argv = Vec::new();
        for (i, a) in arr.iter().enumerate() {
            match a.as_str() {
                Some(s) => argv.push(s.to_string()),
                None => {
                    self.problem(
                        a.span().or_else(|| span.clone()),
                        &format!("{field}[{i}]"),
                        format!("arguments are strings, found {}", a.type_name()),
                    );
                    return None;
                }
            }
        }
        if argv.is_empty() {
            self.problem(
                span,
                field,
                "the command is empty: give at least the program, or leave `command` out to run the image's default command",
            );
            return None;
        }
        if let Err(e) = validate::command(&argv) {
            self.problem(span, field, e.0);
            return None;
        }
        Some(argv)
    }

    fn health(&mut self, v: &Item, span: Option<Range<usize>>, field: &str) -> Option<HealthCheck> {
        let Some(t) = v.as_table_like() else {
            self.problem(
                span,
                field,
                type_message(
                    v,
                    "a table: [processes.NAME.health] with kind, path, interval, timeout, grace",
                ),
            );
            return None;
        };
        let before = self.problems.len();
        let mut h = default_health();
        let t_span = item_span(v).or(span);
        for (k, item, _, vspan) in self.entries(t, t_span, field, Some(HEALTH_KEYS)) {
            let f = path(field, k);
            let Some(s) = item.as_str() else {
                let example = match k {
                    "kind" => "kind = \"http\" (or \"tcp\", \"none\")",
                    "path" => "path = \"/healthz\"",
                    _ => "a duration such as \"5s\" or \"500ms\"",
                };
                self.problem(
                    vspan,
                    &f,
                    type_message(item, &format!("a string: {example}")),
                );
                continue;
            };
            match k {
                "kind" => match s {
                    "http" => h.kind = HealthKind::Http,
                    "tcp" => h.kind = HealthKind::Tcp,
                    "none" => h.kind = HealthKind::None,
                    other => self.problem(
                        vspan,
                        &f,
                        format!(
                            "unknown health check kind `{}`: use http, tcp or none",
                            printable(other)
                        ),
                    ),
                },
                "path" => match validate::health_path(s) {
                    Ok(()) => h.path = s.to_string(),
                    Err(e) => self.problem(vspan, &f, e.0),
                },
                _ => {
                    let ms = match humantime::parse_duration(s) {
                        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
                        Err(_) => {
                            self.problem(
                                vspan,
                                &f,
                                format!(
                                    "`{}` is not a duration: write e.g. \"5s\", \"500ms\" or \"1m\"",
                                    printable(s)
                                ),
                            );
                            continue;
                        }
                    };
                    match validate::health_ms(k, ms) {
                        Ok(ms) => match k {
                            "interval" => h.interval_ms = ms,
                            "timeout" => h.timeout_ms = ms,
                            _ => h.grace_ms = ms,
                        },
                        Err(e) => self.problem(vspan, &f, e.0),
                    }
                }
            }
        }
        (self.problems.len() == before).then_some(h)
    }
}

/// The span of an item's value or table header, when the parser kept one.
fn item_span(item: &Item) -> Option<Range<usize>> {
    match item {
        Item::Value(v) => v.span(),
        Item::Table(t) => t.span(),
        Item::ArrayOfTables(a) => a.span(),
        Item::None => None,
    }
}

/// "expected X, found Y".
fn type_message(item: &Item, expected: &str) -> String {
    let found = match item {
        Item::Value(v) => v.type_name(),
        Item::Table(_) => "table",
        Item::ArrayOfTables(_) => "array of tables",
        Item::None => "nothing",
    };
    format!("expected {expected}; found {found}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessType;

    const GOOD: &str = r#"
app = "shop"
domains = ["Shop.Example.EU", "www.shop.example.eu"]

[env]
LOG_LEVEL = "info"
GREETING = "hello \"world\""

[processes.web]
command = ["bundle", "exec", "puma", "-p", "8080"]
port = 8080
instances = 2
memory = "256m"
cpus = 0.5
surge = 2

[processes.web.health]
kind = "http"
path = "/healthz"
interval = "10s"
timeout = "1500ms"
grace = "1m"

[processes.worker]
command = ["./worker"]
instances = 1
memory = 268435456
cpus = "2"

[processes.worker.health]
kind = "none"
"#;

    #[track_caller]
    fn first_error(text: &str) -> Located {
        match Manifest::parse(text) {
            Ok(m) => panic!("accepted: {m:?}"),
            Err(e) => e.first().clone(),
        }
    }

    #[track_caller]
    fn assert_error(text: &str, line: usize, field: &str, words: &[&str]) -> Located {
        let e = first_error(text);
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        for w in words {
            assert!(e.message.contains(w), "`{w}` not in: {e}");
        }
        e
    }

    #[test]
    fn constraints_and_overcommit_parse_and_are_checked() {
        let m = Manifest::parse(
            "[processes.web]\nconstraints = { disk = \"ssd\", zone = \"eu-1\" }\novercommit = true\n",
        )
        .unwrap();
        let web = &m.processes["web"];
        assert_eq!(
            web.constraints,
            BTreeMap::from([
                ("disk".to_string(), "ssd".to_string()),
                ("zone".to_string(), "eu-1".to_string())
            ])
        );
        assert!(web.overcommit);
        let none = Manifest::parse("[processes.web]\nport = 80\n").unwrap();
        assert!(none.processes["web"].constraints.is_empty());
        assert!(!none.processes["web"].overcommit);
        assert_error(
            "[processes.web]\nconstraints = { disk = 1 }\n",
            2,
            "processes.web.constraints.disk",
            &["a string"],
        );
        assert_error(
            "[processes.web]\nconstraints = { \"Disk Type\" = \"ssd\" }\n",
            2,
            "processes.web.constraints.\"Disk Type\"",
            &["label", "invalid"],
        );
        assert_error(
            "[processes.web]\nconstraints = \"disk=ssd\"\n",
            2,
            "processes.web.constraints",
            &["table of node labels"],
        );
        assert_error(
            "[processes.web]\novercommit = \"yes\"\n",
            2,
            "processes.web.overcommit",
            &["true or false"],
        );
    }

    #[test]
    fn a_good_manifest_parses_to_validated_values() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.app.as_deref(), Some("shop"));
        assert_eq!(
            m.domains,
            Some(vec!["shop.example.eu".into(), "www.shop.example.eu".into()])
        );
        let env = m.env.as_ref().unwrap();
        assert_eq!(env["GREETING"], "hello \"world\"");
        let web = &m.processes["web"];
        assert_eq!(
            web.command.as_deref().unwrap(),
            ["bundle", "exec", "puma", "-p", "8080"]
        );
        assert_eq!(web.port, Some(8080));
        assert_eq!(web.instances, Some(2));
        assert_eq!(web.memory_bytes, Some(256 << 20));
        assert_eq!(web.nano_cpus, Some(500_000_000));
        assert_eq!(web.surge, 2);
        assert_eq!(
            web.health,
            HealthCheck {
                kind: HealthKind::Http,
                path: "/healthz".into(),
                interval_ms: 10_000,
                timeout_ms: 1_500,
                grace_ms: 60_000,
            }
        );
        let worker = &m.processes["worker"];
        assert_eq!(worker.port, None);
        assert_eq!(worker.memory_bytes, Some(256 << 20));
        assert_eq!(worker.nano_cpus, Some(2_000_000_000));
        assert_eq!(worker.surge, DEFAULT_SURGE);
        assert_eq!(worker.health.kind, HealthKind::None);
        assert_eq!(worker.health.interval_ms, 5_000);
    }

    #[test]
    fn absent_sections_are_left_alone_and_empty_ones_are_exact() {
        let m = Manifest::parse("").unwrap();
        assert_eq!(m, Manifest::default());
        let m = Manifest::parse("domains = []\n[env]\n").unwrap();
        assert_eq!(m.domains, Some(vec![]));
        assert_eq!(m.env, Some(BTreeMap::new()));
        // Inline tables are tables too.
        let m = Manifest::parse("processes = { web = { port = 80, health = { kind = \"tcp\" } } }")
            .unwrap();
        assert_eq!(m.processes["web"].health.kind, HealthKind::Tcp);
    }

    #[test]
    fn to_toml_reads_back_equal() {
        let m = Manifest::parse(GOOD).unwrap();
        let text = m.to_toml();
        assert_eq!(Manifest::parse(&text).unwrap(), m, "{text}");
        // Odd keys and values survive quoting.
        let mut m = Manifest {
            env: Some(BTreeMap::from([(
                "lower_ok".to_string(),
                "line\nbreak \\ \"q\" é".to_string(),
            )])),
            ..Default::default()
        };
        m.processes.insert(
            "web".into(),
            ProcessSpec {
                command: Some(vec!["sh".into(), "-c".into(), "echo 'a b' \"$X\"".into()]),
                port: Some(5000),
                instances: Some(0),
                memory_bytes: Some(6 << 20 | 1),
                nano_cpus: Some(10_000_000),
                surge: 1,
                constraints: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
                overcommit: true,
                health: HealthCheck {
                    kind: HealthKind::Tcp,
                    path: "/".into(),
                    interval_ms: 100,
                    timeout_ms: 50,
                    grace_ms: 0,
                },
            },
        );
        let text = m.to_toml();
        assert_eq!(Manifest::parse(&text).unwrap(), m, "{text}");
    }

    #[test]
    fn from_app_leaves_secrets_out() {
        let app = App {
            name: "shop".into(),
            team: "default".into(),
            release: None,
            created_at: 0,
            disk_bytes: None,
            processes: vec![ProcessType {
                name: "web".into(),
                command: None,
                port: 5000,
                instances: 1,
                memory_bytes: None,
                nano_cpus: None,
                surge: 1,
                health: default_health(),
                constraints: BTreeMap::new(),
                overcommit: false,
            }],
            domains: vec!["shop.example.eu".into()],
        };
        let config = [
            ConfigVar {
                key: "A".into(),
                value: Some("1".into()),
                secret: false,
            },
            ConfigVar {
                key: "S".into(),
                value: None,
                secret: true,
            },
            ConfigVar {
                key: "R".into(),
                value: Some("revealed".into()),
                secret: true,
            },
        ];
        let m = Manifest::from_app(&app, &config);
        assert_eq!(
            m.env,
            Some(BTreeMap::from([("A".to_string(), "1".to_string())]))
        );
        let text = m.to_toml();
        assert!(!text.contains("revealed"), "{text}");
        assert_eq!(
            text,
            "app = \"shop\"\ndomains = [\"shop.example.eu\"]\n\n[env]\nA = \"1\"\n\n[processes.web]\nport = 5000\ninstances = 1\n"
        );
        assert_eq!(Manifest::parse(&text).unwrap(), m);
    }

    #[test]
    fn a_string_command_is_an_error_that_shows_the_array() {
        let e = assert_error(
            "[processes.web]\ncommand = \"bundle exec puma\"\n",
            2,
            "processes.web.command",
            &["array", r#"command = ["bundle", "exec", "puma"]"#],
        );
        assert_eq!(e.column, 11);
        assert_error(
            "[processes.web]\ncommand = []\n",
            2,
            "processes.web.command",
            &["empty"],
        );
        assert_error(
            "[processes.web]\ncommand = [\"a\", 1]\n",
            2,
            "processes.web.command[1]",
            &["strings"],
        );
    }

    #[test]
    fn unknown_keys_are_errors_at_every_level() {
        let e = assert_error(
            "app = \"shop\"\nprocess = {}\n",
            2,
            "process",
            &["unknown key `process`", "app, domains, env, processes"],
        );
        assert_eq!(e.column, 1);
        assert_error(
            "[processes.web]\nport = 80\nmemroy = \"1g\"\n",
            3,
            "processes.web.memroy",
            &["unknown key", "memory"],
        );
        assert_error(
            "[processes.web.health]\nkind = \"http\"\nperiod = \"5s\"\n",
            3,
            "processes.web.health.period",
            &["unknown key", "interval"],
        );
        assert_error(
            "[processes.web]\nport = 80\n[processes.web.healthz]\npath = \"/\"\n",
            3,
            "processes.web.healthz",
            &["unknown key"],
        );
    }

    #[test]
    fn every_value_error_names_its_line_and_field() {
        let cases: &[(&str, usize, &str, &str)] = &[
            ("app = \"Shop\"", 1, "app", "app name"),
            ("app = 3", 1, "app", "expected a string"),
            ("domains = \"a.eu\"", 1, "domains", "array"),
            (
                "domains = [\"ok.eu\",\n  \"bad domain\"]",
                2,
                "domains[1]",
                "invalid",
            ),
            ("domains = [\"a.eu\", \"A.eu\"]", 1, "domains[1]", "twice"),
            ("domains = [1]", 1, "domains[0]", "string"),
            ("env = 1", 1, "env", "table"),
            ("[env]\nPORT = \"1\"", 2, "env.PORT", "reserved"),
            ("[env]\n\"A B\" = \"1\"", 2, "env.\"A B\"", "invalid"),
            ("[env]\nN = 3", 2, "env.N", "N = \"3\""),
            ("[env]\nN = \"a\\u0000b\"", 2, "env.N", "NUL"),
            ("processes = 1", 1, "processes", "table"),
            (
                "[processes.Web]\nport = 1",
                1,
                "processes.Web",
                "process type",
            ),
            ("[processes]\nweb = 1", 2, "processes.web", "table"),
            (
                "[processes.web]\nport = 0",
                2,
                "processes.web.port",
                "1 to 65535",
            ),
            (
                "[processes.web]\nport = \"80\"",
                2,
                "processes.web.port",
                "whole number",
            ),
            (
                "[processes.web]\ninstances = -1",
                2,
                "processes.web.instances",
                "out of range",
            ),
            (
                "[processes.web]\ninstances = 1.5",
                2,
                "processes.web.instances",
                "found float",
            ),
            (
                "[processes.web]\nmemory = \"4m\"",
                2,
                "processes.web.memory",
                "minimum",
            ),
            (
                "[processes.web]\nmemory = \"lots\"",
                2,
                "processes.web.memory",
                "256m",
            ),
            (
                "[processes.web]\nmemory = true",
                2,
                "processes.web.memory",
                "found boolean",
            ),
            (
                "[processes.web]\ncpus = 0",
                2,
                "processes.web.cpus",
                "between",
            ),
            (
                "[processes.web]\ncpus = \"half\"",
                2,
                "processes.web.cpus",
                "0.5",
            ),
            (
                "[processes.web]\nsurge = 0",
                2,
                "processes.web.surge",
                "1 to 100",
            ),
            (
                "[processes.web]\nhealth = \"http\"",
                2,
                "processes.web.health",
                "table",
            ),
            (
                "[processes.web.health]\nkind = \"grpc\"",
                2,
                "processes.web.health.kind",
                "http, tcp or none",
            ),
            (
                "[processes.web.health]\npath = \"health\"",
                2,
                "processes.web.health.path",
                "start with `/`",
            ),
            (
                "[processes.web.health]\ninterval = 5",
                2,
                "processes.web.health.interval",
                "\"5s\"",
            ),
            (
                "[processes.web.health]\ninterval = \"soon\"",
                2,
                "processes.web.health.interval",
                "not a duration",
            ),
            (
                "[processes.web.health]\ninterval = \"10ms\"",
                2,
                "processes.web.health.interval",
                "out of range",
            ),
            (
                "[processes.web.health]\ntimeout = \"1h\"",
                2,
                "processes.web.health.timeout",
                "out of range",
            ),
            (
                "[processes.web.health]\ngrace = \"2h\"",
                2,
                "processes.web.health.grace",
                "out of range",
            ),
        ];
        for (text, line, field, word) in cases {
            let e = first_error(text);
            assert_eq!((e.line, e.field.as_str()), (*line, *field), "{text}: {e}");
            assert!(e.message.contains(word), "{text}: `{word}` not in {e}");
        }
    }

    #[test]
    fn all_problems_are_reported_in_file_order() {
        let text = "[processes.web]\nport = 0\nsurge = 0\n\n[env]\nPORT = \"1\"\n";
        let ManifestError::Invalid(all) = Manifest::parse(text).unwrap_err() else {
            panic!("not a validation error")
        };
        let lines: Vec<usize> = all.iter().map(|l| l.line).collect();
        assert_eq!(lines, [2, 3, 6]);
        let shown = ManifestError::Invalid(all).to_string();
        assert!(
            shown.starts_with("2:8 processes.web.port: port 0 is out of range"),
            "{shown}"
        );
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = Manifest::parse("app = \"shop\"\n[processes.web\nport = 1\n").unwrap_err();
        assert!(matches!(e, ManifestError::Syntax(_)), "{e:?}");
        assert_eq!(e.first().line, 2, "{e}");
        let e = Manifest::parse("app = \"a\"\napp = \"b\"\n").unwrap_err();
        assert_eq!(e.first().line, 2, "{e}");
    }

    #[test]
    fn checks_use_what_the_server_knows() {
        let checks = Checks {
            app: Some("shop"),
            max_instances: Some(5),
            apps_domain: Some("apps.example.eu"),
        };
        let parse = |t: &str| Manifest::parse_with(t, &checks).map_err(|e| e.first().clone());
        let e = parse("\napp = \"other\"").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "app"));
        assert!(e.message.contains("for app `other`, not `shop`"), "{e}");
        let e = parse("[processes.web]\ninstances = 6").unwrap_err();
        assert!(e.message.contains("0 to 5"), "{e}");
        let e = parse("domains = [\"blog.apps.example.eu\"]").unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        let e = parse("domains = [\"apps.example.eu\"]").unwrap_err();
        assert!(e.message.contains("is the apps domain"), "{e}");
        let e = parse("domains = [\"login.blog.apps.example.eu\", \"example.eu\"]").unwrap_err();
        assert!(
            e.message.contains("reserved for an app named `blog`"),
            "{e}"
        );
        assert!(parse("domains = [\"login.shop.apps.example.eu\"]").is_ok());
        assert!(parse("app = \"shop\"\ndomains = [\"shop.apps.example.eu\"]").is_ok());
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_col("a\nbé c", 6), (2, 4));
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("abc", 99), (1, 4));
    }
}
