//! Faults on the command line: a kill mid-save, SIGTERM, non-finite steps, a full disk, and the
//! checkpoint tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use common::{fails_with, ok, tern, tern_cmd, SMALL_MODEL};
use serde_json::Value;

/// `train recipes/tiny.toml` on the small model for `steps` steps, checkpoints every 2.
fn args(run: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "recipes/tiny.toml", "--run-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(run.display().to_string());
    v.extend(SMALL_MODEL.iter().map(|s| s.to_string()));
    #[rustfmt::skip]
    v.extend([
        "--set".into(), format!("train.steps={steps}"), "--set".into(), "train.micro_batch=4".into(),
        "--set".into(), "train.checkpoint_every=2".into(), "--set".into(), "train.eval_every=0".into(),
    ]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(n: usize, a: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = tern_cmd(n);
    c.args(a);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("tern runs")
}

fn spawn(n: usize, a: &[String], env: &[(&str, &str)]) -> Child {
    let mut c = tern_cmd(n);
    c.args(a)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("tern starts")
}

/// `(step, loss as printed)` of a run's training lines (complete lines only: the run may be
/// writing while a test polls).
fn losses(run: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
        .collect()
}

fn wait_for(what: &str, timeout_s: u64, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(timeout_s),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step_{step:08}"))
}

fn signal(pid: u32, sig: &str) {
    let s = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

#[test]
fn a_kill_during_a_save_leaves_the_previous_checkpoint_and_the_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(&run(0, &args(&straight, 6, &[]), &[]));
    // Every checkpoint file takes 300 ms to write: kill -9 while step 4's is being written.
    let run_dir = dir.path().join("killed");
    let mut child = spawn(
        0,
        &args(&run_dir, 6, &[]),
        &[("TERN_TEST_FAULT", "slow:300")],
    );
    wait_for("the save of step 4", 120, || {
        run_dir.join("checkpoints/.tmp-step_00000004").exists()
    });
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!ckpt(&run_dir, 4).exists());
    assert!(ckpt(&run_dir, 2).join("manifest.json").exists());
    // Resumed to step 5 first, checkpointing only at its end: step 4 is not saved again, so the
    // killed save's temporary directory goes as stale; then on to 6.
    #[rustfmt::skip]
    let out = run(0, &args(&run_dir, 5, &["--resume", "auto", "--set", "train.checkpoint_every=0"]), &[]);
    ok(&out);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("resumed from") && log.contains("step_00000002"),
        "{log}"
    );
    assert!(!run_dir.join("checkpoints/.tmp-step_00000004").exists());
    ok(&run(0, &args(&run_dir, 6, &["--resume", "auto"]), &[]));
    // The resumed run's steps 3-6 are the uninterrupted run's, bit for bit (the killed attempt
    // also logged steps 3-4 before dying: the last entry of each step counts).
    let mut by_step = std::collections::BTreeMap::new();
    for (s, l) in losses(&run_dir) {
        by_step.insert(s, l);
    }
    assert_eq!(by_step.into_iter().collect::<Vec<_>>(), losses(&straight));
    // The interrupted save's temporary directory is gone, the checkpoints complete.
    assert!(!run_dir.join("checkpoints/.tmp-step_00000004").exists());
    assert!(ckpt(&run_dir, 6).join("manifest.json").exists());
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits_0_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("r");
    // Two data-parallel ranks; SIGTERM reaches one of them (Slurm signals every task; here only
    // one, which must still stop both in step).
    let mut child = spawn(2, &args(&run_dir, 1000, &[]), &[]);
    wait_for("step 3", 300, || losses(&run_dir).len() >= 3);
    let ranks = std::process::Command::new("pgrep")
        .args(["-P", &child.id().to_string(), "tern"])
        .output()
        .unwrap();
    let pids: Vec<u32> = String::from_utf8_lossy(&ranks.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "two ranks under mpirun");
    signal(pids[1], "-TERM");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the job did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {stdout}");
    assert!(stdout.contains("stop requested (SIGTERM)"), "{stdout}");
    let stopped = losses(&run_dir).last().unwrap().0;
    assert!(stopped < 1000);
    assert!(ckpt(&run_dir, stopped).join("manifest.json").exists());
    // And it goes on from there.
    let out = run(0, &args(&run_dir, stopped + 2, &["--resume", "auto"]), &[]);
    ok(&out);
    assert_eq!(losses(&run_dir).last().unwrap().0, stopped + 2);
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_in_a_row_stop_with_the_last_good_weights() {
    let dir = tempfile::tempdir().unwrap();
    // One bad step: skipped, counted, and training goes on.
    let one = dir.path().join("one");
    ok(&run(0, &args(&one, 4, &[]), &[("TERN_TEST_NAN", "2")]));
    let lines: Vec<Value> = std::fs::read_to_string(one.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("loss").is_some())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["skipped_steps"], 0);
    assert_eq!(lines[3]["skipped_steps"], 1);
    assert!(lines[3]["loss"].as_f64().unwrap().is_finite());

    // Three in a row with train.max_bad_steps = 3: the job stops at step 4 with an error and a
    // checkpoint whose weights are those after step 1, the last good one.
    let good = dir.path().join("good");
    ok(&run(0, &args(&good, 1, &[]), &[]));
    let bad = dir.path().join("bad");
    let out = run(
        0,
        &args(&bad, 10, &["--set", "train.max_bad_steps=3"]),
        &[("TERN_TEST_NAN", "2,3,4")],
    );
    fails_with(
        &out,
        &[
            "step 4: 3 non-finite steps in a row",
            "train.max_bad_steps",
            "step_00000004",
        ],
    );
    let whole = |run: &Path, step: u64| -> Vec<u8> {
        let f = run.join(format!("whole-{step}.safetensors"));
        #[rustfmt::skip]
        ok(&tern(&["ckpt", "consolidate", ckpt(run, step).to_str().unwrap(), "--out", f.to_str().unwrap()]));
        std::fs::read(f).unwrap()
    };
    assert!(
        whole(&bad, 4) == whole(&good, 1),
        "the stop checkpoint holds step 1's weights"
    );
}

#[test]
fn a_full_disk_while_saving_is_an_error_that_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r");
    ok(&run(0, &args(&r, 2, &[]), &[]));
    let out = run(
        0,
        &args(&r, 4, &["--resume", "auto"]),
        &[("TERN_TEST_FAULT", "write:state.json")],
    );
    fails_with(
        &out,
        &[
            "saving checkpoint of step 4",
            "state.json",
            "No space left on device",
        ],
    );
    assert!(!ckpt(&r, 4).exists());
    assert!(!r.join("checkpoints/.tmp-step_00000004").exists());
    // The step-2 checkpoint is intact: the run resumes from it.
    let out = run(0, &args(&r, 4, &["--resume", "auto"]), &[]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("step_00000002"));
}

#[test]
fn inspect_and_consolidate_a_tensor_parallel_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (tp2, tp1) = (dir.path().join("tp2"), dir.path().join("tp1"));
    #[rustfmt::skip]
    let tp = ["--set", "parallel.tp=2", "--set", "model.scale_groups=2", "--set", "checkpoint.keep_last=1"];
    ok(&run(2, &args(&tp2, 4, &tp), &[]));
    // keep_last = 1: only the newest checkpoint is left.
    assert!(!ckpt(&tp2, 2).exists());
    let out = tern(&["ckpt", "inspect", ckpt(&tp2, 4).to_str().unwrap(), "--json"]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["step"], 4);
    assert_eq!(v["topology"]["tp"], 2);
    assert_eq!(v["files"].as_object().unwrap().len(), 6);
    let q = &v["tensors"]["model"]["layers.0.self_attn.q_proj.weight"];
    assert_eq!(q["shape"], serde_json::json!([64, 64]));
    assert_eq!(
        (q["split_dim"].as_u64(), q["parts_found"].as_u64()),
        (Some(0), Some(2))
    );
    let o = &v["tensors"]["model"]["layers.0.self_attn.o_proj.weight"];
    assert_eq!(o["split_dim"], 1);
    assert_eq!(
        v["tensors"]["model"]["embed_tokens.weight"]["split_dim"],
        Value::Null
    );
    assert!(v["recipe"].as_str().unwrap().contains("tp = 2"));
    // The same run in one process with two scale groups: its consolidated weights are the
    // tensor-parallel run's, joined (to float rounding of the reductions).
    ok(&run(
        0,
        &args(&tp1, 4, &["--set", "model.scale_groups=2"]),
        &[],
    ));
    let load = |run: &Path| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let f = run.join("whole.safetensors");
        #[rustfmt::skip]
        ok(&tern(&["ckpt", "consolidate", ckpt(run, 4).to_str().unwrap(), "--out", f.to_str().unwrap()]));
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let vals = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (n, v.shape().to_vec(), vals)
            })
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (a, b) = (load(&tp2), load(&tp1));
    assert_eq!(a.len(), b.len());
    for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
        assert_eq!((na, sa), (nb, sb));
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{na}: max difference {diff}");
    }
}

/// `checkpoint.async_save = true`: training goes on while a checkpoint is written (the next
/// step's line appears before the checkpoint is complete); a kill -9 while the writer works
/// leaves the previous checkpoint, and the resumed run's losses are the uninterrupted run's.
#[test]
fn an_asynchronous_save_overlaps_training_and_a_kill_during_it_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(&run(0, &args(&straight, 6, &[]), &[]));
    let run_dir = dir.path().join("killed");
    let asynch = ["--set", "checkpoint.async_save=true"];
    let mut child = spawn(
        0,
        &args(&run_dir, 6, &asynch),
        &[("TERN_TEST_FAULT", "slow:400")],
    );
    // Step 2's save is written in the background (5 files x 400 ms) while steps 3 and on run.
    wait_for("step 3 while step 2's checkpoint is written", 120, || {
        losses(&run_dir).iter().any(|(s, _)| *s == 3)
    });
    assert!(run_dir.join("checkpoints/.tmp-step_00000002").exists());
    assert!(!ckpt(&run_dir, 2).exists());
    // It completes at step 3's end; then step 4's starts: kill -9 while it is being written.
    wait_for("the save of step 4", 120, || {
        run_dir.join("checkpoints/.tmp-step_00000004").exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckpt(&run_dir, 2).join("manifest.json").exists());
    assert!(!ckpt(&run_dir, 4).exists());
    let resumed = run(0, &args(&run_dir, 6, &["--resume", "auto"]), &[]);
    ok(&resumed);
    let log = String::from_utf8_lossy(&resumed.stdout);
    assert!(log.contains("step_00000002"), "{log}");
    let mut by_step = std::collections::BTreeMap::new();
    for (s, l) in losses(&run_dir) {
        by_step.insert(s, l);
    }
    assert_eq!(by_step.into_iter().collect::<Vec<_>>(), losses(&straight));
    assert!(ckpt(&run_dir, 6).join("manifest.json").exists());
}
