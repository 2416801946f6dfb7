//! Sharded checkpoints: everything needed to continue a run exactly, on any layout.
//!
//! `checkpoints/step_00000020/` holds, for each tensor-parallel rank `r` of `n`,
//! `model-tp{r}-of-{n}.safetensors` and `optim-tp{r}-of-{n}.safetensors`: that rank's slice of
//! every split tensor and (rank 0 only) the replicated ones, each described in the file's metadata
//! (global shape, split dimension, part, parts). Beside them `state.json` (step, data position,
//! seed, optimizer step), `recipe.toml` and `manifest.json` (topology and the sha256 of every
//! file). The writers (the first data-parallel group: the other groups hold the same values) write
//! into `.tmp-step_00000020/`, sync, agree that all succeeded, and only then does the first rank
//! write the manifest and rename the directory into place: a `step_*` directory with a valid
//! manifest is complete, and a failure or a kill at any point leaves the previous ones untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tern_dist::Comm;

use crate::faults::Faults;
use crate::params::ParamInfo;

pub mod manager;
pub mod reader;

pub const FORMAT_VERSION: u32 = 2;

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

/// The layout a checkpoint was written with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    pub tp: usize,
    pub dp: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub topology: Topology,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// Where a stored tensor belongs in the whole one (the safetensors metadata of each tensor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    /// The whole tensor's shape.
    pub shape: Vec<usize>,
    /// The dimension split between parts (`None`: the tensor is whole).
    pub dim: Option<usize>,
    pub part: usize,
    pub parts: usize,
}

/// This rank's part of a tensor, to be saved.
#[derive(Debug, Clone)]
pub struct Piece {
    pub name: String,
    pub full_shape: Vec<usize>,
    /// Split dimension; `None` for tensors every rank holds whole (written by part 0 only).
    pub dim: Option<usize>,
    pub values: Vec<f32>,
}

/// Tensors of a safetensors file by name: shape and values.
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Named flat f32 tensors (module order is kept by the caller's `ParamInfo` list).
pub type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A piece as a safetensors tensor: its bytes are made when the writer asks for them, one tensor
/// at a time, so a file is written without a copy of all of it in memory.
struct PieceView<'a> {
    shape: Vec<usize>,
    values: &'a [f32],
}

impl safetensors::View for PieceView<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        to_bytes(self.values).into()
    }
    fn data_len(&self) -> usize {
        self.values.len() * 4
    }
}

/// Named tensors to write, and the metadata describing each.
type Views<'a> = (Vec<(String, PieceView<'a>)>, HashMap<String, String>);

/// This part's pieces as safetensors tensors, each described in the metadata (a tensor every
/// rank holds whole is written by part 0 only).
fn piece_views(pieces: &[Piece], part: usize, parts: usize) -> Result<Views<'_>> {
    let mut meta = HashMap::new();
    let mut views = Vec::new();
    for p in pieces.iter().filter(|p| p.dim.is_some() || part == 0) {
        let (slice, shape) = match p.dim {
            Some(d) => {
                let mut s = p.full_shape.clone();
                s[d] /= parts;
                let slice = Slice {
                    shape: p.full_shape.clone(),
                    dim: Some(d),
                    part,
                    parts,
                };
                (slice, s)
            }
            None => {
                let slice = Slice {
                    shape: p.full_shape.clone(),
                    dim: None,
                    part: 0,
                    parts: 1,
                };
                (slice, p.full_shape.clone())
            }
        };
        if shape.iter().product::<usize>() != p.values.len() {
            bail!(
                "{}: {} values for a part of shape {shape:?}",
                p.name,
                p.values.len()
            );
        }
        meta.insert(p.name.clone(), serde_json::to_string(&slice)?);
        let view = PieceView {
            shape,
            values: &p.values,
        };
        views.push((p.name.clone(), view));
    }
    Ok((views, meta))
}

/// Writes this part's pieces to `path` tensor by tensor, synced; its size and sha256 (read back
/// from the file) for the manifest.
fn write_pieces(
    path: &Path,
    pieces: &[Piece],
    part: usize,
    parts: usize,
    faults: &Faults,
) -> Result<FileEntry> {
    faults.before_write(path)?;
    let (views, meta) = piece_views(pieces, part, parts)?;
    safetensors::tensor::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))?;
    file_entry(path)
}

/// A file's size and sha256, streamed.
pub(crate) fn file_entry(path: &Path) -> Result<FileEntry> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut h, mut bytes) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 22];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        bytes,
        sha256: format!("{:x}", h.finalize()),
    })
}

/// A stored tensor: its name, where it belongs in the whole one, its values.
type StoredPart = (String, Slice, Vec<f32>);

/// Reads a safetensors file: every tensor with its slice description (a file without one, as
/// `tern ckpt consolidate` writes, holds whole tensors).
fn read_pieces(path: &Path, bytes: &[u8]) -> Result<Vec<StoredPart>> {
    let p = path.display();
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("{p}: not a safetensors file: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{p}: not a safetensors file: {e}"))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{p}: tensor {name} is {:?}, expected F32", view.dtype());
        }
        let slice = match meta.get(&name) {
            Some(m) => {
                serde_json::from_str(m).map_err(|e| anyhow!("{p}: metadata of {name}: {e}"))?
            }
            None => Slice {
                shape: view.shape().to_vec(),
                dim: None,
                part: 0,
                parts: 1,
            },
        };
        reader::check_part(path, &name, &slice, view.shape(), view.data().len() as u64)?;
        let v = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, slice, v));
    }
    Ok(out)
}

/// Whole tensors from the parts of every file (`parts` in file order).
fn assemble(files: Vec<(PathBuf, Vec<StoredPart>)>) -> Result<TensorMap> {
    let mut groups: BTreeMap<String, Vec<(Slice, Vec<f32>, PathBuf)>> = BTreeMap::new();
    for (path, pieces) in files {
        for (name, slice, v) in pieces {
            groups
                .entry(name)
                .or_default()
                .push((slice, v, path.clone()));
        }
    }
    let mut out = HashMap::new();
    for (name, mut parts) in groups {
        parts.sort_by_key(|(s, _, _)| s.part);
        let (first, path) = (parts[0].0.clone(), parts[0].2.clone());
        let n = first.parts;
        let ok = parts.len() == n
            && parts.iter().enumerate().all(|(i, (s, _, _))| {
                s.part == i && s.parts == n && s.shape == first.shape && s.dim == first.dim
            });
        if !ok {
            bail!(
                "{}: tensor {name}: parts {:?} of {n} found: the checkpoint is incomplete",
                path.display(),
                parts.iter().map(|(s, _, _)| s.part).collect::<Vec<_>>()
            );
        }
        let shape = first.shape.clone();
        let whole = match first.dim {
            None => parts.pop().unwrap().1,
            Some(d) => {
                let mut local = shape.clone();
                local[d] /= n;
                let all: Vec<f32> = parts.into_iter().flat_map(|(_, v, _)| v).collect();
                tern_parallel::unshard_values(&all, &local, d, n)
            }
        };
        if whole.len() != shape.iter().product::<usize>() {
            bail!(
                "{}: tensor {name}: values do not fill {shape:?}",
                path.display()
            );
        }
        out.insert(name, (shape, whole));
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8], faults: &Faults) -> Result<()> {
    use std::io::Write;
    faults.before_write(path)?;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn entry(bytes: &[u8]) -> FileEntry {
    FileEntry {
        bytes: bytes.len() as u64,
        sha256: format!("{:x}", Sha256::digest(bytes)),
    }
}

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Whether every member of `group` reports success (a collective).
fn all_ok(group: &dyn Comm, ok: bool) -> bool {
    group.all_reduce_sum_f64(if ok { 0.0 } else { 1.0 }) == 0.0
}

/// What a save writes: the run's state and recipe, this rank's pieces, where, and how.
pub struct SaveRequest<'a> {
    pub root: &'a Path,
    pub state: &'a TrainState,
    pub recipe_toml: &'a str,
    pub model: &'a [Piece],
    pub optim: &'a [Piece],
    pub topology: &'a Topology,
    /// Complete checkpoints kept afterwards (0: all).
    pub keep_last: usize,
    pub faults: &'a Faults,
}

/// Writes this rank's part of a checkpoint; a collective over `group` (the tensor-parallel ranks
/// of the first data-parallel group), whose first rank completes it. Returns its directory.
/// `keep_last > 0` then removes all but the newest `keep_last` complete checkpoints. At every
/// stage the ranks agree that all succeeded before the next; a failure anywhere removes the
/// temporary directory and leaves the previous checkpoints as they were.
pub fn save(req: &SaveRequest, group: &dyn Comm) -> Result<PathBuf> {
    let (tmp, final_dir) = begin(req, group)?;
    let written = write_part(req, &tmp, group.rank(), group.size());
    finish(req, group, &tmp, &final_dir, written)
}

/// The first stage: a clean temporary directory, made by the first rank (a collective). Returns
/// it and the checkpoint's final directory.
fn begin(req: &SaveRequest, group: &dyn Comm) -> Result<(PathBuf, PathBuf)> {
    let step = step_dir_name(req.state.step);
    let (final_dir, tmp) = (req.root.join(&step), req.root.join(format!(".tmp-{step}")));
    // The first rank makes a clean temporary directory; the others wait for it.
    let made = if group.rank() == 0 {
        fresh_dir(req.root, &tmp)
    } else {
        Ok(())
    };
    if !all_ok(group, made.is_ok()) {
        made?;
        bail!("tensor-parallel rank 0 could not create {}", tmp.display());
    }
    Ok((tmp, final_dir))
}

/// The last stages once this rank's part is `written` (a collective): every rank's success
/// agreed, the manifest and the rename by the first rank, agreed again.
fn finish(
    req: &SaveRequest,
    group: &dyn Comm,
    tmp: &Path,
    final_dir: &Path,
    written: Result<()>,
) -> Result<PathBuf> {
    if !all_ok(group, written.is_ok()) {
        if group.rank() == 0 {
            let _ = std::fs::remove_dir_all(tmp);
        }
        written?;
        bail!(
            "another tensor-parallel rank failed to write its part of {}; the previous checkpoints are kept",
            final_dir.display()
        );
    }
    let finished = if group.rank() == 0 {
        complete(req, tmp, final_dir, group.size())
    } else {
        Ok(())
    };
    if !all_ok(group, finished.is_ok()) {
        if group.rank() == 0 {
            let _ = std::fs::remove_dir_all(tmp);
        }
        finished?;
        bail!(
            "tensor-parallel rank 0 could not complete {}",
            final_dir.display()
        );
    }
    Ok(final_dir.to_path_buf())
}

/// A save's inputs, owned (for a writer thread).
pub struct OwnedSave {
    pub root: PathBuf,
    pub state: TrainState,
    pub recipe_toml: String,
    pub model: Vec<Piece>,
    pub optim: Vec<Piece>,
    pub topology: Topology,
    pub keep_last: usize,
    pub faults: Faults,
}

impl OwnedSave {
    pub fn request(&self) -> SaveRequest<'_> {
        SaveRequest {
            root: &self.root,
            state: &self.state,
            recipe_toml: &self.recipe_toml,
            model: &self.model,
            optim: &self.optim,
            topology: &self.topology,
            keep_last: self.keep_last,
            faults: &self.faults,
        }
    }
}

/// A save whose files a thread is writing: its agreement and completion wait for
/// [`PendingSave::finish`], so training goes on meanwhile. Until then the checkpoint is a
/// temporary directory, which a crash leaves behind as stale: the previous one stays the latest.
pub struct PendingSave {
    save: std::sync::Arc<OwnedSave>,
    tmp: PathBuf,
    final_dir: PathBuf,
    writer: std::thread::JoinHandle<Result<()>>,
}

impl PendingSave {
    /// Starts `save` (a collective over `group`, as [`save`]): the temporary directory now, this
    /// rank's files on a thread of their own.
    pub fn start(save: OwnedSave, group: &dyn Comm) -> Result<Self> {
        let (tmp, final_dir) = begin(&save.request(), group)?;
        let save = std::sync::Arc::new(save);
        let (s, t) = (std::sync::Arc::clone(&save), tmp.clone());
        let (part, parts) = (group.rank(), group.size());
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write_part(&s.request(), &t, part, parts))
            .context("starting the checkpoint writer thread")?;
        Ok(Self {
            save,
            tmp,
            final_dir,
            writer,
        })
    }

    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.save.state.step
    }

    /// Waits for this rank's files, then agrees and completes (a collective over `group`).
    pub fn finish(self, group: &dyn Comm) -> Result<PathBuf> {
        let written = match self.writer.join() {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the checkpoint writer thread panicked")),
        };
        finish(
            &self.save.request(),
            group,
            &self.tmp,
            &self.final_dir,
            written,
        )
    }
}

fn fresh_dir(root: &Path, tmp: &Path) -> Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))
}

/// This rank's files in `tmp` (rank 0 also the state and the recipe), and the list of them with
/// their sizes and checksums for the manifest.
fn write_part(req: &SaveRequest, tmp: &Path, part: usize, parts: usize) -> Result<()> {
    let suffix = format!("tp{part:02}-of-{parts:02}.safetensors");
    let mut entries = BTreeMap::new();
    for (kind, pieces) in [("model", req.model), ("optim", req.optim)] {
        let name = format!("{kind}-{suffix}");
        let e = write_pieces(&tmp.join(&name), pieces, part, parts, req.faults)?;
        entries.insert(name, e);
    }
    if part == 0 {
        for (name, bytes) in [
            ("state.json", serde_json::to_vec_pretty(req.state)?),
            ("recipe.toml", req.recipe_toml.as_bytes().to_vec()),
        ] {
            write_synced(&tmp.join(name), &bytes, req.faults)?;
            entries.insert(name.to_string(), entry(&bytes));
        }
    }
    // This rank's entries, for the first rank to put in the manifest.
    let list = serde_json::to_vec(&entries)?;
    write_synced(
        &tmp.join(format!(".entries-{part}.json")),
        &list,
        req.faults,
    )
}

/// The first rank's last stage: the manifest of every rank's files, the rename into place (a
/// checkpoint of the same step from an earlier attempt replaced only now), pruning.
fn complete(req: &SaveRequest, tmp: &Path, final_dir: &Path, parts: usize) -> Result<()> {
    let mut files = BTreeMap::new();
    for r in 0..parts {
        let p = tmp.join(format!(".entries-{r}.json"));
        let e: BTreeMap<String, FileEntry> = serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )?;
        files.extend(e);
        std::fs::remove_file(&p).ok();
    }
    let m = Manifest {
        format_version: FORMAT_VERSION,
        step: req.state.step,
        topology: req.topology.clone(),
        files,
    };
    let manifest = serde_json::to_vec_pretty(&m)?;
    write_synced(&tmp.join("manifest.json"), &manifest, req.faults)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir)?;
    }
    std::fs::rename(tmp, final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    if let Ok(d) = std::fs::File::open(req.root) {
        d.sync_all().ok();
    }
    prune(req.root, req.keep_last)
}

/// Removes all but the newest `keep` complete checkpoints (0: keep all), and temporary
/// directories of interrupted saves.
fn prune(root: &Path, keep: usize) -> Result<()> {
    // One save runs at a time: any temporary directory left now is from a killed save.
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-step_") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let complete = complete_dirs(root);
    if keep > 0 && complete.len() > keep {
        for d in &complete[..complete.len() - keep] {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    Ok(())
}

/// `step_*` directories with a valid manifest, oldest first (others are reported and skipped).
fn complete_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
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
    dirs.into_iter()
        .filter(|d| match manifest(d) {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "warning: skipping incomplete checkpoint {}: {e:#}",
                    d.display()
                );
                false
            }
        })
        .collect()
}

/// Reads `manifest.json` and checks that every file it lists exists with the recorded size.
pub fn manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a manifest", path.display()))?;
    if m.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this tern reads {FORMAT_VERSION})",
            path.display(),
            m.format_version
        );
    }
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
    Ok(complete_dirs(root).pop())
}

pub struct Loaded {
    pub state: TrainState,
    pub topology: Topology,
    pub recipe_toml: String,
    /// Whole tensors, assembled from every part.
    pub model: TensorMap,
    pub optim: TensorMap,
}

/// Loads a checkpoint, verifying every file against the manifest's sha256, and assembles whole
/// tensors whatever layout wrote them.
pub fn load(dir: &Path) -> Result<Loaded> {
    let m = manifest(dir)?;
    let mut files = BTreeMap::new();
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
    let tensors = |kind: &str| -> Result<TensorMap> {
        let mut parts = Vec::new();
        for (name, bytes) in files
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("{kind}-")) && n.ends_with(".safetensors"))
        {
            let p = dir.join(name);
            parts.push((p.clone(), read_pieces(&p, bytes)?));
        }
        if parts.is_empty() {
            bail!("{}: no {kind}-*.safetensors in the manifest", dir.display());
        }
        assemble(parts)
    };
    Ok(Loaded {
        recipe_toml: String::from_utf8_lossy(get("recipe.toml")?).into_owned(),
        model: tensors("model")?,
        optim: tensors("optim")?,
        topology: m.topology,
        state,
    })
}

/// Writes whole tensors as one plain safetensors file (`tern ckpt consolidate`), atomically.
pub fn write_whole(path: &Path, tensors: &Named) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| to_bytes(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let out = safetensors::tensor::serialize(views, None)?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    write_synced(&tmp, &out, &Faults::default())?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
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
    use tern_dist::{SoloComm, ThreadComm};

    pub(crate) fn state(step: u64) -> TrainState {
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

    fn topo(tp: usize) -> Topology {
        Topology { tp, dp: 1 }
    }

    /// What `n` tensor-parallel ranks (threads) save at `state(step)`, rank `r` its model and
    /// optimizer pieces `pieces(r)`: each rank's checkpoint directory.
    pub(crate) fn save_by_ranks(
        root: &Path,
        n: usize,
        step: u64,
        pieces: impl Fn(usize) -> (Vec<Piece>, Vec<Piece>) + Sync,
    ) -> Vec<PathBuf> {
        let pieces = &pieces;
        std::thread::scope(|s| {
            let hs: Vec<_> = ThreadComm::group(n)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let (m, o) = pieces(c.rank());
                        let (st, t) = (state(step), topo(n));
                        let req = SaveRequest {
                            root,
                            state: &st,
                            recipe_toml: "x",
                            model: &m,
                            optim: &o,
                            topology: &t,
                            keep_last: 0,
                            faults: &Faults::default(),
                        };
                        save(&req, &c).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// A 4x2 split matrix (rows by part) and a replicated vector, as part `r` of `n` holds them.
    fn pieces(r: usize, n: usize) -> (Vec<Piece>, Vec<Piece>) {
        let full: Vec<f32> = (0..8).map(|i| i as f32 + 0.5).collect();
        let rows = 4 / n;
        let model = vec![
            Piece {
                name: "w".into(),
                full_shape: vec![4, 2],
                dim: Some(0),
                values: full[r * rows * 2..(r + 1) * rows * 2].to_vec(),
            },
            Piece {
                name: "norm".into(),
                full_shape: vec![2],
                dim: None,
                values: vec![1.0, f32::MIN_POSITIVE],
            },
        ];
        let optim = vec![Piece {
            name: "w.exp_avg".into(),
            full_shape: vec![4, 2],
            dim: Some(0),
            values: vec![r as f32; rows * 2],
        }];
        (model, optim)
    }

    fn save_solo(root: &Path, step: u64, keep: usize) -> Result<PathBuf> {
        let (m, o) = pieces(0, 1);
        let (st, t) = (state(step), topo(1));
        let req = SaveRequest {
            root,
            state: &st,
            recipe_toml: "x = 1",
            model: &m,
            optim: &o,
            topology: &t,
            keep_last: keep,
            faults: &Faults::default(),
        };
        save(&req, &SoloComm)
    }

    #[test]
    fn roundtrip_latest_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        save_solo(dir.path(), 5, 0).unwrap();
        let d10 = save_solo(dir.path(), 10, 0).unwrap();
        // A half-written directory without a manifest is not picked.
        std::fs::create_dir_all(dir.path().join("step_00000020")).unwrap();
        assert_eq!(latest(dir.path()).unwrap().unwrap(), d10);
        let l = load(&d10).unwrap();
        assert_eq!(l.state, state(10));
        assert_eq!(l.topology, topo(1));
        assert_eq!(l.model["norm"], (vec![2], vec![1.0, f32::MIN_POSITIVE]));
        assert_eq!(l.model["w"].1[7], 7.5);
        // Flip one byte of the weights: refused, naming the file.
        let p = d10.join("model-tp00-of-01.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        std::fs::write(&p, b).unwrap();
        let e = load(&d10).err().unwrap().to_string();
        assert!(
            e.contains("model-tp00-of-01.safetensors") && e.contains("checksum mismatch"),
            "{e}"
        );
    }

    #[test]
    fn tensor_parallel_parts_assemble_into_whole_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let out = save_by_ranks(&root, 2, 3, |r| pieces(r, 2));
        assert_eq!(out[0], out[1]);
        let mut names: Vec<String> = std::fs::read_dir(&out[0])
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        #[rustfmt::skip]
        assert_eq!(names, [
            "manifest.json", "model-tp00-of-02.safetensors", "model-tp01-of-02.safetensors",
            "optim-tp00-of-02.safetensors", "optim-tp01-of-02.safetensors", "recipe.toml", "state.json",
        ]);
        let l = load(&out[0]).unwrap();
        let whole = load(&save_solo(&dir.path().join("solo"), 3, 0).unwrap()).unwrap();
        assert_eq!(l.model, whole.model);
        assert_eq!(l.optim["w.exp_avg"].1, vec![0., 0., 0., 0., 1., 1., 1., 1.]);
        assert_eq!(l.topology, topo(2));
        // A part missing from the manifest's files: refused as incomplete.
        let m = dir.path().join("step_00000003/manifest.json");
        let mut man: Manifest = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
        man.files.remove("model-tp01-of-02.safetensors");
        std::fs::write(&m, serde_json::to_vec(&man).unwrap()).unwrap();
        let e = format!("{:#}", load(&out[0]).err().unwrap());
        assert!(e.contains("tensor w: parts [0] of 2"), "{e}");
    }

    #[test]
    fn keep_last_prunes_older_checkpoints_after_a_complete_save() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=4 {
            save_solo(dir.path(), step, 2).unwrap();
        }
        let left = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(left(dir.path()), ["step_00000003", "step_00000004"]);
        // (A full disk while saving is tested end to end, tests/fault_cli.rs: the fault switch
        // is an environment variable, which tests running in parallel here would share.)
    }
}
