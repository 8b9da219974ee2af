//! `lora graph`: the network as Graphviz DOT, and SVG/PNG when `dot` is installed.

use anyhow::{Context, Result};
use candle_core::Device;
use lora::io::write_atomic;
use lora::LoraConfig;
use lora_train::ExpensiveNet;

use crate::cli::GraphArgs;
use crate::common::{check_outputs, load_model, Out};

pub fn run(a: GraphArgs) -> Result<()> {
    check_outputs(&[("--out", Some(&a.out), Out::File)])?;
    let net = match &a.model {
        Some(p) => load_model(p)?,
        None => ExpensiveNet::new(784, a.net.hidden1 as usize, a.net.hidden2 as usize, 10, 0, &Device::Cpu)?,
    };
    let lora = if a.no_lora {
        None
    } else {
        let cfg = LoraConfig::new(a.lora.rank as usize, a.lora.alpha);
        cfg.validate()?;
        Some((a.lora.rank as usize, a.lora.alpha, cfg.scale_for("linear1")))
    };
    let graph = crate::report_dir::net_graph(&net, lora);
    let dot = graph.to_dot();
    write_atomic(&a.out, dot.as_bytes())?;
    println!("Wrote {} ({} bytes)", a.out.display(), dot.len());
    if lora_viz::graphviz_available() {
        for format in ["svg", "png"] {
            let path = a.out.with_extension(format);
            let bytes = lora_viz::render_dot(&dot, format).with_context(|| format!("rendering {}", a.out.display()))?;
            write_atomic(&path, &bytes)?;
            println!("Wrote {} ({} bytes)", path.display(), bytes.len());
        }
    } else {
        println!("Graphviz `dot` is not installed: draw it with `dot -Tsvg {} -o network.svg`", a.out.display());
    }
    Ok(())
}
