//! `lora serve`: loads the base and its adapters, prints where it listens, serves until Ctrl-C (or
//! SIGTERM), then drains the requests in flight.

use std::time::Duration;

use anyhow::{Context, Result};
use lora_serve::{Limits, ModelKind, ServeOptions, Server};

use crate::cli::ServeArgs;

pub fn run(a: ServeArgs) -> Result<()> {
    let threads = super::set_threads(a.threads);
    std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap_or_else(|_| "500".into()));
    let is_lm = a.model.is_dir();
    let opts = ServeOptions {
        model: a.model.clone(),
        adapters: a.adapters.clone(),
        name: a.name.clone(),
        mnist_data: a.data.data.clone(),
        max_loaded: a.max_loaded_adapters as usize,
        max_batch: a.max_batch.map_or(if is_lm { 32 } else { 1024 }, |b| b as usize),
        batch_window: Duration::from_millis(a.batch_window_ms),
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_images: a.max_images as usize,
            max_prompts: a.max_prompts as usize,
            max_tokens: a.max_tokens as usize,
        },
    };
    let server = Server::open(&opts).with_context(|| format!("starting the server for {}", a.model.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(threads.clamp(1, 4)).build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("--addr {}: cannot listen", a.addr))?;
        let addr = listener.local_addr()?;
        let kind = match server.kind() {
            ModelKind::Lm => "language model",
            ModelKind::Classifier => "classifier",
        };
        println!("lora serve: listening on http://{addr}");
        println!(
            "  {kind} {:?} with {} adapter(s): {}",
            server.name(),
            server.adapters().len(),
            server.adapters().iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        use std::io::Write;
        std::io::stdout().flush()?;
        lora_serve::serve(server, listener, shutdown_signal()).await?;
        println!("lora serve: stopped (requests in flight finished)");
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
