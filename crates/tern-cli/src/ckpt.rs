//! `tern ckpt inspect|consolidate`: what a checkpoint holds, and one unsharded file of it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tern_train::checkpoint::{self, Slice};

use crate::say;

#[derive(Args)]
pub struct CkptArgs {
    #[command(subcommand)]
    pub command: CkptCommand,
}

#[derive(Subcommand)]
pub enum CkptCommand {
    /// Step, topology, files, tensors (whole shapes and how they are split) and recipe of a
    /// checkpoint directory, read from the headers (no tensor data is read).
    Inspect {
        dir: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every file verified against the manifest, the parts joined: one safetensors file of whole
    /// tensors (the model's; with --optim also the optimizer state).
    Consolidate {
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        optim: bool,
    },
}

/// The tensors of a safetensors file, from its header: name -> (stored shape, slice).
fn header(path: &Path) -> Result<BTreeMap<String, (Vec<usize>, Slice)>> {
    let p = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {p}"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{p}: no safetensors header"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        bail!("{p}: a header of {n} bytes: not a safetensors file");
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .with_context(|| format!("{p}: header cut short"))?;
    let v: Value =
        serde_json::from_slice(&h).with_context(|| format!("{p}: header is not JSON"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{p}: header is not an object"))?;
    let meta = obj.get("__metadata__").cloned().unwrap_or(json!({}));
    let mut out = BTreeMap::new();
    for (name, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone())
            .with_context(|| format!("{p}: shape of {name}"))?;
        let slice = match meta.get(name).and_then(Value::as_str) {
            Some(s) => serde_json::from_str(s).with_context(|| format!("{p}: layout of {name}"))?,
            None => Slice {
                shape: shape.clone(),
                dim: None,
                part: 0,
                parts: 1,
            },
        };
        out.insert(name.clone(), (shape, slice));
    }
    Ok(out)
}

fn inspect(dir: &Path, as_json: bool) -> Result<()> {
    let m = checkpoint::manifest(dir)?;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    let state: Value = serde_json::from_str(&read("state.json")?).context("state.json")?;
    let recipe = read("recipe.toml")?;
    // Whole tensors by kind: shape, split dimension, parts seen.
    let mut tensors: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for name in m.files.keys().filter(|n| n.ends_with(".safetensors")) {
        let kind = name.split('-').next().unwrap_or("").to_string();
        for (t, (_, s)) in header(&dir.join(name))? {
            let e = tensors.entry(kind.clone()).or_default();
            let seen = e
                .get(&t)
                .and_then(|v| v["parts_found"].as_u64())
                .unwrap_or(0);
            e.insert(
                t,
                json!({"shape": s.shape, "split_dim": s.dim, "parts": s.parts, "parts_found": seen + 1}),
            );
        }
    }
    let bytes: u64 = m.files.values().map(|f| f.bytes).sum();
    if as_json {
        let out = json!({
            "dir": dir.display().to_string(),
            "format_version": m.format_version,
            "step": m.step,
            "topology": m.topology,
            "files": m.files.iter().map(|(n, f)| (n.clone(), json!({"bytes": f.bytes, "sha256": f.sha256}))).collect::<BTreeMap<_, _>>(),
            "bytes": bytes,
            "state": state,
            "tensors": tensors,
            "recipe": recipe,
        });
        say(&serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    say(&format!(
        "checkpoint {} | format {} | step {} | written by tp {} x dp {}",
        dir.display(),
        m.format_version,
        m.step,
        m.topology.tp,
        m.topology.dp
    ));
    say(&format!(
        "state: consumed samples {} | tokens {} | skipped steps {} | optimizer step {} | seed {}",
        state["consumed_samples"],
        state["tokens_seen"],
        state["skipped_steps"],
        state["optimizer_step"],
        state["seed"]
    ));
    say(&format!("files ({:.2} MB):", bytes as f64 / 1e6));
    for (n, f) in &m.files {
        say(&format!(
            "  {n:<32} {:>12} bytes  sha256 {}",
            f.bytes, f.sha256
        ));
    }
    for (kind, ts) in &tensors {
        let elems: u64 = ts
            .values()
            .map(|v| {
                v["shape"]
                    .as_array()
                    .map_or(0, |s| s.iter().map(|x| x.as_u64().unwrap_or(0)).product())
            })
            .sum();
        say(&format!("{kind} tensors ({}, {elems} values):", ts.len()));
        for (t, v) in ts {
            let split = match v["split_dim"].as_u64() {
                Some(d) => format!("split along dim {d} in {}", v["parts"]),
                None => "whole".to_string(),
            };
            say(&format!("  {t:<48} {:<16} {split}", v["shape"].to_string()));
        }
    }
    say(&format!("recipe:\n{recipe}"));
    Ok(())
}

pub fn run(a: CkptArgs) -> Result<()> {
    match a.command {
        CkptCommand::Inspect { dir, json } => inspect(&dir, json),
        CkptCommand::Consolidate { dir, out, optim } => {
            let l = checkpoint::load(&dir)?;
            let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = l
                .model
                .into_iter()
                .chain(if optim { l.optim } else { Default::default() })
                .map(|(n, (s, v))| (n, s, v))
                .collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            checkpoint::write_whole(&out, &tensors)?;
            say(&format!(
                "consolidated {} (step {}, tp {} x dp {}): {} tensors -> {}",
                dir.display(),
                l.state.step,
                l.topology.tp,
                l.topology.dp,
                tensors.len(),
                out.display()
            ));
            Ok(())
        }
    }
}
