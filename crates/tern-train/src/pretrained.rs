//! A model's configuration and weights from a Hugging Face Llama directory or a tern checkpoint
//! (a `step_*` directory, or a run directory or its `checkpoints/` folder: the newest complete
//! checkpoint there). Used for a distillation teacher and by `tern logits`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use tern_model::{studentize, Llama, ModelConfig, StudentConfig};

use crate::checkpoint::{self, TensorMap};
use crate::params::{assign, param_infos};
use crate::recipe::Recipe;

pub struct Pretrained {
    /// The directory the weights came from.
    pub source: PathBuf,
    pub config: ModelConfig,
    /// Set when the weights are a distillation student's (its encoders are among the tensors).
    pub student: Option<StudentConfig>,
    pub tensors: TensorMap,
}

/// Where `path` points: a checkpoint directory, or `None` for a Hugging Face directory.
fn checkpoint_dir(path: &Path) -> Result<Option<PathBuf>> {
    if tern_hf::is_hf_dir(path) {
        return Ok(None);
    }
    if path.join("manifest.json").is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    for root in [path.to_path_buf(), path.join("checkpoints")] {
        if root.is_dir() {
            if let Some(d) = checkpoint::latest(&root)? {
                return Ok(Some(d));
            }
        }
    }
    bail!(
        "{}: neither a Hugging Face model directory (config.json) nor a tern checkpoint \
         (manifest.json), nor a folder of complete checkpoints",
        path.display()
    )
}

/// The model config of the checkpoint at `path` (its recipe alone, no tensors read); `None` for a
/// Hugging Face directory.
pub fn config_of(path: &Path) -> Result<Option<ModelConfig>> {
    let Some(dir) = checkpoint_dir(path)? else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(dir.join("recipe.toml"))
        .with_context(|| format!("{}/recipe.toml", dir.display()))?;
    let recipe: Recipe =
        toml::from_str(&text).with_context(|| format!("{}/recipe.toml", dir.display()))?;
    Ok(Some(recipe.model))
}

pub fn load(path: &Path) -> Result<Pretrained> {
    match checkpoint_dir(path)? {
        None => {
            let m = tern_hf::load(path)?;
            Ok(Pretrained {
                source: path.to_path_buf(),
                config: m.config,
                student: None,
                tensors: m
                    .tensors
                    .into_iter()
                    .map(|t| (t.name, (t.shape, t.values)))
                    .collect(),
            })
        }
        Some(dir) => {
            let l = checkpoint::load(&dir)?;
            let recipe: Recipe = toml::from_str(&l.recipe_toml)
                .with_context(|| format!("{}/recipe.toml", dir.display()))?;
            let student = recipe
                .distill
                .as_ref()
                .map(|d| d.student(recipe.model.n_layers, recipe.train.seed));
            Ok(Pretrained {
                source: dir,
                config: recipe.model,
                student,
                tensors: l.model,
            })
        }
    }
}

impl Pretrained {
    /// The model with these weights (module order, names and shapes checked); the host copies
    /// are consumed.
    pub fn build<B: Backend>(mut self, device: &B::Device) -> Result<Llama<B>> {
        let mut model = Llama::new(&self.config, device);
        if let Some(s) = &self.student {
            model = studentize(model, s, device);
        }
        let values = take_named(&mut self.tensors, &model, &self.source)?;
        Ok(assign(model, values))
    }
}

/// The values of every parameter of `model`, by name, as flat tensors (module order).
pub fn take_named<B: Backend, M: Module<B>>(
    map: &mut TensorMap,
    model: &M,
    source: &Path,
) -> Result<Vec<Tensor<B, 1>>> {
    let infos = param_infos::<B, M>(model);
    let device = model
        .devices()
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("a model without a device"))?;
    let file = source.join("*.safetensors");
    checkpoint::take_in_order(map, &infos, "", &file).map(|vs| {
        vs.into_iter()
            .map(|v| {
                let n = v.len();
                Tensor::from_data(TensorData::new(v, [n]), &device)
            })
            .collect()
    })
}
