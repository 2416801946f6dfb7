//! A checkpoint read tensor by tensor: each tensor's stored parts are found from the files'
//! headers, and only the parts that hold a wanted block are read (positioned reads), so a rank
//! that restores its shard never holds more than one stored part of one tensor beyond what it
//! keeps. Every file is checked against the manifest's sha256 first, streamed (no copy kept).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use super::{file_entry, manifest, Slice, Topology, TrainState};

/// Which of a checkpoint's tensor files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Model,
    Optim,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "model-",
            Kind::Optim => "optim-",
        }
    }
}

/// One stored part of a tensor: where its values are.
#[derive(Debug, Clone)]
struct Stored {
    file: PathBuf,
    slice: Slice,
    /// The part's shape, as stored.
    shape: Vec<usize>,
    /// Byte offset of its values in the file.
    offset: u64,
}

pub struct Reader {
    pub state: TrainState,
    pub topology: Topology,
    pub recipe_toml: String,
    parts: HashMap<(Kind, String), Vec<Stored>>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Streams `path` through sha256 against the manifest's value.
fn verify(path: &Path, want: &str) -> Result<()> {
    let sha = file_entry(path)?.sha256;
    if sha != want {
        bail!(
            "{}: checksum mismatch (sha256 {sha}, manifest {want}): the file is corrupt",
            path.display()
        );
    }
    Ok(())
}

/// Checks that a stored part's description is one a whole tensor can be built from: the split
/// dimension exists, the part is one of the parts, they divide that dimension, and the stored
/// shape and byte length are the part's. The error names the file and the tensor.
pub fn check_part(path: &Path, name: &str, s: &Slice, stored: &[usize], bytes: u64) -> Result<()> {
    let fail = |what: String| Err(anyhow!("{}: tensor {name}: {what}", path.display()));
    if s.parts == 0 || s.part >= s.parts {
        return fail(format!("part {} of {} parts", s.part, s.parts));
    }
    let mut want = s.shape.clone();
    match s.dim {
        Some(d) if d >= s.shape.len() => {
            return fail(format!(
                "split dimension {d} of a {}-d tensor",
                s.shape.len()
            ))
        }
        Some(d) if !s.shape[d].is_multiple_of(s.parts) => {
            return fail(format!(
                "{} parts do not divide dimension {d} of {:?}",
                s.parts, s.shape
            ))
        }
        Some(d) => want[d] /= s.parts,
        None if s.parts != 1 => return fail(format!("{} parts of an unsplit tensor", s.parts)),
        None => {}
    }
    if stored != want.as_slice() {
        return fail(format!(
            "stored as {stored:?}, its part of {:?} is {want:?}",
            s.shape
        ));
    }
    let n = want.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
    if n.and_then(|n| n.checked_mul(4)) != Some(bytes) {
        return fail(format!("{bytes} bytes for a part of shape {want:?} in f32"));
    }
    Ok(())
}

/// The tensors of one safetensors file: name, slice description, stored shape, data offset.
fn read_header(path: &Path) -> Result<Vec<(String, Stored)>> {
    let p = path.display();
    let mut f = File::open(path).with_context(|| format!("reading {p}"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{p}: not a safetensors file"))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n > size.saturating_sub(8) {
        bail!("{p}: not a safetensors file (header of {n} bytes in a file of {size})");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let mut map: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| anyhow!("{p}: not a safetensors file: {e}"))?;
    let meta: HashMap<String, String> = match map.remove("__metadata__") {
        Some(m) => serde_json::from_value(m).map_err(|e| anyhow!("{p}: metadata: {e}"))?,
        None => HashMap::new(),
    };
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, v) in map {
        let e: HeaderEntry =
            serde_json::from_value(v).map_err(|e| anyhow!("{p}: tensor {name}: {e}"))?;
        if e.dtype != "F32" {
            bail!("{p}: tensor {name} is {}, expected F32", e.dtype);
        }
        let slice = match meta.get(&name) {
            Some(m) => {
                serde_json::from_str(m).map_err(|e| anyhow!("{p}: metadata of {name}: {e}"))?
            }
            None => Slice {
                shape: e.shape.clone(),
                dim: None,
                part: 0,
                parts: 1,
            },
        };
        let [start, end] = e.data_offsets;
        if start > end || base + end > size {
            bail!("{p}: tensor {name}: bytes {start}..{end} outside the file");
        }
        check_part(path, &name, &slice, &e.shape, end - start)?;
        out.push((
            name,
            Stored {
                file: path.to_path_buf(),
                slice,
                shape: e.shape,
                offset: base + start,
            },
        ));
    }
    Ok(out)
}

/// A stored part's values.
fn read_values(s: &Stored) -> Result<Vec<f32>> {
    let n: usize = s.shape.iter().product();
    let mut bytes = vec![0u8; n * 4];
    File::open(&s.file)
        .and_then(|f| f.read_exact_at(&mut bytes, s.offset))
        .with_context(|| format!("reading {}", s.file.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Rows `r0..r1` and columns `c0..c1` of a row-major `rows x cols` block.
fn sub_block(
    v: &[f32],
    cols: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
) -> Vec<f32> {
    (r0..r1)
        .flat_map(|r| v[r * cols + c0..r * cols + c1].iter().copied())
        .collect()
}

impl Reader {
    /// Opens checkpoint `dir`: the manifest, every file's checksum, the state, the recipe, and the
    /// headers of the tensor files.
    pub fn open(dir: &Path) -> Result<Self> {
        let m = manifest(dir)?;
        for (name, e) in &m.files {
            verify(&dir.join(name), &e.sha256)?;
        }
        let read = |n: &str| -> Result<Vec<u8>> {
            if !m.files.contains_key(n) {
                bail!("{}: manifest lists no {n}", dir.display());
            }
            std::fs::read(dir.join(n)).with_context(|| format!("reading {}/{n}", dir.display()))
        };
        let state: TrainState =
            serde_json::from_slice(&read("state.json")?).context("state.json")?;
        let recipe_toml = String::from_utf8_lossy(&read("recipe.toml")?).into_owned();
        let mut parts: HashMap<(Kind, String), Vec<Stored>> = HashMap::new();
        for kind in [Kind::Model, Kind::Optim] {
            let files: Vec<&String> = m
                .files
                .keys()
                .filter(|n| n.starts_with(kind.prefix()) && n.ends_with(".safetensors"))
                .collect();
            if files.is_empty() {
                bail!(
                    "{}: no {}*.safetensors in the manifest",
                    dir.display(),
                    kind.prefix()
                );
            }
            for f in files {
                for (name, s) in read_header(&dir.join(f))? {
                    parts.entry((kind, name)).or_default().push(s);
                }
            }
        }
        Ok(Self {
            state,
            topology: m.topology,
            recipe_toml,
            parts,
        })
    }

    pub fn has(&self, kind: Kind, name: &str) -> bool {
        self.parts.contains_key(&(kind, name.to_string()))
    }

    /// Tensor `name` of whole shape `shape`: whole when `dim` is `None` or `tp` is 1, else block
    /// `rank` of `tp` along `dim`; read from the stored parts that hold it, whatever layout wrote
    /// them.
    pub fn read(
        &self,
        kind: Kind,
        name: &str,
        shape: &[usize],
        dim: Option<usize>,
        (rank, tp): (usize, usize),
    ) -> Result<Vec<f32>> {
        let mut parts = self
            .parts
            .get(&(kind, name.to_string()))
            .cloned()
            .ok_or_else(|| anyhow!("the checkpoint has no tensor {name}"))?;
        parts.sort_by_key(|s| s.slice.part);
        let first = parts[0].clone();
        let (n, stored_dim) = (first.slice.parts, first.slice.dim);
        let where_ = first.file.display();
        let complete = parts.len() == n
            && parts.iter().enumerate().all(|(i, s)| {
                s.slice.part == i && s.slice.shape == first.slice.shape && s.slice.dim == stored_dim
            });
        if !complete {
            let found: Vec<usize> = parts.iter().map(|s| s.slice.part).collect();
            bail!("{where_}: tensor {name}: parts {found:?} of {n} found: the checkpoint is incomplete");
        }
        if first.slice.shape != shape {
            bail!(
                "{where_}: tensor {name} has shape {:?}, the model needs {shape:?}",
                first.slice.shape
            );
        }
        // A vector is a one-column matrix.
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let want = dim.filter(|_| tp > 1);
        if let (Some(d), Some(sd)) = (want, stored_dim) {
            if d != sd {
                bail!("{where_}: tensor {name} is stored split along dimension {sd}, wanted along {d}");
            }
        }
        let d = want.or(stored_dim).unwrap_or(0);
        if d > 1 || (d == 1 && shape.len() != 2) {
            bail!("{where_}: tensor {name}: split along dimension {d} of {shape:?} (tern splits rows or columns of matrices)");
        }
        let along = if d == 0 { rows } else { cols };
        // The wanted range along `d`, and each stored part's.
        let (w0, w1) = match want {
            Some(_) => (rank * along / tp, (rank + 1) * along / tp),
            None => (0, along),
        };
        let (r, c) = if d == 0 {
            (w1 - w0, cols)
        } else {
            (rows, w1 - w0)
        };
        let mut out = vec![0f32; r * c];
        for (p, s) in parts.iter().enumerate() {
            let (p0, p1) = match stored_dim {
                Some(_) => (p * along / n, (p + 1) * along / n),
                None => (0, along),
            };
            let (o0, o1) = (w0.max(p0), w1.min(p1));
            if o0 >= o1 {
                continue;
            }
            let v = read_values(s)?;
            if d == 0 {
                let block = sub_block(&v, cols, (o0 - p0, o1 - p0), (0, cols));
                out[(o0 - w0) * cols..(o1 - w0) * cols].copy_from_slice(&block);
            } else {
                let pc = p1 - p0;
                for row in 0..rows {
                    let src = &v[row * pc + (o0 - p0)..row * pc + (o1 - p0)];
                    out[row * c + (o0 - w0)..row * c + (o1 - w0)].copy_from_slice(src);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Piece;

    /// An 8x6 matrix split by rows, a 6x8 one by columns, a replicated vector: every value
    /// distinct.
    type Named = (&'static str, Vec<usize>, Option<usize>, Vec<f32>);

    fn whole() -> Vec<Named> {
        let m = |n: usize, off: f32| (0..n).map(|i| i as f32 + off).collect::<Vec<_>>();
        vec![
            ("rows", vec![8, 6], Some(0), m(48, 0.25)),
            ("cols", vec![6, 8], Some(1), m(48, 100.5)),
            ("norm", vec![6], None, m(6, -3.0)),
        ]
    }

    /// `whole()` saved by `n` tensor-parallel ranks (threads).
    fn saved(root: &Path, n: usize) -> PathBuf {
        let dirs = crate::checkpoint::tests::save_by_ranks(root, n, 3, |r| {
            let model: Vec<Piece> = whole()
                .into_iter()
                .map(|(name, shape, dim, v)| Piece {
                    name: name.into(),
                    values: match dim {
                        Some(d) => tern_parallel::shard_values(&v, &shape, d, r, n),
                        None => v,
                    },
                    full_shape: shape,
                    dim,
                })
                .collect();
            let optim = model[..1].to_vec();
            (model, optim)
        });
        dirs[0].clone()
    }

    /// Written by 1, 2 or 4 ranks, read whole or as the blocks of 1, 2, 4 or 8 ranks: always the
    /// matching block of the whole tensor.
    #[test]
    fn any_layout_reads_back_as_any_other() {
        for written in [1, 2, 4] {
            let dir = tempfile::tempdir().unwrap();
            let r = Reader::open(&saved(dir.path(), written)).unwrap();
            assert_eq!(r.state, crate::checkpoint::tests::state(3));
            assert!(r.has(Kind::Optim, "rows") && !r.has(Kind::Optim, "cols"));
            for (name, shape, dim, v) in whole() {
                for tp in [1, 2, 4, 8] {
                    if dim.is_some_and(|d| !shape[d].is_multiple_of(tp)) {
                        continue;
                    }
                    for rank in 0..tp {
                        let got = r.read(Kind::Model, name, &shape, dim, (rank, tp)).unwrap();
                        let want = match dim.filter(|_| tp > 1) {
                            Some(d) => tern_parallel::shard_values(&v, &shape, d, rank, tp),
                            None => v.clone(),
                        };
                        assert_eq!(
                            got, want,
                            "{name} written by {written}, rank {rank} of {tp}"
                        );
                    }
                }
            }
            let e = r
                .read(Kind::Model, "rows", &[8, 5], Some(0), (0, 1))
                .unwrap_err();
            assert!(e.to_string().contains("has shape [8, 6]"), "{e}");
            assert!(r.read(Kind::Model, "nope", &[1], None, (0, 1)).is_err());
        }
    }

    /// Metadata that disagrees with the data is an error naming the file and the tensor.
    #[test]
    fn inconsistent_part_descriptions_are_named_errors() {
        let p = Path::new("/c/model-tp00-of-02.safetensors");
        let s = |dim, part, parts| Slice {
            shape: vec![4, 6],
            dim,
            part,
            parts,
        };
        assert!(check_part(p, "w", &s(Some(0), 1, 2), &[2, 6], 48).is_ok());
        for (slice, stored, bytes, what) in [
            (s(Some(2), 0, 2), vec![2, 6], 48, "split dimension 2"),
            (s(Some(0), 2, 2), vec![2, 6], 48, "part 2 of 2"),
            (s(Some(1), 0, 4), vec![4, 1], 16, "4 parts do not divide"),
            (s(Some(0), 0, 2), vec![3, 6], 72, "stored as [3, 6]"),
            (s(Some(0), 0, 2), vec![2, 6], 40, "40 bytes"),
            (s(None, 0, 2), vec![4, 6], 96, "2 parts of an unsplit"),
        ] {
            let e = check_part(p, "w", &slice, &stored, bytes)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("/c/model-tp00-of-02.safetensors: tensor w:"),
                "{e}"
            );
            assert!(e.contains(what), "{e}");
        }
    }
}
