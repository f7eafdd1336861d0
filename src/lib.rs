//! escale: a self-hosted PaaS appliance in one binary.
//!
//! `escale serve` runs the registry (SQLite), the API, the reconciler that places and heals
//! containers on Docker engines, and the reverse proxy. The same binary is the CLI.
//! See `ARCHITECTURE.md` for the bird's-eye view, the code map and the invariants.

pub mod api;
pub mod auth;
pub mod backup;
pub mod certs;
pub mod cleanup;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod events;
pub mod git;
pub mod handover;
pub mod http;
pub mod images;
pub mod install;
pub mod listen;
pub mod manifest;
pub mod model;
pub mod node;
pub mod proxy;
pub mod registry;
pub mod routing;
pub mod runtime;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod service;
pub mod tls;
pub mod validate;
pub mod web;
pub mod webhooks;

#[cfg(test)]
mod layout {
    //! The module layout ARCHITECTURE.md promises: no import cycle between top-level modules.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `crate::name` references in `text`, grouped imports (`crate::{a, b::c}`) included.
    fn references(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for part in group[..end].split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    out.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
        out
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn top_level_modules_have_no_import_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let module_of = |p: &Path| -> String {
            let rel = p.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            first.trim_end_matches(".rs").to_string()
        };
        let modules: BTreeSet<String> = files.iter().map(|p| module_of(p)).collect();
        let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in &files {
            let m = module_of(f);
            if m == "lib" || m == "main" {
                continue;
            }
            // Code only: a doc link is not a dependency, nor are unit tests (a file named
            // `tests.rs`, or what follows `#[cfg(test)]`).
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text: String = std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .take_while(|l| l.trim() != "#[cfg(test)]")
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for r in references(&text) {
                if r != m && modules.contains(&r) {
                    deps.entry(m.clone()).or_default().insert(r);
                }
            }
        }
        // Every edge a -> b must not be reachable back from b.
        let reaches = |from: &str, to: &str| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![from.to_string()];
            while let Some(n) = stack.pop() {
                if n == to {
                    return true;
                }
                if seen.insert(n.clone()) {
                    stack.extend(deps.get(&n).into_iter().flatten().cloned());
                }
            }
            false
        };
        let mut cycles = Vec::new();
        for (a, bs) in &deps {
            for b in bs {
                if reaches(b, a) {
                    cycles.push(format!("{a} -> {b}"));
                }
            }
        }
        assert!(
            cycles.is_empty(),
            "edges on an import cycle between top-level modules: {cycles:?}"
        );
        // The proxy depends on the routing snapshot, TLS and listener hygiene only.
        let proxy: Vec<&String> = deps["proxy"].iter().collect();
        assert!(
            deps["proxy"]
                .iter()
                .all(|d| ["routing", "tls", "listen"].contains(&d.as_str())),
            "the proxy reaches beyond routing, tls and listen: {proxy:?}"
        );
    }
}
