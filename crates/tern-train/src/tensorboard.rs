//! A TensorBoard event-file writer for scalars.
//!
//! The format is TFRecord framing around `tensorflow.Event` protobufs. Only three messages are
//! needed (Event, Summary, Summary.Value), so they are encoded by hand here instead of pulling in
//! a protobuf toolchain; `docs/design.md` says why the named `tensorboard-rs` crate is not used.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u32, out: &mut Vec<u8>) {
    varint(((field << 3) | wire) as u64, out);
}

fn len_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Event { wall_time = 1 (double), step = 2 (int64), <body> }.
fn event(step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&now().to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

pub struct EventWriter {
    file: BufWriter<File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}",
            now() as u64,
            host.trim(),
            std::process::id()
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        // Event.file_version = 3
        let e = event(0, |e| len_field(3, b"brain.Event:2", e));
        w.write_record(&e)?;
        Ok(w)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(&tfrecord(data))
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Scalars for one step: Event.summary = 5 { Summary.value = 1 { tag = 1, simple_value = 2 } }.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            len_field(1, tag.as_bytes(), &mut value);
            key(2, 5, &mut value);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            len_field(1, &value, &mut summary);
        }
        let e = event(step as i64, |e| len_field(5, &summary, e));
        self.write_record(&e)
    }

    /// SessionLog START at `step`: TensorBoard drops the events at or after `step` that earlier
    /// files hold, so a resumed run does not show the steps redone after its checkpoint twice.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut log = Vec::new();
        key(1, 0, &mut log);
        varint(1, &mut log); // SessionLog.status = START
        let e = event(step as i64, |e| len_field(7, &log, e)); // Event.session_log = 7
        self.write_record(&e)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_framing() {
        // CRC-32C check value of "123456789" (RFC 3720) and TensorFlow's mask of it, by hand:
        // rotate right 15 then add 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0x2507_c60du32.wrapping_add(0xa282_ead8)
        );
        let r = tfrecord(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 3);
        assert_eq!(&r[12..15], b"abc");
    }

    #[test]
    fn varint_encoding() {
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, vec![0xac, 0x02]);
    }
}
