//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A model small enough for multi-run tests to take seconds: `--set` pairs for the tiny recipe.
#[rustfmt::skip]
pub const SMALL_MODEL: &[&str] = &[
    "--set", "model.hidden=64", "--set", "model.intermediate=128", "--set", "model.n_layers=2",
    "--set", "data.seq_len=64", "--set", "train.global_batch=8", "--set", "optim.decay_steps=50",
];

/// GaLore at rank 16 with a projection refresh every 4 steps: `--set` pairs.
#[rustfmt::skip]
pub const GALORE: &[&str] = &[
    "--set", "optim.name=\"galore_adamw\"", "--set", "optim.rank=16",
    "--set", "optim.update_proj_gap=4", "--set", "optim.lr=0.01",
];

/// `train recipes/tiny.toml --run-dir DIR`: the start of every training command of the tests.
pub fn tiny_train(run_dir: &Path) -> Vec<&str> {
    vec![
        "train",
        "recipes/tiny.toml",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]
}

/// `mpirun -np n tern` with what OpenMPI needs as root, without ssh, and with more ranks than
/// cores (n = 0: the binary alone).
pub fn tern_cmd(n: usize) -> Command {
    let tern = env!("CARGO_BIN_EXE_tern");
    let mut cmd = if n == 0 {
        Command::new(tern)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &n.to_string(), tern]);
        // Open MPI 4 jobs started at the same moment race on their shared session directory
        // under /tmp ("orte_session_dir failed"); the tests run several at once, each gets its own.
        let session = tempfile::Builder::new()
            .prefix("ompi-")
            .tempdir()
            .unwrap()
            .keep();
        c.env("OMPI_MCA_orte_tmpdir_base", session);
        c
    };
    cmd.current_dir(repo())
        .env("RUST_BACKTRACE", "0")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_plm_rsh_agent", "");
    cmd
}

/// `tern ARGS` in the repository, no launcher.
pub fn tern(args: &[&str]) -> Output {
    tern_cmd(0).args(args).output().expect("tern runs")
}

/// Asserts success, showing both streams otherwise.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "tern failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts failure with a message holding every part of `expect`, and no panic: the stderr.
pub fn fails_with(out: &Output, expect: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure; stderr: {err}");
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Every line of a run's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `logits` tensor of a safetensors file.
pub fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("logits").unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::F32);
    let values = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v.shape().to_vec(), values)
}

/// A safetensors file with tensor `input_ids` (i64), as `tern logits` reads.
pub fn write_input_ids(path: &Path, ids: &[i64], shape: [usize; 2]) {
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape.to_vec(), &bytes)
            .unwrap();
    let file = safetensors::tensor::serialize(vec![("input_ids", view)], None).unwrap();
    std::fs::write(path, file).unwrap();
}
