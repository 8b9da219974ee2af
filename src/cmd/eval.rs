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
    let started = std::time::Instant::now();
    let e = evaluate(&net, &data.test, 1000)?;
    let seconds = started.elapsed().as_secs_f64();
    print_eval(&format!("{} on the test set:", a.model.display()), &e);
    let summary = json!({"model": a.model, "accuracy": e.accuracy, "wrong": e.wrong, "confusion": e.confusion});
    if let Some(j) = &a.json {
        write_json(j, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        let name = a.model.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
        let run = crate::viz::EvalRun { args: &a, net: &net, models: vec![(name, &e)], summary: &summary, seconds };
        crate::viz::eval(dir, run)?;
    }
    Ok(())
}
