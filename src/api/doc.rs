//! Completes the OpenAPI document generated from the handlers' `#[utoipa::path]` annotations
//! with the error answers every operation can give, so the document lists each status the
//! server may answer, each as `application/problem+json` with the [`super::Problem`] schema.
//!
//! What follows from an operation's shape is added here, once for all: `401` (with
//! `WWW-Authenticate`) when it needs a token; `400` when it takes a body, a query or a path
//! parameter (syntax the extractors refuse); `404` when its path names something; `413` and
//! `422` when it takes a JSON body. What depends on the handler (`403`, `409`, `422` for rules
//! beyond the schema, `429`, `503`) is in [`ERRORS`], one row per operation: an operation
//! without a row is a bug that [`complete`]'s test catches.
//!
//! Invariant (tested in `tests/it/api.rs`, whose harness checks every answer it gets): every
//! status an operation answers is in its `responses`.

use serde_json::{json, Map, Value};

use crate::validate::{self, patterns};

/// Error statuses an operation answers beyond those its shape implies, by operation id (the
/// handler's name).
pub const ERRORS: &[(&str, &[u16])] = &[
    ("health", &[]),
    ("openapi_json", &[]),
    // The setup token is refused (403), a concurrent setup won (409), hashing is saturated.
    ("setup", &[403, 409, 503]),
    ("login", &[401, 409, 429, 503]),
    ("me", &[]),
    ("list_users", &[403]),
    ("create_user", &[403, 404, 409, 503]),
    ("delete_user", &[403, 409]),
    ("list_teams", &[]),
    ("create_team", &[403, 409]),
    ("list_tokens", &[]),
    ("create_token", &[409]),
    ("delete_token", &[409]),
    ("list_apps", &[]),
    // Another team's app needs the admin role; the name is taken.
    ("create_app", &[403, 404, 409]),
    ("get_app", &[]),
    ("destroy_app", &[409]),
    ("list_processes", &[]),
    // A deploy holds the app (409); the formation does not fit the nodes (422).
    ("update_process", &[409]),
    ("define_process", &[409]),
    ("remove_process", &[409, 422]),
    ("update_formation", &[409]),
    // `reveal` is for admins.
    ("get_config", &[403]),
    ("update_config", &[409]),
    ("list_releases", &[]),
    ("get_release", &[422]),
    ("create_release", &[409, 503]),
    ("rollback", &[409, 503]),
    ("list_domains", &[]),
    ("add_domain", &[409]),
    ("remove_domain", &[409, 422]),
    ("list_certs", &[]),
    ("add_cert", &[409]),
    ("remove_cert", &[409, 422]),
    ("get_manifest", &[]),
    ("apply_manifest", &[409]),
    ("set_webhook", &[409]),
    // An invalid app name is 422 here.
    ("get_webhook", &[422]),
    ("remove_webhook", &[409, 422]),
    ("list_events", &[]),
    ("list_all_events", &[]),
    ("list_instances", &[]),
    ("logs", &[503]),
    // An unknown (or invalid) `app` is 404.
    ("stream_events", &[404]),
    ("list_nodes", &[403]),
    ("get_node", &[403]),
    ("add_node", &[403, 409]),
    ("renew_node", &[403, 409]),
    ("cordon_node", &[403, 409]),
    ("uncordon_node", &[403, 409]),
    ("drain_node", &[403, 409]),
    ("remove_node", &[403, 409]),
    // A backup is being taken (409); the object store ([backup.s3]) failed or refused (503).
    ("create_backup", &[403, 409, 503]),
    ("list_backups", &[403, 503]),
    ("download_backup", &[403]),
];

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// Adds every operation's error answers (see the module doc) and renders each as
/// problem+json, and states the rules of [`crate::validate`] in the schemas and parameters
/// ([`constrain`]); `max_instances` is the server's bound on an instance count.
pub fn complete(doc: &mut Value, max_instances: u32) {
    constrain(doc, max_instances);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else {
                continue;
            };
            let id = op
                .get("operationId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut statuses: Vec<u16> = extra(&id).to_vec();
            let secured = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            let params = op
                .get("parameters")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let has = |kind: &str| params.iter().any(|p| p["in"] == kind);
            let body = op.contains_key("requestBody");
            if secured {
                statuses.push(401);
            }
            if body || has("query") || has("path") {
                statuses.push(400);
            }
            if path.contains('{') {
                statuses.push(404);
            }
            if body {
                statuses.extend([413, 422]);
            }
            // A query's values are checked beyond their types (ranges, names).
            if has("query") {
                statuses.push(422);
            }
            let responses = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("responses is an object");
            for s in statuses {
                responses.entry(s.to_string()).or_insert_with(|| json!({}));
            }
            for (status, resp) in responses.iter_mut() {
                let code: u16 = status.parse().unwrap_or(0);
                if code >= 400 {
                    *resp = problem(code, resp);
                }
            }
            sort_responses(responses);
        }
    }
}

fn pattern(p: &str) -> Value {
    json!({"pattern": p})
}

fn string(p: &str, max: usize) -> Value {
    json!({"pattern": p, "maxLength": max})
}

fn range(min: i64, max: i64) -> Value {
    json!({"minimum": min, "maximum": max})
}

/// A config var name: its syntax, and not one escale reserves.
fn env_key() -> Value {
    json!({"type": "string", "pattern": patterns::ENV_KEY, "not": {"pattern": patterns::ENV_KEY_RESERVED}})
}

/// The rules each request schema's properties follow, as JSON Schema keywords merged into the
/// generated property (component, property, keywords).
fn property_rules() -> Vec<(&'static str, &'static str, Value)> {
    let port = range(1, 65535);
    let password = json!({"minLength": 8, "maxLength": 1024});
    vec![
        ("SetupRequest", "name", pattern(patterns::ACCOUNT_NAME)),
        ("SetupRequest", "password", password.clone()),
        ("LoginRequest", "token_name", pattern(patterns::TOKEN_NAME)),
        ("CreateUserRequest", "name", pattern(patterns::ACCOUNT_NAME)),
        ("CreateUserRequest", "team", pattern(patterns::ACCOUNT_NAME)),
        ("CreateUserRequest", "password", password),
        ("CreateTeamRequest", "name", pattern(patterns::ACCOUNT_NAME)),
        ("CreateTokenRequest", "name", pattern(patterns::TOKEN_NAME)),
        ("CreateAppRequest", "name", pattern(patterns::APP_NAME)),
        ("CreateAppRequest", "team", pattern(patterns::ACCOUNT_NAME)),
        ("CreateAppRequest", "port", port.clone()),
        (
            "ProcessUpdate",
            "command",
            json!({"maxItems": validate::MAX_ARGS, "items": {"type": "string", "pattern": patterns::NO_NUL, "maxLength": validate::MAX_ARG_CHARS}}),
        ),
        ("ProcessUpdate", "port", port.clone()),
        ("ProcessUpdate", "memory", pattern(patterns::MEMORY_LIMIT)),
        ("ProcessUpdate", "cpus", pattern(patterns::CPUS)),
        ("ProcessUpdate", "surge", range(1, 100)),
        (
            "ProcessUpdate",
            "constraints",
            json!({"propertyNames": {"pattern": patterns::NODE_LABEL_KEY}, "additionalProperties": {"type": "string", "pattern": patterns::NODE_LABEL_VALUE}}),
        ),
        ("HealthUpdate", "path", pattern(patterns::HEALTH_PATH)),
        ("HealthUpdate", "interval_ms", range(100, 3_600_000)),
        ("HealthUpdate", "timeout_ms", range(50, 600_000)),
        ("HealthUpdate", "grace_ms", range(0, 3_600_000)),
        (
            "ConfigUpdate",
            "set",
            json!({"propertyNames": env_key(), "additionalProperties": {"type": "string", "pattern": patterns::NO_NUL, "maxLength": validate::MAX_VALUE_CHARS}}),
        ),
        ("ConfigUpdate", "unset", json!({"items": env_key()})),
        ("DeployRequest", "image", string(patterns::IMAGE_REF, 512)),
        ("DeployRequest", "port", port),
        (
            "DeployRequest",
            "description",
            string(patterns::NO_NUL, 500),
        ),
        ("DomainRequest", "domain", string(patterns::DOMAIN, 253)),
        ("CertRequest", "domain", string(patterns::DOMAIN, 253)),
        (
            "WebhookRequest",
            "repository",
            json!({"pattern": "^(?:https?|file)://[A-Za-z0-9._~/:+\\[\\]-]+$", "maxLength": 2048}),
        ),
        ("WebhookRequest", "secret", pattern("^[!-~]{16,256}$")),
        ("AddNodeRequest", "name", pattern(patterns::NODE_NAME)),
        (
            "AddNodeRequest",
            "labels",
            json!({"items": {"type": "string", "pattern": patterns::NODE_LABEL}}),
        ),
    ]
}

/// The rules of path and query parameters, by operation (`*` for all) and name.
fn parameter_rules() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        ("*", "app", string(patterns::APP_NAME, 30)),
        ("*", "process", string(patterns::PROCESS_NAME, 20)),
        ("*", "node", string(patterns::NODE_NAME, 63)),
        ("*", "domain", string(patterns::DOMAIN, 253)),
        ("*", "version", pattern(patterns::VERSION)),
        ("delete_user", "name", pattern(patterns::ACCOUNT_NAME)),
        ("delete_token", "name", pattern(patterns::TOKEN_NAME)),
        ("*", "limit", range(1, 1000)),
        ("list_events", "after", range(1, super::apps::MAX_CURSOR)),
        (
            "list_all_events",
            "after",
            range(1, super::apps::MAX_CURSOR),
        ),
        ("list_releases", "after", range(1, super::apps::MAX_CURSOR)),
        ("logs", "tail", range(0, 10_000)),
    ]
}

/// States the rules of [`crate::validate`] in the document (see [`property_rules`] and
/// [`parameter_rules`]).
fn constrain(doc: &mut Value, max_instances: u32) {
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (component, property, rules) in property_rules() {
            let prop = schemas
                .get_mut(component)
                .and_then(|c| c.pointer_mut(&format!("/properties/{property}")))
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("the document has no {component}.{property}"));
            for (k, v) in rules.as_object().expect("rules are an object") {
                prop.insert(k.clone(), v.clone());
            }
        }
        // Something to change: `set` or `unset` not empty.
        if let Some(c) = schemas.get_mut("ConfigUpdate") {
            c["anyOf"] = json!([
                {"required": ["set"], "properties": {"set": {"minProperties": 1}}},
                {"required": ["unset"], "properties": {"unset": {"minItems": 1}}}
            ]);
        }
        // `3` or `"v3"`.
        if let Some(c) = schemas.get_mut("RollbackRequest") {
            c["properties"]["version"] = json!({
                "description": "The version to roll back to, e.g. `3` or `\"v3\"`.",
                "oneOf": [
                    {"type": "integer", "minimum": 1, "maximum": 999_999_999},
                    {"type": "string", "pattern": patterns::VERSION}
                ]
            });
        }
    }
    let rules = parameter_rules();
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        for method in METHODS {
            let Some(op) = item.get_mut(method) else {
                continue;
            };
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            // The formation: process type -> instances.
            if id == "update_formation" {
                if let Some(schema) =
                    op.pointer_mut("/requestBody/content/application~1json/schema")
                {
                    *schema = json!({
                        "type": "object",
                        "minProperties": 1,
                        "propertyNames": {"pattern": patterns::PROCESS_NAME},
                        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": max_instances}
                    });
                }
            }
            for p in op
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let name = p["name"].as_str().unwrap_or_default().to_string();
                for (op_id, param, r) in &rules {
                    if (*op_id == "*" || *op_id == id) && *param == name {
                        for (k, v) in r.as_object().expect("rules are an object") {
                            p["schema"][k] = v.clone();
                        }
                    }
                }
            }
        }
    }
}

/// The statuses [`ERRORS`] gives `operation`; none for an unknown one (the test catches it).
fn extra(operation: &str) -> &'static [u16] {
    ERRORS
        .iter()
        .find(|(id, _)| *id == operation)
        .map(|(_, s)| *s)
        .unwrap_or(&[])
}

/// A problem+json answer with status `code`, keeping an annotation's description.
fn problem(code: u16, declared: &Value) -> Value {
    let reason = axum::http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error");
    let description = declared
        .get("description")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .unwrap_or(reason)
        .to_string();
    let mut out = json!({
        "description": description,
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    });
    let mut headers = Map::new();
    match code {
        401 => {
            headers.insert(
                "WWW-Authenticate".into(),
                json!({"description": "the schemes accepted: Bearer (and Basic, the token as password)", "required": true, "schema": {"type": "string"}}),
            );
        }
        429 | 503 => {
            headers.insert(
                "Retry-After".into(),
                json!({"description": "seconds to wait before trying again (when the refusal is temporary)", "schema": {"type": "integer", "minimum": 1}}),
            );
        }
        _ => {}
    }
    if !headers.is_empty() {
        out["headers"] = Value::Object(headers);
    }
    out
}

fn sort_responses(responses: &mut Map<String, Value>) {
    let mut all: Vec<(String, Value)> = std::mem::take(responses).into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    responses.extend(all);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_row_and_every_row_an_operation() {
        let doc = super::super::openapi();
        let mut ids = std::collections::BTreeSet::new();
        for item in doc["paths"].as_object().expect("paths").values() {
            for m in METHODS {
                if let Some(op) = item.get(m) {
                    let id = op["operationId"].as_str().expect("operationId");
                    assert!(
                        ERRORS.iter().any(|(r, _)| *r == id),
                        "operation `{id}` has no row in doc::ERRORS"
                    );
                    assert!(ids.insert(id.to_string()), "operation id `{id}` twice");
                }
            }
        }
        for (row, _) in ERRORS {
            assert!(
                ids.contains(*row),
                "doc::ERRORS row `{row}` names no operation"
            );
        }
    }

    #[test]
    fn errors_are_problem_json_and_401_says_how_to_authenticate() {
        let doc = super::super::openapi();
        let me = &doc["paths"]["/api/v1/me"]["get"]["responses"];
        let unauth = &me["401"];
        assert_eq!(
            unauth["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem",
            "{me}"
        );
        assert!(unauth["headers"]["WWW-Authenticate"].is_object(), "{me}");
        assert!(me.get("404").is_none(), "/me names nothing: {me}");
        let create = &doc["paths"]["/api/v1/apps"]["post"]["responses"];
        for s in ["400", "401", "403", "409", "413", "422"] {
            assert!(create.get(s).is_some(), "POST /apps lacks {s}: {create}");
        }
        // No error answer anywhere is plain JSON.
        for item in doc["paths"].as_object().expect("paths").values() {
            for m in METHODS {
                for (status, r) in item[m]["responses"].as_object().into_iter().flatten() {
                    if status.as_str() >= "400" {
                        let content = r["content"].as_object().expect("content");
                        assert_eq!(
                            content.keys().collect::<Vec<_>>(),
                            ["application/problem+json"]
                        );
                    }
                }
            }
        }
    }
}
