//! Integers in JSON bodies as JSON Schema counts them: `3` and `3.0` are the same integer
//! (`type: integer` accepts both), so a body field declared `i64` takes either; `3.5` is
//! refused; and a nested object is an object, never an array. Used with
//! `#[serde(deserialize_with = ...)]`.

use std::collections::BTreeMap;

use serde::de::{Deserializer, Error};
use serde::Deserialize;

/// A JSON number that is an integer, whatever its notation.
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Int, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        integer(&n)
            .map(Int)
            .ok_or_else(|| D::Error::custom(format!("invalid type: `{n}` is not an integer")))
    }
}

/// `n` as an `i64` when it is an integer in range (`3`, `3.0`, `3e2`).
pub fn integer(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64).then_some(f as i64)
}

/// An optional integer field.
pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(Option::<Int>::deserialize(d)?.map(|i| i.0))
}

/// An optional nested object (`{...}` or `null`; serde would also take an array for a struct).
pub fn option_object<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        v @ serde_json::Value::Object(_) => serde_json::from_value(v)
            .map(Some)
            .map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "invalid type: expected an object, got `{other}`"
        ))),
    }
}

/// A map of integers (the formation).
pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, i64>, D::Error> {
    Ok(BTreeMap::<String, Int>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "super::option")]
        n: Option<i64>,
    }

    #[test]
    fn integers_in_any_notation_and_nothing_else() {
        for (text, want) in [
            (r#"{"n": 3}"#, Some(3)),
            (r#"{"n": 3.0}"#, Some(3)),
            (r#"{"n": 3e2}"#, Some(300)),
            (r#"{"n": -7}"#, Some(-7)),
            (r#"{"n": null}"#, None),
            ("{}", None),
        ] {
            let t: T = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t.n, want, "{text}");
        }
        for bad in [
            r#"{"n": 3.5}"#,
            r#"{"n": "3"}"#,
            r#"{"n": 1e300}"#,
            r#"{"n": true}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }
}
