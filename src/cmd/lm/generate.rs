//! `lora lm generate`: prompts → text, streamed for one prompt, batched for several.

use std::io::Write;

use anyhow::{Context, Result};
use lora_lm::generate::{generate, Finish, Sampling};
use lora_lm::hf::{load_adapter, load_model, load_tokenizer};
use lora_lm::StreamDecoder;

use crate::lm_cli::LmGenerateArgs;

pub fn run(a: LmGenerateArgs) -> Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    sampling.validate()?;
    let (mut model, _) = load_model(&a.model).with_context(|| format!("loading the model {}", a.model.display()))?;
    // Nothing trains here: a frozen base lets every adapted projection run as one fused op.
    model.freeze_base();
    let tok = load_tokenizer(&a.model, model.config())?;
    if let Some(dir) = &a.adapter {
        load_adapter(&mut model, "adapter", dir, a.force).with_context(|| format!("loading the adapter {}", dir.display()))?;
        model.lora_mut().set_active(&["adapter"])?;
    }
    let prompts: Vec<Vec<u32>> = a.prompt.iter().map(|p| tok.encode(p)).collect::<lora_lm::Result<_>>()?;
    // The model's end tokens: config.json's and generation_config.json's.
    let stop = lora_lm::hf::end_token_ids(&a.model, model.config())?;
    let stream = prompts.len() == 1;
    let mut decoder = StreamDecoder::after(&prompts[0]);
    if stream {
        let mut stdout = std::io::stdout();
        write!(stdout, "{}", a.prompt[0])?;
        stdout.flush()?;
    }
    let out = generate(&model, &prompts, a.max_tokens as usize, &sampling, &stop, |_, id| {
        if stream {
            if let Some(piece) = decoder.push(&tok, id)? {
                let mut stdout = std::io::stdout();
                // A closed stdout (`| head`) stops generating; the end below then exits quietly.
                return Ok(write!(stdout, "{piece}").and_then(|()| stdout.flush()).is_ok());
            }
        }
        Ok(true)
    })?;
    let mut stdout = std::io::stdout().lock();
    if stream {
        writeln!(stdout, "{}", decoder.finish(&tok)?)?;
    } else {
        for (i, (p, g)) in a.prompt.iter().zip(&out).enumerate() {
            writeln!(stdout, "--- prompt {} ---", i + 1)?;
            writeln!(stdout, "{p}{}", tok.decode_continuation(&prompts[i], &g.tokens)?)?;
        }
    }
    for (i, g) in out.iter().enumerate() {
        if g.finish == Finish::Context {
            eprintln!("note: prompt {} stopped at the model's context ({} tokens)", i + 1, model.config().max_position_embeddings);
        }
    }
    Ok(())
}
