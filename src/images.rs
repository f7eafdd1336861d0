//! Which images an app may run or build on: the pure rules, no I/O.
//!
//! Every app shares the nodes' Docker engines, and an engine resolves more than names: an id
//! or any unambiguous id prefix (`df`), `sha256:<id>`, and every local tag, including the
//! images escale built from another team's source. So:
//!
//! - An image is named by reference only: [`refuse_id`] refuses `sha256:...` and bare hex
//!   (an id prefix for the engine), and [`referenced_by`] requires the image the engine found
//!   to carry the requested name among its `RepoTags`/`RepoDigests`.
//! - An image escale built belongs to its app: builds are labelled [`LABEL_BUILT_FOR`] with the
//!   app's uid (never reused); [`may_use`] lets only that app run it or build on it. Images
//!   built before uids existed (labelled with the app name only) are nobody's.
//! - A Dockerfile is checked before its build: [`dockerfile_images`] lists the images its
//!   `FROM` and `COPY --from` lines pull in (line continuations, the escape directive, global
//!   `ARG`s with the build args, stage names, `--platform`); what it cannot decide for sure
//!   (a `$` in `--from`, unsupported substitutions) is refused rather than guessed.

use std::collections::HashMap;

/// Label on images escale builds: the uid of the app they were built for.
pub const LABEL_BUILT_FOR: &str = "escale.built-for";
/// Label on images escale builds: the commit they were built from (also on images built
/// before [`LABEL_BUILT_FOR`] existed).
pub const LABEL_GIT_COMMIT: &str = "escale.git.commit";

/// Refuses references the engine would take as an image id: `sha256:...` and bare hex names
/// (no registry, path, tag or digest), which the engine resolves as id prefixes.
pub fn refuse_id(image: &str) -> Result<(), String> {
    let lower = image.to_ascii_lowercase();
    let bare_hex = !image.is_empty() && image.bytes().all(|b| b.is_ascii_hexdigit());
    if lower.starts_with("sha256:") || bare_hex {
        return Err(format!(
            "`{}` looks like an image id; escale runs images by name only: give `repository:tag` or `repository@sha256:<digest>`",
            crate::validate::printable(image)
        ));
    }
    Ok(())
}

/// A reference in the short form the engine reports in `RepoTags`/`RepoDigests`:
/// `docker.io/library/` and `docker.io/` dropped, `:latest` added when there is neither tag
/// nor digest, the tag dropped when there is a digest.
pub fn normalize(image: &str) -> String {
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    let mut name = name;
    for prefix in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            name = rest;
            break;
        }
    }
    let name = name.strip_prefix("library/").unwrap_or(name);
    match (digest, tag) {
        (Some(d), _) => format!("{name}@{d}"),
        (None, Some(t)) => format!("{name}:{t}"),
        (None, None) => format!("{name}:latest"),
    }
}

/// Whether an image with these tags and digests is what `image` names (and not merely what
/// the engine resolved it to, e.g. by id prefix).
pub fn referenced_by(image: &str, repo_tags: &[String], repo_digests: &[String]) -> bool {
    let want = normalize(image);
    repo_tags
        .iter()
        .chain(repo_digests)
        .any(|r| normalize(r) == want)
}

/// Who built an image, by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builder {
    /// Not built by escale (pulled, or built by someone else).
    Other,
    /// Built by escale for the app with this uid.
    App(String),
    /// Built by an escale before app uids: whose it is cannot be told.
    Unknown,
}

/// Who built the image with these labels.
pub fn builder(labels: &HashMap<String, String>) -> Builder {
    if let Some(uid) = labels.get(LABEL_BUILT_FOR) {
        Builder::App(uid.clone())
    } else if labels.contains_key(LABEL_GIT_COMMIT) {
        Builder::Unknown
    } else {
        Builder::Other
    }
}

/// Whether the app with uid `app_uid` may run, or build on, an image built by `b`.
pub fn may_use(b: &Builder, app_uid: &str) -> bool {
    match b {
        Builder::Other => true,
        Builder::App(uid) => uid == app_uid,
        Builder::Unknown => false,
    }
}

/// An image a Dockerfile uses, with the 1-based line of the instruction that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub line: usize,
    /// `FROM` or `COPY --from`.
    pub instruction: &'static str,
    pub image: String,
}

/// The images (not stages, not `scratch`) that the `FROM` and `COPY --from` instructions of
/// `dockerfile` use, `ARG`s substituted as the classic builder does: global `ARG`s (before
/// the first `FROM`) take their build arg if one is given, else their default. `Err` (a
/// message naming the line) when escale cannot tell for sure what an instruction names.
pub fn dockerfile_images(
    dockerfile: &str,
    build_args: &[(String, String)],
) -> Result<Vec<Used>, String> {
    let given: HashMap<&str, &str> = build_args
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut globals: HashMap<String, String> = HashMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut seen_from = false;
    for (line, text) in logical_lines(dockerfile) {
        let text = text.trim();
        let (word, rest) = match text.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((w, r)) => (w, r.trim_start()),
            None => (text, ""),
        };
        let bad = |why: &str| format!("Dockerfile line {line}: {why}");
        match word.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                for decl in rest.split_ascii_whitespace() {
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n, Some(d)),
                        None => (decl, None),
                    };
                    let value = match (given.get(name), default) {
                        (Some(v), _) => (*v).to_string(),
                        (None, Some(d)) => expand(d, &globals).map_err(|e| bad(&e))?,
                        (None, None) => String::new(),
                    };
                    globals.insert(name.to_string(), value);
                }
            }
            "FROM" => {
                seen_from = true;
                let words: Vec<&str> = rest
                    .split_ascii_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let Some(raw) = words.first() else {
                    return Err(bad("FROM names no image"));
                };
                let image = expand(raw, &globals).map_err(|e| bad(&e))?;
                check_word(&image).map_err(|e| bad(&e))?;
                let lower = image.to_ascii_lowercase();
                if !(lower == "scratch" || lower.is_empty() || stages.contains(&lower)) {
                    out.push(Used {
                        line,
                        instruction: "FROM",
                        image,
                    });
                }
                if words.len() >= 3 && words[1].eq_ignore_ascii_case("as") {
                    stages.push(words[2].to_ascii_lowercase());
                } else {
                    stages.push(String::new());
                }
            }
            "COPY" => {
                let mut words = rest.split_ascii_whitespace().peekable();
                while let Some(w) = words.next_if(|w| w.starts_with("--")) {
                    let Some(flag) = w.strip_prefix("--") else {
                        continue;
                    };
                    let (name, value) = match flag.split_once('=') {
                        Some((n, v)) => (n, Some(v.to_string())),
                        None => (flag, None),
                    };
                    if !name.eq_ignore_ascii_case("from") {
                        continue;
                    }
                    let value = match value {
                        Some(v) => v,
                        None => words.next().unwrap_or_default().to_string(),
                    };
                    check_word(&value).map_err(|e| bad(&e))?;
                    if value.contains('$') {
                        return Err(bad(
                            "`COPY --from` must name a stage or an image literally (no `$`)",
                        ));
                    }
                    let lower = value.to_ascii_lowercase();
                    let is_index = !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_digit());
                    if !(is_index || lower.is_empty() || stages.contains(&lower)) {
                        out.push(Used {
                            line,
                            instruction: "COPY --from",
                            image: value,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Refuses what the builder would read differently from a plain word (quotes, escapes).
fn check_word(w: &str) -> Result<(), String> {
    if w.contains(['"', '\'', '\\', '`']) {
        Err(format!(
            "`{}`: quotes and escapes are not allowed in image names",
            crate::validate::printable(w)
        ))
    } else {
        Ok(())
    }
}

/// `$NAME`, `${NAME}`, `${NAME:-word}` and `${NAME:+word}` substituted from `vars` (unset is
/// empty, as with the builder); any other `$` form is an error.
fn expand(s: &str, vars: &HashMap<String, String>) -> Result<String, String> {
    let unsupported = || {
        format!(
            "`{}`: escale checks images named with `$NAME`, `${{NAME}}`, `${{NAME:-default}}` or `${{NAME:+word}}` only",
            crate::validate::printable(s)
        )
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(inner) = rest.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(unsupported)?;
            let body = &inner[..end];
            rest = &inner[end + 1..];
            let (name, op) = match body.find(|c: char| !is_name(c)) {
                Some(j) => (&body[..j], Some(&body[j..])),
                None => (body, None),
            };
            if name.is_empty() {
                return Err(unsupported());
            }
            let value = vars.get(name).map(String::as_str).unwrap_or("");
            match op {
                None => out.push_str(value),
                Some(op) => {
                    if op.contains('$') {
                        return Err(unsupported());
                    }
                    if let Some(word) = op.strip_prefix(":-") {
                        out.push_str(if value.is_empty() { word } else { value });
                    } else if let Some(word) = op.strip_prefix(":+") {
                        out.push_str(if value.is_empty() { "" } else { word });
                    } else {
                        return Err(unsupported());
                    }
                }
            }
        } else {
            let end = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
            if end == 0 {
                return Err(unsupported());
            }
            out.push_str(vars.get(&rest[..end]).map(String::as_str).unwrap_or(""));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The Dockerfile's instructions, continuation lines joined, comments and blank lines
/// dropped (also inside a continuation, as the builder does), with the line each starts on.
/// Honours the `# escape=` parser directive.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut escape = '\\';
    let mut directives = true;
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if directives {
            if let Some(d) = trimmed.strip_prefix('#') {
                if let Some((k, v)) = d.split_once('=') {
                    let k = k.trim().to_ascii_lowercase();
                    if k == "escape" {
                        if let Some(c) = v.trim().chars().next() {
                            escape = c;
                        }
                        continue;
                    }
                    if k == "syntax" || k == "check" {
                        continue;
                    }
                }
            }
            directives = false;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let end = raw.trim_end();
        let (body, continues) = match end.strip_suffix(escape) {
            Some(b) => (b, true),
            None => (end, false),
        };
        let (start, mut acc) = current.take().unwrap_or((i + 1, String::new()));
        acc.push_str(body);
        if continues {
            current = Some((start, acc));
        } else {
            out.push((start, acc));
        }
    }
    if let Some(c) = current {
        out.push(c);
    }
    out
}

/// The label selecting the images built for the app with uid `uid`.
pub fn built_for_label(uid: &str) -> String {
    format!("{LABEL_BUILT_FOR}={uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_prefixes_are_refused() {
        for bad in [
            "df",
            "DF",
            "0123abcd",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "SHA256:01",
        ] {
            assert!(refuse_id(bad).is_err(), "{bad}");
        }
        for ok in [
            "nginx",
            "df:1",
            "library/df",
            "reg.io/x@sha256:00",
            "web-app",
        ] {
            assert!(refuse_id(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn references_are_normalized_and_matched() {
        assert_eq!(normalize("nginx"), "nginx:latest");
        assert_eq!(normalize("docker.io/library/nginx:1"), "nginx:1");
        assert_eq!(normalize("docker.io/acme/app"), "acme/app:latest");
        assert_eq!(normalize("reg.io:5000/a/b"), "reg.io:5000/a/b:latest");
        assert_eq!(normalize("a:1@sha256:ab"), "a@sha256:ab");
        let tags = vec!["shop:v1-abc".to_string()];
        let digests = vec!["nginx@sha256:ff".to_string()];
        assert!(referenced_by("shop:v1-abc", &tags, &[]));
        assert!(referenced_by(
            "docker.io/library/nginx@sha256:ff",
            &[],
            &digests
        ));
        assert!(!referenced_by("shop", &tags, &[]));
        assert!(!referenced_by("df", &tags, &digests));
    }

    #[test]
    fn built_images_belong_to_their_app() {
        let mut l = HashMap::new();
        assert_eq!(builder(&l), Builder::Other);
        assert!(may_use(&builder(&l), "a"));
        l.insert(LABEL_GIT_COMMIT.to_string(), "c".to_string());
        assert_eq!(builder(&l), Builder::Unknown);
        assert!(!may_use(&builder(&l), "a"));
        l.insert(LABEL_BUILT_FOR.to_string(), "a".to_string());
        assert!(may_use(&builder(&l), "a"));
        assert!(!may_use(&builder(&l), "b"));
    }

    fn images(df: &str, args: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let args: Vec<(String, String)> = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        dockerfile_images(df, &args).map(|v| v.into_iter().map(|u| u.image).collect())
    }

    #[test]
    fn dockerfiles_name_their_images() {
        let df = "# syntax=docker/dockerfile:1\nARG BASE=alpine:3\nARG TAG\nFROM --platform=$BUILDPLATFORM ${BASE} AS build\nRUN make\nFROM build\nFROM scratch\nCOPY --from=build /a /a\nCOPY --from=0 /b /b\nCOPY --chown=1:1 --from=victim:v1 /c /c\nFROM reg.io/x:${TAG:-1}\n";
        assert_eq!(
            images(df, &[]).unwrap(),
            vec!["alpine:3", "victim:v1", "reg.io/x:1"]
        );
        // Build args override declared global ARGs only.
        assert_eq!(
            images(df, &[("BASE", "shop:v2-abc"), ("TAG", "9")]).unwrap(),
            vec!["shop:v2-abc", "victim:v1", "reg.io/x:9"]
        );
        assert_eq!(
            images("FROM $X\n", &[("X", "shop:v1")]).unwrap(),
            vec![""; 0]
        );
        // Continuations, comments inside them, lower case, the escape directive.
        assert_eq!(
            images("from \\\n  # comment\n\n  shop:v1 \\\n as s\n", &[]).unwrap(),
            vec!["shop:v1"]
        );
        assert_eq!(
            images("# escape=`\nFROM a:1\ncopy `\n --from=shop:v1 / /\n", &[]).unwrap(),
            vec!["a:1", "shop:v1"]
        );
        // A stage name used before it is defined is an image.
        assert_eq!(
            images("FROM a:1\nCOPY --from=later / /\nFROM b:1 AS later\n", &[]).unwrap(),
            vec!["a:1", "later", "b:1"]
        );
        // What cannot be decided for sure is refused.
        for bad in [
            "FROM a:1\nCOPY --from=$X / /\n",
            "FROM ${X/a/b}\n",
            "FROM \"shop:v1\"\n",
            "FROM\n",
            "ARG X=${Y:?}\nFROM a\n",
        ] {
            assert!(images(bad, &[]).is_err(), "{bad}");
        }
    }
}
