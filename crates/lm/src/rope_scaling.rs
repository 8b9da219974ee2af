//! RoPE frequencies for every scaling transformers defines (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`), computed
//! with transformers' f32 operations in transformers' order, so the tables are those transformers builds.
//!
//! For rotary width r (`head_dim · partial_rotary_factor`), base θ and i = 0…r/2−1, with e_i = 2i/r in f32:
//!
//! ```text
//! default   f_i = 1 / θ^e_i                                   attention factor a = 1
//! linear    f_i = (1 / θ^e_i) / factor
//! dynamic   at n positions > max_position_embeddings M:  θ' = θ·(factor·n/M − (factor − 1))^(r/(r−2)),
//!           f_i = 1 / θ'^e_i  (f32, as the forward's tensor arithmetic); n ≤ M: default
//! yarn      f_i = f_interp·(1 − γ_i) + f_extrap·γ_i,  f_extrap = 1/θ^e_i, f_interp = 1/(factor·θ^e_i),
//!           γ_i = 1 − clamp((i − lo)/(hi − lo), 0, 1), [lo, hi] the correction range of beta_fast/beta_slow
//!           over original_max_position_embeddings; a = attention_factor, or 0.1·ln(factor) + 1 (mscale ratio)
//! longrope  f_i = 1 / (ext_i · θ^e_i), ext = long_factor when n > original_max_position_embeddings, else
//!           short_factor;  a = attention_factor, or √(1 + ln(factor)/ln(original)) (1 when factor ≤ 1)
//! llama3    wavelength λ_i = 2π/f_i:  λ < orig/high_freq_factor: f_i;  λ > orig/low_freq_factor: f_i/factor;
//!           between: (1 − s)·f_i/factor + s·f_i,  s = (orig/λ − low)/(high − low)
//! ```
//!
//! The angle of position p is p·f_i; the tables hold a·cos and a·sin of it (transformers' `attention_scaling`).
//! Only `dynamic` and `longrope` depend on the positions in use (n = the largest position + 1).

use serde_json::{json, Map, Value};

/// A RoPE scaling as `config.json`'s `rope_parameters` (or the older `rope_scaling`) gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No scaling.
    Default,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Dynamic NTK: past `max_position_embeddings`, θ grows with the sequence length.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// YaRN.
    Yarn {
        /// The scaling factor (`None`: max_position_embeddings / original_max_position_embeddings).
        factor: Option<f64>,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
        /// The factor on cos and sin (`None`: derived from `factor`, `mscale`, `mscale_all_dim`).
        attention_factor: Option<f64>,
        /// Extrapolation boundary (default 32).
        beta_fast: f64,
        /// Interpolation boundary (default 1).
        beta_slow: f64,
        /// YaRN's mscale.
        mscale: Option<f64>,
        /// YaRN's mscale_all_dim.
        mscale_all_dim: Option<f64>,
        /// Whether the correction range is rounded out to whole dimensions (default true).
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-frequency factors for short and long sequences.
    LongRope {
        /// Factors while the sequence fits `original_max_position_embeddings` (r/2 of them).
        short_factor: Vec<f64>,
        /// Factors past it.
        long_factor: Vec<f64>,
        /// The scaling factor (`None`: max_position_embeddings / original_max_position_embeddings).
        factor: Option<f64>,
        /// The factor on cos and sin (`None`: derived from the factor).
        attention_factor: Option<f64>,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
    /// Llama 3.1's frequency-band scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Low-frequency band edge.
        low_freq_factor: f64,
        /// High-frequency band edge.
        high_freq_factor: f64,
        /// The context the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Which table a sequence of `n` positions uses: one built once, or one for that length (dynamic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TableKey {
    /// The table every length shares.
    Static,
    /// LongRoPE's long-factor table.
    Long,
    /// Dynamic NTK's table for exactly this many positions.
    Dynamic(usize),
}

impl RopeScaling {
    /// The `rope_type` name.
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The longest sequence a model with this scaling takes: `max_position_embeddings`, except dynamic NTK,
    /// which exists to go past it (up to `factor` times it).
    pub fn context(&self, max_position_embeddings: usize) -> usize {
        match self {
            RopeScaling::Dynamic { factor } => ((max_position_embeddings as f64) * factor.max(1.0)).floor() as usize,
            _ => max_position_embeddings,
        }
    }

    pub(crate) fn table_key(&self, n: usize, max_position_embeddings: usize) -> TableKey {
        match self {
            RopeScaling::Dynamic { .. } if n > max_position_embeddings => TableKey::Dynamic(n),
            RopeScaling::LongRope { original_max_position_embeddings, .. } if n > *original_max_position_embeddings => TableKey::Long,
            _ => TableKey::Static,
        }
    }

    /// The inverse frequencies (r/2) and the attention factor for rotary width `dim`, base `theta`, context
    /// `max_position_embeddings`, when `n` positions are in use.
    pub fn frequencies(&self, theta: f64, dim: usize, max_position_embeddings: usize, n: usize) -> (Vec<f32>, f64) {
        let key = self.table_key(n, max_position_embeddings);
        let exps: Vec<f32> = (0..dim / 2).map(|i| (2 * i) as f32 / dim as f32).collect();
        let pow = |base: f32| -> Vec<f32> { exps.iter().map(|&e| base.powf(e)).collect() };
        let default = || -> Vec<f32> { pow(theta as f32).iter().map(|p| 1.0 / p).collect() };
        match self {
            RopeScaling::Default => (default(), 1.0),
            RopeScaling::Linear { factor } => (default().iter().map(|f| f / *factor as f32).collect(), 1.0),
            RopeScaling::Dynamic { factor } => {
                let base = match key {
                    // The forward's `torch.max(position_ids) + 1` is a tensor: the new base is f32 arithmetic.
                    TableKey::Dynamic(n) => {
                        let s = (*factor as f32) * (n as f32) / (max_position_embeddings as f32) - (factor - 1.0) as f32;
                        (theta as f32) * s.powf((dim as f64 / (dim as f64 - 2.0)) as f32)
                    }
                    _ => theta as f32,
                };
                (pow(base).iter().map(|p| 1.0 / p).collect(), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let factor = factor.unwrap_or(max_position_embeddings as f64 / *orig as f64);
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let af = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => get_mscale(factor, *m) / get_mscale(factor, *a),
                    _ => get_mscale(factor, 1.0),
                });
                let correction_dim =
                    |rot: f64| (dim as f64 * (*orig as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * theta.ln());
                let (mut lo, mut hi) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    lo = lo.floor();
                    hi = hi.ceil();
                }
                let (lo, mut hi) = (lo.max(0.0), hi.min(dim as f64 - 1.0));
                if lo == hi {
                    hi += 0.001;
                }
                let pos = pow(theta as f32);
                let inv = (0..dim / 2)
                    .map(|i| {
                        let (extrap, interp) = (1.0 / pos[i], 1.0 / (factor as f32 * pos[i]));
                        let ramp = ((i as f32 - lo as f32) / (hi - lo) as f32).clamp(0.0, 1.0);
                        let gamma = 1.0 - ramp;
                        interp * (1.0 - gamma) + extrap * gamma
                    })
                    .collect();
                (inv, af)
            }
            RopeScaling::LongRope { short_factor, long_factor, factor, attention_factor, original_max_position_embeddings: orig } => {
                let factor = factor.unwrap_or(max_position_embeddings as f64 / *orig as f64);
                let af =
                    attention_factor.unwrap_or_else(|| if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (*orig as f64).ln()).sqrt() });
                let ext = if key == TableKey::Long { long_factor } else { short_factor };
                let inv = pow(theta as f32).iter().zip(ext).map(|(p, &e)| 1.0 / (e as f32 * p)).collect();
                (inv, af)
            }
            RopeScaling::Llama3 { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: orig } => {
                let (low_wl, high_wl) = ((*orig as f64 / low) as f32, (*orig as f64 / high) as f32);
                let f = *factor as f32;
                let inv = default()
                    .into_iter()
                    .map(|inv| {
                        let wl = (2.0 * std::f64::consts::PI) as f32 / inv;
                        let scaled = if wl > low_wl { inv / f } else { inv };
                        let smooth = (*orig as f32 / wl - *low as f32) / (high - low) as f32;
                        let smoothed = (1.0 - smooth) * scaled / f + smooth * scaled;
                        // transformers' ~(λ < high) * ~(λ > low), NaN included.
                        let medium = wl.partial_cmp(&high_wl) != Some(std::cmp::Ordering::Less)
                            && wl.partial_cmp(&low_wl) != Some(std::cmp::Ordering::Greater);
                        if medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }

    /// Reads a `rope_parameters` / `rope_scaling` object's scaling (its `rope_theta` and `partial_rotary_factor`
    /// are the caller's). `original` is a top-level `original_max_position_embeddings`, which transformers lets
    /// override the object's; `max_position_embeddings` is the default of the object's. Unknown keys, and keys
    /// of another RoPE type, are refused by name: `Err((key, value, why))`.
    pub(crate) fn from_object(
        obj: &Map<String, Value>,
        original: Option<usize>,
        max_position_embeddings: usize,
    ) -> std::result::Result<Self, (String, Value, String)> {
        let kind = obj.get("rope_type").or_else(|| obj.get("type")).cloned().unwrap_or(json!("default"));
        let name = kind.as_str().ok_or_else(|| ("rope_type".to_string(), kind.clone(), "must be a string".to_string()))?;
        let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
        let allowed: &[&str] = match name {
            "default" => &[],
            "linear" | "dynamic" => &["factor"],
            "yarn" => &[
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            ],
            "longrope" => &["short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"],
            "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
            _ => {
                return Err((
                    "rope_type".into(),
                    kind.clone(),
                    "lora-rs implements the RoPE types default, linear, dynamic, yarn, longrope and llama3".into(),
                ))
            }
        };
        for (k, v) in obj {
            if !common.contains(&k.as_str()) && !allowed.contains(&k.as_str()) && !v.is_null() {
                return Err((k.clone(), v.clone(), format!("not a parameter of rope_type \"{name}\" (lora-rs does not implement it)")));
            }
        }
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let num = |k: &str| -> std::result::Result<Option<f64>, (String, Value, String)> {
            match get(k) {
                None => Ok(None),
                Some(v) => {
                    v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| (k.to_string(), v.clone(), "must be a number".into()))
                }
            }
        };
        let positive = |k: &str| -> std::result::Result<Option<f64>, (String, Value, String)> {
            match num(k)? {
                Some(x) if x <= 0.0 => Err((k.to_string(), json!(x), "must be above 0".into())),
                x => Ok(x),
            }
        };
        let required = |k: &str| positive(k)?.ok_or_else(|| (k.to_string(), Value::Null, format!("is required by rope_type \"{name}\"")));
        let orig = || -> std::result::Result<usize, (String, Value, String)> {
            if let Some(o) = original {
                return Ok(o);
            }
            match get("original_max_position_embeddings") {
                None => Ok(max_position_embeddings),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n >= 1 && n <= u32::MAX as u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| ("original_max_position_embeddings".into(), v.clone(), "must be a positive integer".into())),
            }
        };
        let factors = |k: &str| -> std::result::Result<Vec<f64>, (String, Value, String)> {
            let v = get(k).ok_or_else(|| (k.to_string(), Value::Null, "is required by rope_type \"longrope\"".to_string()))?;
            v.as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().filter(|f| f.is_finite() && *f > 0.0)).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| (k.to_string(), v.clone(), "must be a list of positive numbers".into()))
        };
        Ok(match name {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: required("factor")? },
            "dynamic" => RopeScaling::Dynamic { factor: required("factor")? },
            "yarn" => RopeScaling::Yarn {
                factor: positive("factor")?,
                original_max_position_embeddings: orig()?,
                attention_factor: positive("attention_factor")?,
                beta_fast: positive("beta_fast")?.unwrap_or(32.0),
                beta_slow: positive("beta_slow")?.unwrap_or(1.0),
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
                truncate: match get("truncate") {
                    None => true,
                    Some(v) => v.as_bool().ok_or_else(|| ("truncate".to_string(), v.clone(), "must be true or false".to_string()))?,
                },
            },
            "longrope" => RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                factor: positive("factor")?,
                attention_factor: positive("attention_factor")?,
                original_max_position_embeddings: orig()?,
            },
            _ => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: orig()?,
            },
        })
    }

    /// The `rope_parameters` object transformers 5 writes (with θ and, when not 1, the partial rotary factor).
    pub(crate) fn to_object(&self, theta: f64, partial_rotary_factor: f64) -> Value {
        let mut v = json!({"rope_type": self.name(), "rope_theta": theta});
        let o = v.as_object_mut().expect("an object");
        let mut put = |k: &str, x: Value| {
            if !x.is_null() {
                o.insert(k.into(), x);
            }
        };
        match self {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => put("factor", json!(factor)),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                put("factor", json!(factor));
                put("original_max_position_embeddings", json!(original_max_position_embeddings));
                put("attention_factor", json!(attention_factor));
                put("beta_fast", json!(beta_fast));
                put("beta_slow", json!(beta_slow));
                put("mscale", json!(mscale));
                put("mscale_all_dim", json!(mscale_all_dim));
                put("truncate", json!(truncate));
            }
            RopeScaling::LongRope { short_factor, long_factor, factor, attention_factor, original_max_position_embeddings } => {
                put("short_factor", json!(short_factor));
                put("long_factor", json!(long_factor));
                put("factor", json!(factor));
                put("attention_factor", json!(attention_factor));
                put("original_max_position_embeddings", json!(original_max_position_embeddings));
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                put("factor", json!(factor));
                put("low_freq_factor", json!(low_freq_factor));
                put("high_freq_factor", json!(high_freq_factor));
                put("original_max_position_embeddings", json!(original_max_position_embeddings));
            }
        }
        if partial_rotary_factor != 1.0 {
            put("partial_rotary_factor", json!(partial_rotary_factor));
        }
        v
    }

    /// Checks the scaling against the rotary width `dim`; the error names the key.
    pub(crate) fn check(&self, dim: usize) -> std::result::Result<(), (String, String)> {
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = self {
            for (k, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != dim / 2 {
                    return Err((
                        format!("rope_parameters.{k}"),
                        format!("has {} values; the rotary width {dim} needs {}", f.len(), dim / 2),
                    ));
                }
            }
        }
        if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = self {
            if high_freq_factor <= low_freq_factor {
                return Err((
                    "rope_parameters.high_freq_factor".into(),
                    format!("{high_freq_factor} must be above low_freq_factor {low_freq_factor}"),
                ));
            }
        }
        if let RopeScaling::Dynamic { .. } = self {
            if dim <= 2 {
                return Err(("rope_parameters.rope_type".into(), format!("\"dynamic\" needs a rotary width above 2, not {dim}")));
            }
        }
        Ok(())
    }
}
