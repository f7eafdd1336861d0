//! Validation of every name and value a user can send, applied at the API edge.
//!
//! Each function returns the canonical form (or `()`) or a [`ValidationError`] whose text says
//! what is wrong and what would be accepted. Nothing here does I/O.

/// A value that does not fit; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ValidationError> {
    Err(ValidationError(msg.into()))
}

/// Largest value of one config var, in characters.
pub const MAX_VALUE_CHARS: usize = 32 * 1024;

/// The rules above as JSON Schema regular expressions, for the OpenAPI document
/// (`crate::api`'s `doc` module): each accepts exactly what its function accepts (a property
/// test below checks both directions), so a request valid by the document is not refused for a
/// rule it does not state, and an invalid one is refused. They use the syntax that ECMA-262,
/// Python's `re` and the `regex` crate share (no look-around).
pub mod patterns {
    /// [`super::app_name`].
    pub const APP_NAME: &str = r"^[a-z](?:[a-z0-9-]{0,28}[a-z0-9])?$";
    /// [`super::process_name`].
    pub const PROCESS_NAME: &str = r"^[a-z](?:[a-z0-9-]{0,18}[a-z0-9])?$";
    /// [`super::account_name`].
    pub const ACCOUNT_NAME: &str = r"^[a-z0-9][a-z0-9._-]{0,39}$";
    /// [`super::token_name`].
    pub const TOKEN_NAME: &str = r"^[A-Za-z0-9._:@-]{1,64}$";
    /// [`super::node_name`].
    pub const NODE_NAME: &str = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$";
    /// [`super::node_label`] (`KEY=VALUE`).
    pub const NODE_LABEL: &str = r"^[a-z0-9][a-z0-9._-]{0,62}=[A-Za-z0-9._-]{1,63}$";
    /// A node label's key and value apart (process constraints).
    pub const NODE_LABEL_KEY: &str = r"^[a-z0-9][a-z0-9._-]{0,62}$";
    pub const NODE_LABEL_VALUE: &str = r"^[A-Za-z0-9._-]{1,63}$";
    /// [`super::env_key`]'s syntax; `PORT` and `ESCALE_*` are refused besides (the document
    /// says so with a `not`).
    pub const ENV_KEY: &str = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$";
    /// Names [`super::env_key`] reserves.
    pub const ENV_KEY_RESERVED: &str = r"^(?:PORT$|ESCALE_)";
    /// Text without NUL (config values, commands, descriptions).
    pub const NO_NUL: &str = r"^[^\x00]*$";
    /// [`super::health_path`].
    pub const HEALTH_PATH: &str = r"^/[!-~]{0,511}$";
    /// [`super::domain`] as the API takes it: ASCII (international names in their `xn--`
    /// form; the CLI converts), the last label starting with a letter, at most 253
    /// characters with an optional final dot.
    pub const DOMAIN: &str = r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$";
    /// [`super::image_ref`]: Docker's reference grammar.
    pub const IMAGE_REF: &str = r"^(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*(?::[0-9]{1,5})?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,})?$";
    /// [`super::api_memory_limit`]: `none`, or 6m to 999999999.999m, or 0.01g to 999999.999g
    /// (an optional `b`, `ib`).
    pub const MEMORY_LIMIT: &str = r"^(?:none|unlimited|(?:(?:[6-9]|[1-9][0-9]{1,8})(?:\.[0-9]{1,3})?[mM]|(?:0\.(?:0[1-9]|[1-9])[0-9]?|[1-9][0-9]{0,5}(?:\.[0-9]{1,3})?)[gG])(?:[iI]?[bB])?)$";
    /// [`super::api_cpus`]: `none`, or 0.01 to 256.
    pub const CPUS: &str = r"^(?:none|unlimited|0\.(?:0[1-9]|[1-9])[0-9]{0,7}|(?:[1-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])(?:\.[0-9]{1,8})?|256(?:\.0{1,8})?)$";
    /// A release version, `3` or `v3` (1 to 999999999).
    pub const VERSION: &str = r"^v?[1-9][0-9]{0,8}$";
}

/// A release version, `3` or `v3` ([`patterns::VERSION`]).
pub fn version(v: &str) -> Result<u32, ValidationError> {
    if !matches(patterns::VERSION, v) {
        return err(format!(
            "`{}` is not a release version; write e.g. `v3` or `3`",
            printable(v)
        ));
    }
    Ok(v.trim_start_matches('v').parse().expect("at most 9 digits"))
}

/// Whether `value` matches `pattern` (one of [`patterns`]), compiled once.
pub fn matches(pattern: &'static str, value: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<&'static str, regex::Regex>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry(pattern)
        .or_insert_with(|| regex::Regex::new(pattern).expect("a valid pattern"))
        .is_match(value)
}

/// A memory limit as the API takes it ([`patterns::MEMORY_LIMIT`]): `Some(bytes)`, or `None`
/// for `none`/`unlimited`.
pub fn api_memory_limit(input: &str) -> Result<Option<u64>, ValidationError> {
    if !matches(patterns::MEMORY_LIMIT, input) {
        return err(format!(
            "memory limit `{}` is invalid: write 6m to 999999999m or 0.01g to 999999g (e.g. `256m`, `1.5g`), or `none`",
            printable(input)
        ));
    }
    match input {
        "none" | "unlimited" => Ok(None),
        x => memory_limit(x).map(Some),
    }
}

/// A CPU limit as the API takes it ([`patterns::CPUS`]): `Some(nano-CPUs)`, or `None` for
/// `none`/`unlimited`.
pub fn api_cpus(input: &str) -> Result<Option<i64>, ValidationError> {
    if !matches(patterns::CPUS, input) {
        return err(format!(
            "CPU limit `{}` is invalid: write 0.01 to 256 (e.g. `0.5`, `2`), or `none`",
            printable(input)
        ));
    }
    match input {
        "none" | "unlimited" => Ok(None),
        x => cpus(x).map(Some),
    }
}
/// Largest number of config vars of one app.
pub const MAX_VARS: usize = 500;

/// An app name: a DNS label, lowercase letters, digits and `-`, 1 to 30 characters, starting
/// with a letter and not ending with `-` (it becomes `APP.<apps_domain>` and container names).
pub fn app_name(name: &str) -> Result<(), ValidationError> {
    dns_label(name, 30, "app name")
}

/// A process type name such as `web` or `worker`: same rules as an app name, 1 to 20 characters.
pub fn process_name(name: &str) -> Result<(), ValidationError> {
    dns_label(name, 20, "process type")
}

/// A user or team name: lowercase letters, digits, `-`, `_`, `.`, 1 to 40 characters.
pub fn account_name(name: &str, what: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        err(format!(
            "{what} `{}` is invalid: use 1 to 40 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit",
            printable(name)
        ))
    }
}

/// A token name (label only): printable, 1 to 64 characters.
pub fn token_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if ok {
        Ok(())
    } else {
        err("token name must be 1 to 64 letters, digits, `-`, `_`, `.`, `:` or `@`")
    }
}

fn dns_label(name: &str, max: usize, what: &str) -> Result<(), ValidationError> {
    if label_chars(name, max, false) {
        return Ok(());
    }
    err(format!(
        "{what} `{}` is invalid: use 1 to {max} lowercase letters, digits and `-`, starting with a letter and not ending with `-`",
        printable(name)
    ))
}

/// A node name: a DNS label of 1 to 63 lowercase letters, digits and `-` (a digit may come
/// first, as in host names).
pub fn node_name(name: &str) -> bool {
    label_chars(name, 63, true)
}

/// A node label `KEY=VALUE`: a key of 1 to 63 lowercase letters, digits, `.`, `_` and `-`
/// starting with a letter or digit, a value of 1 to 63 letters, digits, `.`, `_` and `-`.
pub fn node_label(input: &str) -> Result<(String, String), ValidationError> {
    let Some((key, value)) = input.split_once('=') else {
        return err(format!(
            "label `{}` is invalid: write it KEY=VALUE, e.g. disk=ssd",
            printable(input)
        ));
    };
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        });
    let value_ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if !key_ok || !value_ok {
        return err(format!(
            "label `{}` is invalid: the key takes 1 to 63 lowercase letters, digits, `.`, `_` and `-` (starting with a letter or digit), the value 1 to 63 letters, digits, `.`, `_` and `-`",
            printable(input)
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Lowercase letters, digits and `-`, 1 to `max` of them, not ending with `-`, starting with a
/// letter (or a digit when `digit_first`).
fn label_chars(name: &str, max: usize, digit_first: bool) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && (b[0].is_ascii_lowercase() || (digit_first && b[0].is_ascii_digit()))
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A config var name: a POSIX environment variable name, not one escale sets itself.
pub fn env_key(key: &str) -> Result<(), ValidationError> {
    let b = key.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 255
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if !ok {
        return err(format!(
            "config var name `{}` is invalid: use letters, digits and `_`, not starting with a digit (POSIX), at most 255",
            printable(key)
        ));
    }
    if key == "PORT" || key.starts_with("ESCALE_") {
        return err(format!(
            "config var `{key}` is set by escale itself (PORT and ESCALE_* are reserved)"
        ));
    }
    Ok(())
}

/// A config var value: any text without NUL, at most [`MAX_VALUE_CHARS`] characters.
pub fn env_value(key: &str, value: &str) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return err(format!(
            "value of `{key}` contains a NUL byte, which environment variables cannot hold"
        ));
    }
    let n = value.chars().count();
    if n > MAX_VALUE_CHARS {
        return err(format!(
            "value of `{key}` is {n} characters; the limit is {MAX_VALUE_CHARS}"
        ));
    }
    Ok(())
}

/// A domain name (RFC 1123; international names are converted to punycode). Returns the
/// canonical lowercase ASCII form.
pub fn domain(input: &str) -> Result<String, ValidationError> {
    let shown = printable(input);
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty()
        || trimmed.len() > 253
        || trimmed.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return err(format!(
            "domain `{shown}` is invalid: expected a host name such as shop.example.eu"
        ));
    }
    let ascii = idna::domain_to_ascii(trimmed).map_err(|_| {
        ValidationError(format!(
            "domain `{shown}` is not a valid international domain name"
        ))
    })?;
    if ascii.parse::<std::net::Ipv4Addr>().is_ok() {
        return err(format!(
            "`{shown}` is an IP address; a domain name is needed"
        ));
    }
    for label in ascii.split('.') {
        let b = label.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-');
        if !ok {
            return err(format!(
                "domain `{shown}` has an invalid label `{}`: labels are 1 to 63 letters, digits and `-`, not starting or ending with `-`",
                printable(label)
            ));
        }
    }
    if ascii.len() > 253 {
        return err(format!("domain `{shown}` is longer than 253 characters"));
    }
    Ok(ascii.to_ascii_lowercase())
}

/// A domain as the API takes it ([`patterns::DOMAIN`], at most 253 characters): the
/// canonical lowercase form of [`domain`].
pub fn api_domain(input: &str) -> Result<String, ValidationError> {
    if input.len() > 253 || !matches(patterns::DOMAIN, input) {
        return err(format!(
            "domain `{}` is invalid: expected a host name such as shop.example.eu: labels of 1 to 63 letters, digits and `-` (not starting or ending with `-`), the last starting with a letter, at most 253 characters (international names in their xn-- form)",
            printable(input)
        ));
    }
    domain(input)
}

/// An image reference, `[registry[:port]/]path[:tag][@algorithm:hex]`, in Docker's reference
/// grammar ([`patterns::IMAGE_REF`]), at most 512 characters.
pub fn image_ref(input: &str) -> Result<(), ValidationError> {
    if input.is_empty() || input.len() > 512 {
        return err(format!(
            "image reference `{}` is invalid: it must be 1 to 512 characters",
            printable(input)
        ));
    }
    if !matches(patterns::IMAGE_REF, input) {
        return err(format!(
            "image reference `{}` is invalid: path components are lowercase letters and digits separated by `.`, `_`, `__` or `-`, a tag is 1 to 128 letters, digits, `_`, `.` or `-` (not starting with `.` or `-`), a digest `sha256:<hex>`; expected e.g. `nginx:1.27`, `registry.example.eu:5000/team/app:v3` or `app@sha256:...`",
            printable(input)
        ));
    }
    Ok(())
}

/// A memory or size amount: `256m`, `1g`, `512k`, `1.5g`, or plain bytes. Units are binary
/// (k = 1024). Returns bytes.
pub fn memory(input: &str) -> Result<u64, ValidationError> {
    let s = input.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let s = s.strip_suffix('i').unwrap_or(s);
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'g') => (&s[..s.len() - 1], 1 << 30),
        Some(b't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let bad = || {
        ValidationError(format!(
            "`{}` is not a size: write e.g. `256m`, `1g`, `512k`",
            printable(input)
        ))
    };
    if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > (1u64 << 50) as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Smallest memory limit the Docker engine accepts.
pub const MIN_MEMORY: u64 = 6 << 20;

/// A memory limit for an instance: a [`memory`] amount of at least 6 MiB.
pub fn memory_limit(input: &str) -> Result<u64, ValidationError> {
    let v = memory(input)?;
    if v < MIN_MEMORY {
        return err(format!(
            "memory limit `{}` is below the engine's minimum of 6m",
            printable(input)
        ));
    }
    Ok(v)
}

/// A CPU limit: `0.5`, `2`, at least 0.01 and at most 256. Returns nano-CPUs as the engine wants.
pub fn cpus(input: &str) -> Result<i64, ValidationError> {
    let t = input.trim();
    let v: f64 = t
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && t.bytes().all(|c| c.is_ascii_digit() || c == b'.'))
        .ok_or_else(|| {
            ValidationError(format!(
                "`{}` is not a CPU count: write e.g. `0.5` or `2`",
                printable(input)
            ))
        })?;
    if !(0.01..=256.0).contains(&v) {
        return err(format!("CPU limit `{t}` must be between 0.01 and 256"));
    }
    Ok((v * 1e9).round() as i64)
}

/// An instance count between 0 and `max`.
pub fn instances(process: &str, n: i64, max: u32) -> Result<u32, ValidationError> {
    if n < 0 || n > max as i64 {
        return err(format!(
            "instance count {n} for `{process}` is out of range: use 0 to {max} (the server's max_instances)"
        ));
    }
    Ok(n as u32)
}

/// A TCP port an app listens on, 1 to 65535.
pub fn port(n: i64) -> Result<u16, ValidationError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ValidationError(format!("port {n} is out of range: use 1 to 65535")))
}

/// An HTTP health-check path: starts with `/`, printable ASCII, at most 512 characters.
pub fn health_path(p: &str) -> Result<(), ValidationError> {
    if p.starts_with('/') && p.len() <= 512 && p.bytes().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        err(format!("health check path `{}` must start with `/` and contain no spaces or control characters", printable(p)))
    }
}

/// Extra instances a rolling deploy may start, 1 to 100.
pub fn surge(n: i64) -> Result<u32, ValidationError> {
    if (1..=100).contains(&n) {
        Ok(n as u32)
    } else {
        err(format!("surge {n} is out of range: use 1 to 100"))
    }
}

/// A health-check timing in milliseconds: `interval` 100 ms to 1 h, `timeout` 50 ms to 10 min,
/// `grace` 0 to 1 h.
pub fn health_ms(what: &str, ms: i64) -> Result<u32, ValidationError> {
    let (min, max) = match what {
        "timeout" => (50, 600_000),
        "grace" => (0, 3_600_000),
        _ => (100, 3_600_000),
    };
    if (min..=max).contains(&ms) {
        Ok(ms as u32)
    } else {
        err(format!(
            "health {what} {ms} ms is out of range: use {min} to {max} ms"
        ))
    }
}

/// Most arguments a command may have.
pub const MAX_ARGS: usize = 256;
/// Longest argument of a command, in characters.
pub const MAX_ARG_CHARS: usize = 4096;

/// A command as argv: at most [`MAX_ARGS`] arguments of at most [`MAX_ARG_CHARS`] characters,
/// no NUL byte.
pub fn command(argv: &[String]) -> Result<(), ValidationError> {
    if argv.len() > MAX_ARGS
        || argv
            .iter()
            .any(|a| a.contains('\0') || a.chars().count() > MAX_ARG_CHARS)
    {
        return err(format!("a command has at most {MAX_ARGS} arguments of at most {MAX_ARG_CHARS} characters, without NUL"));
    }
    Ok(())
}

/// A custom domain (already [`domain`]-normalised) for `app`, as far as the apps domain goes:
/// not the apps domain itself nor a name above it (which would sit over every app's host),
/// and nothing under `OTHER.<apps_domain>`, which is reserved for the app named `OTHER`: its
/// own host and every name below it (`login.OTHER.<apps_domain>`). An app may have names
/// under its own host. Which team holds a custom domain is the registry's check.
pub fn custom_domain(domain: &str, app: &str, apps_domain: &str) -> Result<(), ValidationError> {
    if is_apps_domain_or_above(domain, apps_domain) {
        return err(format!(
            "`{domain}` is the apps domain {apps_domain} or a name above it; apps get APP.{apps_domain}, add a name of your own"
        ));
    }
    if let Some(rest) = domain.strip_suffix(&format!(".{apps_domain}")) {
        let owner = rest.rsplit('.').next().unwrap_or(rest);
        if owner != app {
            return err(format!(
                "`{domain}` is reserved for an app named `{owner}` ({owner}.{apps_domain} and the names under it); pick another domain"
            ));
        }
    }
    Ok(())
}

/// True when `domain` is the apps domain or one of its parents (`example.eu` for
/// `apps.example.eu`): refused as a custom domain for everyone.
pub fn is_apps_domain_or_above(domain: &str, apps_domain: &str) -> bool {
    domain == apps_domain || apps_domain.ends_with(&format!(".{domain}"))
}

/// A text safe to echo back in an error message: control characters escaped, length capped.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(|c| c.escape_debug()).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// A ref escale accepts: `refs/heads/...` or `refs/tags/...`, components of ASCII letters,
/// digits, `.`, `_` and `-`, none empty, none starting with `.` or `-`, none ending in `.lock`,
/// no `..`, at most 200 bytes.
pub fn git_ref(r: &str) -> bool {
    let rest = match r
        .strip_prefix("refs/heads/")
        .or_else(|| r.strip_prefix("refs/tags/"))
    {
        Some(rest) => rest,
        None => return false,
    };
    r.len() <= 200
        && !r.contains("..")
        && rest.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && !c.starts_with('-')
                && !c.ends_with(".lock")
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_domains_under_the_apps_domain_belong_to_their_app() {
        let apps = "apps.example.eu";
        for ok in [
            "shop.apps.example.eu",
            "login.shop.apps.example.eu",
            "a.b.shop.apps.example.eu",
            "shop.example.eu",
            "other.eu",
            "xapps.example.eu",
            "shop.apps.example.eu.evil.eu",
        ] {
            custom_domain(ok, "shop", apps).unwrap_or_else(|e| panic!("{ok}: {}", e.0));
        }
        for bad in [
            "apps.example.eu",
            "example.eu",
            "eu",
            "aapp.apps.example.eu",
            "login.aapp.apps.example.eu",
            "shop.aapp.apps.example.eu",
            "a.b.aapp.apps.example.eu",
        ] {
            assert!(custom_domain(bad, "shop", apps).is_err(), "{bad}");
        }
    }

    #[test]
    fn app_names() {
        for ok in ["shop", "a", "shop-2", "a23456789012345678901234567890"] {
            assert!(app_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Shop",
            "2shop",
            "shop-",
            "sh_op",
            "sh.op",
            "a234567890123456789012345678901",
            "$(id)",
            "-x",
            "shop\n",
            "../x",
        ] {
            let e = app_name(bad).unwrap_err().0;
            assert!(e.contains("app name"), "{bad}: {e}");
        }
    }

    #[test]
    fn env_keys_and_values() {
        for ok in ["A", "_X", "DATABASE_URL", "lower_ok9"] {
            assert!(env_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "9A", "A-B", "A B", "A=B", "PORT", "ESCALE_X", "é"] {
            assert!(env_key(bad).is_err(), "{bad}");
        }
        assert!(env_value("A", "x\0y").unwrap_err().0.contains("NUL"));
        assert!(env_value("A", &"x".repeat(MAX_VALUE_CHARS + 1)).is_err());
        assert!(env_value("A", "multi\nline $(id) `x`").is_ok());
    }

    #[test]
    fn domains() {
        assert_eq!(domain("Shop.Example.EU").unwrap(), "shop.example.eu");
        assert_eq!(domain("shop.example.eu.").unwrap(), "shop.example.eu");
        assert_eq!(domain("bücher.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(domain("localhost").unwrap(), "localhost");
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a b.c",
            "a_b.c",
            "1.2.3.4",
            &"a".repeat(64),
            "x;id.com",
            "a/b",
        ] {
            assert!(domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_refs() {
        for ok in [
            "nginx",
            "nginx:1.27",
            "library/nginx:latest",
            "registry.example.eu:5000/team/app:v3",
            "localhost/app",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "escale-fixture/webapp:abc_1",
            "a__b/c-d.e",
        ] {
            assert!(image_ref(ok).is_ok(), "{ok}: {:?}", image_ref(ok));
        }
        for bad in [
            "",
            "Nginx",
            "nginx:",
            "nginx:-x",
            "a//b",
            "-a",
            "a b",
            "$(id)",
            "app@sha256:zz",
            "reg.io:abc/x",
            "a..b",
            "x:y:z",
        ] {
            assert!(image_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(memory("256m").unwrap(), 256 << 20);
        assert_eq!(memory("1g").unwrap(), 1 << 30);
        assert_eq!(memory("1GiB").unwrap(), 1 << 30);
        assert_eq!(memory("512k").unwrap(), 512 << 10);
        assert_eq!(memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(memory("1000").unwrap(), 1000);
        for bad in ["", "m", "-1m", "1x", "1e9", "NaN", "0"] {
            assert!(memory(bad).is_err(), "{bad}");
        }
        assert!(memory_limit("4m").is_err());
        assert_eq!(cpus("0.5").unwrap(), 500_000_000);
        assert_eq!(cpus("2").unwrap(), 2_000_000_000);
        for bad in ["", "0", "-1", "abc", "1e3", "inf", "300"] {
            assert!(cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_ports_paths() {
        assert_eq!(instances("web", 7, 100).unwrap(), 7);
        assert!(instances("web", 101, 100)
            .unwrap_err()
            .0
            .contains("0 to 100"));
        assert!(instances("web", -1, 100).is_err());
        assert!(port(0).is_err() && port(70000).is_err() && port(8080).is_ok());
        assert!(
            health_path("/health").is_ok()
                && health_path("health").is_err()
                && health_path("/a b").is_err()
        );
    }

    #[test]
    fn printable_escapes_controls() {
        assert_eq!(printable("a\nb\0"), "a\\nb\\0");
    }

    /// Each pattern of the document and its function agree: what the pattern generates is
    /// accepted, and on arbitrary and near-miss input both say the same.
    mod patterns_agree {
        use super::super::*;
        use proptest::prelude::*;

        type Check = fn(&str) -> bool;

        fn rules() -> Vec<(&'static str, Check)> {
            vec![
                (patterns::APP_NAME, |s| app_name(s).is_ok()),
                (patterns::PROCESS_NAME, |s| process_name(s).is_ok()),
                (patterns::ACCOUNT_NAME, |s| account_name(s, "x").is_ok()),
                (patterns::TOKEN_NAME, |s| token_name(s).is_ok()),
                (patterns::NODE_NAME, node_name),
                (patterns::NODE_LABEL, |s| node_label(s).is_ok()),
                (patterns::ENV_KEY, |s| {
                    env_key(s).is_ok() || matches(patterns::ENV_KEY_RESERVED, s)
                }),
                (patterns::HEALTH_PATH, |s| health_path(s).is_ok()),
                (patterns::DOMAIN, |s| s.len() > 253 || api_domain(s).is_ok()),
                (patterns::IMAGE_REF, |s| {
                    s.len() > 512 || image_ref(s).is_ok()
                }),
                (patterns::MEMORY_LIMIT, |s| api_memory_limit(s).is_ok()),
                (patterns::CPUS, |s| api_cpus(s).is_ok()),
                (patterns::VERSION, |s| version(s).is_ok()),
            ]
        }

        /// The pattern without its anchors, for proptest's generator.
        fn body(p: &str) -> &str {
            p.trim_start_matches('^').trim_end_matches('$')
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            #[test]
            fn generated_values_are_accepted(seed in any::<u64>()) {
                use proptest::strategy::ValueTree;
                use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
                let mut runner = TestRunner::new_with_rng(
                    Config::default(),
                    TestRng::from_seed(RngAlgorithm::ChaCha, &{
                        let mut b = [0u8; 32];
                        b[..8].copy_from_slice(&seed.to_le_bytes());
                        b
                    }),
                );
                for (p, check) in rules() {
                    let strategy = proptest::string::string_regex(body(p)).expect("pattern");
                    let v = strategy.new_tree(&mut runner).expect("value").current();
                    prop_assert!(matches(p, &v), "{p} does not match its own `{v:?}`");
                    prop_assert!(check(&v), "{p} generated `{v:?}`, which its function refuses");
                }
            }

            #[test]
            fn near_misses_agree(s in "[a-zA-Z0-9._:@/=+ -]{0,12}", cut in 0usize..12, c in "[a-zA-Z0-9._:@/=+\\x00 -]") {
                for (p, check) in rules() {
                    let mut v = s.clone();
                    let at = cut.min(v.len());
                    v.insert_str(at, &c);
                    for v in [&s, &v] {
                        prop_assert_eq!(check(v), matches(p, v), "{} on `{:?}`", p, v);
                    }
                }
            }
        }
    }
}
