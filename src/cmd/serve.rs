//! `lora serve`: loads the base and its adapters (for an MNIST classifier, also MNIST's pixel statistics
//! and test images), prints where it listens, serves until Ctrl-C (or SIGTERM), then drains the requests
//! in flight for at most --shutdown-timeout.

use std::time::Duration;

use anyhow::{Context, Result};
use lora_serve::{Access, ClassifierInputs, Limits, ModelKind, Normalization, ServeOptions, Server, Stopped, Timeouts};

use crate::cli::ServeArgs;

/// `value` seconds as a duration, or an error naming `flag`.
fn seconds(flag: &str, value: f64) -> Result<Duration> {
    anyhow::ensure!(
        value.is_finite() && value > 0.0 && value <= 86_400.0,
        "{flag} {value}: give a number of seconds above 0 (at most 86400)"
    );
    Ok(Duration::from_secs_f64(value))
}

/// What an MNIST classifier needs from MNIST: the training pixels' mean and standard deviation, and the
/// test images for /v1/mnist/sample.
fn mnist_inputs(dir: &std::path::Path) -> Result<ClassifierInputs> {
    let data = mnist::Mnist::load(dir).with_context(|| format!("{}: MNIST data (for the pixel normalisation, --data)", dir.display()))?;
    let (mean, std) = mnist::mean_std(&data.train.images);
    let pixels = data.test.pixels();
    Ok(ClassifierInputs { normalization: Normalization { mean, std }, images: data.test.images, labels: data.test.labels, pixels })
}

pub fn run(a: ServeArgs) -> Result<()> {
    let threads = super::set_threads(a.threads);
    std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap_or_else(|_| "500".into()));
    let is_lm = a.model.is_dir();
    let timeouts = Timeouts {
        request: seconds("--request-timeout", a.request_timeout)?,
        write: seconds("--write-timeout", a.write_timeout)?,
        keep_alive: seconds("--keep-alive", a.keep_alive)?,
        shutdown: seconds("--shutdown-timeout", a.shutdown_timeout)?,
    };
    let opts = ServeOptions {
        model: a.model.clone(),
        adapters: a.adapters.clone(),
        name: a.name.clone(),
        classifier: if a.model.is_file() && !a.model.parent().is_some_and(|p| p.join("adapter_config.json").is_file()) {
            Some(mnist_inputs(&a.data.data)?)
        } else {
            None
        },
        max_loaded: a.max_loaded_adapters as usize,
        max_batch: a.max_batch.map_or(if is_lm { 32 } else { 1024 }, |b| b as usize),
        batch_window: Duration::from_millis(a.batch_window_ms),
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_images: a.max_images as usize,
            max_prompts: a.max_prompts as usize,
            max_tokens: a.max_tokens as usize,
            max_concurrent_requests: a.max_concurrent_requests as usize,
        },
        timeouts,
        access: Access {
            api_key: a.api_key.clone().or_else(|| std::env::var("LORA_API_KEY").ok().filter(|k| !k.is_empty())),
            allow_adapter_updates: a.allow_adapter_updates,
        },
        chat_template: a.chat_template.clone(),
    };
    let server = Server::open(&opts).with_context(|| format!("starting the server for {}", a.model.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(threads.clamp(1, 4)).build()?;
    let stopped = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr).await.with_context(|| format!("--addr {}: cannot listen", a.addr))?;
        let addr = listener.local_addr()?;
        let kind = match server.kind() {
            ModelKind::Lm => "language model",
            ModelKind::Classifier => "classifier",
        };
        println!("lora serve: listening on http://{addr}");
        let adapters = server.adapters();
        println!(
            "  {kind} {:?} with {} adapter(s): {}",
            server.name(),
            adapters.len(),
            adapters.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        if let (Some(dir), true) = (&a.adapters, adapters.is_empty()) {
            println!("  (no sub-folder of {} holds an adapter_config.json)", dir.display());
        }
        if opts.access.api_key.is_some() {
            println!("  /v1 routes want an API key (Authorization: Bearer KEY)");
        }
        if !opts.access.allow_adapter_updates {
            println!("  loading and unloading adapters over HTTP is off (--allow-adapter-updates turns it on)");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        anyhow::Ok(lora_serve::serve(server, listener, shutdown_signal()).await?)
    })?;
    // Connections still open past the shutdown timeout, and blocking tasks, are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match stopped {
        Stopped::Drained => println!("lora serve: stopped (requests in flight finished)"),
        Stopped::TimedOut { open_requests } => {
            println!(
                "lora serve: stopped after --shutdown-timeout {} s; {open_requests} request(s) still open were dropped",
                a.shutdown_timeout
            )
        }
    }
    Ok(())
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
