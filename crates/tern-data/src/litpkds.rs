//! TinyLlama's packed token shards (`lit_gpt/packed_dataset.py`), byte for byte, so that shards
//! move between TinyLlama and tern either way.
//!
//! A shard is a 24-byte little-endian header, `LITPKDS` | u64 version 1 | u8 dtype code | u64
//! chunk size in tokens, then exactly `chunk_size` tokens. TinyLlama's `PackedDatasetBuilder`
//! concatenates documents (each followed by EOS), cuts the stream into full chunks named
//! `{prefix}_{counter:010d}.bin`, and its preparation script drops the last partial chunk.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const MAGIC: &[u8; 7] = b"LITPKDS";
pub const HEADER_BYTES: usize = 24;
pub const VERSION: u64 = 1;
/// TinyLlama's chunk: 1024 blocks of 2049 tokens.
pub const TINYLLAMA_CHUNK: usize = 2049 * 1024;

/// The token types of the format that hold token ids (`dtypes` of packed_dataset.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    U8,
    I16,
    I32,
    I64,
    U16,
    /// Not a LITPKDS type (it has no code there): tern's HDF5 shards for vocabularies over 65536.
    U32,
}

impl TokenType {
    /// The LITPKDS dtype code (`None` for `U32`, which the format lacks).
    pub fn code(self) -> Option<u8> {
        Some(match self {
            TokenType::U8 => 1,
            TokenType::I16 => 3,
            TokenType::I32 => 4,
            TokenType::I64 => 5,
            TokenType::U16 => 8,
            TokenType::U32 => return None,
        })
    }
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => TokenType::U8,
            3 => TokenType::I16,
            4 => TokenType::I32,
            5 => TokenType::I64,
            8 => TokenType::U16,
            _ => return None,
        })
    }
    pub fn width(self) -> usize {
        match self {
            TokenType::U8 => 1,
            TokenType::I16 | TokenType::U16 => 2,
            TokenType::I32 | TokenType::U32 => 4,
            TokenType::I64 => 8,
        }
    }
    /// TinyLlama's `dtype="auto"`: u16 when the vocabulary is below 65500, else i32.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab < 65500 {
            TokenType::U16
        } else {
            TokenType::I32
        }
    }
    fn put(self, out: &mut Vec<u8>, t: u32) {
        match self {
            TokenType::U8 => out.push(t as u8),
            TokenType::I16 | TokenType::U16 => out.extend_from_slice(&(t as u16).to_le_bytes()),
            TokenType::I32 => out.extend_from_slice(&(t as i32).to_le_bytes()),
            TokenType::U32 => out.extend_from_slice(&t.to_le_bytes()),
            TokenType::I64 => out.extend_from_slice(&(t as i64).to_le_bytes()),
        }
    }
    /// Token `i` of `data`; negative values (never a token id) come back as `None`.
    pub(crate) fn get(self, data: &[u8], i: usize) -> Option<u32> {
        let at = |n: usize| &data[i * n..(i + 1) * n];
        let v: i64 = match self {
            TokenType::U8 => data[i] as i64,
            TokenType::I16 => i16::from_le_bytes(at(2).try_into().unwrap()) as i64,
            TokenType::U16 => u16::from_le_bytes(at(2).try_into().unwrap()) as i64,
            TokenType::I32 => i32::from_le_bytes(at(4).try_into().unwrap()) as i64,
            TokenType::U32 => u32::from_le_bytes(at(4).try_into().unwrap()) as i64,
            TokenType::I64 => i64::from_le_bytes(at(8).try_into().unwrap()),
        };
        u32::try_from(v).ok()
    }
}

/// The header of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub dtype: TokenType,
    pub chunk_size: usize,
}

impl Header {
    /// The file size the header promises (header and `chunk_size` tokens), `None` when that
    /// overflows (a corrupt or hostile header).
    pub fn file_bytes(&self) -> Option<u64> {
        (self.chunk_size as u64)
            .checked_mul(self.dtype.width() as u64)?
            .checked_add(HEADER_BYTES as u64)
    }

    /// [`Self::file_bytes`], or an error naming `path` and a file of `len` bytes when it is not
    /// what the header promises.
    pub fn check_len(&self, path: &Path, len: u64) -> Result<()> {
        let want = self.file_bytes();
        if want != Some(len) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            bail!(
                "{}: {len} bytes, the header promises {} tokens of {} bytes ({want} bytes in all): truncated or corrupt",
                path.display(),
                self.chunk_size,
                self.dtype.width()
            );
        }
        Ok(())
    }

    pub fn bytes(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..7].copy_from_slice(MAGIC);
        h[7..15].copy_from_slice(&VERSION.to_le_bytes());
        // Writers pick their type with `for_vocab`, which never gives `U32`.
        h[15] = self.dtype.code().expect("a LITPKDS token type");
        h[16..24].copy_from_slice(&(self.chunk_size as u64).to_le_bytes());
        h
    }

    /// Parses and checks a header; errors name the file and the byte offset.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self> {
        let f = file.display();
        if bytes.len() < HEADER_BYTES {
            bail!(
                "{f}: {} bytes, shorter than the 24-byte LITPKDS header",
                bytes.len()
            );
        }
        if &bytes[..7] != MAGIC {
            bail!(
                "{f}: offset 0: magic {:?} is not LITPKDS",
                String::from_utf8_lossy(&bytes[..7])
            );
        }
        let version = u64::from_le_bytes(bytes[7..15].try_into().unwrap());
        if version != VERSION {
            bail!("{f}: offset 7: version {version}, tern reads version {VERSION}");
        }
        let code = bytes[15];
        let dtype = TokenType::from_code(code).with_context(|| {
            format!(
                "{f}: offset 15: dtype code {code} is not an integer token type (1, 3, 4, 5, 8)"
            )
        })?;
        let chunk_size = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        Ok(Self { dtype, chunk_size })
    }
}

/// Reads a whole shard, checking its header, its length and every token against `vocab`.
pub fn read_tokens(path: &Path, vocab: Option<usize>) -> Result<(Header, Vec<u32>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let h = Header::parse(&bytes, path)?;
    h.check_len(path, bytes.len() as u64)?;
    let data = &bytes[HEADER_BYTES..];
    let mut tokens = Vec::with_capacity(h.chunk_size);
    for i in 0..h.chunk_size {
        let offset = HEADER_BYTES + i * h.dtype.width();
        let t = h
            .dtype
            .get(data, i)
            .with_context(|| format!("{}: offset {offset}: negative token id", path.display()))?;
        if let Some(v) = vocab {
            if t as usize >= v {
                bail!(
                    "{}: offset {offset}: token id {t} is not below the vocabulary size {v}",
                    path.display()
                );
            }
        }
        tokens.push(t);
    }
    Ok((h, tokens))
}

/// TinyLlama's `PackedDatasetBuilder`: documents in, full chunks out.
pub struct PackedWriter {
    dir: PathBuf,
    prefix: String,
    header: Header,
    sep: u32,
    chunk: Vec<u32>,
    counter: usize,
    files: Vec<PathBuf>,
}

impl PackedWriter {
    /// Shards `{dir}/{prefix}_{counter:010d}.bin` of `chunk_size` tokens; `sep` fills the unused
    /// tail of a remainder chunk, as the builder's `write_reminder` does.
    pub fn new(dir: &Path, prefix: &str, chunk_size: usize, sep: u32, dtype: TokenType) -> Self {
        Self {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            header: Header { dtype, chunk_size },
            sep,
            chunk: Vec::with_capacity(chunk_size),
            counter: 0,
            files: Vec::new(),
        }
    }

    /// Appends tokens (a document with its EOS), writing every chunk that fills up.
    pub fn add(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            let room = self.header.chunk_size - self.chunk.len();
            let n = room.min(tokens.len());
            self.chunk.extend_from_slice(&tokens[..n]);
            tokens = &tokens[n..];
            if self.chunk.len() == self.header.chunk_size {
                self.write_chunk()?;
            }
        }
        Ok(())
    }

    /// The name the next shard gets.
    pub fn next_path(&self) -> PathBuf {
        self.dir
            .join(format!("{}_{:010}.bin", self.prefix, self.counter))
    }

    fn write_chunk(&mut self) -> Result<()> {
        let path = self.next_path();
        let mut bytes =
            Vec::with_capacity(HEADER_BYTES + self.chunk.len() * self.header.dtype.width());
        bytes.extend_from_slice(&self.header.bytes());
        let pad = self.header.chunk_size - self.chunk.len();
        for &t in self.chunk.iter().chain(std::iter::repeat_n(&self.sep, pad)) {
            self.header.dtype.put(&mut bytes, t);
        }
        // Written under a temporary name, synced, then renamed: an interrupted write never
        // leaves a file that looks like a finished shard.
        let tmp = path.with_extension("bin.tmp");
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
        self.files.push(path);
        self.counter += 1;
        self.chunk.clear();
        Ok(())
    }

    /// Ends the stream. TinyLlama's preparation drops the last partial chunk (its issue #83);
    /// `keep_remainder` writes it padded with `sep` instead (the builder's `write_reminder`).
    /// Returns the shards written and the tokens dropped.
    pub fn finish(mut self, keep_remainder: bool) -> Result<(Vec<PathBuf>, usize)> {
        let left = self.chunk.len();
        if keep_remainder && left > 0 {
            self.write_chunk()?;
            return Ok((self.files, 0));
        }
        Ok((self.files, left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/litpkds")
    }

    /// The documents of `data-prep/litpkds_fixture.py`, written by TinyLlama's builder there.
    fn fixture_docs() -> Vec<Vec<u32>> {
        let text = fs::read_to_string(fixture_dir().join("documents.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn writes_what_tinyllamas_builder_writes_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::new(dir.path(), "train_slimpajama_0", 16, 2, TokenType::U16);
        for d in fixture_docs() {
            w.add(&d).unwrap();
        }
        let (files, dropped) = w.finish(false).unwrap();
        let expected: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = fs::read_dir(fixture_dir())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "bin"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(files.len(), expected.len());
        for (ours, theirs) in files.iter().zip(&expected) {
            assert_eq!(ours.file_name(), theirs.file_name());
            assert_eq!(
                fs::read(ours).unwrap(),
                fs::read(theirs).unwrap(),
                "{ours:?}"
            );
        }
        let total: usize = fixture_docs().iter().map(Vec::len).sum();
        assert_eq!(dropped, total - 16 * files.len());
        // And read back: the concatenated documents.
        let all: Vec<u32> = fixture_docs().concat();
        let mut back = Vec::new();
        for f in &expected {
            let (h, t) = read_tokens(f, Some(100)).unwrap();
            assert_eq!(
                h,
                Header {
                    dtype: TokenType::U16,
                    chunk_size: 16
                }
            );
            back.extend(t);
        }
        assert_eq!(back, all[..back.len()]);
    }

    #[test]
    fn remainder_is_padded_with_the_separator_when_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::new(dir.path(), "x", 4, 2, TokenType::I32);
        w.add(&[5, 6, 7, 8, 9, 2]).unwrap();
        let (files, dropped) = w.finish(true).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(read_tokens(&files[1], None).unwrap().1, vec![9, 2, 2, 2]);
        assert!(files[1].ends_with("x_0000000001.bin"));
    }

    #[test]
    fn bad_shards_are_refused_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::new(dir.path(), "s", 4, 2, TokenType::U16);
        w.add(&[1, 2, 3, 4]).unwrap();
        let (files, _) = w.finish(false).unwrap();
        let good = fs::read(&files[0]).unwrap();
        let p = dir.path().join("bad.bin");
        let err = |bytes: &[u8], vocab: Option<usize>| {
            fs::write(&p, bytes).unwrap();
            format!("{:#}", read_tokens(&p, vocab).unwrap_err())
        };
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(err(&magic, None).contains("bad.bin: offset 0: magic"));
        let mut version = good.clone();
        version[7] = 2;
        assert!(err(&version, None).contains("offset 7: version 2"));
        let mut dtype = good.clone();
        dtype[15] = 6;
        assert!(err(&dtype, None).contains("offset 15: dtype code 6"));
        assert!(err(&good[..good.len() - 1], None).contains("truncated"));
        assert!(err(&good[..10], None).contains("shorter than the 24-byte"));
        // A chunk size whose byte count overflows: refused, not allocated.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&(u64::MAX / 2 + 9).to_le_bytes());
        assert!(
            err(&huge, None).contains("more than 2^64 bytes"),
            "{}",
            err(&huge, None)
        );
        assert!(
            format!("{:#}", crate::shard::ShardInfo::open(&p).unwrap_err())
                .contains("truncated or corrupt")
        );
        assert!(err(&good, Some(4))
            .contains("offset 30: token id 4 is not below the vocabulary size 4"));
        // No temporary file is left behind.
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".tmp")));
    }
}
