//! tern's HDF5 token shards.
//!
//! One file per shard, readable by h5py:
//! - `/tokens`: 1-D, `u16` when every id of the vocabulary fits (vocab <= 65536), else `u32`;
//!   contiguous and uncompressed, so a training window is one `pread` at a fixed offset
//!   (compressed chunks measured 5-30x slower for random windows) and reads need not go through the HDF5
//!   library, whose global lock would serialise them.
//! - `/doc_offsets`: `u64`, `documents + 1` entries: document `d` is
//!   `tokens[doc_offsets[d]:doc_offsets[d+1]]`, its EOS last.
//! - attributes on `/`: `format = "tern-tokens"`, `version = 1`, `vocab_size`, `eos_id`,
//!   `tokenizer_sha256`, `documents`, `tokens`, `source_files` (the input files).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use hdf5::types::{IntSize, TypeDescriptor, VarLenUnicode};

pub const FORMAT: &str = "tern-tokens";
pub const VERSION: u64 = 1;
pub const EXTENSION: &str = "h5";

/// What a shard says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub vocab_size: u64,
    pub eos_id: u32,
    pub tokenizer_sha256: String,
    pub source_files: Vec<String>,
}

/// Where the tokens of a shard lie in its file, and its attributes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub meta: Meta,
    pub tokens: u64,
    pub documents: u64,
    /// Bytes per token: 2 (`u16`) or 4 (`u32`).
    pub width: usize,
    /// Byte offset of token 0 in the file.
    pub offset: u64,
}

fn vlu(s: &str) -> Result<VarLenUnicode> {
    VarLenUnicode::from_str(s).map_err(|e| anyhow!("{s:?}: not storable as an HDF5 string: {e}"))
}

/// Writes a shard to `path` (under a temporary name, synced, then renamed: an interrupted write
/// never leaves a file that looks finished). `doc_ends[d]` is the end of document `d`.
pub fn write(path: &Path, tokens: &[u32], doc_ends: &[u64], meta: &Meta) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let ctx = || format!("writing {}", tmp.display());
    {
        let f = hdf5::File::create(&tmp).with_context(ctx)?;
        if meta.vocab_size <= 1 << 16 {
            let t: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
            f.new_dataset_builder()
                .with_data(&t[..])
                .create("tokens")
                .with_context(ctx)?;
        } else {
            f.new_dataset_builder()
                .with_data(tokens)
                .create("tokens")
                .with_context(ctx)?;
        }
        let mut offsets = Vec::with_capacity(doc_ends.len() + 1);
        offsets.push(0u64);
        offsets.extend_from_slice(doc_ends);
        f.new_dataset_builder()
            .with_data(&offsets[..])
            .create("doc_offsets")
            .with_context(ctx)?;
        let put_u64 = |name: &str, v: u64| -> Result<()> {
            f.new_attr::<u64>()
                .create(name)
                .and_then(|a| a.write_scalar(&v))
                .with_context(ctx)
        };
        let put_str = |name: &str, v: &str| -> Result<()> {
            let v = vlu(v)?;
            f.new_attr::<VarLenUnicode>()
                .create(name)
                .and_then(|a| a.write_scalar(&v))
                .with_context(ctx)
        };
        put_str("format", FORMAT)?;
        put_u64("version", VERSION)?;
        put_u64("vocab_size", meta.vocab_size)?;
        put_u64("eos_id", meta.eos_id as u64)?;
        put_str("tokenizer_sha256", &meta.tokenizer_sha256)?;
        put_u64("documents", doc_ends.len() as u64)?;
        put_u64("tokens", tokens.len() as u64)?;
        let files = meta
            .source_files
            .iter()
            .map(|s| vlu(s))
            .collect::<Result<Vec<_>>>()?;
        f.new_attr::<VarLenUnicode>()
            .shape(files.len())
            .create("source_files")
            .and_then(|a| a.write_raw(&files))
            .with_context(ctx)?;
        f.close().with_context(ctx)?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(ctx)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Opens a shard and checks it: format and version, a 1-D unsigned 16/32-bit little-endian
/// contiguous `/tokens` that the file really holds. Errors name the file.
pub fn open(path: &Path) -> Result<Layout> {
    let p = path.display();
    let f = hdf5::File::open(path)
        .map_err(|e| anyhow!("{p}: not a readable HDF5 file (truncated or corrupt?): {e}"))?;
    let str_attr = |name: &str| -> Result<String> {
        let a = f
            .attr(name)
            .map_err(|_| anyhow!("{p}: no attribute {name:?}: not a tern token shard"))?;
        let v: VarLenUnicode = a
            .read_scalar()
            .map_err(|e| anyhow!("{p}: attribute {name:?} is not a string: {e}"))?;
        Ok(v.as_str().to_string())
    };
    let u64_attr = |name: &str| -> Result<u64> {
        let a = f
            .attr(name)
            .map_err(|_| anyhow!("{p}: no attribute {name:?}: not a tern token shard"))?;
        a.read_scalar::<u64>()
            .map_err(|e| anyhow!("{p}: attribute {name:?} is not an integer: {e}"))
    };
    let format = str_attr("format")?;
    if format != FORMAT {
        bail!("{p}: format {format:?} is not {FORMAT:?}");
    }
    let version = u64_attr("version")?;
    if version != VERSION {
        bail!("{p}: version {version}, tern reads version {VERSION}");
    }
    let ds = f
        .dataset("tokens")
        .map_err(|_| anyhow!("{p}: no dataset /tokens"))?;
    if ds.ndim() != 1 {
        bail!("{p}: /tokens has shape {:?}, expected 1-D", ds.shape());
    }
    let dtype = ds.dtype().with_context(|| format!("{p}: /tokens"))?;
    let width = match dtype.to_descriptor() {
        Ok(TypeDescriptor::Unsigned(IntSize::U2)) => 2,
        Ok(TypeDescriptor::Unsigned(IntSize::U4)) => 4,
        other => bail!("{p}: /tokens has type {other:?}, expected u16 or u32"),
    };
    if dtype.byte_order() != hdf5::datatype::ByteOrder::LittleEndian {
        bail!("{p}: /tokens is not little-endian");
    }
    let tokens = ds.size() as u64;
    let offset = match ds.offset() {
        Some(o) => o,
        None if tokens == 0 => 0,
        None => bail!(
            "{p}: /tokens is chunked or compressed; tern reads contiguous token datasets \
             (write them with tern prep, or with h5py without chunks or compression)"
        ),
    };
    let file_len = std::fs::metadata(path)
        .with_context(|| format!("{p}: reading its size"))?
        .len();
    if offset + tokens * width as u64 > file_len {
        bail!(
            "{p}: /tokens ends at byte {} but the file has {file_len} bytes: truncated",
            offset + tokens * width as u64
        );
    }
    let stated = u64_attr("tokens")?;
    if stated != tokens {
        bail!("{p}: attribute tokens = {stated} but /tokens holds {tokens}");
    }
    let documents = u64_attr("documents")?;
    let source_files = f
        .attr("source_files")
        .and_then(|a| a.read_raw::<VarLenUnicode>())
        .map(|v| v.iter().map(|s| s.as_str().to_string()).collect())
        .unwrap_or_default();
    let meta = Meta {
        vocab_size: u64_attr("vocab_size")?,
        eos_id: u64_attr("eos_id")? as u32,
        tokenizer_sha256: str_attr("tokenizer_sha256")?,
        source_files,
    };
    Ok(Layout {
        meta,
        tokens,
        documents,
        width,
        offset,
    })
}

/// Documents in, shards `{dir}/{prefix}_{counter:010d}.h5` out: each shard ends at a document
/// boundary once it holds `shard_tokens` tokens, so memory stays at one shard (plus a document).
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    shard_tokens: usize,
    meta: Meta,
    tokens: Vec<u32>,
    ends: Vec<u64>,
    counter: usize,
    files: Vec<PathBuf>,
}

impl ShardWriter {
    pub fn new(dir: &Path, prefix: &str, shard_tokens: usize, meta: Meta) -> Self {
        Self {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            shard_tokens,
            meta,
            tokens: Vec::new(),
            ends: Vec::new(),
            counter: 0,
            files: Vec::new(),
        }
    }

    /// Appends one document (with its EOS).
    pub fn add(&mut self, doc: &[u32]) -> Result<()> {
        self.tokens.extend_from_slice(doc);
        self.ends.push(self.tokens.len() as u64);
        if self.tokens.len() >= self.shard_tokens {
            self.write_shard()?;
        }
        Ok(())
    }

    fn write_shard(&mut self) -> Result<()> {
        let path = self
            .dir
            .join(format!("{}_{:010}.{EXTENSION}", self.prefix, self.counter));
        write(&path, &self.tokens, &self.ends, &self.meta)?;
        self.files.push(path);
        self.counter += 1;
        self.tokens.clear();
        self.ends.clear();
        Ok(())
    }

    /// Writes the last, shorter shard (nothing is dropped) and returns all shards.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if !self.tokens.is_empty() {
            self.write_shard()?;
        }
        Ok(self.files)
    }
}

/// `/doc_offsets` of a shard.
pub fn doc_offsets(path: &Path) -> Result<Vec<u64>> {
    let f = hdf5::File::open(path).with_context(|| format!("{}", path.display()))?;
    f.dataset("doc_offsets")
        .and_then(|d| d.read_raw::<u64>())
        .with_context(|| format!("{}: /doc_offsets", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(vocab: u64) -> Meta {
        Meta {
            vocab_size: vocab,
            eos_id: 2,
            tokenizer_sha256: "ab".repeat(32),
            source_files: vec!["a.jsonl".into(), "b.jsonl.zst".into()],
        }
    }

    #[test]
    fn round_trip_in_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, width) in [(4096u64, 2usize), (65536, 2), (65537, 4), (128_256, 4)] {
            let p = dir.path().join(format!("s{vocab}.h5"));
            let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % vocab as u32).collect();
            write(&p, &tokens, &[10, 400, 1000], &meta(vocab)).unwrap();
            let l = open(&p).unwrap();
            assert_eq!((l.tokens, l.documents, l.width), (1000, 3, width));
            assert_eq!(l.meta, meta(vocab));
            // The tokens lie where the layout says, as little-endian integers.
            let bytes = std::fs::read(&p).unwrap();
            let at = l.offset as usize;
            let back: Vec<u32> = (0..1000)
                .map(|i| {
                    let b = &bytes[at + i * width..at + (i + 1) * width];
                    if width == 2 {
                        u16::from_le_bytes([b[0], b[1]]) as u32
                    } else {
                        u32::from_le_bytes(b.try_into().unwrap())
                    }
                })
                .collect();
            assert_eq!(back, tokens);
            assert_eq!(doc_offsets(&p).unwrap(), vec![0, 10, 400, 1000]);
            assert!(!dir.path().join(format!("s{vocab}.h5.tmp")).exists());
            // No timestamps inside: the same input gives the same bytes (reruns are checkable).
            let again = dir.path().join("again.h5");
            std::thread::sleep(std::time::Duration::from_millis(1100));
            write(&again, &tokens, &[10, 400, 1000], &meta(vocab)).unwrap();
            assert!(std::fs::read(&again).unwrap() == bytes, "{vocab}");
        }
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("good.h5");
        let tokens: Vec<u32> = (0..5000).map(|i| i % 100).collect();
        write(&p, &tokens, &[5000], &meta(100)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let err = |name: &str, b: &[u8]| {
            let q = dir.path().join(name);
            std::fs::write(&q, b).unwrap();
            format!("{:#}", open(&q).unwrap_err())
        };
        let e = err("cut.h5", &bytes[..bytes.len() - 3000]);
        assert!(e.contains("cut.h5") && e.contains("truncated"), "{e}");
        let e = err("junk.h5", b"LITPKDS and then some bytes that are not HDF5");
        assert!(
            e.contains("junk.h5") && e.contains("not a readable HDF5"),
            "{e}"
        );
        // A well-formed HDF5 file that is not a tern shard, and one of another version.
        let q = dir.path().join("other.h5");
        {
            let f = hdf5::File::create(&q).unwrap();
            f.new_dataset_builder()
                .with_data(&[1u16, 2, 3][..])
                .create("tokens")
                .unwrap();
        }
        let e = format!("{:#}", open(&q).unwrap_err());
        assert!(e.contains("other.h5") && e.contains("\"format\""), "{e}");
        let q = dir.path().join("v2.h5");
        write(&q, &tokens, &[5000], &meta(100)).unwrap();
        {
            let f = hdf5::File::open_rw(&q).unwrap();
            f.delete_attr("version").unwrap();
            f.new_attr::<u64>()
                .create("version")
                .unwrap()
                .write_scalar(&2u64)
                .unwrap();
        }
        let e = format!("{:#}", open(&q).unwrap_err());
        assert!(e.contains("v2.h5: version 2"), "{e}");
    }
}
