//! Which modules an adapter adapts, and with which rank and alpha: PEFT's rules, reproduced exactly
//! (`check_target_module_exists`, `match_target_against_key`, `get_pattern_key` in PEFT 0.21).
//!
//! For a module's full name `key` (e.g. `model.layers.1.self_attn.q_proj`):
//!
//! ```text
//! excluded    exclude_modules regex: fullmatch(regex, key);  list: key == e or key ends with "." + e
//! targeted    target_modules regex: fullmatch(regex, key)                      (layers_to_transform refused)
//!             list: key == t (exact names bypass layers_to_transform), or key ends with "." + t and,
//!                   with layers_to_transform, the layer index of key is one of them, where the index is
//!                   the first number after a dotted part: match(".*?\.[^.]*\.(\d+)\.", key), or with
//!                   layers_pattern P: match("(?:^|.*?\.)P\.(\d+)\.", key) for the first P that matches
//!             "all-linear": every linear layer but the model's output layer, as full names
//! rank, alpha the value of the first key k of rank_pattern / alpha_pattern, in file order, with
//!             match("(.*\.)?(k)$", key); else r / lora_alpha
//! ```
//!
//! Regular expressions are Rust's `regex` syntax, which covers what PEFT configs use (no look-around or
//! back-references); one it cannot compile is refused, naming the key.

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{LoraError, Result};

/// PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// Module names or dotted suffixes (`q_proj`, `self_attn.o_proj`, a full name). Empty: every layer
    /// (lora-rs' own configs only; an adapter file must name its targets).
    Names(Vec<String>),
    /// A regular expression the whole module name must match.
    Regex(String),
    /// PEFT's `"all-linear"`: every linear layer except the model's output layer.
    AllLinear,
}

impl Default for Targets {
    fn default() -> Self {
        Targets::Names(Vec::new())
    }
}

impl From<Vec<String>> for Targets {
    fn from(v: Vec<String>) -> Self {
        Targets::Names(v)
    }
}

impl FromIterator<String> for Targets {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        Targets::Names(iter.into_iter().collect())
    }
}

impl Targets {
    /// The names of a list (empty for a regex or `all-linear`).
    pub fn names(&self) -> &[String] {
        match self {
            Targets::Names(v) => v,
            _ => &[],
        }
    }
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(v) => write!(f, "{v:?}"),
            Targets::Regex(r) => write!(f, "{r:?} (regex)"),
            Targets::AllLinear => write!(f, "\"all-linear\""),
        }
    }
}

/// PEFT's `exclude_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclude {
    /// Module names or dotted suffixes.
    Names(Vec<String>),
    /// A regular expression the whole module name must match.
    Regex(String),
}

/// `rank_pattern` / `alpha_pattern`: keys (regular expressions) in the order the file gives them, since
/// the first key that matches wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern<T>(Vec<(String, T)>);

impl<T> Default for Pattern<T> {
    fn default() -> Self {
        Pattern(Vec::new())
    }
}

impl<T> Pattern<T> {
    /// An empty pattern.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets `key` (replacing its value in place, else appending).
    pub fn insert(&mut self, key: impl Into<String>, value: T) {
        let key = key.into();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = value,
            None => self.0.push((key, value)),
        }
    }
    /// Whether it has no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// `(key, value)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// The value of the first key that matches `module` as PEFT's `get_pattern_key` does.
    pub fn lookup(&self, module: &str) -> Result<Option<&T>> {
        for (k, v) in &self.0 {
            if regex(&format!(r"^(?:.*\.)?(?:{k})$"), k)?.is_match(module) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}

impl<T> FromIterator<(String, T)> for Pattern<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(iter: I) -> Self {
        let mut p = Pattern::new();
        for (k, v) in iter {
            p.insert(k, v);
        }
        p
    }
}

impl<T: Serialize> Serialize for Pattern<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Pattern<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Pattern<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of module patterns")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Pattern<T>, A::Error> {
                let mut p = Pattern::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    p.insert(k, v);
                }
                Ok(p)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// `pattern` compiled; an error names `key` (the config entry it came from).
pub(crate) fn regex(pattern: &str, key: &str) -> Result<regex::Regex> {
    regex::Regex::new(pattern).map_err(|e| {
        let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        LoraError::config(key.to_string(), format!("{pattern:?}"), format!("not a regular expression lora-rs can use ({why})"))
    })
}

/// Whether `re` matches the whole of `key` (Python's `re.fullmatch`).
pub(crate) fn fullmatch(re: &str, key: &str, field: &str) -> Result<bool> {
    Ok(regex(&format!("^(?:{re})$"), field)?.is_match(key))
}

/// Name or dotted-suffix match.
pub(crate) fn name_match(names: &[String], key: &str) -> bool {
    names.iter().any(|t| key == t || key.ends_with(&format!(".{t}")))
}

/// The layer index PEFT reads from `key` for `layers_to_transform`.
pub(crate) fn layer_index(key: &str, patterns: &[String]) -> Result<Option<usize>> {
    let caps = if patterns.is_empty() {
        regex(r"^.*?\.[^.]*\.(?P<idx>\d+)\.", "layers_pattern")?.captures(key).and_then(|c| c.name("idx"))
    } else {
        let mut found = None;
        for p in patterns {
            if let Some(m) = regex(&format!(r"^(?:.*?\.)?{p}\.(?P<idx>\d+)\."), "layers_pattern")?.captures(key).and_then(|c| c.name("idx"))
            {
                found = Some(m);
                break;
            }
        }
        found
    };
    Ok(caps.and_then(|m| m.as_str().parse().ok()))
}
