//! Run outputs for people: `metrics.jsonl`, TensorBoard scalars, and a progress bar or log lines.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::recipe::Progress;
use crate::tensorboard::EventWriter;

/// One logged training step.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Achieved training TFLOP/s of one device, and that over its peak (when the peak is known).
    pub tflops_per_device: f64,
    pub mfu: Option<f64>,
    pub skipped_steps: u64,
    /// More fields of the `metrics.jsonl` line (a distillation's `mse`, `ce`, `kl`, `block`);
    /// numeric ones also go to TensorBoard as `train/<key>`.
    pub extra: serde_json::Map<String, Value>,
}

/// The run's outputs; silent on every rank but the first of a job.
pub struct MetricsLogger {
    out: Option<Outputs>,
}

struct Outputs {
    jsonl: File,
    jsonl_path: PathBuf,
    tb: EventWriter,
    bar: Option<ProgressBar>,
}

/// Keeps only the lines of `metrics.jsonl` with `step <= last_step` (a resumed run redoes the rest).
fn truncate_after(path: &Path, last_step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<String> = BufReader::new(File::open(path)?)
        .lines()
        .map_while(|l| l.ok())
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= last_step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = File::create(&tmp)?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl MetricsLogger {
    /// Outputs of a rank that writes none.
    pub fn silent() -> Self {
        Self { out: None }
    }

    /// Opens the outputs of `run_dir`; `start_step` is the number of steps already done.
    pub fn open(
        run_dir: &Path,
        start_step: u64,
        total_steps: u64,
        progress: Progress,
    ) -> Result<Self> {
        let jsonl_path = run_dir.join("metrics.jsonl");
        truncate_after(&jsonl_path, start_step)
            .with_context(|| format!("rewriting {}", jsonl_path.display()))?;
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .with_context(|| format!("opening {}", jsonl_path.display()))?;
        let mut tb = EventWriter::create(&run_dir.join("tb"))?;
        if start_step > 0 {
            tb.session_start(start_step + 1)?;
        }
        let bar_on = match progress {
            Progress::Bar => true,
            Progress::Plain => false,
            Progress::Auto => std::io::stderr().is_terminal(),
        };
        let bar = bar_on.then(|| {
            let b = ProgressBar::new(total_steps);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(start_step);
            b
        });
        Ok(Self {
            out: Some(Outputs {
                jsonl,
                jsonl_path,
                tb,
                bar,
            }),
        })
    }

    fn write_line(o: &mut Outputs, v: Value) -> Result<()> {
        // One write per line: a reader never sees a line's first half.
        o.jsonl
            .write_all(format!("{v}\n").as_bytes())
            .with_context(|| format!("writing {}", o.jsonl_path.display()))
    }

    /// A plain line, or a message above the progress bar.
    pub fn say(&self, line: &str) {
        let Some(o) = &self.out else { return };
        match &o.bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    pub fn step(&mut self, m: &StepMetrics, zero_fractions: &[(String, f64)]) -> Result<()> {
        let Some(o) = &mut self.out else {
            return Ok(());
        };
        let mut line = json!({
                "step": m.step,
                "loss": m.loss,
                "lr": m.lr,
                "weight_decay": m.weight_decay,
                "grad_norm": m.grad_norm,
                "tokens": m.tokens,
                "tokens_per_s": m.tokens_per_s,
                "tflops_per_device": m.tflops_per_device,
                "skipped_steps": m.skipped_steps,
        });
        let fields = line.as_object_mut().expect("an object");
        if let Some(mfu) = m.mfu {
            fields.insert("mfu".into(), json!(mfu));
        }
        fields.extend(m.extra.clone());
        for (name, z) in zero_fractions {
            fields.insert(format!("ternary_zero_fraction/{name}"), json!(z));
        }
        Self::write_line(o, line)?;
        let mut scalars: Vec<(String, f64)> = vec![
            ("train/loss".into(), m.loss),
            ("train/lr".into(), m.lr),
            ("train/grad_norm".into(), m.grad_norm),
            ("train/tokens".into(), m.tokens as f64),
            ("train/tokens_per_s".into(), m.tokens_per_s),
            ("train/tflops_per_device".into(), m.tflops_per_device),
        ];
        if let Some(mfu) = m.mfu {
            scalars.push(("train/mfu".into(), mfu));
        }
        for (k, v) in &m.extra {
            if let Some(x) = v.as_f64() {
                // `act_sparsity/attn` and the like keep their own section.
                let tag = if k.contains('/') {
                    k.clone()
                } else {
                    format!("train/{k}")
                };
                scalars.push((tag, x));
            }
        }
        if !zero_fractions.is_empty() {
            let mean =
                zero_fractions.iter().map(|(_, z)| z).sum::<f64>() / zero_fractions.len() as f64;
            scalars.push(("ternary_zero_fraction/mean".into(), mean));
        }
        for (name, z) in zero_fractions {
            scalars.push((format!("ternary_zero_fraction/{name}"), *z));
        }
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        o.tb.scalars(m.step, &refs)?;
        o.tb.flush()?;
        let mut msg = format!("loss {:.4}", m.loss);
        // Labels first, then the float parts of the loss; integers (a block number) are in the
        // label already.
        for v in m.extra.values() {
            if let Value::String(s) = v {
                msg += &format!(" | {s}");
            }
        }
        for (k, v) in &m.extra {
            if let Value::Number(n) = v {
                if n.is_f64() {
                    msg += &format!(" | {k} {:.4}", n.as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        msg += &format!(
            " | lr {:.3e} | grad_norm {:.3} | {:.0} tok/s | {:.3} TFLOP/s",
            m.lr, m.grad_norm, m.tokens_per_s, m.tflops_per_device
        );
        if let Some(mfu) = m.mfu {
            msg += &format!(" | MFU {:.1}%", 100.0 * mfu);
        }
        match &o.bar {
            Some(b) => {
                b.set_position(m.step);
                b.set_message(msg);
            }
            None => println!("step {} | {msg}", m.step),
        }
        Ok(())
    }

    /// Writes one more line to `metrics.jsonl` (it must carry a `step`).
    pub fn note(&mut self, line: Value) -> Result<()> {
        match &mut self.out {
            Some(o) => Self::write_line(o, line),
            None => Ok(()),
        }
    }

    pub fn validation(&mut self, step: u64, val_loss: f64) -> Result<()> {
        let Some(o) = &mut self.out else {
            return Ok(());
        };
        Self::write_line(o, json!({ "step": step, "val_loss": val_loss }))?;
        o.tb.scalars(step, &[("val/loss", val_loss)])?;
        o.tb.flush()?;
        self.say(&format!("step {step} | val_loss {val_loss:.4}"));
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        let Some(o) = &mut self.out else {
            return Ok(());
        };
        if let Some(b) = &o.bar {
            b.finish();
        }
        o.jsonl.sync_all().ok();
        o.tb.flush()
    }
}
