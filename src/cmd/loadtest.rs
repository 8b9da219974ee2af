//! `lora loadtest`: drives a local `lora serve` (through `lora-loadtest`) and prints throughput and latency.

use anyhow::Result;
use lora_loadtest::{run as drive, LoadtestOptions};

use crate::cli::LoadtestArgs;
use crate::common::{check_outputs, write_json, Out};

pub fn run(a: LoadtestArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    let o = LoadtestOptions {
        addr: a.addr.clone(),
        clients: a.clients,
        seconds: a.seconds,
        models: a.models.clone(),
        max_tokens: a.max_tokens,
        prompt: a.prompt.clone(),
        images: a.images,
        churn: a.churn,
        api_key: a.api_key.clone().or_else(|| std::env::var("LORA_API_KEY").ok()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).build()?;
    let r = runtime.block_on(drive(&o))?;
    println!(
        "{} clients, {:.1} s, {} model(s) ({}){}",
        r.clients,
        r.seconds,
        r.models.len(),
        r.kind,
        if a.churn { format!(", churn: {} adapter operations, {} failed", r.churn_ops, r.churn_errors) } else { String::new() }
    );
    println!(
        "{:>10} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "requests", "errors", "req/s", "tokens/s", "images/s", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "{:>10} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>9.1}",
        r.requests, r.errors, r.requests_per_s, r.tokens_per_s, r.images_per_s, r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    for e in &r.first_errors {
        eprintln!("error: {e}");
    }
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    anyhow::ensure!(
        r.errors == 0 && r.churn_errors == 0,
        "{} of {} requests failed ({} churn operations failed)",
        r.errors,
        r.requests,
        r.churn_errors
    );
    Ok(())
}
