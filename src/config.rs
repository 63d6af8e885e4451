//! Reading `config.json` files: a thin typed view over JSON with the defaults of the reference
//! configuration classes, and errors that name the file.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A JSON object read from a config file, with typed getters that fall back to defaults.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub path: PathBuf,
    pub value: Value,
}

impl Cfg {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: "top level is not a JSON object".into(),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            value,
        })
    }

    fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg,
        }
    }

    /// A nested object (e.g. `vision_config`), keeping the file path for errors.
    pub fn sub(&self, key: &str) -> Option<Cfg> {
        self.value.get(key).filter(|v| v.is_object()).map(|v| Cfg {
            path: self.path.clone(),
            value: v.clone(),
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.value.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<String>> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(format!("{key} should be a string, found {v}"))),
        }
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.str_opt(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                // Some configs store sizes as lists ([h, w]); callers that accept that use
                // `size2`.
                None => Err(self.err(format!("{key} should be a non-negative integer, found {v}"))),
            },
        }
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    /// A positive integer (sizes, depths).
    pub fn positive(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.usize(key, default)?;
        if v == 0 {
            return Err(self.err(format!("{key} must be positive")));
        }
        Ok(v)
    }

    /// An integer or an `[h, w]` pair.
    pub fn size2(&self, key: &str, default: usize) -> Result<(usize, usize)> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok((default, default)),
            Some(Value::Array(a)) if a.len() == 2 => {
                let h = a[0].as_u64();
                let w = a[1].as_u64();
                match (h, w) {
                    (Some(h), Some(w)) if h > 0 && w > 0 => Ok((h as usize, w as usize)),
                    _ => Err(self.err(format!("{key} should be [h, w] of positive integers"))),
                }
            }
            Some(_) => {
                let v = self.positive(key, default)?;
                Ok((v, v))
            }
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("{key} should be a number, found {v}"))),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(format!("{key} should be true or false, found {v}"))),
        }
    }

    pub fn usize_list(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(default.to_vec()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| self.err(format!("{key} should be a list of integers")))
                })
                .collect(),
            Some(v) => Err(self.err(format!("{key} should be a list, found {v}"))),
        }
    }

    pub fn f32_list(&self, key: &str) -> Result<Option<Vec<f32>>> {
        match self.value.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|n| n as f32)
                        .ok_or_else(|| self.err(format!("{key} should be a list of numbers")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(Value::Number(n)) => Ok(n.as_f64().map(|v| vec![v as f32; 3])),
            Some(v) => Err(self.err(format!("{key} should be a list, found {v}"))),
        }
    }

    /// A check that fails with a config error naming the key.
    pub fn ensure(&self, ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.err(msg()))
        }
    }
}

/// Read a TOML recipe into `T`. Errors are one line naming the file, the line and the key:
/// `run.toml: line 3: batch_size: invalid type: string "eight", expected usize`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_toml(&text).map_err(|msg| Error::Io {
        path: path.to_path_buf(),
        msg,
    })
}

/// Parse TOML text; the error message starts with the line number and, where the error sits
/// on a `key = value` line, the key.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        let Some(span) = e.span() else {
            return msg;
        };
        let start = span.start.min(text.len());
        let line_no = text[..start].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"'))
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        match key {
            Some(k) if !msg.contains(&format!("`{k}`")) => format!("line {line_no}: {k}: {msg}"),
            _ => format!("line {line_no}: {msg}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct R {
        out: Option<String>,
        batch_size: Option<usize>,
    }

    #[test]
    fn toml_errors_name_line_and_key() {
        let e = parse_toml::<R>("out = \"a\"\nbatch_size = \"eight\"\n").unwrap_err();
        assert_eq!(
            e,
            "line 2: batch_size: invalid type: string \"eight\", expected usize"
        );
        let e = parse_toml::<R>("out = \"a\"\n\nbatch = 3\n").unwrap_err();
        assert!(e.starts_with("line 3: unknown field `batch`"), "{e}");
        let e = parse_toml::<R>("out = \n").unwrap_err();
        assert!(e.starts_with("line 1: "), "{e}");
    }
}
