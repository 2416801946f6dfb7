//! Finding and reading SlimPajama-format JSONL files (plain or zstd-compressed); `.bin` and `.h5`
//! files found beside them are token shards (TinyLlama's packed format, tern's HDF5).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Text (`.jsonl`, `.jsonl.zst`) or token shards (`.bin`, `.h5`).
fn is_source(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".jsonl") || name.ends_with(".jsonl.zst") || crate::shard::Kind::of(p).is_some()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_source(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Expands files, directories and glob patterns into a sorted list of JSONL files and shards.
/// `key` names the recipe key in errors.
pub fn expand(inputs: &[String], key: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let p = Path::new(input);
        let before = files.len();
        if p.is_dir() {
            walk(p, &mut files)?;
        } else if p.is_file() {
            files.push(p.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let mut hits: Vec<PathBuf> = glob::glob(input)
                .with_context(|| format!("{key}: bad glob pattern {input:?}"))?
                .filter_map(|r| r.ok())
                .filter(|p| p.is_file() && is_source(p))
                .collect();
            hits.sort();
            files.extend(hits);
        } else {
            bail!("{key}: {input} does not exist");
        }
        if files.len() == before {
            bail!("{key}: {input} holds no .jsonl, .jsonl.zst, .bin or .h5 file");
        }
    }
    Ok(files)
}

/// Calls `f(line_number, line)` for every line of a JSONL(.zst) file.
pub fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "zst") {
        Box::new(
            zstd::stream::read::Decoder::new(file)
                .with_context(|| format!("{}: not a zstd stream", path.display()))?,
        )
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line).with_context(|| {
            format!(
                "{}: read error after line {n} (truncated or corrupt file?)",
                path.display()
            )
        })?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        f(n, &line).with_context(|| format!("{}:{n}", path.display()))?;
    }
}
