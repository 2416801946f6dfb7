//! Token shards on disk (TinyLlama's packed `.bin`, tern's `.h5`), read by random access.
//!
//! A shard is opened once to check it and to find where its tokens lie; windows are then read
//! with `pread` on a small cache of open files: no mapping per file (a SlimPajama run has 300k
//! shards, over Linux's default limit of 65530 mappings), no HDF5 call on the training path.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::h5;
use crate::litpkds::{self, TokenType};

/// Shard file kinds, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Litpkds,
    Hdf5,
}

impl Kind {
    pub fn of(path: &Path) -> Option<Kind> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin") => Some(Kind::Litpkds),
            Some("h5" | "hdf5") => Some(Kind::Hdf5),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Litpkds => "litpkds",
            Kind::Hdf5 => "hdf5",
        }
    }
}

/// A checked shard: where its tokens are and what it says about itself.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    pub path: PathBuf,
    pub kind: Kind,
    pub tokens: u64,
    /// Byte offset of token 0.
    pub offset: u64,
    pub dtype: TokenType,
    /// HDF5 shards record these; TinyLlama's format does not.
    pub documents: Option<u64>,
    pub meta: Option<h5::Meta>,
}

impl ShardInfo {
    pub fn open(path: &Path) -> Result<Self> {
        match Kind::of(path) {
            Some(Kind::Litpkds) => {
                let mut head = [0u8; litpkds::HEADER_BYTES];
                let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
                let len = f.metadata()?.len();
                let n = f.read_at(&mut head, 0).unwrap_or(0);
                let h = litpkds::Header::parse(&head[..n], path)?;
                h.check_len(path, len)?;
                Ok(Self {
                    path: path.to_path_buf(),
                    kind: Kind::Litpkds,
                    tokens: h.chunk_size as u64,
                    offset: litpkds::HEADER_BYTES as u64,
                    dtype: h.dtype,
                    documents: None,
                    meta: None,
                })
            }
            Some(Kind::Hdf5) => {
                let l = h5::open(path)?;
                Ok(Self {
                    path: path.to_path_buf(),
                    kind: Kind::Hdf5,
                    tokens: l.tokens,
                    offset: l.offset,
                    dtype: if l.width == 2 {
                        TokenType::U16
                    } else {
                        TokenType::U32
                    },
                    documents: Some(l.documents),
                    meta: Some(l.meta),
                })
            }
            None => bail!("{}: not a token shard (.bin or .h5)", path.display()),
        }
    }

    /// Checks that the shard was made for this tokenizer, where it says (HDF5 shards do).
    pub fn check_tokenizer(&self, sha256: &str, vocab: usize, eos: u32) -> Result<()> {
        let Some(m) = &self.meta else { return Ok(()) };
        let p = self.path.display();
        if m.tokenizer_sha256 != sha256 {
            bail!(
                "{p}: tokenised with a tokenizer of sha256 {}, but data.tokenizer has sha256 {sha256}: \
                 re-run tern prep with this tokenizer, or point data.tokenizer at the one the shards were made with",
                m.tokenizer_sha256
            );
        }
        if m.vocab_size as usize > vocab || m.eos_id != eos {
            bail!(
                "{p}: made for a vocabulary of {} with EOS {}, the tokenizer has {vocab} with EOS {eos}",
                m.vocab_size,
                m.eos_id
            );
        }
        Ok(())
    }
}

/// Open files kept for reading; past this many, the cache starts over.
const OPEN_FILES: usize = 256;

/// Reads token windows from shards, checking every id against the vocabulary.
#[derive(Default)]
pub struct ShardReader {
    open: HashMap<PathBuf, File>,
    buf: Vec<u8>,
}

impl ShardReader {
    /// Tokens `start .. start + out.len()` of `shard` into `out`; an id at or above `vocab` is an
    /// error naming the file and the byte offset.
    pub fn read(
        &mut self,
        shard: &ShardInfo,
        start: u64,
        out: &mut [u32],
        vocab: usize,
    ) -> Result<()> {
        let p = &shard.path;
        if start + out.len() as u64 > shard.tokens {
            bail!(
                "{}: tokens {start}..{} requested, the shard holds {}",
                p.display(),
                start + out.len() as u64,
                shard.tokens
            );
        }
        if !self.open.contains_key(p) {
            if self.open.len() >= OPEN_FILES {
                self.open.clear();
            }
            let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            self.open.insert(p.clone(), f);
        }
        let w = shard.dtype.width();
        let at = shard.offset + start * w as u64;
        self.buf.resize(out.len() * w, 0);
        self.open[p]
            .read_exact_at(&mut self.buf, at)
            .with_context(|| format!("{}: reading at byte {at} (truncated?)", p.display()))?;
        decode(shard.dtype, &self.buf, out);
        if let Some(i) = out.iter().position(|&t| t as usize >= vocab) {
            let id = match out[i] {
                u32::MAX => "negative".to_string(),
                t => t.to_string(),
            };
            bail!(
                "{}: offset {}: token id {id} is not below the vocabulary size {vocab}",
                p.display(),
                at + (i * w) as u64,
            );
        }
        Ok(())
    }
}

/// Little-endian integers to token ids; negative values (never ids) become `u32::MAX`, which
/// the vocabulary check then refuses.
fn decode(dtype: TokenType, bytes: &[u8], out: &mut [u32]) {
    match dtype {
        TokenType::U16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        }
        TokenType::U32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        other => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = other.get(bytes, i).unwrap_or(u32::MAX);
            }
        }
    }
}
