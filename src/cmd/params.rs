//! `lora params`: parameter counts per layer, base and LoRA.

use anyhow::Result;
use candle_core::Device;
use lora_train::ExpensiveNet;

use crate::cli::ParamsArgs;
use crate::common::{check_outputs, load_model, param_counts, print_params, write_json, Out};

pub fn run(a: ParamsArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    let net = match &a.model {
        Some(p) => load_model(p)?,
        None => ExpensiveNet::new(784, a.net.hidden1 as usize, a.net.hidden2 as usize, 10, 0, &Device::Cpu)?,
    };
    let p = param_counts(&net, a.lora.rank as usize)?;
    print_params(&p);
    if let Some(j) = &a.json {
        write_json(j, &p)?;
    }
    Ok(())
}
