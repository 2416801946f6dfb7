//! Faults the tests inject, read from the environment once when a run starts and handed to the
//! components they affect (nothing reads the environment in the step loop or the writer):
//! - `TERN_TEST_NAN=STEP[,STEP...]`: those steps' loss and gradients are not finite on every rank,
//!   as an overflow would make them;
//! - `TERN_TEST_PANIC=RANK:STEP`: that rank panics at that step;
//! - `TERN_TEST_FAULT=write:NAME`: writing a checkpoint file named `NAME` fails as a full disk
//!   would (ENOSPC); `TERN_TEST_FAULT=slow:MS`: each checkpoint file write waits `MS` first, so
//!   that a test can kill the process in the middle of a save.

use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    pub nan_steps: Vec<u64>,
    pub panic_at: Option<(usize, u64)>,
    pub fail_write: Option<String>,
    pub slow_write_ms: Option<u64>,
}

impl Faults {
    /// The faults the environment asks for (none in a normal run); a malformed value is an error
    /// naming the variable.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok();
        Self::parse(
            var("TERN_TEST_NAN").as_deref(),
            var("TERN_TEST_PANIC").as_deref(),
            var("TERN_TEST_FAULT").as_deref(),
        )
    }

    fn parse(nan: Option<&str>, panic: Option<&str>, fault: Option<&str>) -> Result<Self> {
        let mut f = Faults::default();
        if let Some(v) = nan {
            f.nan_steps = v
                .split(',')
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()
                .with_context(|| format!("TERN_TEST_NAN={v}: expected STEP[,STEP...]"))?;
        }
        if let Some(v) = panic {
            let parsed = v
                .split_once(':')
                .and_then(|(r, s)| Some((r.parse().ok()?, s.parse().ok()?)));
            match parsed {
                Some(p) => f.panic_at = Some(p),
                None => bail!("TERN_TEST_PANIC={v}: expected RANK:STEP"),
            }
        }
        if let Some(v) = fault {
            if let Some(name) = v.strip_prefix("write:") {
                f.fail_write = Some(name.to_string());
            } else if let Some(ms) = v.strip_prefix("slow:").and_then(|m| m.parse().ok()) {
                f.slow_write_ms = Some(ms);
            } else {
                bail!("TERN_TEST_FAULT={v}: expected write:NAME or slow:MS");
            }
        }
        Ok(f)
    }

    /// Whether (1-based) step `step` is made non-finite.
    pub fn nan(&self, step: u64) -> bool {
        self.nan_steps.contains(&step)
    }

    /// Panics if `rank` was asked to at (1-based) step `step`.
    pub fn maybe_panic(&self, rank: usize, step: u64) {
        if self.panic_at == Some((rank, step)) {
            panic!("TERN_TEST_PANIC: rank {rank} panics at step {step} as asked");
        }
    }

    /// Before a checkpoint file is written.
    pub fn before_write(&self, path: &Path) -> Result<()> {
        if let Some(ms) = self.slow_write_ms {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if self.fail_write.as_deref() == Some(name) {
            return Err(std::io::Error::from_raw_os_error(28))
                .with_context(|| format!("writing {}", path.display()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_switch_and_names_a_bad_one() {
        let f = Faults::parse(Some("2, 5"), Some("1:3"), Some("write:state.json")).unwrap();
        assert_eq!(f.nan_steps, [2, 5]);
        assert_eq!(f.panic_at, Some((1, 3)));
        assert!(f.nan(5) && !f.nan(3));
        let e = f.before_write(Path::new("/x/state.json")).unwrap_err();
        assert!(format!("{e:#}").contains("No space left"), "{e:#}");
        assert!(f.before_write(Path::new("/x/manifest.json")).is_ok());
        let slow = Faults::parse(None, None, Some("slow:1")).unwrap();
        assert_eq!(slow.slow_write_ms, Some(1));
        for (nan, panic, fault, key) in [
            (Some("x"), None, None, "TERN_TEST_NAN"),
            (None, Some("3"), None, "TERN_TEST_PANIC"),
            (None, None, Some("loud:3"), "TERN_TEST_FAULT"),
        ] {
            let e = Faults::parse(nan, panic, fault).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
        assert_eq!(Faults::parse(None, None, None).unwrap(), Faults::default());
    }
}
