//! PEFT's `adapter_config.json`, both ways: [`parse_peft_config`] reads it into a validated [`LoraConfig`],
//! [`peft_config_json`] writes one PEFT loads.
//!
//! The file is read by `serde` into `PeftConfigFile`, one field per key of PEFT 0.21's `LoraConfig`, each
//! of a type that checks its value as it is read (`Checked`); `serde_path_to_error` names the key of the
//! value that fails, down to `rank_pattern.<module>`. Every error reads `<file>: <key> = <value>: <why>`.
//! `null` reads as absent (PEFT writes `null` for unset keys). Keys PEFT's `LoraConfig` does not have, and
//! keys of features lora-rs does not have, are refused by name unless they hold PEFT's "off" value.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{Bias, Init, LoraConfig, Scaling};
use crate::error::{LoraError, Result};
use crate::io::FileError;
use crate::peft::matching::{Exclude, Pattern, Targets};

/// Keys of features lora-rs does not have: accepted only when they hold PEFT's "off" value.
pub(crate) const OFF_ONLY_KEYS: &[&str] = &[
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "layer_replication",
    "arrow_config",
    "kasa_config",
];

/// `adapter_config.json` as PEFT 0.21's `LoraConfig` writes it: the keys lora-rs honours, with their types,
/// and those it accepts as descriptions of the file. Keys of features lora-rs lacks land in `other`.
#[derive(Deserialize)]
struct PeftConfigFile {
    peft_type: Option<Checked<LoraType>>,
    r: Option<Checked<PositiveInt>>,
    lora_alpha: Option<Checked<Number>>,
    lora_dropout: Option<Checked<Number>>,
    use_rslora: Option<Checked<Flag>>,
    use_dora: Option<Checked<Flag>>,
    lora_bias: Option<Checked<Flag>>,
    target_modules: Option<Checked<TargetModules>>,
    exclude_modules: Option<Checked<ExcludeModules>>,
    layers_to_transform: Option<Checked<LayerIndices>>,
    layers_pattern: Option<Checked<OneOrMoreNames>>,
    /// In file order: the first key that matches a module wins.
    rank_pattern: Option<Pattern<Checked<PositiveInt>>>,
    alpha_pattern: Option<Pattern<Checked<Number>>>,
    init_lora_weights: Option<Checked<Init>>,
    bias: Option<Checked<Bias>>,
    modules_to_save: Option<Checked<ModuleNames>>,
    base_model_name_or_path: Option<Value>,
    /// Features lora-rs does not have: their switch must be off (checked as they are read; never used).
    #[allow(dead_code)]
    fan_in_fan_out: Option<Checked<Off>>,
    #[allow(dead_code)]
    use_qalora: Option<Checked<Off>>,
    #[allow(dead_code)]
    use_bdlora: Option<Checked<Off>>,
    #[allow(dead_code)]
    ensure_weight_tying: Option<Checked<Off>>,
    #[allow(dead_code)]
    trainable_token_indices: Option<Checked<EmptyList>>,
    #[allow(dead_code)]
    target_parameters: Option<Checked<EmptyList>>,
    /// Descriptions of the file, and settings of features that are off unless their own key turns them on.
    #[allow(dead_code)]
    task_type: Option<Value>,
    #[allow(dead_code)]
    auto_mapping: Option<Value>,
    #[allow(dead_code)]
    peft_version: Option<Value>,
    #[allow(dead_code)]
    revision: Option<Value>,
    #[allow(dead_code)]
    inference_mode: Option<Value>,
    #[allow(dead_code)]
    megatron_core: Option<Value>,
    #[allow(dead_code)]
    qalora_group_size: Option<Value>,
    #[allow(dead_code)]
    runtime_config: Option<Value>,
    /// Every other key, in file order of appearance.
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// A value read as JSON and converted by `T`, refused with `= <value>: <why>` (the key comes from the path).
struct Checked<T>(T);

/// A type read from one JSON value.
trait FromJson: Sized {
    /// The value as this type, or why it is not one.
    fn from_json(v: &Value) -> std::result::Result<Self, String>;
}

impl<'de, T: FromJson> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        T::from_json(&v).map(Checked).map_err(|why| D::Error::custom(format!("= {v}: {why}")))
    }
}

/// `"LORA"`, the only `peft_type` lora-rs reads.
struct LoraType;
impl FromJson for LoraType {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        (v == "LORA").then_some(LoraType).ok_or_else(|| "only \"LORA\" adapters are supported".into())
    }
}

/// An integer in 1..=2³²−1.
struct PositiveInt(usize);
impl FromJson for PositiveInt {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v.as_u64() {
            Some(n) if n >= 1 && n <= u32::MAX as u64 => Ok(PositiveInt(n as usize)),
            _ => Err("must be a positive integer".into()),
        }
    }
}

/// A finite number.
struct Number(f64);
impl FromJson for Number {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        v.as_f64().filter(|x| x.is_finite()).map(Number).ok_or_else(|| "must be a number".into())
    }
}

/// `true` or `false`.
struct Flag(bool);
impl FromJson for Flag {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        v.as_bool().map(Flag).ok_or_else(|| "must be true or false".into())
    }
}

/// A switch of a feature lora-rs lacks, which must be `false`.
struct Off;
impl FromJson for Off {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Bool(false) => Ok(Off),
            Value::Bool(true) => Err("is not supported by lora-rs".into()),
            _ => Err("must be true or false".into()),
        }
    }
}

/// A list of a feature lora-rs lacks, which must be empty.
struct EmptyList;
impl FromJson for EmptyList {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Array(a) if a.is_empty() => Ok(EmptyList),
            _ => Err("is not supported by lora-rs".into()),
        }
    }
}

/// A list of non-empty module names.
struct ModuleNames(Vec<String>);
impl FromJson for ModuleNames {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let names = v.as_array().and_then(|a| a.iter().map(|m| m.as_str().filter(|s| !s.is_empty()).map(String::from)).collect());
        names.map(ModuleNames).ok_or_else(|| "must be a list of module names".into())
    }
}

/// One name or a list of names (`layers_pattern`).
struct OneOrMoreNames(Vec<String>);
impl FromJson for OneOrMoreNames {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(OneOrMoreNames(vec![s.clone()])),
            _ => ModuleNames::from_json(v).map(|m| OneOrMoreNames(m.0)).map_err(|_| "must be a string or a list of strings".into()),
        }
    }
}

/// As PEFT: a string is a regular expression matched against whole module names (`"all-linear"` aside),
/// a list holds names matched whole or as dotted suffixes.
struct TargetModules(Targets);
impl FromJson for TargetModules {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Ok(TargetModules(Targets::AllLinear)),
            Value::String(s) => Ok(TargetModules(Targets::Regex(s.clone()))),
            _ => match ModuleNames::from_json(v) {
                Ok(m) if m.0.is_empty() => Err("names no module".into()),
                Ok(m) => Ok(TargetModules(Targets::Names(m.0))),
                Err(_) => Err("must be a string or a list of module names".into()),
            },
        }
    }
}

/// A regular expression or a list of names; an empty list excludes nothing.
struct ExcludeModules(Option<Exclude>);
impl FromJson for ExcludeModules {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(ExcludeModules(Some(Exclude::Regex(s.clone())))),
            _ => match ModuleNames::from_json(v) {
                Ok(m) => Ok(ExcludeModules(Some(Exclude::Names(m.0)).filter(|e| !matches!(e, Exclude::Names(v) if v.is_empty())))),
                Err(_) => Err("must be a string or a list of module names".into()),
            },
        }
    }
}

/// A layer index or a list of them.
struct LayerIndices(Vec<usize>);
impl FromJson for LayerIndices {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let index = |i: &Value| i.as_u64().map(|i| i as usize);
        match v {
            Value::Array(a) => a.iter().map(index).collect::<Option<_>>().map(LayerIndices),
            _ => index(v).map(|i| LayerIndices(vec![i])),
        }
        .ok_or_else(|| "must be a layer index or a list of them".into())
    }
}

impl FromJson for Init {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let init = Init::from_peft_value(v).map_err(|e| match e {
            LoraError::Config { why, .. } => why,
            other => other.to_string(),
        })?;
        if let Init::Pissa { niter: Some(_) } = init {
            return Err("pissa_niter_N: the randomised SVD PEFT started this adapter from cannot be recomputed; save it from PEFT \
                        converted to plain LoRA (path_initial_model_for_weight_conversion)"
                .into());
        }
        Ok(init)
    }
}

impl FromJson for Bias {
    fn from_json(v: &Value) -> std::result::Result<Self, String> {
        match v.as_str() {
            Some("none") => Ok(Bias::None),
            Some("all") => Ok(Bias::All),
            Some("lora_only") => Ok(Bias::LoraOnly),
            _ => Err("must be \"none\", \"all\" or \"lora_only\"".into()),
        }
    }
}

/// PEFT's "off" values: null, false, an empty list or object.
pub(crate) fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn bad(path: &Path, why: impl Into<String>) -> LoraError {
    LoraError::File(FileError::invalid(path, why))
}

/// Parses and validates PEFT's `adapter_config.json` text. `path` names the file in errors.
pub fn parse_peft_config(path: &Path, text: &str) -> Result<(LoraConfig, Option<String>)> {
    let value: Value = serde_json::from_str(text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad(path, "not a JSON object"));
    }
    let f: PeftConfigFile = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text)).map_err(|e| {
        // "<key> = <value>: <why>" from the path and our message, without serde_json's position suffix.
        let inner = e.inner().to_string();
        let at = format!(" at line {} column {}", e.inner().line(), e.inner().column());
        bad(path, format!("{} {}", e.path(), inner.strip_suffix(&at).unwrap_or(&inner)))
    })?;
    if f.peft_type.is_none() {
        return Err(bad(path, "missing key peft_type"));
    }
    for (key, v) in &f.other {
        if is_off(v) {
            continue;
        }
        if OFF_ONLY_KEYS.contains(&key.as_str()) {
            return Err(bad(path, format!("{key} = {v} is not supported by lora-rs (only its default, off)")));
        }
        return Err(bad(path, format!("{key} = {v}: not a key of PEFT 0.21's LoraConfig, so lora-rs cannot honour it")));
    }
    let missing = |key: &str| bad(path, format!("missing key {key}"));
    let flag = |v: Option<Checked<Flag>>| v.is_some_and(|f| f.0 .0);
    let config = LoraConfig {
        r: f.r.ok_or_else(|| missing("r"))?.0 .0,
        alpha: f.lora_alpha.ok_or_else(|| missing("lora_alpha"))?.0 .0,
        dropout: f.lora_dropout.map_or(0.0, |d| d.0 .0),
        scaling: if flag(f.use_rslora) { Scaling::RankStabilized } else { Scaling::Standard },
        target_modules: f.target_modules.ok_or_else(|| missing("target_modules"))?.0 .0,
        exclude_modules: f.exclude_modules.and_then(|e| e.0 .0),
        layers_to_transform: f.layers_to_transform.map(|l| l.0 .0).unwrap_or_default(),
        layers_pattern: f.layers_pattern.map(|l| l.0 .0).unwrap_or_default(),
        rank_pattern: f.rank_pattern.unwrap_or_default().iter().map(|(k, v)| (k.clone(), v.0 .0)).collect(),
        alpha_pattern: f.alpha_pattern.unwrap_or_default().iter().map(|(k, v)| (k.clone(), v.0 .0)).collect(),
        init: f.init_lora_weights.map_or(Init::Kaiming, |i| i.0),
        use_dora: flag(f.use_dora),
        lora_bias: flag(f.lora_bias),
        bias: f.bias.map_or(Bias::None, |b| b.0),
        modules_to_save: f.modules_to_save.map(|m| m.0 .0).unwrap_or_default(),
    };
    config.validate().map_err(|e| bad(path, e.to_string()))?;
    let base = f.base_model_name_or_path.as_ref().and_then(Value::as_str).map(String::from);
    Ok((config, base))
}

/// The `adapter_config.json` PEFT writes for `config` (only keys PEFT's `LoraConfig` accepts).
pub fn peft_config_json(config: &LoraConfig, base_model_name_or_path: Option<&str>, task_type: Option<&str>) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": task_type,
        "inference_mode": true,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": null,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": match &config.target_modules {
            Targets::Names(v) => json!(v),
            Targets::Regex(r) => json!(r),
            Targets::AllLinear => json!("all-linear"),
        },
        "exclude_modules": match &config.exclude_modules {
            None => Value::Null,
            Some(Exclude::Names(v)) => json!(v),
            Some(Exclude::Regex(r)) => json!(r),
        },
        "bias": match config.bias {
            Bias::None => "none",
            Bias::All => "all",
            Bias::LoraOnly => "lora_only",
        },
        "fan_in_fan_out": false,
        "init_lora_weights": config.init.peft_value(),
        "use_rslora": config.scaling == Scaling::RankStabilized,
        "use_dora": config.use_dora,
        "modules_to_save": if config.modules_to_save.is_empty() { Value::Null } else { json!(config.modules_to_save) },
        "layers_to_transform": if config.layers_to_transform.is_empty() { Value::Null } else { json!(config.layers_to_transform) },
        "layers_pattern": if config.layers_pattern.is_empty() { Value::Null } else { json!(config.layers_pattern) },
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "lora_bias": config.lora_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_err(text: &str) -> String {
        parse_peft_config(Path::new("c.json"), text).unwrap_err().to_string()
    }

    #[test]
    fn config_errors_name_the_key_and_value() {
        let ok = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["linear1"]}"#;
        assert!(parse_peft_config(Path::new("c.json"), ok).is_ok());
        assert!(config_err("{").contains("not valid JSON"));
        assert!(config_err(r#"{"peft_type":"LORA","lora_alpha":4,"target_modules":["x"]}"#).contains("missing key r"));
        assert!(config_err(&ok.replace("\"r\":2", "\"r\":0")).contains("c.json: r = 0: must be a positive integer"));
        assert!(config_err(&ok.replace("\"r\":2", "\"r\":-1")).contains("r = -1"));
        assert!(config_err(&ok.replace("4", "\"four\"")).contains("lora_alpha = \"four\": must be a number"));
        let e = config_err(&ok.replace("}", ",\"use_dora\":true,\"lora_bias\":true,\"init_lora_weights\":true}"));
        assert!(e.contains("lora_bias = true") && e.contains("use_dora"), "{e}");
        let e = config_err(&ok.replace("}", ",\"lora_bias\":true,\"init_lora_weights\":\"gaussian\"}"));
        assert!(e.contains("lora_bias = true") && e.contains("init_lora_weights"), "{e}");
        let e = config_err(&ok.replace("}", ",\"use_dora\":1}"));
        assert!(e.contains("use_dora = 1"), "{e}");
        assert!(config_err(&ok.replace("}", ",\"bias\":\"some\"}")).contains("bias = \"some\""));
        assert!(config_err(&ok.replace("}", ",\"modules_to_save\":\"lm_head\"}")).contains("modules_to_save = \"lm_head\""));
        assert!(config_err(&ok.replace("LORA", "IA3")).contains("peft_type = \"IA3\""));
        // The path names the entry inside an object, and the position is dropped.
        let e = config_err(&ok.replace("}", ",\"rank_pattern\":{\"linear1\":2,\"linear2\":0}}"));
        assert!(e.ends_with("rank_pattern.linear2 = 0: must be a positive integer"), "{e}");
        let e = config_err(&ok.replace("}", ",\"alpha_pattern\":{\"linear1\":\"x\"}}"));
        assert!(e.ends_with("alpha_pattern.linear1 = \"x\": must be a number"), "{e}");
        let e = config_err(&ok.replace("}", ",\"layers_to_transform\":[1,\"x\"]}"));
        assert!(e.ends_with("layers_to_transform = [1,\"x\"]: must be a layer index or a list of them"), "{e}");
        // null is absent, as PEFT writes unset keys.
        let (c, _) = parse_peft_config(Path::new("c.json"), &ok.replace("}", ",\"lora_dropout\":null,\"bias\":null}")).unwrap();
        assert_eq!((c.dropout, c.bias), (0.0, Bias::None));
        // Pattern keys keep their file order (the first that matches wins).
        let (c, _) = parse_peft_config(Path::new("c.json"), &ok.replace("}", ",\"rank_pattern\":{\"z\":3,\"a\":4}}")).unwrap();
        assert_eq!(c.rank_pattern.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(), [("z", 3), ("a", 4)]);
        // A string is a regular expression (as in PEFT); one that does not compile is refused by key.
        let (c, _) = parse_peft_config(Path::new("c.json"), &ok.replace("[\"linear1\"]", "\"linear[12]\"")).unwrap();
        assert_eq!(c.target_modules, crate::Targets::Regex("linear[12]".into()));
        assert!(config_err(&ok.replace("[\"linear1\"]", "\"linear(\"")).contains("target_modules"));
    }

    #[test]
    fn every_key_of_a_feature_lora_rs_lacks_is_refused_by_name_unless_it_is_off() {
        let ok = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["linear1"]"#;
        let with = |key: &str, v: &str| format!("{ok},\"{key}\":{v}}}");
        for key in OFF_ONLY_KEYS {
            for off in ["null", "false", "[]", "{}"] {
                assert!(parse_peft_config(Path::new("c.json"), &with(key, off)).is_ok(), "{key} = {off}");
            }
            let e = config_err(&with(key, r#"{"x":1}"#));
            assert!(e.contains(&format!("{key} = {{\"x\":1}} is not supported")), "{e}");
        }
        for key in ["fan_in_fan_out", "use_qalora", "use_bdlora", "ensure_weight_tying"] {
            assert!(config_err(&with(key, "true")).contains(&format!("{key} = true")));
        }
        for init in [r#""pissa_niter_4""#, r#""loftq""#, r#""eva""#, r#""corda""#, r#""mica""#, r#""orthogonal""#] {
            assert!(config_err(&with("init_lora_weights", init)).contains("init_lora_weights"), "{init}");
        }
        for init in ["true", "false", r#""gaussian""#, r#""pissa""#, r#""olora""#] {
            assert!(parse_peft_config(Path::new("c.json"), &with("init_lora_weights", init)).is_ok(), "{init}");
        }
        let e = config_err(&with("use_magic", "3"));
        assert!(e.contains("use_magic = 3: not a key of PEFT"), "{e}");
        assert!(parse_peft_config(Path::new("c.json"), &with("future_switch", "false")).is_ok());
    }
}
