//! YAML → typed struct, reporting unknown keys as problems.
//!
//! `#[serde(deny_unknown_fields)]` stops at the first unknown key. We instead
//! parse leniently, record every ignored key through `serde_ignored`, and
//! report them together with the type errors and the validator's findings.
//! A typo such as `flush_intreval` must never be silently dropped.

use serde::de::DeserializeOwned;

use crate::dsn::redact_passwords;
use crate::problems::{Invalid, Problems};

/// Parses `text` into `T`. Unknown keys are appended to `problems`; a
/// document that does not fit `T` at all is an error on its own.
pub fn parse<T: DeserializeOwned>(text: &str, problems: &mut Problems) -> Result<T, Invalid> {
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let parsed: Result<T, _> =
        serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
    finish(parsed, unknown, problems)
}

/// Like [`parse`], from an already parsed YAML value (after env overrides).
pub fn parse_value<T: DeserializeOwned>(
    value: serde_yaml_ng::Value,
    problems: &mut Problems,
) -> Result<T, Invalid> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> =
        serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    finish(parsed, unknown, problems)
}

fn finish<T, E: std::fmt::Display>(
    parsed: Result<T, E>,
    unknown: Vec<String>,
    problems: &mut Problems,
) -> Result<T, Invalid> {
    match parsed {
        Ok(value) => {
            for path in unknown {
                problems.push(path, "unknown key");
            }
            Ok(value)
        }
        Err(e) => {
            // The error may quote a value, and a value may be a DSN.
            let mut fatal = Problems::new();
            fatal.push(
                "",
                format!("cannot parse YAML: {}", redact_passwords(&e.to_string())),
            );
            fatal.fail()
        }
    }
}

/// Serializes to YAML. Our models contain only strings, integers, maps and
/// lists, which always serialize.
pub fn to_string<T: serde::Serialize>(value: &T) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_else(|e| format!("# cannot serialize: {e}\n"))
}
