//! Secrets in the binaries' configurations (tokens, passwords): one wrapper type, [`Secret`],
//! whose `Debug` never shows the value, and one rule for where a secret may come from
//! ([`resolve_secret`]): written in place (config key, command-line flag, environment
//! variable) or read from a file once at start.
//!
//! A configuration struct that derives `Debug` and holds its secrets as [`Secret`] can be
//! printed or logged whole without leaking them; the value is reached only through
//! [`Secret::expose`], at the one place that sends or compares it.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// A secret string: `Debug` prints `Secret(***)`, whatever it holds; there is no `Display`.
/// [`Secret::expose`] gives the value to the code that must send or check it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends or compares it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is the empty string (an unset secret, in the Go configs).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Equal values, compared in time that depends on the lengths only, never on where the bytes
/// differ.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Secret {}

/// Compares two byte strings in time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a secret could not be had. Each names the setting, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret's file cannot be read.
    #[error("{setting}: cannot read {path}: {source}")]
    Unreadable {
        /// The setting that names the file, e.g. `AdminTokenFile`.
        setting: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret's file is empty (or holds only a line end).
    #[error("{setting}: {path} is empty")]
    Empty {
        /// The setting that names the file.
        setting: String,
        /// The file.
        path: PathBuf,
    },
    /// The value and the file are both set in the same place.
    #[error("{value_setting} and {file_setting} are both set: set only one")]
    Conflict {
        /// The setting holding the value, e.g. `AdminToken`.
        value_setting: String,
        /// The setting naming a file, e.g. `AdminTokenFile`.
        file_setting: String,
    },
}

/// Reads the secret in `path` (named by `setting`, for errors): the whole file, less one
/// trailing line end (`\n` or `\r\n`). An unreadable or empty file is an error.
pub fn read_secret_file(setting: &str, path: &Path) -> Result<Secret, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Unreadable {
        setting: setting.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let value = text
        .strip_suffix('\n')
        .map(|rest| rest.strip_suffix('\r').unwrap_or(rest))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(SecretError::Empty {
            setting: setting.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(value))
}

/// The secret set in one place (the config file, or the command line and environment): its
/// value (`value_setting`; empty means unset) or the file named by `file_setting`, read now.
/// Both set is an error; neither gives `None`.
pub fn resolve_secret(
    value: Option<Secret>,
    file: Option<&Path>,
    value_setting: &str,
    file_setting: &str,
) -> Result<Option<Secret>, SecretError> {
    let value = value.filter(|v| !v.is_empty());
    match (value, file) {
        (Some(_), Some(_)) => Err(SecretError::Conflict {
            value_setting: value_setting.to_owned(),
            file_setting: file_setting.to_owned(),
        }),
        (None, Some(path)) => read_secret_file(file_setting, path).map(Some),
        (value, None) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(Secret(***))");
        assert_eq!(format!("{secret:#?}"), "Secret(***)");
        assert_eq!(secret.expose(), "hunter2");

        #[derive(Debug)]
        #[allow(dead_code)]
        struct Config {
            user: String,
            password: Secret,
        }
        let printed = format!(
            "{:?}",
            Config {
                user: "admin".into(),
                password: "hunter2".into(),
            }
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("admin"), "{printed}");
    }

    #[test]
    fn deserializes_from_a_plain_string_and_compares_by_value() {
        let secret: Secret = serde_json::from_str(r#""t0ken""#).expect("a JSON string");
        assert_eq!(secret.expose(), "t0ken");
        assert_eq!(secret, Secret::from("t0ken"));
        assert_ne!(secret, Secret::from("t0keN"));
        assert_ne!(secret, Secret::from("t0ken2"));
        assert!(Secret::default().is_empty());
        assert!(!secret.is_empty());
    }

    #[test]
    fn a_file_is_read_without_its_line_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, expected) in [
            ("abc\n", "abc"),
            ("abc\r\n", "abc"),
            ("abc", "abc"),
            ("abc\n\n", "abc\n"),
            (" a b ", " a b "),
        ] {
            let path = dir.path().join("token");
            std::fs::write(&path, text).expect("write");
            let secret = read_secret_file("AdminTokenFile", &path).expect("readable");
            assert_eq!(secret.expose(), expected, "{text:?}");
        }
        for empty in ["", "\n", "\r\n"] {
            let path = dir.path().join("empty");
            std::fs::write(&path, empty).expect("write");
            let err = read_secret_file("AdminTokenFile", &path).expect_err("empty");
            assert!(matches!(err, SecretError::Empty { .. }), "{empty:?}: {err}");
            assert!(err.to_string().contains("AdminTokenFile"), "{err}");
        }
        let missing = dir.path().join("missing");
        let err = read_secret_file("ProxyTokenFile", &missing).expect_err("missing");
        assert!(matches!(err, SecretError::Unreadable { .. }));
        assert!(err.to_string().contains("ProxyTokenFile"), "{err}");
    }

    #[test]
    fn a_value_or_a_file_never_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").expect("write");
        let resolve = |value: Option<&str>, file: Option<&Path>| {
            resolve_secret(
                value.map(Secret::from),
                file,
                "AdminToken",
                "AdminTokenFile",
            )
        };
        assert_eq!(resolve(None, None).expect("none"), None);
        assert_eq!(resolve(Some(""), None).expect("empty is unset"), None);
        assert_eq!(
            resolve(Some("v"), None)
                .expect("value")
                .as_ref()
                .map(Secret::expose),
            Some("v")
        );
        assert_eq!(
            resolve(None, Some(&path))
                .expect("file")
                .as_ref()
                .map(Secret::expose),
            Some("from-file")
        );
        assert_eq!(
            resolve(Some(""), Some(&path))
                .expect("an empty value is unset")
                .as_ref()
                .map(Secret::expose),
            Some("from-file")
        );
        let err = resolve(Some("v"), Some(&path)).expect_err("both");
        assert!(matches!(err, SecretError::Conflict { .. }));
        assert!(
            err.to_string().contains("AdminToken and AdminTokenFile"),
            "{err}"
        );
        assert!(!err.to_string().contains("from-file"), "{err}");
    }
}
