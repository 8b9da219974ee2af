//! The bodies of the fuzz targets, shared with `tests/fuzz_regressions.rs`, which replays the kept corpus
//! and every crash artifact through them on each `cargo test`. Errors are fine; panics are bugs.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// The IDX reader (raw and gzip, images and labels).
pub fn idx(data: &[u8]) {
    for kind in [mnist::IdxKind::Images, mnist::IdxKind::Labels] {
        if let Ok(idx) = mnist::decode_idx(Path::new("fuzz"), data.to_vec(), kind) {
            assert_eq!(idx.data.len(), idx.dims.iter().product::<usize>());
        }
    }
}

/// A model file: safetensors parsing with our checks, then building ExpensiveNet from its tensors.
pub fn safetensors_model(data: &[u8]) {
    if let Ok(f) = lora::io::TensorFile::from_bytes(Path::new("fuzz.safetensors"), data, &Device::Cpu) {
        if let Ok(net) = lora_train::ExpensiveNet::from_tensors(|n| f.get(n).cloned(), "fuzz") {
            let sizes = net.sizes().expect("sizes of a built network");
            let x = Tensor::ones((1, sizes[0]), DType::F32, &Device::Cpu).expect("input");
            net.forward(&x).expect("forward of a validated network");
        }
    }
}

/// PEFT's adapter_config.json parser on arbitrary text.
pub fn adapter_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok((config, _)) = lora::adapter::parse_peft_config(Path::new("adapter_config.json"), &text) {
        assert!(config.validate().is_ok());
        let _ = config.scale_for("linear1");
    }
}

/// A whole adapter (config + safetensors) loaded onto a 16-8-4-10 model.
/// Input layout: u16 little-endian config length, the config text, then the safetensors bytes.
pub fn adapter_files(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let text = String::from_utf8_lossy(&data[2..2 + n]);
    if let Ok(files) = lora::adapter_from_bytes(Path::new("fuzz"), &text, &data[2 + n..]) {
        let mut net = lora_train::ExpensiveNet::new(16, 8, 4, 10, 0, &Device::Cpu).expect("small network");
        if net.model.insert_adapter_files("x", &files).is_ok() {
            net.model.set_active(&["x"]).expect("just inserted");
            let x = Tensor::ones((2, 16), DType::F32, &Device::Cpu).expect("input");
            net.forward(&x).expect("forward with a validated adapter");
        }
    }
}
