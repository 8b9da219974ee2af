//! Progress bars in the spirit of the seed's tqdm: one bar per epoch, running average loss.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use lora_train::StepInfo;

/// Drives one bar per epoch from the training loop's step callbacks.
pub struct EpochBars {
    label: String,
    epochs: usize,
    bar: Option<ProgressBar>,
    current_epoch: usize,
}

impl EpochBars {
    pub fn new(label: &str, epochs: usize) -> Self {
        EpochBars { label: label.to_string(), epochs, bar: None, current_epoch: 0 }
    }

    pub fn step(&mut self, s: &StepInfo) {
        if s.epoch != self.current_epoch {
            self.finish();
            let bar = ProgressBar::with_draw_target(Some(s.steps_in_epoch as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{msg} {percent:>3}%|{bar:30}| {pos}/{len} [{elapsed}<{eta}, {rate}] {prefix}")
                    .map(|st| {
                        st.with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.1} it/s", s.per_sec());
                        })
                    })
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(format!("{} (epoch = {}/{})", self.label, s.epoch, self.epochs));
            self.bar = Some(bar);
            self.current_epoch = s.epoch;
        }
        if let Some(b) = &self.bar {
            b.set_prefix(format!("loss={:.4}", s.avg_loss));
            b.set_position(s.step as u64);
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
            if b.is_hidden() {
                eprintln!("{} (epoch = {}/{}): {} steps, {}", self.label, self.current_epoch, self.epochs, b.position(), b.prefix());
            }
        }
    }
}
