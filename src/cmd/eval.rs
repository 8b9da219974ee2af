//! `lora eval`: accuracy and per-digit wrong counts of a saved model, and of each adapter on it.

use anyhow::{Context, Result};
use lora::LoadOptions;
use lora_train::{evaluate, Evaluation};
use serde_json::{json, Map, Value};

use crate::cli::EvalArgs;
use crate::common::{check_input_size, check_outputs, fingerprint, load_model, print_eval, print_wrong_table, write_json, Data, Out};

fn to_json(e: &Evaluation) -> Value {
    json!({"accuracy": e.accuracy, "wrong": e.wrong, "confusion": e.confusion})
}

pub fn run(a: EvalArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File), ("--report", a.report.report.as_deref(), Out::Dir)])?;
    let mut net = load_model(&a.model)?;
    let data = Data::load(&a.data.data)?;
    check_input_size(&net, &a.model, &data)?;
    let opts = LoadOptions { base_fingerprint: Some(fingerprint(&net)?), force: a.force };
    for (name, dir) in &a.adapter {
        anyhow::ensure!(name != "base", "--adapter base=…: the name \"base\" is reserved for the model without adapters");
        net.model.load_adapter(name, dir, &opts).with_context(|| format!("loading adapter {name} from {}", dir.display()))?;
    }
    // One loaded base; switching the active adapter copies no weights.
    let started = std::time::Instant::now();
    net.model.set_active(&[])?;
    let base = evaluate(&net, &data.test, 1000)?;
    let mut results = Vec::new();
    for (name, _) in &a.adapter {
        net.model.set_active(&[name.as_str()])?;
        results.push((name.clone(), evaluate(&net, &data.test, 1000)?));
    }
    if results.is_empty() {
        print_eval(&format!("{} on the test set:", a.model.display()), &base);
    } else {
        let mut cols = vec![("base", &base)];
        cols.extend(results.iter().map(|(n, e)| (n.as_str(), e)));
        println!("Wrong answers per digit (test set), {} with each adapter:", a.model.display());
        print_wrong_table(&cols);
    }
    let adapters: Map<String, Value> = results.iter().map(|(n, e)| (n.clone(), to_json(e))).collect();
    let summary = json!({"model": a.model, "accuracy": base.accuracy, "wrong": base.wrong, "confusion": base.confusion,
        "base": to_json(&base), "adapters": adapters});
    if let Some(j) = &a.json {
        write_json(j, &summary)?;
    }
    if let Some(dir) = &a.report.report {
        let name = a.model.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
        let mut models = vec![(if results.is_empty() { name } else { "base".to_string() }, &base)];
        models.extend(results.iter().map(|(n, e)| (n.clone(), e)));
        let run = crate::report_dir::EvalRun { args: &a, net: &net, models, summary: &summary, seconds: started.elapsed().as_secs_f64() };
        crate::report_dir::eval(dir, run)?;
    }
    Ok(())
}
