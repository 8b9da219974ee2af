//! `lora serve` with an MNIST classifier, through the real binary and real HTTP: predictions over the
//! whole test set equal `lora eval`'s for the base and each adapter while the three are requested at
//! once (mixed batches), and bad requests get a 4xx while the server keeps serving.

mod serve_support;

use futures_util::future::join_all;
use serde_json::{json, Value};
use serve_support::{get, lora, mnist_fixture, post, s, Served};

/// The confusion matrix (true digit × predicted digit) of `model`'s predictions on every test image.
async fn confusion(c: &reqwest::Client, url: &str, model: &str, images: &[u8], labels: &[u8]) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; 10]; 10];
    for (chunk, chunk_labels) in images.chunks(500 * 784).zip(labels.chunks(500)) {
        let imgs: Vec<&[u8]> = chunk.chunks(784).collect();
        let (status, v) = post(c, &format!("{url}/v1/predict"), &json!({"model": model, "images": imgs})).await;
        assert_eq!(status, 200, "{model}: {v}");
        for (p, &l) in v["predictions"].as_array().unwrap().iter().zip(chunk_labels) {
            m[l as usize][p.as_u64().unwrap() as usize] += 1;
        }
    }
    m
}

fn matrix(v: &Value) -> Vec<Vec<u64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_equal_lora_evals_for_the_base_and_each_adapter_requested_at_once() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let (m, a) = mnist_fixture(d.path(), &["9", "4"], &["--rank", "2", "--alpha", "3"]);
    let (a9, a4) = (format!("digit9={}", s(&p("adapters/digit9"))), format!("digit4={}", s(&p("adapters/digit4"))));
    lora(&["eval", "--model", s(&p("m.safetensors")), "--adapter", &a9, "--adapter", &a4, "--json", s(&p("eval.json"))]);
    let eval: Value = serde_json::from_slice(&std::fs::read(p("eval.json")).unwrap()).unwrap();
    // An adapter folder given as the model is named as one, with the base it records and the folder to give.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lora")).args(["serve", "--model", s(&p("adapters/digit9"))]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a LoRA adapter"), "{err}");
    assert!(err.contains(&format!("--adapters {}", s(&a))) && err.contains("--model "), "{err}");
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--threads", "2"]);
    let c = reqwest::Client::new();
    let test = mnist::Mnist::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"))).unwrap().test;
    let models = ["m", "digit9", "digit4"];
    let got = join_all(models.iter().map(|model| confusion(&c, &server.url, model, &test.images, &test.labels))).await;
    assert_eq!(got[0], matrix(&eval["base"]["confusion"]), "base");
    assert_eq!(got[1], matrix(&eval["adapters"]["digit9"]["confusion"]), "digit9");
    assert_eq!(got[2], matrix(&eval["adapters"]["digit4"]["confusion"]), "digit4");
    assert_ne!(got[0], got[1], "the adapter changes nothing");
    // Probabilities in a mixed batch equal those alone (same kernels; f32 rounding of the base products,
    // whose order depends on the batch's size: ≤ 1e-6 on probabilities in [0, 1]).
    let imgs: Vec<&[u8]> = test.images.chunks(784).take(8).collect();
    let ask = |model: &'static str| {
        let (c, url, imgs) = (c.clone(), server.url.clone(), imgs.clone());
        async move { post(&c, &format!("{url}/v1/predict"), &json!({"model": model, "images": imgs})).await.1 }
    };
    let together = join_all(models.iter().map(|&m| ask(m))).await;
    for (model, mixed) in models.iter().zip(&together) {
        let alone = ask(model).await;
        assert_eq!(mixed["predictions"], alone["predictions"], "{model}");
        let (x, y) = (&mixed["probabilities"], &alone["probabilities"]);
        for (rx, ry) in x.as_array().unwrap().iter().zip(y.as_array().unwrap()) {
            for (px, py) in rx.as_array().unwrap().iter().zip(ry.as_array().unwrap()) {
                let (px, py) = (px.as_f64().unwrap(), py.as_f64().unwrap());
                assert!((px - py).abs() <= 1e-6, "{model}: {px} mixed vs {py} alone");
            }
        }
        let sum: f64 = x[0].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{model}: probabilities sum to {sum}");
    }
    // A sample image from the server predicts like the same pixels sent back.
    let (_, sample) = get(&c, &format!("{}/v1/mnist/sample", server.url)).await;
    assert_eq!(sample["pixels"].as_array().unwrap().len(), 784);
    let (status, _) = post(&c, &format!("{}/v1/predict", server.url), &json!({"model": "m", "images": [sample["pixels"]]})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prediction_requests_get_a_4xx_naming_the_image_and_value() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.safetensors");
    lora(&["pretrain", "--hidden1", "16", "--hidden2", "8", "--epochs", "1", "--batch-size", "1000", "--out", s(&m)]);
    let server = Served::start(&["--model", s(&m), "--max-images", "4", "--allow-adapter-updates"]);
    let c = reqwest::Client::new();
    let u = format!("{}/v1/predict", server.url);
    let zeros = vec![0u8; 784];
    let mut bad = zeros.iter().map(|&v| json!(v)).collect::<Vec<_>>();
    bad[17] = json!(300);
    let mut neg = bad.clone();
    neg[17] = json!(-1);
    let mut text = bad.clone();
    text[17] = json!("x");
    let cases = vec![
        ("short image", json!({"model": "m", "images": [vec![0u8; 783]]}), 400, "images[0] has 783 values; the model takes 784"),
        ("pixel over 255", json!({"model": "m", "images": [zeros, bad]}), 400, "images[1][17] = 300"),
        ("negative pixel", json!({"model": "m", "images": [neg]}), 400, "images[0][17] = -1"),
        ("pixel not a number", json!({"model": "m", "images": [text]}), 400, "images[0][17] = \"x\""),
        ("too many images", json!({"model": "m", "images": vec![zeros.clone(); 5]}), 400, "5 images: give 1 to 4"),
        ("no images", json!({"model": "m", "images": []}), 400, "0 images"),
        ("images not a list", json!({"model": "m", "images": 3}), 400, "images"),
        ("unknown model", json!({"model": "digit7", "images": [zeros]}), 404, "`digit7` does not exist"),
    ];
    for (what, body, status, want) in cases {
        let (got, v) = post(&c, &u, &body).await;
        assert_eq!(got, status, "{what}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(want), "{what}: {v}");
        let (ok, v) = post(&c, &u, &json!({"model": "m", "images": [zeros]})).await;
        assert_eq!(ok, 200, "after {what}: {v}");
    }
    let (status, v) = post(&c, &format!("{}/v1/completions", server.url), &json!({"model": "m", "prompt": "a"})).await;
    assert!(status == 404 && v["error"]["message"].as_str().unwrap().contains("classifier"), "{v}");
    let (status, v) = post(&c, &format!("{}/v1/load_lora_adapter", server.url), &json!({"lora_name": "x", "lora_path": "y"})).await;
    assert!(status == 400 && v["error"]["message"].as_str().unwrap().contains("--adapters"), "{v}");
}
