//! `lora lm eval`: flags → [`lora_lm::jobs::EvalJob`] → [`lora_lm::jobs::evaluate`]; prints the table.

use std::time::Instant;

use anyhow::{Context, Result};
use lora_lm::data::Corpus;
use lora_lm::hf::{load_adapter, load_model, load_tokenizer};
use lora_lm::instruct::{is_instruction_file, read_instructions, Examples, Packing};
use lora_lm::jobs::{evaluate_on, EvalData, EvalJob, EvalTable};

use super::corpus;
use super::finetune::{instruction_examples, Split};
use crate::common::{check_outputs, write_json, Out};
use crate::lm_cli::LmEvalArgs;

/// Tokens per forward pass when `--batch-size` is not given.
const EVAL_TOKENS: usize = 1024;

/// Prints bits per byte, rows = corpora, columns = models; the best of each row marked with *.
pub fn print_table(t: &EvalTable) {
    let w = t.corpora.iter().map(String::len).max().unwrap_or(4).max(6);
    print!("{:<w$}", "bits/byte");
    for c in &t.columns {
        print!(" {c:>10}");
    }
    println!();
    for (c, row) in t.corpora.iter().zip(&t.scores) {
        print!("{c:<w$}");
        let best = row.iter().map(|s| s.bits_per_byte).fold(f64::INFINITY, f64::min);
        for s in row {
            let mark = if s.bits_per_byte == best { "*" } else { " " };
            print!(" {:>9.4}{mark}", s.bits_per_byte);
        }
        println!();
    }
    if let Some(row) = t.scores.first() {
        println!("({} tokens scored per model on {}; * = lowest in the row)", row[0].tokens, t.corpora[0]);
    }
}

pub fn run(a: LmEvalArgs) -> Result<()> {
    check_outputs(&[
        ("--json", a.json.as_deref(), Out::File),
        ("--token-losses", a.token_losses.as_deref(), Out::File),
        ("--report", a.report.report.as_deref(), Out::Dir),
    ])?;
    let t0 = Instant::now();
    let (mut model, _) = load_model(&a.model).with_context(|| format!("loading the model {}", a.model.display()))?;
    // Nothing trains here: a frozen base lets every adapted projection run as one fused op.
    model.freeze_base();
    let tok = load_tokenizer(&a.model, model.config())?;
    let mut names = Vec::new();
    for (name, dir) in &a.adapter {
        if name == "base" {
            anyhow::bail!("--adapter {name}={}: the name \"base\" is taken by the model without adapters", dir.display());
        }
        load_adapter(&mut model, name, dir, a.force).with_context(|| format!("loading adapter {name} from {}", dir.display()))?;
        names.push(name.clone());
    }
    let ctx = a.context.map_or(model.config().max_position_embeddings, |c| c as usize);
    if ctx > model.config().max_position_embeddings {
        anyhow::bail!("--context {ctx} is longer than the model's context ({})", model.config().max_position_embeddings);
    }
    // Each file is a corpus or instruction data (scored on its completions and assistant turns).
    let mut corpora: Vec<Corpus> = Vec::new();
    let mut examples: Vec<Examples> = Vec::new();
    let mut order = Vec::new();
    for p in &a.data {
        if is_instruction_file(p).with_context(|| format!("reading data {}", p.display()))? {
            let data = read_instructions(p)?;
            let split = Split { validation: true, len: ctx, packing: Packing::Off };
            examples.push(instruction_examples(&a.model, &model, &tok, &data, &a.chat, split)?);
            order.push((true, examples.len() - 1));
        } else {
            corpora.push(corpus(p)?);
            order.push((false, corpora.len() - 1));
        }
    }
    if examples.is_empty() && (a.chat.chat_template.is_some() || a.chat.loss_on.is_some()) {
        anyhow::bail!("--chat-template and --loss-on apply to instruction data (JSONL rows with \"messages\", or \"prompt\" and \"completion\"); no --data file holds it");
    }
    let data: Vec<EvalData<'_>> =
        order.iter().map(|&(ex, i)| if ex { EvalData::Examples(&examples[i]) } else { EvalData::Corpus(&corpora[i]) }).collect();
    let job = EvalJob {
        adapters: names,
        context: ctx,
        max_tokens: a.max_tokens.map(|m| m as usize),
        batch: a.batch_size.map_or((EVAL_TOKENS / ctx).max(1), |b| b as usize),
        per_token: a.token_losses.is_some(),
    };
    let table = evaluate_on(&mut model, &tok, &data, &job, &mut |_| {}).context("scoring")?;
    print_table(&table);
    let seconds = t0.elapsed().as_secs_f64();
    println!("({seconds:.1} s)");
    if let Some(p) = &a.json {
        write_json(p, &table.json())?;
    }
    if let Some(p) = &a.token_losses {
        write_json(p, &table.token_losses_json())?;
    }
    if let Some(dir) = &a.report.report {
        super::report_dir::training(dir, "lora lm eval", &[], &[&table], &table.json())?;
    }
    Ok(())
}
