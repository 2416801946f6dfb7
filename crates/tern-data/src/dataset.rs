//! Training and validation data as the trainer sees them: sources of fixed-size blocks.
//!
//! A source is a list of shards: token shards on disk (`.bin`, `.h5`) read in place, and text
//! files (`.jsonl`, `.jsonl.zst`) tokenised at start into one in-memory shard. Blocks of
//! `seq_len + 1` tokens never span shards (as in TinyLlama's `PackedDataset`); a shard's tail
//! shorter than a block is not read.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::sampler::{block_of, Blend, BlendCursor};
use crate::shard::{Kind, ShardInfo, ShardReader};
use crate::source;
use crate::tokenize::{tokenize_text, TextTokenizer};

/// Tokens a source reads from.
pub enum Shard {
    Disk(ShardInfo),
    /// Text tokenised at start (`files` are the text files it came from).
    Memory {
        files: Vec<PathBuf>,
        tokens: Vec<u32>,
        documents: u64,
    },
}

impl Shard {
    pub fn tokens(&self) -> u64 {
        match self {
            Shard::Disk(s) => s.tokens,
            Shard::Memory { tokens, .. } => tokens.len() as u64,
        }
    }

    pub fn documents(&self) -> Option<u64> {
        match self {
            Shard::Disk(s) => s.documents,
            Shard::Memory { documents, .. } => Some(*documents),
        }
    }
}

/// One weighted source of blocks.
pub struct TokenSource {
    pub name: String,
    pub shards: Vec<Shard>,
    /// `ends[i]`: blocks in shards `0..=i`.
    ends: Vec<u64>,
    block_len: usize,
}

impl TokenSource {
    /// Opens the shards and tokenises the text files that `paths` name (`key` is the recipe key
    /// for errors), checking every shard against the tokenizer.
    pub fn open(
        cfg: &DataConfig,
        tok: &TextTokenizer,
        name: &str,
        paths: &[String],
        key: &str,
        block_len: usize,
    ) -> Result<Self> {
        let files = source::expand(paths, key)?;
        let (disk, text): (Vec<PathBuf>, Vec<PathBuf>) =
            files.into_iter().partition(|f| Kind::of(f).is_some());
        let mut shards = Vec::new();
        if !text.is_empty() {
            let s = tokenize_text(cfg, tok, &text).with_context(|| key.to_string())?;
            shards.push(Shard::Memory {
                files: s.files,
                tokens: s.tokens,
                documents: s.documents as u64,
            });
        }
        for f in disk {
            let s = ShardInfo::open(&f).with_context(|| format!("{key}: token shard"))?;
            s.check_tokenizer(&tok.sha256, tok.vocab_size, tok.eos_id)
                .with_context(|| key.to_string())?;
            shards.push(Shard::Disk(s));
        }
        let mut ends = Vec::with_capacity(shards.len());
        let mut total = 0;
        for s in &shards {
            total += s.tokens() / block_len as u64;
            ends.push(total);
        }
        let source = Self {
            name: name.to_string(),
            shards,
            ends,
            block_len,
        };
        if source.blocks() == 0 {
            bail!(
                "{key}: {} tokens in {} file(s), and no shard holds a whole block of data.seq_len + 1 = {block_len} tokens",
                source.tokens(),
                source.shards.len()
            );
        }
        Ok(source)
    }

    pub fn blocks(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(Shard::tokens).sum()
    }

    /// Documents, when every shard knows its count (TinyLlama's shards do not).
    pub fn documents(&self) -> Option<u64> {
        self.shards.iter().map(Shard::documents).sum()
    }

    /// Block `b` into `out` (`block_len` tokens).
    pub fn read_block(
        &self,
        reader: &mut ShardReader,
        b: u64,
        out: &mut [u32],
        vocab: usize,
    ) -> Result<()> {
        let i = self.ends.partition_point(|&e| e <= b);
        let first = if i == 0 { 0 } else { self.ends[i - 1] };
        let start = (b - first) * self.block_len as u64;
        match &self.shards[i] {
            Shard::Disk(s) => reader.read(s, start, out, vocab),
            Shard::Memory { tokens, .. } => {
                let at = start as usize;
                out.copy_from_slice(&tokens[at..at + out.len()]);
                Ok(())
            }
        }
    }

    /// What identifies the source's blocks: shard names and sizes (not their directory, so data
    /// moved to another file system still resumes), and the tokens of tokenised text.
    fn fingerprint(&self, h: &mut Sha256) {
        h.update(self.block_len.to_le_bytes());
        for s in &self.shards {
            match s {
                Shard::Disk(s) => {
                    let name = s.path.file_name().unwrap_or_default();
                    h.update(name.as_encoded_bytes());
                    h.update(s.tokens.to_le_bytes());
                }
                Shard::Memory { tokens, .. } => {
                    for t in tokens {
                        h.update(t.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// A sample's block: `source` and block `index` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    pub source: usize,
    pub index: u64,
}

/// The training sources, their blend and the seed: global sample `i` -> a block.
pub struct TrainData {
    pub sources: Vec<TokenSource>,
    pub weights: Vec<f64>,
    blend: Blend,
    seed: u64,
    cursor: BlendCursor,
    reader: ShardReader,
    vocab: usize,
}

impl TrainData {
    pub fn open(cfg: &DataConfig, tok: &TextTokenizer, seed: u64) -> Result<Self> {
        let block_len = cfg.seq_len + 1;
        let mut sources = Vec::new();
        let mut weights = Vec::new();
        for (key, s) in cfg.train_sources() {
            let name = s.name.as_deref().unwrap_or("train");
            sources.push(TokenSource::open(
                cfg, tok, name, &s.paths, &key, block_len,
            )?);
            weights.push(s.weight);
        }
        let blend = Blend::new(&weights).map_err(|e| anyhow!("data.sources: {e}"))?;
        let cursor = blend.cursor(0);
        Ok(Self {
            sources,
            weights,
            blend,
            seed,
            cursor,
            reader: ShardReader::default(),
            vocab: tok.vocab_size,
        })
    }

    /// The blocks of global samples `start .. start + count`.
    pub fn samples(&mut self, start: u64, count: usize) -> Vec<BlockRef> {
        if self.cursor.position() != start {
            self.cursor = self.blend.cursor(start);
        }
        (&mut self.cursor)
            .take(count)
            .map(|(s, k)| BlockRef {
                source: s,
                index: block_of(self.sources[s].blocks(), self.seed, s, k),
            })
            .collect()
    }

    /// The tokens of `blocks`, one block after another.
    pub fn read(&mut self, blocks: &[BlockRef]) -> Result<Vec<u32>> {
        let len = self.sources[0].block_len;
        let mut out = vec![0u32; blocks.len() * len];
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(len)) {
            self.sources[b.source].read_block(&mut self.reader, b.index, o, self.vocab)?;
        }
        Ok(out)
    }

    /// Identifies the data and its order: a checkpoint resumes only on the same.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        for (s, w) in self.sources.iter().zip(&self.weights) {
            h.update(w.to_le_bytes());
            s.fingerprint(&mut h);
        }
        format!("{:x}", h.finalize())
    }
}

/// Held-out data, read in order from its first block.
pub struct ValData {
    pub source: TokenSource,
    reader: ShardReader,
    vocab: usize,
}

impl ValData {
    pub fn open(cfg: &DataConfig, tok: &TextTokenizer) -> Result<Self> {
        let source = TokenSource::open(
            cfg,
            tok,
            "validation",
            &cfg.validation,
            "data.validation",
            cfg.seq_len + 1,
        )?;
        Ok(Self {
            source,
            reader: ShardReader::default(),
            vocab: tok.vocab_size,
        })
    }

    /// Blocks `start .. start + count`, one after another.
    pub fn read(&mut self, start: u64, count: usize) -> Result<Vec<u32>> {
        let len = self.source.block_len;
        let mut out = vec![0u32; count * len];
        for (i, o) in out.chunks_exact_mut(len).enumerate() {
            self.source
                .read_block(&mut self.reader, start + i as u64, o, self.vocab)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use crate::prep::{prep, PrepOptions};
    use std::path::Path;

    fn sample() -> (PathBuf, TextTokenizer) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        let tok = TextTokenizer::load(&root.join("tokenizer.json"), "</s>").unwrap();
        (root, tok)
    }

    fn cfg(train: Vec<String>, seq_len: usize) -> DataConfig {
        DataConfig {
            train: train.clone(),
            sources: vec![],
            validation: train,
            tokenizer: String::new(),
            seq_len,
            text_field: "text".into(),
            skip_sets: vec![],
            eos_token: "</s>".into(),
        }
    }

    fn prep_to(input: &Path, out: &Path, format: Kind, chunk: usize, tok: &TextTokenizer) {
        let o = PrepOptions {
            chunk_size: chunk,
            format,
            workers: 2,
            ..PrepOptions::new(input, out)
        };
        prep(&o, tok, &|_, _| {}).unwrap();
    }

    /// All blocks of a source, in order.
    fn all_blocks(s: &TokenSource, vocab: usize) -> Vec<u32> {
        let mut r = ShardReader::default();
        let mut out = vec![0; s.blocks() as usize * s.block_len];
        for (b, o) in out.chunks_exact_mut(s.block_len).enumerate() {
            s.read_block(&mut r, b as u64, o, vocab).unwrap();
        }
        out
    }

    #[test]
    fn shards_read_back_as_the_text_they_were_made_from() {
        let (root, tok) = sample();
        let input = root.join("validation");
        let text_cfg = cfg(vec![input.display().to_string()], 63);
        let text = TokenSource::open(&text_cfg, &tok, "t", &text_cfg.train, "k", 64).unwrap();
        let Shard::Memory { tokens: want, .. } = &text.shards[0] else {
            panic!("text is tokenised in memory")
        };
        for format in [Kind::Hdf5, Kind::Litpkds] {
            let out = tempfile::tempdir().unwrap();
            // One worker's shards hold the text's tokens in order (the sample is one file).
            prep_to(&input, out.path(), format, 64 * 10, &tok);
            let c = cfg(vec![out.path().display().to_string()], 63);
            let s = TokenSource::open(&c, &tok, "s", &c.train, "k", 64).unwrap();
            assert!(s.shards.len() > 1, "{format:?}");
            let mut r = ShardReader::default();
            let mut got = Vec::new();
            let mut blocks = Vec::new();
            for sh in &s.shards {
                let Shard::Disk(d) = sh else { panic!() };
                let mut t = vec![0; d.tokens as usize];
                r.read(d, 0, &mut t, tok.vocab_size).unwrap();
                // Blocks never span shards: a shard's tail shorter than a block is not read.
                blocks.extend_from_slice(&t[..t.len() / 64 * 64]);
                got.extend(t);
            }
            assert!(got[..] == want[..got.len()], "{format:?}");
            assert!(all_blocks(&s, tok.vocab_size) == blocks, "{format:?}");
            match format {
                // Whole documents: every token kept, boundaries recorded.
                Kind::Hdf5 => {
                    assert_eq!(s.tokens(), want.len() as u64);
                    assert_eq!(s.documents(), text.documents());
                    let Shard::Disk(first) = &s.shards[0] else {
                        panic!()
                    };
                    let offs = crate::h5::doc_offsets(&first.path).unwrap();
                    for w in offs.windows(2).skip(1) {
                        assert_eq!(want[w[0] as usize - 1], tok.eos_id);
                    }
                }
                // Full chunks of exactly 10 blocks; the partial last chunk dropped.
                Kind::Litpkds => assert_eq!(s.tokens() % 640, 0),
            }
        }
    }

    #[test]
    fn a_weighted_mix_is_exact_deterministic_and_resumable() {
        let (root, tok) = sample();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        prep_to(&root.join("train"), a.path(), Kind::Hdf5, 4096, &tok);
        prep_to(
            &root.join("validation"),
            b.path(),
            Kind::Litpkds,
            2049,
            &tok,
        );
        let mut c = cfg(vec![], 32);
        c.sources = vec![
            SourceConfig {
                paths: vec![format!("{}/*.h5", a.path().display())],
                weight: 0.693584,
                name: Some("slimpajama".into()),
            },
            SourceConfig {
                paths: vec![b.path().display().to_string()],
                weight: 0.306416,
                name: None,
            },
        ];
        let mut d = TrainData::open(&c, &tok, 42).unwrap();
        assert_eq!(d.sources[1].name, "source1");
        let n = 20_000;
        let all = d.samples(0, n);
        let from_b = all.iter().filter(|r| r.source == 1).count();
        assert!(
            (from_b as f64 / n as f64 - 0.306416).abs() < 1e-3,
            "{from_b}"
        );
        // The small source repeats: every block once per epoch, in a new order each epoch.
        let nb = d.sources[1].blocks() as usize;
        let b_order: Vec<u64> = all
            .iter()
            .filter(|r| r.source == 1)
            .map(|r| r.index)
            .collect();
        let mut epoch0 = b_order[..nb].to_vec();
        epoch0.sort();
        assert_eq!(epoch0, (0..nb as u64).collect::<Vec<_>>());
        assert_ne!(b_order[..nb], b_order[nb..2 * nb]);
        // Resume anywhere, in any batch split: the same samples (another DP size reads other
        // slices of the same global batches).
        let mut fresh = TrainData::open(&c, &tok, 42).unwrap();
        assert_eq!(fresh.samples(12_345, 100), all[12_345..12_445]);
        assert_eq!(fresh.samples(12_445, 7), all[12_445..12_452]);
        assert_eq!(fresh.samples(3, 5), all[3..8]);
        assert_eq!(fresh.fingerprint(), d.fingerprint());
        let tokens = d.read(&all[..4]).unwrap();
        assert_eq!(tokens.len(), 4 * 33);
        // Another seed: another order and another fingerprint.
        let mut other = TrainData::open(&c, &tok, 43).unwrap();
        assert_ne!(other.samples(0, 100), all[..100]);
        assert_ne!(other.fingerprint(), d.fingerprint());
    }

    #[test]
    fn bad_sources_are_refused_naming_the_file_or_key() {
        let (root, tok) = sample();
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::h5::Meta {
            vocab_size: tok.vocab_size as u64,
            eos_id: tok.eos_id,
            tokenizer_sha256: tok.sha256.clone(),
            source_files: vec![],
        };
        let open = |paths: Vec<String>, seq: usize| {
            let c = cfg(paths, seq);
            TokenSource::open(&c, &tok, "s", &c.train, "data.train", seq + 1)
        };
        let err = |r: Result<TokenSource>| format!("{:#}", r.err().expect("an error"));
        // A token id outside the vocabulary: found when its block is read.
        let p = dir.path().join("big_id.h5");
        let mut t: Vec<u32> = vec![5; 100];
        t[70] = 5000;
        crate::h5::write(&p, &t, &[100], &meta).unwrap();
        let s = open(vec![p.display().to_string()], 49).unwrap();
        let mut r = ShardReader::default();
        let mut out = vec![0; 50];
        s.read_block(&mut r, 0, &mut out, tok.vocab_size).unwrap();
        let e = format!(
            "{:#}",
            s.read_block(&mut r, 1, &mut out, tok.vocab_size)
                .unwrap_err()
        );
        assert!(
            e.contains("big_id.h5: offset")
                && e.contains("token id 5000 is not below the vocabulary size 4096"),
            "{e}"
        );
        // Shards made with another tokenizer.
        let p = dir.path().join("other_tok.h5");
        let mut m = meta.clone();
        m.tokenizer_sha256 = "0".repeat(64);
        crate::h5::write(&p, &t, &[100], &m).unwrap();
        let e = err(open(vec![p.display().to_string()], 49));
        assert!(
            e.contains("data.train")
                && e.contains("other_tok.h5: tokenised with a tokenizer of sha256 0000"),
            "{e}"
        );
        // An empty source: a glob that matches nothing, a directory with no data.
        let e = err(open(vec![format!("{}/*.bin", dir.path().display())], 49));
        assert!(e.contains("data.train") && e.contains("holds no"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = err(open(vec![empty.path().display().to_string()], 49));
        assert!(e.contains("holds no .jsonl"), "{e}");
        // Too little data for one block.
        let p = dir.path().join("short.h5");
        crate::h5::write(&p, &t[..10], &[10], &meta).unwrap();
        let e = err(open(vec![p.display().to_string()], 49));
        assert!(
            e.contains("no shard holds a whole block of data.seq_len + 1 = 50"),
            "{e}"
        );
        // A truncated packed shard.
        let out = tempfile::tempdir().unwrap();
        prep_to(
            &root.join("validation"),
            out.path(),
            Kind::Litpkds,
            1000,
            &tok,
        );
        let f = crate::prep::shards_of(out.path(), "train", "slimpajama").unwrap()[0].clone();
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 2]).unwrap();
        let e = err(open(vec![f.display().to_string()], 49));
        assert!(
            e.contains(&format!("{}: ", f.display())) && e.contains("truncated"),
            "{e}"
        );
    }
}
