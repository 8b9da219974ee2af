//! LoRA hyper-parameters and their validation.
//!
//! Scaling of the update `s·B·A`: standard LoRA uses `s = alpha / r`; rank-stabilised LoRA (rsLoRA,
//! Kalajievo 2023) uses `s = alpha / √r`, so the update's magnitude does not shrink as the rank grows.
//! Which modules are adapted, and per-module rank and alpha overrides (`rank_pattern`, `alpha_pattern`),
//! follow PEFT's rules exactly: see [`crate::peft::matching`].

use serde::{Deserialize, Serialize};

use crate::error::{LoraError, Result};
use crate::peft::matching::{fullmatch, layer_index, name_match, Exclude, Pattern, Targets};

/// How the adapter's update is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scaling {
    /// `alpha / r` (the LoRA paper, the seed).
    #[default]
    Standard,
    /// `alpha / √r` (rsLoRA; PEFT's `use_rslora = true`).
    RankStabilized,
}

impl Scaling {
    /// The factor `s` for a given alpha and rank.
    pub fn scale(self, alpha: f64, r: usize) -> f64 {
        match self {
            Scaling::Standard => alpha / r as f64,
            Scaling::RankStabilized => alpha / (r as f64).sqrt(),
        }
    }
}

/// Which biases train alongside the adapters (PEFT's `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias trains (the seed; the only value adapter files support).
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// Only the biases of LoRA-wrapped layers train.
    LoraOnly,
}

/// How a new adapter starts (PEFT's `init_lora_weights`, plus the seed tutorial's own choice).
///
/// Every variant but [`Init::Random`] starts with an update that changes nothing: B = 0 for the plain
/// ones; PiSSA and OLoRA start from factors of W0 itself and subtract their initial product from the
/// base, which lora-rs keeps inside the adapter (see [`crate::LoraLinear`]) instead of rewriting W0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// A ~ N(0, 1), B = 0: the seed tutorial's choice and this project's demo default (written to PEFT
    /// files as `"gaussian"`, the nearest PEFT name: the initialisation does not change how a file loads).
    #[default]
    Normal,
    /// A ~ N(0, 1/r²), i.e. standard deviation 1/r, B = 0: PEFT's `init_lora_weights="gaussian"`.
    PeftGaussian,
    /// A ~ U(−1/√in, 1/√in) (PyTorch's Kaiming-uniform with a = √5), B = 0: PEFT's default,
    /// `init_lora_weights=true`.
    Kaiming,
    /// A ~ U(−1/√in, 1/√in), B ~ U(−1/√r, 1/√r) (and a LoRA bias like B): `nn.Linear`'s own
    /// initialisation, PEFT's `init_lora_weights=false`. The adapter changes the outputs from the start.
    Random,
    /// PiSSA (`"pissa"`): A = √S_r·V_rᵀ/√s, B = U_r·√S_r/√s from the top r singular triplets of W0
    /// (exact SVD; `niter` records PEFT's `"pissa_niter_N"`, whose randomised SVD lora-rs replaces by the
    /// exact one), and the base becomes W0 − s·B·A.
    Pissa {
        /// PEFT's `N` of `"pissa_niter_N"`, when that name was asked for.
        niter: Option<usize>,
    },
    /// OLoRA (`"olora"`): W0 = Q·R, `A = R[:r]`, `B = Q[:, :r]`, and the base becomes W0 − s·B·A.
    Olora,
}

impl Init {
    /// Whether this initialisation changes the base (PiSSA, OLoRA).
    pub fn rewrites_base(self) -> bool {
        matches!(self, Init::Pissa { .. } | Init::Olora)
    }

    /// PEFT's `init_lora_weights` value for this initialisation.
    pub fn peft_value(self) -> serde_json::Value {
        match self {
            Init::Normal | Init::PeftGaussian => serde_json::json!("gaussian"),
            Init::Kaiming => serde_json::json!(true),
            Init::Random => serde_json::json!(false),
            Init::Pissa { niter: None } => serde_json::json!("pissa"),
            Init::Pissa { niter: Some(n) } => serde_json::json!(format!("pissa_niter_{n}")),
            Init::Olora => serde_json::json!("olora"),
        }
    }

    /// Reads PEFT's `init_lora_weights` (`true`, `false`, `"gaussian"`, `"pissa"`, `"pissa_niter_N"`,
    /// `"olora"`); other values are refused by name.
    pub fn from_peft_value(v: &serde_json::Value) -> Result<Init> {
        match v {
            serde_json::Value::Bool(true) => Ok(Init::Kaiming),
            serde_json::Value::Bool(false) => Ok(Init::Random),
            serde_json::Value::String(s) if s.eq_ignore_ascii_case("gaussian") => Ok(Init::PeftGaussian),
            serde_json::Value::String(s) if s == "pissa" => Ok(Init::Pissa { niter: None }),
            serde_json::Value::String(s) if s.eq_ignore_ascii_case("olora") => Ok(Init::Olora),
            serde_json::Value::String(s) if s.starts_with("pissa_niter_") => match s["pissa_niter_".len()..].parse::<usize>() {
                Ok(n) => Ok(Init::Pissa { niter: Some(n) }),
                Err(_) => Err(LoraError::config("init_lora_weights", v, "pissa_niter_N needs a whole number N")),
            },
            _ => Err(LoraError::config(
                "init_lora_weights",
                v,
                "lora-rs honours true, false, \"gaussian\", \"pissa\", \"pissa_niter_N\" and \"olora\" \
                 (LoftQ, EVA, CorDA, LoRA-GA, MiCA and orthogonal initialisations are not supported)",
            )),
        }
    }
}

/// Hyper-parameters of one adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r of the update (≥ 1).
    pub r: usize,
    /// Alpha; the update is scaled by `alpha / r` (or `alpha / √r`).
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f64,
    /// Standard or rank-stabilised scaling.
    pub scaling: Scaling,
    /// Which biases train.
    pub bias: Bias,
    /// How A is initialised.
    pub init: Init,
    /// The modules to adapt (names, a regex or all-linear); an empty list means every layer.
    pub target_modules: Targets,
    /// Modules never adapted, even when targeted.
    pub exclude_modules: Option<Exclude>,
    /// Only these layer indexes (with a list of target names; empty: every layer).
    pub layers_to_transform: Vec<usize>,
    /// The name(s) of the layer list whose index `layers_to_transform` reads (empty: the first number).
    pub layers_pattern: Vec<String>,
    /// Per-module rank overrides, first matching key wins.
    pub rank_pattern: Pattern<usize>,
    /// Per-module alpha overrides, first matching key wins.
    pub alpha_pattern: Pattern<f64>,
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output row rescales the adapted weight,
    /// `W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row`.
    #[serde(default)]
    pub use_dora: bool,
    /// A trained bias on B (PEFT's `lora_bias`): the update becomes `s·(B·A·x + b_B)`.
    #[serde(default)]
    pub lora_bias: bool,
    /// Layers trained in full, as the adapter's own copies (PEFT's `modules_to_save`; a layer matches when its
    /// name ends with an entry, as PEFT matches them).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 1,
            alpha: 1.0,
            dropout: 0.0,
            scaling: Scaling::Standard,
            bias: Bias::None,
            init: Init::Normal,
            target_modules: Targets::default(),
            exclude_modules: None,
            layers_to_transform: Vec::new(),
            layers_pattern: Vec::new(),
            rank_pattern: Pattern::new(),
            alpha_pattern: Pattern::new(),
            use_dora: false,
            lora_bias: false,
            modules_to_save: Vec::new(),
        }
    }
}

impl LoraConfig {
    /// A config with rank `r` and `alpha`, everything else default.
    pub fn new(r: usize, alpha: f64) -> Self {
        LoraConfig { r, alpha, ..Default::default() }
    }

    /// Checks every field; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let check_r = |field: String, r: usize| {
            if r == 0 {
                Err(LoraError::config(field, r, "rank must be at least 1"))
            } else {
                Ok(())
            }
        };
        let check_alpha = |field: String, a: f64| {
            if !a.is_finite() {
                Err(LoraError::config(field, a, "alpha must be a finite number"))
            } else {
                Ok(())
            }
        };
        check_r("r".into(), self.r)?;
        check_alpha("lora_alpha".into(), self.alpha)?;
        for (k, &r) in self.rank_pattern.iter() {
            check_r(format!("rank_pattern.{k}"), r)?;
            crate::peft::matching::regex(k, &format!("rank_pattern.{k}"))?;
        }
        for (k, &a) in self.alpha_pattern.iter() {
            check_alpha(format!("alpha_pattern.{k}"), a)?;
            crate::peft::matching::regex(k, &format!("alpha_pattern.{k}"))?;
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::config("lora_dropout", self.dropout, "dropout must be in [0, 1)"));
        }
        match &self.target_modules {
            Targets::Names(v) => {
                if let Some(m) = v.iter().find(|m| m.is_empty()) {
                    return Err(LoraError::config("target_modules", format!("{m:?}"), "module names must not be empty"));
                }
            }
            Targets::Regex(r) => {
                crate::peft::matching::regex(r, "target_modules")?;
                if !self.layers_to_transform.is_empty() {
                    return Err(LoraError::config(
                        "layers_to_transform",
                        format!("{:?}", self.layers_to_transform),
                        "cannot be used when target_modules is a regular expression (as in PEFT)",
                    ));
                }
            }
            Targets::AllLinear => {}
        }
        if let Some(Exclude::Regex(r)) = &self.exclude_modules {
            crate::peft::matching::regex(r, "exclude_modules")?;
        }
        for p in &self.layers_pattern {
            crate::peft::matching::regex(p, "layers_pattern")?;
        }
        if let Some(m) = self.modules_to_save.iter().find(|m| m.is_empty()) {
            return Err(LoraError::config("modules_to_save", format!("{m:?}"), "module names must not be empty"));
        }
        if self.lora_bias && self.use_dora {
            return Err(LoraError::config("lora_bias", true, "is not supported together with use_dora (as in PEFT)"));
        }
        if self.lora_bias && !matches!(self.init, Init::Kaiming | Init::Random) {
            return Err(LoraError::config(
                "lora_bias",
                true,
                format!("needs init_lora_weights true or false (as in PEFT), not {}", self.init.peft_value()),
            ));
        }
        if self.use_dora && self.init.rewrites_base() {
            return Err(LoraError::config(
                "use_dora",
                true,
                format!("is not supported with init_lora_weights = {} in lora-rs", self.init.peft_value()),
            ));
        }
        if !self.layers_pattern.is_empty() && self.layers_to_transform.is_empty() {
            return Err(LoraError::config("layers_pattern", format!("{:?}", self.layers_pattern), "needs layers_to_transform"));
        }
        Ok(())
    }

    /// Whether `module` is one of `modules_to_save` (PEFT's rule: its name ends with an entry).
    pub fn saves(&self, module: &str) -> bool {
        self.modules_to_save.iter().any(|m| module.ends_with(m.as_str()))
    }

    /// Whether `module` is excluded by `exclude_modules`.
    pub fn excludes(&self, module: &str) -> bool {
        match &self.exclude_modules {
            None => false,
            Some(Exclude::Names(v)) => name_match(v, module),
            Some(Exclude::Regex(r)) => fullmatch(r, module, "exclude_modules").unwrap_or(false),
        }
    }

    /// Whether `module` is adapted by this config (PEFT's `check_target_module_exists`). With
    /// `all-linear`, every module not excluded is (the model leaves out its output layer).
    pub fn targets(&self, module: &str) -> bool {
        if self.excludes(module) {
            return false;
        }
        match &self.target_modules {
            Targets::AllLinear => true,
            Targets::Regex(r) => fullmatch(r, module, "target_modules").unwrap_or(false),
            Targets::Names(v) if v.is_empty() => true,
            Targets::Names(v) if v.iter().any(|t| t == module) => true,
            Targets::Names(v) => {
                name_match(v, module)
                    && (self.layers_to_transform.is_empty()
                        || layer_index(module, &self.layers_pattern).ok().flatten().is_some_and(|i| self.layers_to_transform.contains(&i)))
            }
        }
    }

    /// The rank used for `module` (the first matching `rank_pattern` key's, else `r`).
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern.lookup(module).ok().flatten().copied().unwrap_or(self.r)
    }

    /// The alpha used for `module` (the first matching `alpha_pattern` key's, else `alpha`).
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern.lookup(module).ok().flatten().copied().unwrap_or(self.alpha)
    }

    /// The scale `s` used for `module`.
    pub fn scale_for(&self, module: &str) -> f64 {
        self.scaling.scale(self.alpha_for(module), self.rank_for(module))
    }

    /// How a new adapter on `module` is built.
    pub fn spec_for(&self, module: &str) -> crate::AdapterSpec {
        crate::AdapterSpec {
            rank: self.rank_for(module),
            alpha: self.alpha_for(module),
            scale: self.scale_for(module),
            dropout: self.dropout,
            init: self.init,
            use_dora: self.use_dora,
            lora_bias: self.lora_bias,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_stabilized_scale_divides_by_the_square_root_of_rank() {
        assert_eq!(Scaling::Standard.scale(4.0, 4), 1.0);
        assert_eq!(Scaling::RankStabilized.scale(4.0, 4), 2.0);
    }

    #[test]
    fn patterns_override_rank_and_alpha_per_module() {
        let mut c = LoraConfig::new(2, 4.0);
        c.scaling = Scaling::RankStabilized;
        c.rank_pattern.insert("linear3", 4);
        c.alpha_pattern.insert("linear3", 2.0);
        assert_eq!((c.rank_for("linear1"), c.alpha_for("linear1")), (2, 4.0));
        assert_eq!((c.rank_for("model.linear3"), c.alpha_for("linear3")), (4, 2.0));
        assert!((c.scale_for("linear1") - 4.0 / 2f64.sqrt()).abs() < 1e-15);
        assert_eq!(c.scale_for("linear3"), 1.0);
    }

    #[test]
    fn validate_names_the_field_and_value() {
        let e = LoraConfig::new(0, 1.0).validate().unwrap_err().to_string();
        assert!(e.contains("r = 0"), "{e}");
        let e = LoraConfig::new(1, f64::NAN).validate().unwrap_err().to_string();
        assert!(e.contains("lora_alpha = NaN"), "{e}");
        let mut c = LoraConfig::new(1, 1.0);
        c.rank_pattern.insert("linear2", 0);
        assert!(c.validate().unwrap_err().to_string().contains("rank_pattern.linear2 = 0"));
        c = LoraConfig { dropout: 1.0, ..LoraConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("lora_dropout = 1"));
    }

    #[test]
    fn empty_target_list_targets_every_module() {
        let mut c = LoraConfig::default();
        assert!(c.targets("anything"));
        c.target_modules = crate::Targets::Names(vec!["linear1".into()]);
        assert!(c.targets("linear1") && c.targets("net.linear1") && !c.targets("linear2"));
    }
}
