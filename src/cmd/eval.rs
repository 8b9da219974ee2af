//! `lora eval`: accuracy and per-digit wrong counts of a saved model.

use anyhow::Result;
use lora_train::evaluate;
use serde_json::json;

use crate::cli::EvalArgs;
use crate::common::{load_model, print_eval, write_json, Data};

pub fn run(a: EvalArgs) -> Result<()> {
    let net = load_model(&a.model)?;
    let data = Data::load(&a.data.data)?;
    if net.sizes()?[0] != data.raw.test.pixels() {
        anyhow::bail!(
            "{}: model takes {} inputs but the images have {} pixels",
            a.model.display(),
            net.sizes()?[0],
            data.raw.test.pixels()
        );
    }
    let e = evaluate(&net, &data.test, 1000)?;
    print_eval(&format!("{} on the test set:", a.model.display()), &e);
    if let Some(j) = &a.json {
        write_json(j, &json!({"model": a.model, "accuracy": e.accuracy, "wrong": e.wrong, "confusion": e.confusion}))?;
    }
    Ok(())
}
