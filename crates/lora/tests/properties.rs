//! Property tests of the LoRA library: PEFT configs survive a round trip through `adapter_config.json`,
//! and merging then unmerging an adapter gives the weight back to within its stated rounding.

use std::path::Path;

use candle_core::{Device, Tensor};
use lora::adapter::{parse_peft_config, peft_config_json};
use lora::{Adapter, Init, LoraConfig, LoraLinear, Scaling};
use proptest::prelude::*;

fn module() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,6}(\\.[a-z0-9_]{1,6}){0,2}"
}

proptest! {
    #[test]
    fn a_peft_config_reads_back_as_written(
        r in 1usize..64,
        alpha in -64.0f64..64.0,
        dropout in 0.0f64..0.99,
        rslora in any::<bool>(),
        targets in proptest::collection::vec(module(), 1..5),
        ranks in proptest::collection::btree_map(module(), 1usize..32, 0..3),
        alphas in proptest::collection::btree_map(module(), -8.0f64..8.0, 0..3),
        init in 0usize..5,
        variant in 0usize..3,
    ) {
        // Every initialisation PEFT can name (the seed's N(0, 1) is written as "gaussian"), and DoRA or a
        // LoRA bias where PEFT allows them.
        let init = [Init::PeftGaussian, Init::Kaiming, Init::Random, Init::Pissa { niter: None }, Init::Olora][init];
        let use_dora = variant == 1 && !init.rewrites_base();
        let lora_bias = variant == 2 && matches!(init, Init::Kaiming | Init::Random);
        let c = LoraConfig {
            init,
            use_dora,
            lora_bias,
            dropout,
            scaling: if rslora { Scaling::RankStabilized } else { Scaling::Standard },
            target_modules: targets.into(),
            rank_pattern: ranks.into_iter().collect(),
            alpha_pattern: alphas.into_iter().collect(),
            ..LoraConfig::new(r, alpha)
        };
        let text = serde_json::to_string_pretty(&peft_config_json(&c, Some("base"), Some("CAUSAL_LM"))).unwrap();
        let (back, base) = parse_peft_config(Path::new("adapter_config.json"), &text).unwrap();
        prop_assert_eq!(base.as_deref(), Some("base"));
        prop_assert_eq!(back, c);
    }

    #[test]
    fn merge_then_unmerge_restores_the_weight_within_rounding(
        out in 1usize..12, inp in 1usize..12, r in 1usize..4, scale in -4.0f64..4.0, seed in any::<u64>(),
    ) {
        let vals = |n: usize, k: u64| -> Vec<f32> {
            (0..n).map(|i| {
                let x = (seed ^ k).wrapping_add(i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            }).collect()
        };
        let dev = Device::Cpu;
        let w0 = vals(out * inp, 1);
        let mut l = LoraLinear::new(Tensor::from_vec(w0.clone(), (out, inp), &dev).unwrap(), None).unwrap();
        let a = Tensor::from_vec(vals(r * inp, 2), (r, inp), &dev).unwrap();
        let b = Tensor::from_vec(vals(out * r, 3), (out, r), &dev).unwrap();
        l.insert_adapter("a", Adapter::from_tensors(&a, &b, scale, scale, 0.0).unwrap()).unwrap();
        l.set_active(&["a"]).unwrap();
        let x = Tensor::from_vec(vals(3 * inp, 4), (3, inp), &dev).unwrap();
        let before = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let delta = l.adapter("a").unwrap().delta_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.merge("a", true).unwrap();
        let merged = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Merged and unmerged forwards sum the same terms in another order: inputs and weights are ≤ 1 and
        // |s·B·A| ≤ 4·r, so each output is a sum of ≤ 12 terms of size ≤ 17: f32 rounding ≲ 12·17·6e-8.
        for (m, u) in merged.iter().zip(&before) {
            prop_assert!((m - u).abs() <= 2e-4, "merged {} vs unmerged {}", m, u);
        }
        l.unmerge("a").unwrap();
        let w = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // One add and one subtract per element: |error| ≤ ulp(|W0| + |s·B·A|) (the documented bound).
        for ((got, want), d) in w.iter().zip(&w0).zip(&delta) {
            let bound = 2.0 * f32::EPSILON * (want.abs() + d.abs()).max(f32::MIN_POSITIVE);
            prop_assert!((got - want).abs() <= bound, "{} vs {} (delta {})", got, want, d);
        }
        prop_assert!(l.merged().is_empty());
    }
}
