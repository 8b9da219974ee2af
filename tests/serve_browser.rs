//! The page `lora serve` serves at `/`, in a real headless Chromium driven over the DevTools protocol:
//! it loads without console errors and shows only the panel of the server's model kind; a prompt streams
//! into one column per ticked model with each model's own completion; a digit drawn with real pointer
//! events gets the predictions `/v1/predict` gives the same pixels; the adapters table follows loads and
//! unloads; server errors appear in the page; a blank pad predicts nothing; every model starts ticked; it
//! fits a phone's width with every Unload button on the screen (and one clicked there), and works from the
//! keyboard; a server with an API key and without adapter updates gets the key from the page and offers no
//! loading; the chat mode streams each reply as `/v1/chat/completions` gives it, with the conversation so far.
//!
//! Screenshots of both panels go to `target/screenshots/`, and to `docs/` with `LORA_UPDATE_SCREENSHOTS=1`.
//! With `LORA_SCREENSHOT_LM=DIR` the page serves DIR/base with DIR/adapters (`lora lm demo`'s
//! runs/lm-demo) instead of the random test model, and with `LORA_SCREENSHOT_MNIST=DIR`
//! DIR/base.safetensors with the adapter folders in DIR (`lora demo`'s runs/demo) instead of the tests'
//! tiny classifier: `scripts/serve-screenshots.sh` makes the docs' pictures that way, from the real demo
//! models. Chromium: `.ci/run` installs Debian's `chromium` when it is missing.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use serve_support::{fixture, fixture_context, mnist_fixture, s, Served};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// A headless Chromium with one page, spoken to over its DevTools WebSocket.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next: u64,
    /// Console errors, uncaught exceptions and error log entries seen so far.
    errors: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Browser {
        let exe = std::env::var("LORA_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(&exe)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--no-default-browser-check", "--remote-debugging-port=0", "--window-size=1280,1000"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe} ({e}): the browser tests need Debian's chromium (.ci/run installs it)"));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.split("DevTools listening on ").nth(1) {
                        break u.trim().to_string();
                    }
                }
                _ => panic!("{exe} exited before listening for DevTools"),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let (ws, _) = tungstenite::connect(&url).unwrap();
        let mut b = Browser { child, ws, session: String::new(), next: 0, errors: Vec::new(), _profile: profile };
        let targets = b.call_browser("Target.getTargets", json!({}));
        let page = targets["targetInfos"].as_array().unwrap().iter().find(|t| t["type"] == "page").unwrap()["targetId"].clone();
        let attached = b.call_browser("Target.attachToTarget", json!({"targetId": page, "flatten": true}));
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(domain, json!({}));
        }
        b
    }

    fn send(&mut self, method: &str, params: Value, session: bool) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if session {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let Message::Text(t) = self.ws.read().unwrap() else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
            self.event(&v);
        }
    }
    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, false)
    }
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true)
    }

    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => self.errors.push(format!("console.error: {}", p["args"])),
            Some("Runtime.exceptionThrown") => self.errors.push(format!("exception: {}", p["exceptionDetails"])),
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                self.errors.push(format!("log ({}): {}", p["entry"]["source"], p["entry"]["text"]))
            }
            _ => {}
        }
    }

    /// The value of a JavaScript expression (promises awaited).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "awaitPromise": true, "returnByValue": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is truthy; returns its value.
    fn wait_for(&mut self, expr: &str, what: &str) -> Value {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expr);
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if Instant::now() >= until {
                let text = self.eval("document.body.innerText.slice(0, 3000)");
                panic!(
                    "timed out waiting for {what} ({expr}); page errors: {:?}; the page shows:\n{}",
                    self.errors,
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("window.loraPage && window.loraPage.ready", "the page to start");
    }

    fn mouse(&mut self, kind: &str, x: f64, y: f64, buttons: u8) {
        let button = if kind == "mouseMoved" && buttons == 0 { "none" } else { "left" };
        self.call("Input.dispatchMouseEvent", json!({"type": kind, "x": x, "y": y, "button": button, "buttons": buttons, "clickCount": 1}));
    }

    /// A real click in the middle of the element (scrolled into view, after two frames of layout).
    fn click(&mut self, selector: &str) {
        let r = self.eval(&format!(
            "(async () => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'center'}}); await new Promise(f => requestAnimationFrame(() => requestAnimationFrame(f))); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        self.mouse("mousePressed", x, y, 1);
        self.mouse("mouseReleased", x, y, 0);
    }

    /// Focuses the element, selects its text and types `text` over it.
    fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!("(() => {{ const e = document.querySelector({selector:?}); e.focus(); e.select(); }})()"));
        self.call("Input.insertText", json!({"text": text}));
    }

    fn key(&mut self, key: &str, code: &str, keycode: u32, text: Option<&str>) {
        let mut down = json!({"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": keycode});
        if let Some(t) = text {
            down["text"] = json!(t);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": keycode}));
    }

    /// A PNG of the whole page, written to target/screenshots/NAME (and docs/NAME when asked).
    fn screenshot(&mut self, name: &str) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{name}: not a screenshot");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), &png).unwrap();
        if std::env::var("LORA_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            std::fs::write(root.join("docs").join(name), &png).unwrap();
        }
    }

    /// Fails on any console error, exception or error log seen so far.
    fn assert_no_errors(&self, when: &str) {
        assert!(self.errors.is_empty(), "page errors {when}: {:#?}", self.errors);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blocking<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn post(url: &str, body: &Value) -> Value {
    blocking(async { serve_support::post(&reqwest::Client::new(), url, body).await.1 })
}

/// The centre of mass (column, row) of a 28 × 28 image, pixel centres at i + 0.5.
fn centre_of_mass(pixels: &Value) -> (f64, f64) {
    let p: Vec<f64> = pixels.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let total: f64 = p.iter().sum();
    let x = p.iter().enumerate().map(|(i, v)| v * ((i % 28) as f64 + 0.5)).sum::<f64>() / total;
    let y = p.iter().enumerate().map(|(i, v)| v * ((i / 28) as f64 + 0.5)).sum::<f64>() / total;
    (x, y)
}

/// The models the server lists, the base first.
fn model_ids(server: &Served) -> Vec<String> {
    let v = blocking(async { serve_support::get(&reqwest::Client::new(), &format!("{}/v1/models", server.url)).await.1 });
    v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

/// A 390 × 844 phone.
fn as_a_phone(b: &mut Browser) {
    b.call("Emulation.setDeviceMetricsOverride", json!({"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}));
}

/// Checks the phone-width layout: nothing wider than the screen, and every Unload button on it: with the
/// page scrolled down to it (only the page: a user does not know to scroll a table sideways), it lies
/// inside the screen and is what a tap at its middle reaches.
fn fits_a_phone(b: &mut Browser) {
    as_a_phone(b);
    let fits = b.eval("document.documentElement.scrollWidth <= window.innerWidth + 1");
    assert_eq!(fits, json!(true), "the page is wider than a 390 px phone");
    let off = b.eval(
        "(async () => { const off = []; for (const u of document.querySelectorAll('#adapters button')) { if (u.hidden) continue; \
         window.scrollTo(0, u.getBoundingClientRect().top + window.scrollY - window.innerHeight / 2); \
         await new Promise(f => requestAnimationFrame(() => requestAnimationFrame(f))); const r = u.getBoundingClientRect(); \
         const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2); \
         if (r.left < 0 || r.right > window.innerWidth || !(hit === u || u.contains(hit))) off.push([u.getAttribute('aria-label'), r.left, r.right]); } return off; })()",
    );
    assert_eq!(off, json!([]), "Unload buttons off a 390 px screen: {off}");
}

#[test]
fn the_language_model_page_streams_each_ticked_model_and_manages_adapters() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let (base, adapters, prompt, max) = match std::env::var("LORA_SCREENSHOT_LM") {
        Ok(dir) => (PathBuf::from(&dir).join("base"), PathBuf::from(&dir).join("adapters"), "SELECT ", "48"),
        Err(_) => (d.path().join("base"), d.path().join("adapters"), "SELECT id FROM", "24"),
    };
    let server = Served::start(&["--model", s(&base), "--adapters", s(&adapters), "--allow-adapter-updates"]);
    let mut b = Browser::launch();
    b.open(&server.url);
    assert_eq!(b.eval("document.querySelector('#kind').textContent"), "language model");
    assert_eq!(b.eval("[document.querySelector('#lm-panel').hidden, document.querySelector('#mnist-panel').hidden]"), json!([false, true]));
    // The header names the base as the base model, with the number of adapters.
    let header = b.eval("document.querySelector('#base').textContent");
    let ids = model_ids(&server);
    assert_eq!(header, format!("base model {} · {} adapters", ids[0], ids.len() - 1).as_str(), "{header}");
    // Every model starts ticked.
    let ticked = b.eval("[...document.querySelectorAll('#lm-models input:checked')].map(i => i.value)");
    let models: Vec<String> = ticked.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(models, model_ids(&server), "not every model is ticked");
    b.type_into("#prompt", prompt);
    b.type_into("#max-tokens", max);
    b.click("#generate");
    b.wait_for("[...document.querySelectorAll('#columns .column')].every(c => c.dataset.done === 'true') && document.querySelectorAll('#columns .column').length", "every column");
    b.assert_no_errors("after generating");
    for (i, model) in models.iter().enumerate() {
        let text = b.eval(&format!("document.querySelectorAll('#columns .column')[{i}].dataset.text"));
        let meta = b.eval(&format!("document.querySelectorAll('#columns .column')[{i}].querySelector('.meta').textContent"));
        let want = post(
            &format!("{}/v1/completions", server.url),
            &json!({"model": model, "prompt": prompt, "max_tokens": max.parse::<u32>().unwrap(), "temperature": 0, "top_p": 1, "seed": 0}),
        );
        assert_eq!(text, want["choices"][0]["text"], "{model}: the column differs from /v1/completions");
        assert!(meta.as_str().unwrap().contains("tokens/s"), "{model}: {meta}");
    }
    b.screenshot("serve-lm.png");
    // The adapters table follows a load and an unload made in the page.
    let rows = "[...document.querySelectorAll('#adapters tbody tr')].map(r => r.dataset.name)";
    let before = b.eval(rows);
    if std::env::var("LORA_SCREENSHOT_LM").is_err() {
        b.type_into("#load-name", "extra");
        b.type_into("#load-path", "spare/sql_v2");
        b.click("#load");
        b.wait_for("document.querySelector('#adapters tr[data-name=extra]')", "the loaded adapter's row");
        assert_eq!(b.eval("document.querySelector('#adapters tr[data-name=extra] td:nth-child(2)').textContent"), "4");
        assert_eq!(b.eval("document.querySelector('#lm-models input[value=extra]').checked"), json!(true), "a loaded adapter comes ticked");
        // On a phone: every Unload button on the screen, and a real tap on one unloads it.
        fits_a_phone(&mut b);
        b.click("#adapters tr[data-name=extra] button");
        b.wait_for("!document.querySelector('#adapters tr[data-name=extra]')", "the unloaded adapter's row to go");
        b.call("Emulation.clearDeviceMetricsOverride", json!({}));
        assert_eq!(b.eval(rows), before);
        b.assert_no_errors("after loading and unloading");
        // A server error shows in the page.
        b.type_into("#load-name", "bad");
        b.type_into("#load-path", "../base");
        b.click("#load");
        let shown = b.wait_for("!document.querySelector('#error').hidden && document.querySelector('#error').textContent", "the error");
        assert!(shown.as_str().unwrap().contains("outside the adapters folder"), "{shown}");
    }
    fits_a_phone(&mut b);
}

#[test]
fn the_chat_mode_streams_each_reply_as_the_chat_route_gives_it_and_keeps_the_conversation() {
    let d = tempfile::tempdir().unwrap();
    fixture_context(d.path(), 256);
    // The demo's byte-level model has 256 positions: its picture is one question, answered in full.
    let (base, adapters, model, system, turns, max) = match std::env::var("LORA_SCREENSHOT_LM") {
        Ok(dir) => (
            PathBuf::from(&dir).join("base"),
            PathBuf::from(&dir).join("adapters"),
            "chat",
            "",
            vec!["Return the number of items in the queue."],
            "128",
        ),
        Err(_) => (d.path().join("base"), d.path().join("adapters"), "js", "Be brief.", vec!["SELECT", "And then?"], "20"),
    };
    let server = Served::start(&["--model", s(&base), "--adapters", s(&adapters)]);
    let mut b = Browser::launch();
    b.open(&server.url);
    assert_eq!(
        b.eval("[document.querySelector('#generate-view').hidden, document.querySelector('#chat-view').hidden]"),
        json!([false, true])
    );
    b.click("#tab-chat");
    assert_eq!(
        b.eval("[document.querySelector('#generate-view').hidden, document.querySelector('#chat-view').hidden]"),
        json!([true, false])
    );
    assert_eq!(b.eval("document.querySelector('#tab-chat').getAttribute('aria-selected')"), "true");
    let hint = b.eval("document.querySelector('#chat-template').textContent");
    assert!(hint.as_str().unwrap().contains("ChatML"), "{hint}");
    // An adapter is chosen first; pick the one to talk to.
    assert_eq!(b.eval("document.querySelector('#chat-model').value"), model_ids(&server)[1].as_str());
    b.eval(&format!(
        "(() => {{ const s = document.querySelector('#chat-model'); s.value = {model:?}; s.dispatchEvent(new Event('change')); }})()"
    ));
    b.type_into("#max-tokens", max);
    b.type_into("#chat-system", system);
    let mut messages: Vec<Value> = if system.is_empty() { vec![] } else { vec![json!({"role": "system", "content": system})] };
    let ask = |messages: &Vec<Value>| {
        post(
            &format!("{}/v1/chat/completions", server.url),
            &json!({"model": model, "messages": messages, "max_tokens": max.parse::<u32>().unwrap(), "temperature": 0, "top_p": 1, "seed": 0}),
        )
    };
    for (i, text) in turns.iter().enumerate() {
        b.type_into("#chat-input", text);
        // The first with Enter, the next with the button; each sends the conversation so far.
        if i == 0 {
            b.key("Enter", "Enter", 13, Some("\r"));
        } else {
            b.click("#chat-send");
        }
        b.wait_for(&format!("document.querySelectorAll('.turn.assistant[data-done=true]').length === {}", i + 1), "the reply");
        messages.push(json!({"role": "user", "content": text}));
        let got = b.eval(&format!("document.querySelectorAll('.turn.assistant')[{i}].dataset.text"));
        assert_eq!(got, ask(&messages)["choices"][0]["message"]["content"], "reply {i} differs from /v1/chat/completions");
        messages.push(json!({"role": "assistant", "content": got}));
    }
    let meta = b.eval("document.querySelector('#chat-meta').textContent");
    assert!(meta.as_str().unwrap().contains("tokens/s"), "{meta}");
    let roles: Vec<&str> = turns.iter().flat_map(|_| ["user", "assistant"]).collect();
    assert_eq!(b.eval("[...document.querySelectorAll('.turn')].map(t => t.dataset.role)"), json!(roles));
    b.assert_no_errors("after chatting");
    b.screenshot("serve-chat.png");
    fits_a_phone(&mut b);
    b.call("Emulation.clearDeviceMetricsOverride", json!({}));
    b.click("#chat-new");
    assert_eq!(b.eval("document.querySelectorAll('.turn').length"), 0);
}

#[test]
fn the_classifier_page_predicts_a_digit_drawn_with_pointer_events_as_the_api_does() {
    let d = tempfile::tempdir().unwrap();
    let (m, a) = match std::env::var("LORA_SCREENSHOT_MNIST") {
        Ok(dir) => (PathBuf::from(&dir).join("base.safetensors"), PathBuf::from(&dir)),
        Err(_) => mnist_fixture(d.path(), &["7", "1"], &[]),
    };
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--allow-adapter-updates"]);
    let models = model_ids(&server);
    let mut b = Browser::launch();
    b.open(&server.url);
    assert_eq!(b.eval("document.querySelector('#kind').textContent"), "classifier");
    assert_eq!(b.eval("[document.querySelector('#lm-panel').hidden, document.querySelector('#mnist-panel').hidden]"), json!([true, false]));
    // A blank pad is no digit: no chart, a hint instead.
    b.wait_for("document.querySelector('#charts').dataset.pixels", "the first (blank) prediction round");
    assert_eq!(
        b.eval("[document.querySelectorAll('#charts .chart').length, document.querySelector('#draw-hint').hidden]"),
        json!([0, false])
    );
    let ticked = b.eval("[...document.querySelectorAll('#mnist-models input:checked')].map(i => i.value)");
    assert_eq!(ticked, json!(models), "not every model is ticked");
    // A "7": a stroke across the top, then down to the bottom left, as real pointer events.
    let r = b.eval("(() => { const r = document.querySelector('#pad').getBoundingClientRect(); return [r.x, r.y, r.width]; })()");
    let (x0, y0, w) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap(), r[2].as_f64().unwrap());
    let at = |gx: f64, gy: f64| (x0 + gx / 28.0 * w, y0 + gy / 28.0 * w);
    let path: Vec<(f64, f64)> =
        (0..=12).map(|i| (7.0 + i as f64, 6.0)).chain((1..=16).map(|i| (19.0 - i as f64 * 0.5, 6.0 + i as f64))).collect();
    let (sx, sy) = at(path[0].0, path[0].1);
    b.mouse("mousePressed", sx, sy, 1);
    for &(gx, gy) in &path[1..] {
        let (x, y) = at(gx, gy);
        b.mouse("mouseMoved", x, y, 1);
    }
    let (ex, ey) = at(path[path.len() - 1].0, path[path.len() - 1].1);
    b.mouse("mouseReleased", ex, ey, 0);
    let settled = "(() => { const c = document.querySelector('#charts'); return c.dataset.pixels === JSON.stringify(loraPage.pixels()) && [...c.querySelectorAll('.chart')].every(x => x.dataset.prediction !== undefined) && c.querySelectorAll('.chart').length; })()";
    b.wait_for(settled, "the charts of the drawn digit");
    b.assert_no_errors("after drawing");
    let pixels = b.eval("loraPage.pixels()");
    let ink = pixels.as_array().unwrap().iter().filter(|v| v.as_u64().unwrap() > 0).count();
    assert!((40..400).contains(&ink), "{ink} inked pixels");
    // What is sent is the drawing centred by its centre of mass, as MNIST's digits are (the 7 was drawn
    // high: its centre lies about 3 rows above the middle).
    let (drawn, sent) = (centre_of_mass(&b.eval("loraPage.drawn()")), centre_of_mass(&pixels));
    assert!(drawn.1 < 13.0, "the test's 7 is not drawn high: centre {drawn:?}");
    assert!((sent.0 - 14.0).abs() <= 0.5 && (sent.1 - 14.0).abs() <= 0.5, "the sent image's centre of mass is {sent:?}");
    let charts = b.eval("[...document.querySelectorAll('#charts .chart')].map(c => [c.dataset.model, Number(c.dataset.prediction), JSON.parse(c.dataset.probabilities)])");
    let charts = charts.as_array().unwrap();
    assert_eq!(charts.len(), models.len(), "{charts:?}");
    assert_eq!(b.eval("document.querySelector('#draw-hint').hidden"), json!(true));
    if std::env::var("LORA_SCREENSHOT_MNIST").is_ok() {
        let said: Vec<String> = charts.iter().map(|c| format!("{} predicts {}", c[0].as_str().unwrap(), c[1])).collect();
        eprintln!("the drawn 7: {}", said.join(", "));
    }
    for c in charts {
        let model = c[0].as_str().unwrap();
        let api = post(&format!("{}/v1/predict", server.url), &json!({"model": model, "images": [pixels]}));
        assert_eq!(c[1], api["predictions"][0], "{model}: the page and the API predict differently");
        for (x, y) in c[2].as_array().unwrap().iter().zip(api["probabilities"][0].as_array().unwrap()) {
            // The page's three requests ran as one mixed batch, the API's alone: f32 rounding only.
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-6, "{model}: {x} vs {y}");
        }
    }
    b.screenshot("serve-mnist.png");
    // From the keyboard: focus the pad, move the brush from the middle (14, 14) to the empty lower right
    // (22, 24), paint.
    b.eval("document.querySelector('#pad').focus()");
    for _ in 0..8 {
        b.key("ArrowRight", "ArrowRight", 39, None);
    }
    for _ in 0..10 {
        b.key("ArrowDown", "ArrowDown", 40, None);
    }
    let ink = b.eval("loraPage.drawn().filter(v => v > 0).length").as_u64().unwrap() as usize;
    assert_eq!(b.eval("loraPage.drawn()[24 * 28 + 22]"), json!(0), "the brush's target is inked already: the check proves nothing");
    b.key(" ", "Space", 32, Some(" "));
    let after = b.eval("loraPage.drawn().filter(v => v > 0).length").as_u64().unwrap() as usize;
    assert!(after > ink, "painting from the keyboard changed nothing");
    // A random test image from the server.
    b.click("#sample");
    b.wait_for("document.querySelector('#sample-label').textContent.includes('labelled')", "a test image");
    b.wait_for(settled, "the charts of the test image");
    b.assert_no_errors("after a test image");
    assert_eq!(b.eval("loraPage.pixels()"), b.eval("loraPage.drawn()"), "a test image is sent as it is, not shifted");
    // Last, as it changes the viewport under the mouse.
    fits_a_phone(&mut b);
    b.call("Emulation.clearDeviceMetricsOverride", json!({}));
    // Cleared: nothing predicted, the hint again.
    b.click("#clear");
    b.wait_for(
        "document.querySelectorAll('#charts .chart').length === 0 && !document.querySelector('#draw-hint').hidden",
        "the cleared pad",
    );
    b.assert_no_errors("after clearing");
    // An adapter unloaded elsewhere while ticked: the next prediction's error appears in the page.
    let victim = models.last().unwrap().clone();
    let unloaded = post(&format!("{}/v1/unload_lora_adapter", server.url), &json!({"lora_name": victim}));
    assert_eq!(unloaded["status"], "ok", "{unloaded}");
    b.click("#sample");
    let shown = b.wait_for("!document.querySelector('#error').hidden && document.querySelector('#error').textContent", "the error");
    assert!(shown.as_str().unwrap().contains(&victim), "{shown}");
}

#[test]
fn with_an_api_key_and_no_adapter_updates_the_page_asks_for_the_key_and_offers_no_loading() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let (base, adapters) = (d.path().join("base"), d.path().join("adapters"));
    let server = Served::start(&["--model", s(&base), "--adapters", s(&adapters), "--api-key", "page-key"]);
    let mut b = Browser::launch();
    b.call("Page.navigate", json!({"url": server.url}));
    b.wait_for("window.loraPage && window.loraPage.ready", "the page to start");
    // /v1/models answered 401: the page says so and shows the key field.
    let shown = b.wait_for("!document.querySelector('#error').hidden && document.querySelector('#error').textContent", "the error");
    assert!(shown.as_str().unwrap().contains("API key"), "{shown}");
    assert_eq!(b.eval("document.querySelector('#key-form').hidden"), json!(false));
    b.errors.clear(); // the browser logs the 401 itself
    b.type_into("#api-key", "page-key");
    b.click("#key-form button");
    b.wait_for("document.querySelectorAll('#lm-models input').length === 3 && document.querySelector('#key-form').hidden", "the models");
    assert_eq!(b.eval("document.querySelector('#error').hidden"), json!(true));
    // Loading is off: no form, no Unload buttons, a note naming the flag.
    assert_eq!(b.eval("document.querySelector('#load-form').hidden"), json!(true));
    assert_eq!(b.eval("[...document.querySelectorAll('#adapters button')].filter(u => !u.hidden).length"), json!(0));
    let note = b.eval("document.querySelector('#updates-off').hidden ? '' : document.querySelector('#updates-off').textContent");
    assert!(note.as_str().unwrap().contains("--allow-adapter-updates"), "{note}");
    // Generating sends the key.
    b.type_into("#max-tokens", "4");
    b.click("#generate");
    b.wait_for("[...document.querySelectorAll('#columns .column')].every(c => c.dataset.done === 'true') && document.querySelectorAll('#columns .column').length", "every column");
    assert_eq!(b.eval("[...document.querySelectorAll('#columns .column')].filter(c => c.dataset.error).length"), json!(0));
    b.assert_no_errors("after generating with the key");
}
