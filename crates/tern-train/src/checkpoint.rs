//! Single-process checkpoints: everything needed to continue a run exactly.
//!
//! `checkpoints/step_00000020/` holds `model.safetensors` (weights by module path),
//! `optim.safetensors` (AdamW moments as `<name>.exp_avg` / `<name>.exp_avg_sq`), `state.json`
//! (step, data position, seed, optimizer step), `recipe.toml`, and `manifest.json` with the sha256
//! of every file. A checkpoint is written under a temporary name, synced, then renamed: a directory
//! named `step_*` with a matching manifest is complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::params::ParamInfo;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Training samples consumed: the whole data position (see `tern_data::sampler`).
    pub consumed_samples: u64,
    pub tokens_seen: u64,
    /// Steps whose update was skipped (non-finite loss or gradients).
    pub skipped_steps: u64,
    /// AdamW's update counter (bias correction).
    pub optimizer_step: u64,
    /// The run seed: the initial weights and the data order derive from it (there is no other RNG).
    pub seed: u64,
    pub tokenizer_sha256: String,
    /// Blocks over all training sources.
    pub train_blocks: u64,
    /// Identifies the training data and its order (`tern_data::TrainData::fingerprint`).
    #[serde(default)]
    pub data_fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    step: u64,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

/// Tensors of a safetensors file by name: shape and values.
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Named flat f32 tensors (module order is kept by the caller's `ParamInfo` list).
pub type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn safetensors_bytes(tensors: &Named) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| to_bytes(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::tensor::serialize(views, None)?)
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<TensorMap> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "{}: tensor {name} is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let v = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Writes a complete checkpoint under `root`, atomically. Returns its directory.
pub fn save(
    root: &Path,
    state: &TrainState,
    model: &Named,
    optim: &Named,
    recipe_toml: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = root.join(step_dir_name(state.step));
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        step_dir_name(state.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model.safetensors", safetensors_bytes(model)?),
        ("optim.safetensors", safetensors_bytes(optim)?),
        ("state.json", serde_json::to_vec_pretty(state)?),
        ("recipe.toml", recipe_toml.as_bytes().to_vec()),
    ];
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: state.step,
        files: BTreeMap::new(),
    };
    for (name, bytes) in &files {
        write_synced(&tmp.join(name), bytes)?;
        manifest.files.insert(
            name.to_string(),
            FileEntry {
                bytes: bytes.len() as u64,
                sha256: format!("{:x}", Sha256::digest(bytes)),
            },
        );
    }
    write_synced(
        &tmp.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    if final_dir.exists() {
        // A checkpoint of the same step from an earlier attempt: replace it only now that the new
        // one is complete.
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    if let Ok(d) = std::fs::File::open(root) {
        d.sync_all().ok();
    }
    Ok(final_dir)
}

/// Reads `manifest.json` and checks that every file it lists exists with the recorded size.
fn manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a manifest", path.display()))?;
    for (name, e) in &m.files {
        let p = dir.join(name);
        let len = std::fs::metadata(&p)
            .with_context(|| format!("{}: missing", p.display()))?
            .len();
        if len != e.bytes {
            bail!(
                "{}: {len} bytes, the manifest says {}",
                p.display(),
                e.bytes
            );
        }
    }
    Ok(m)
}

/// The newest complete checkpoint under `root` (incomplete ones are reported and skipped).
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step_"))
        })
        .collect();
    dirs.sort();
    for d in dirs.into_iter().rev() {
        match manifest(&d) {
            Ok(_) => return Ok(Some(d)),
            Err(e) => eprintln!(
                "warning: skipping incomplete checkpoint {}: {e:#}",
                d.display()
            ),
        }
    }
    Ok(None)
}

pub struct Loaded {
    pub state: TrainState,
    pub recipe_toml: String,
    pub model: TensorMap,
    pub optim: TensorMap,
}

/// Loads a checkpoint, verifying every file against the manifest's sha256.
pub fn load(dir: &Path) -> Result<Loaded> {
    let m = manifest(dir)?;
    let mut files = HashMap::new();
    for (name, e) in &m.files {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let sha = format!("{:x}", Sha256::digest(&bytes));
        if sha != e.sha256 {
            bail!(
                "{}: checksum mismatch (sha256 {sha}, manifest {}): the file is corrupt",
                p.display(),
                e.sha256
            );
        }
        files.insert(name.clone(), bytes);
    }
    let get = |n: &str| {
        files
            .get(n)
            .ok_or_else(|| anyhow!("{}: manifest lists no {n}", dir.display()))
    };
    let state: TrainState = serde_json::from_slice(get("state.json")?).context("state.json")?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this tern reads {FORMAT_VERSION})",
            dir.display(),
            state.format_version
        );
    }
    Ok(Loaded {
        recipe_toml: String::from_utf8_lossy(get("recipe.toml")?).into_owned(),
        model: read_safetensors(&dir.join("model.safetensors"), get("model.safetensors")?)?,
        optim: read_safetensors(&dir.join("optim.safetensors"), get("optim.safetensors")?)?,
        state,
    })
}

/// Takes the tensors of `infos` (with `suffix`) out of a loaded map, checking names and shapes.
pub fn take_in_order(
    map: &mut TensorMap,
    infos: &[ParamInfo],
    suffix: &str,
    file: &Path,
) -> Result<Vec<Vec<f32>>> {
    infos
        .iter()
        .map(|info| {
            let name = format!("{}{suffix}", info.name);
            let (shape, v) = map
                .remove(&name)
                .ok_or_else(|| anyhow!("{}: no tensor {name}", file.display()))?;
            if shape != info.shape {
                bail!(
                    "{}: tensor {name} has shape {shape:?}, the model needs {:?}",
                    file.display(),
                    info.shape
                );
            }
            Ok(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            format_version: FORMAT_VERSION,
            step,
            consumed_samples: step * 4,
            tokens_seen: 0,
            skipped_steps: 0,
            optimizer_step: step,
            seed: 1,
            tokenizer_sha256: "x".into(),
            train_blocks: 10,
            data_fingerprint: "y".into(),
        }
    }

    #[test]
    fn roundtrip_latest_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let model: Named = vec![(
            "w".into(),
            vec![2, 2],
            vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE],
        )];
        let optim: Named = vec![("w.exp_avg".into(), vec![2, 2], vec![0.0; 4])];
        save(dir.path(), &state(5), &model, &optim, "x = 1").unwrap();
        let d10 = save(dir.path(), &state(10), &model, &optim, "x = 1").unwrap();
        // A half-written directory without a manifest is not picked.
        std::fs::create_dir_all(dir.path().join("step_00000020")).unwrap();
        assert_eq!(latest(dir.path()).unwrap().unwrap(), d10);
        let l = load(&d10).unwrap();
        assert_eq!(l.state, state(10));
        assert_eq!(
            l.model["w"],
            (vec![2, 2], vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE])
        );
        // Flip one byte of the weights: refused, naming the file.
        let p = d10.join("model.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        std::fs::write(&p, b).unwrap();
        let e = load(&d10).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("checksum mismatch"),
            "{e}"
        );
    }
}
