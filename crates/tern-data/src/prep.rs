//! `tern prep`: SlimPajama-format JSONL(.zst) to token shards, as TinyLlama's
//! `prepare_slimpajama.py` does it: skip sets by name, tokenise, EOS after every document, pack
//! into LITPKDS chunks named `{split}_{name}_{worker}_{counter:010d}.bin`, or into tern's HDF5
//! shards `..._{counter:010d}.h5` (whole documents, boundaries kept, nothing dropped).
//!
//! Work is split by input file over `workers` threads (file i goes to worker i mod workers), each
//! writing its own shards, so both cores work and memory stays bounded (one chunk and one batch
//! of documents per worker). A worker that finishes leaves a `.done` record; a rerun skips the
//! workers whose record matches the same inputs and tokenizer, and redoes the others from scratch
//! after removing their shards, so an interrupted run never leaves a half-done worker that looks
//! finished.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::h5;
use crate::litpkds::{PackedWriter, TokenType};
use crate::shard::Kind;
use crate::source;
use crate::tokenize::TextTokenizer;

pub struct PrepOptions {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    /// `train` or `validation`: the first part of the shard names.
    pub split: String,
    /// Dataset name in the shard names (TinyLlama: `slimpajama`, `starcoder`).
    pub name: String,
    /// Tokens per shard (LITPKDS: exactly; HDF5: at least, up to the end of a document).
    pub chunk_size: usize,
    pub format: Kind,
    pub workers: usize,
    pub text_field: String,
    pub skip_sets: Vec<String>,
    /// Write the last partial chunk of each worker, padded with EOS (TinyLlama drops it).
    pub keep_remainder: bool,
}

impl PrepOptions {
    /// TinyLlama's settings: `train_slimpajama_*` LITPKDS chunks of 2049 x 1024 tokens, GitHub
    /// left out, the last partial chunk dropped; one worker.
    pub fn new(input: &Path, out: &Path) -> Self {
        Self {
            inputs: vec![input.display().to_string()],
            out: out.to_path_buf(),
            split: "train".into(),
            name: "slimpajama".into(),
            chunk_size: crate::litpkds::TINYLLAMA_CHUNK,
            format: Kind::Litpkds,
            workers: 1,
            text_field: "text".into(),
            skip_sets: vec!["RedPajamaGithub".into()],
            keep_remainder: false,
        }
    }
}

/// What one worker did (also its `.done` record).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub files: Vec<String>,
    pub tokenizer_sha256: String,
    pub chunk_size: usize,
    #[serde(default)]
    pub format: String,
    pub documents: u64,
    pub skipped_documents: u64,
    /// Lines that are not JSON objects with a text field: counted and skipped.
    pub bad_lines: u64,
    pub first_bad_line: Option<String>,
    pub text_bytes: u64,
    pub tokens_written: u64,
    pub tokens_dropped: u64,
    pub shards: Vec<String>,
}

#[derive(Debug, Default)]
pub struct PrepSummary {
    pub workers: Vec<WorkerReport>,
    pub skipped_workers: usize,
    pub seconds: f64,
}

impl PrepSummary {
    pub fn total(&self, f: impl Fn(&WorkerReport) -> u64) -> u64 {
        self.workers.iter().map(f).sum()
    }
}

/// Documents per tokenizer call (the tokenizer spreads a batch over threads).
const BATCH: usize = 64;

fn done_path(o: &PrepOptions, w: usize) -> PathBuf {
    o.out.join(format!(".{}_{}_{w}.done", o.split, o.name))
}

fn prefix(o: &PrepOptions, w: usize) -> String {
    format!("{}_{}_{w}", o.split, o.name)
}

/// Removes the shards (and temporary files) of worker `w` from an earlier, unfinished run.
fn clear_worker(o: &PrepOptions, w: usize) -> Result<()> {
    let p = format!("{}_", prefix(o, w));
    for e in std::fs::read_dir(&o.out).with_context(|| format!("reading {}", o.out.display()))? {
        let path = e?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(rest) = name.strip_prefix(&p) {
            // Only this worker's `{counter:010d}.bin[.tmp]` files, not another worker's prefix.
            if rest.len() >= 10 && rest[..10].bytes().all(|b| b.is_ascii_digit()) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

fn run_worker(
    o: &PrepOptions,
    tok: &TextTokenizer,
    w: usize,
    files: &[PathBuf],
    done_bytes: &AtomicU64,
    progress: &(dyn Fn() + Sync),
) -> Result<WorkerReport> {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut writer = match o.format {
        Kind::Litpkds => Sink::Packed(PackedWriter::new(
            &o.out,
            &prefix(o, w),
            o.chunk_size,
            tok.eos_id,
            TokenType::for_vocab(tok.vocab_size),
        )),
        Kind::Hdf5 => Sink::H5(h5::ShardWriter::new(
            &o.out,
            &prefix(o, w),
            o.chunk_size,
            h5::Meta {
                vocab_size: tok.vocab_size as u64,
                eos_id: tok.eos_id,
                tokenizer_sha256: tok.sha256.clone(),
                source_files: names.clone(),
            },
        )),
    };
    let mut r = WorkerReport {
        files: names,
        tokenizer_sha256: tok.sha256.clone(),
        chunk_size: o.chunk_size,
        format: o.format.name().into(),
        ..Default::default()
    };
    let mut pending: Vec<String> = Vec::with_capacity(BATCH);
    let flush = |pending: &mut Vec<String>, writer: &mut Sink, r: &mut WorkerReport| {
        for mut ids in tok.encode_batch(std::mem::take(pending))? {
            ids.push(tok.eos_id);
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= tok.vocab_size) {
                bail!(
                    "token id {bad} outside the tokenizer's vocabulary of {}",
                    tok.vocab_size
                );
            }
            r.tokens_written += ids.len() as u64;
            writer.add(&ids)?;
        }
        Ok(())
    };
    for file in files {
        source::for_each_line(file, |n, line| {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    r.bad_lines += 1;
                    r.first_bad_line
                        .get_or_insert_with(|| format!("{}:{n}: {e}", file.display()));
                    return Ok(());
                }
            };
            let set = v
                .pointer("/meta/redpajama_set_name")
                .and_then(|s| s.as_str());
            if set.is_some_and(|s| o.skip_sets.iter().any(|k| k == s)) {
                r.skipped_documents += 1;
                return Ok(());
            }
            let Some(text) = v.get(&o.text_field).and_then(|t| t.as_str()) else {
                r.bad_lines += 1;
                r.first_bad_line.get_or_insert_with(|| {
                    format!("{}:{n}: no string field {:?}", file.display(), o.text_field)
                });
                return Ok(());
            };
            r.text_bytes += text.len() as u64;
            r.documents += 1;
            pending.push(text.to_string());
            if pending.len() == BATCH {
                flush(&mut pending, &mut writer, &mut r)?;
            }
            Ok(())
        })?;
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        done_bytes.fetch_add(size, Ordering::Relaxed);
        progress();
    }
    flush(&mut pending, &mut writer, &mut r)?;
    let (shards, dropped) = match writer {
        Sink::Packed(w) => w.finish(o.keep_remainder)?,
        Sink::H5(w) => (w.finish()?, 0),
    };
    r.tokens_dropped = dropped as u64;
    r.tokens_written -= dropped as u64;
    r.shards = shards
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    Ok(r)
}

/// Where a worker's documents go.
enum Sink {
    Packed(PackedWriter),
    H5(h5::ShardWriter),
}

impl Sink {
    fn add(&mut self, doc: &[u32]) -> Result<()> {
        match self {
            Sink::Packed(w) => w.add(doc),
            Sink::H5(w) => w.add(doc),
        }
    }
}

/// Prepares the shards; `progress(done_bytes, total_bytes)` is called after every input file.
pub fn prep(
    o: &PrepOptions,
    tok: &TextTokenizer,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PrepSummary> {
    if o.workers == 0 || o.chunk_size == 0 {
        bail!("--workers and --chunk-size must be at least 1");
    }
    let files = source::expand(&o.inputs, "--input")?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let start = Instant::now();
    let size = |f: &PathBuf| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    let parts: Vec<Vec<PathBuf>> = (0..o.workers)
        .map(|w| files.iter().skip(w).step_by(o.workers).cloned().collect())
        .collect();
    let part_bytes: Vec<u64> = parts.iter().map(|p| p.iter().map(size).sum()).collect();
    let total: u64 = part_bytes.iter().sum();
    let done = AtomicU64::new(0);
    let tick = || progress(done.load(Ordering::Relaxed), total);
    let results: Vec<Result<Option<WorkerReport>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.is_empty())
            .map(|(w, files)| {
                let (done, tick, part_bytes) = (&done, &tick, &part_bytes);
                sc.spawn(move || -> Result<Option<WorkerReport>> {
                    let record = done_path(o, w);
                    let names: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    if let Ok(text) = std::fs::read_to_string(&record) {
                        if let Ok(old) = serde_json::from_str::<WorkerReport>(&text) {
                            let complete = old.files == names
                                && old.tokenizer_sha256 == tok.sha256
                                && old.chunk_size == o.chunk_size
                                && old.format == o.format.name()
                                && old.shards.iter().all(|s| o.out.join(s).is_file());
                            if complete {
                                done.fetch_add(part_bytes[w], Ordering::Relaxed);
                                tick();
                                return Ok(None);
                            }
                        }
                    }
                    let _ = std::fs::remove_file(&record);
                    clear_worker(o, w)?;
                    let r = run_worker(o, tok, w, files, done, tick)?;
                    let tmp = record.with_extension("done.tmp");
                    std::fs::write(&tmp, serde_json::to_string_pretty(&r)?)
                        .and_then(|_| std::fs::rename(&tmp, &record))
                        .with_context(|| format!("writing {}", record.display()))?;
                    Ok(Some(r))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a prep worker panicked")))
            .collect()
    });
    let mut summary = PrepSummary::default();
    for r in results {
        match r? {
            Some(rep) => summary.workers.push(rep),
            None => summary.skipped_workers += 1,
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// All shards in `dir` named for `split` and `name`, in worker then counter order.
pub fn shards_of(dir: &Path, split: &str, name: &str) -> Result<Vec<PathBuf>> {
    let p = format!("{split}_{name}_");
    let mut out: Vec<(usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let n = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rest = n
            .strip_prefix(&p)
            .and_then(|r| r.strip_suffix(".bin").or_else(|| r.strip_suffix(".h5")));
        if let Some(rest) = rest {
            if let Some((w, _)) = rest.split_once('_') {
                if let Ok(w) = w.parse::<usize>() {
                    out.push((w, path));
                }
            }
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::litpkds::read_tokens;
    use crate::tokenize::tokenize_text;
    use crate::DataConfig;

    fn sample() -> (PathBuf, TextTokenizer) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        let tok = TextTokenizer::load(&root.join("tokenizer.json"), "</s>").unwrap();
        (root, tok)
    }

    fn opts(input: &Path, out: &Path, workers: usize) -> PrepOptions {
        PrepOptions {
            chunk_size: 2049 * 8,
            workers,
            ..PrepOptions::new(input, out)
        }
    }

    #[test]
    fn shards_hold_the_tokenizers_own_encoding() {
        let (root, tok) = sample();
        let dir = tempfile::tempdir().unwrap();
        let o = opts(&root.join("validation"), dir.path(), 1);
        let s = prep(&o, &tok, &|_, _| {}).unwrap();
        let cfg = DataConfig {
            train: o.inputs.clone(),
            sources: vec![],
            validation: o.inputs.clone(),
            tokenizer: String::new(),
            seq_len: 8,
            text_field: "text".into(),
            skip_sets: o.skip_sets.clone(),
            eos_token: "</s>".into(),
        };
        let want = tokenize_text(&cfg, &tok, &source::expand(&cfg.train, "t").unwrap()).unwrap();
        let mut got = Vec::new();
        for f in shards_of(dir.path(), "train", "slimpajama").unwrap() {
            got.extend(read_tokens(&f, Some(tok.vocab_size)).unwrap().1);
        }
        let r = &s.workers[0];
        assert_eq!(r.documents as usize, want.documents);
        assert_eq!(got.len() as u64, r.tokens_written);
        assert_eq!(
            r.tokens_written + r.tokens_dropped,
            want.tokens.len() as u64
        );
        assert_eq!(got[..], want.tokens[..got.len()]);
        assert!(got.len() % o.chunk_size == 0 && !got.is_empty());
    }

    #[test]
    fn rerun_skips_finished_workers_and_redoes_broken_ones() {
        let (root, tok) = sample();
        // The sample's documents cut into two files, so that both workers have work.
        let input = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for f in source::expand(&[root.join("train").display().to_string()], "t").unwrap() {
            source::for_each_line(&f, |_, l| {
                lines.push(l.to_string());
                Ok(())
            })
            .unwrap();
        }
        let half = lines.len() / 2;
        std::fs::write(input.path().join("part0.jsonl"), lines[..half].concat()).unwrap();
        std::fs::write(input.path().join("part1.jsonl"), lines[half..].concat()).unwrap();
        for format in [Kind::Litpkds, Kind::Hdf5] {
            let dir = tempfile::tempdir().unwrap();
            let o = PrepOptions {
                format,
                ..opts(input.path(), dir.path(), 2)
            };
            let ext = if format == Kind::Hdf5 { "h5" } else { "bin" };
            let first = prep(&o, &tok, &|_, _| {}).unwrap();
            assert_eq!(first.workers.len(), 2);
            let snapshot = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
                shards_of(d, "train", "slimpajama")
                    .unwrap()
                    .into_iter()
                    .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
                    .collect()
            };
            let before = snapshot(dir.path());
            assert!(before.iter().all(|(p, _)| p.extension().unwrap() == ext));
            let again = prep(&o, &tok, &|_, _| {}).unwrap();
            assert_eq!((again.skipped_workers, again.workers.len()), (2, 0));
            // An interrupted worker 1: its record gone, a shard cut short, a temporary file left.
            std::fs::remove_file(done_path(&o, 1)).unwrap();
            let w1 = before
                .iter()
                .find(|(p, _)| p.to_string_lossy().contains("_1_"))
                .unwrap();
            std::fs::write(&w1.0, &w1.1[..100]).unwrap();
            let tmp = dir
                .path()
                .join(format!("train_slimpajama_1_0000000099.{ext}.tmp"));
            std::fs::write(&tmp, b"x").unwrap();
            let fixed = prep(&o, &tok, &|_, _| {}).unwrap();
            assert_eq!((fixed.skipped_workers, fixed.workers.len()), (1, 1));
            assert!(snapshot(dir.path()) == before, "{format:?}");
            assert!(!tmp.exists());
            // Another format is other work: both workers run again.
            let other = PrepOptions {
                format: if format == Kind::Hdf5 {
                    Kind::Litpkds
                } else {
                    Kind::Hdf5
                },
                ..opts(input.path(), dir.path(), 2)
            };
            assert_eq!(prep(&other, &tok, &|_, _| {}).unwrap().workers.len(), 2);
        }
    }

    #[test]
    fn bad_lines_are_counted_and_skipped() {
        let (_, tok) = sample();
        let input = tempfile::tempdir().unwrap();
        std::fs::write(
            input.path().join("a.jsonl"),
            "{\"text\": \"one\"}\nnot json\n{\"body\": 1}\n{\"text\": \"two\"}\n",
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut o = opts(input.path(), out.path(), 1);
        o.chunk_size = 2;
        let s = prep(&o, &tok, &|_, _| {}).unwrap();
        let r = &s.workers[0];
        assert_eq!((r.documents, r.bad_lines), (2, 2));
        assert!(
            r.first_bad_line.as_deref().unwrap().contains("a.jsonl:2"),
            "{r:?}"
        );
    }
}
