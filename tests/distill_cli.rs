//! Layer-wise distillation and Hugging Face models, end to end through the `tern` binary.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use safetensors::SafeTensors;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A float teacher of the small test model, trained 10 steps on the sample (made once).
fn teacher() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("teacher");
        let mut args = tiny_train(&dir);
        args.extend(SMALL_MODEL);
        #[rustfmt::skip]
        args.extend(["--set", "model.linear=\"float\"", "--set", "train.steps=10", "--set", "train.eval_every=0"]);
        ok(&tern(&args));
        dir
    })
}

/// `train recipes/distill-tiny.toml` on the small model with `teacher()`: 2 blocks x 8 steps, then
/// 2 steps of all blocks and 2 end to end.
fn distill_args<'a>(run: &'a Path, teacher_arg: &'a str) -> Vec<&'a str> {
    let mut a = vec!["train", "recipes/distill-tiny.toml", "--run-dir", s(run)];
    a.extend(SMALL_MODEL);
    #[rustfmt::skip]
    a.extend([
        "--set", "optim.warmup_steps=2", "--set", "train.steps=20", "--set", "train.log_every=1",
        "--set", "train.eval_every=16", "--set", "train.eval_batches=2", "--set", "train.checkpoint_every=8",
        "--set", "distill.block_steps=8", "--set", "distill.all_steps=2", "--set", "distill.e2e_steps=2",
    ]);
    a.extend(["--set", teacher_arg]);
    a
}

/// Every tensor of a checkpoint, consolidated.
fn weights(run: &Path, step: u64) -> HashMap<String, Vec<u8>> {
    let dir = run.join(format!("checkpoints/step_{step:08}"));
    let f = run.join(format!("whole-{step}.safetensors"));
    ok(&tern(&["ckpt", "consolidate", s(&dir), "--out", s(&f)]));
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

fn newest_step(run: &Path) -> u64 {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step_")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort();
    *steps.last().unwrap()
}

/// Hugging Face transformers' logits (tests/fixtures/hf-llama, data-prep/hf_llama_fixture.py)
/// for a GQA model with an untied head in f32 and a tied one stored in bf16.
#[test]
fn logits_match_hugging_face_transformers() {
    let fixtures = repo().join("tests/fixtures/hf-llama");
    let dir = tempfile::tempdir().unwrap();
    for name in ["untied-f32", "tied-bf16"] {
        let out = dir.path().join(format!("{name}.safetensors"));
        let ids = fixtures.join("input_ids.safetensors");
        ok(&tern(&[
            "logits",
            "--model",
            s(&fixtures.join(name)),
            "--input-ids",
            s(&ids),
            "--out",
            s(&out),
        ]));
        let (shape, ours) = read_logits(&out);
        let (want_shape, want) = read_logits(&fixtures.join(format!("logits-{name}.safetensors")));
        assert_eq!(shape, want_shape);
        assert_eq!(shape, [2, 11, 96]);
        let diff = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let biggest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Measured 5.2e-6 (untied f32, logits up to 5.8) and 5.6e-6 (tied bf16, up to 6.3): f32
        // rounding of two implementations, 9e-7 of the logits' scale.
        assert!(
            diff <= 2e-6 * biggest,
            "{name}: max |difference| {diff} (logits up to {biggest})"
        );
        assert!(biggest > 1.0, "{name}: logits too small to tell anything");
    }
    // A sharded copy (index + two files) gives the same logits.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let src = fixtures.join("untied-f32");
    std::fs::copy(src.join("config.json"), sharded.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (k, half) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = half
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        std::fs::write(
            sharded.join(&file),
            safetensors::tensor::serialize(views, None).unwrap(),
        )
        .unwrap();
        for n in half {
            map.insert(n.clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let out = dir.path().join("sharded.safetensors");
    let ids = fixtures.join("input_ids.safetensors");
    ok(&tern(&[
        "logits",
        "--model",
        s(&sharded),
        "--input-ids",
        s(&ids),
        "--out",
        s(&out),
    ]));
    assert_eq!(
        read_logits(&out),
        read_logits(&dir.path().join("untied-f32.safetensors"))
    );
    // Ids outside the vocabulary are refused, naming the position.
    let bad = dir.path().join("bad.safetensors");
    write_input_ids(&bad, &[3, 96], [1, 2]);
    fails_with(
        &tern(&[
            "logits",
            "--model",
            s(&src),
            "--input-ids",
            s(&bad),
            "--out",
            s(&out),
        ]),
        &["input_ids[0][1] = 96 is outside the model's vocabulary 0..96"],
    );
}

#[test]
fn distillation_lowers_the_projections_mse_and_freezes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("student");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    ok(&tern(&distill_args(&run, &teacher_arg)));
    let m = metrics(&run);

    // The logged phases, and the MSE falling within each block's phase.
    let steps: Vec<&Value> = m.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 20);
    for (i, l) in steps.iter().enumerate() {
        let expect = match i {
            0..=7 => "block 0",
            8..=15 => "block 1",
            16..=17 => "all blocks",
            _ => "end to end",
        };
        assert_eq!(l["phase"], expect, "step {}", i + 1);
        assert!(l["ce"].as_f64().unwrap().is_finite());
        assert_eq!(
            l.get("mse").is_some(),
            i < 18,
            "step {}: mse only outside end to end",
            i + 1
        );
    }
    for (first, last) in [(0, 7), (8, 15)] {
        let (a, b) = (
            steps[first]["mse"].as_f64().unwrap(),
            steps[last]["mse"].as_f64().unwrap(),
        );
        assert!(
            b < 0.8 * a,
            "mse of steps {}..{}: {a} -> {b}",
            first + 1,
            last + 1
        );
    }

    // Per projection, on the same validation blocks: before training and after the block phases.
    let val_mse = |step: u64| -> HashMap<String, f64> {
        let l = m
            .iter()
            .find(|l| l["step"] == step && l.get("val_mse").is_some())
            .unwrap_or_else(|| panic!("no val_mse at step {step}"));
        l["val_mse"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect()
    };
    let (before, after) = (val_mse(0), val_mse(16));
    assert_eq!(before.len(), 14, "7 projections x 2 blocks: {before:?}");
    // Each block's total falls clearly; single projections may not (the CE term pulls too, and
    // some start near zero), but nearly all do.
    for block in ["layers.0.", "layers.1."] {
        let sum = |m: &HashMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(block))
                .map(|(_, v)| v)
                .sum()
        };
        let (b, a) = (sum(&before), sum(&after));
        assert!(
            a < 0.8 * b,
            "{block}: validation MSE {b} -> {a}: {before:?} -> {after:?}"
        );
    }
    let fell = before.iter().filter(|(k, b)| after[*k] < **b).count();
    assert!(
        fell >= 12,
        "only {fell} of 14 projections' MSE fell: {before:?} -> {after:?}"
    );
    let teacher_val = m
        .iter()
        .find_map(|l| l.get("teacher_val_loss"))
        .and_then(Value::as_f64);
    assert!(teacher_val.is_some_and(f64::is_finite), "{m:?}");

    // Frozen parameters stay bit-identical: after block 0's phase only block 0 differs from the
    // teacher; after block 1's, block 0 is as it was and embedding, final norm and head are still
    // the teacher's.
    let t = weights(teacher(), newest_step(teacher()));
    let w8 = weights(&run, 8);
    let w16 = weights(&run, 16);
    let mut checked = 0;
    for (name, v) in &w8 {
        if name.contains(".encoder.") {
            assert!(
                name.starts_with("layers.0.") || name.starts_with("layers.1."),
                "{name}"
            );
            if name.starts_with("layers.0.") {
                assert_eq!(
                    &w16[name], v,
                    "{name}: block 0's encoder moved after its phase"
                );
            }
            continue;
        }
        let same_as_teacher = t[name] == *v;
        if name.starts_with("layers.0.") {
            assert_eq!(&w16[name], v, "{name}: block 0 moved after its phase");
            if name.ends_with("_proj.weight") {
                assert!(
                    !same_as_teacher,
                    "{name}: block 0's projection did not train"
                );
            }
        } else {
            assert!(
                same_as_teacher,
                "{name}: frozen during block 0's phase, but changed"
            );
            if !name.starts_with("layers.1.") {
                assert_eq!(
                    &w16[name], v,
                    "{name}: frozen in the block phases, but changed"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, t.len(), "every teacher tensor compared");
    // The end-to-end phase trains everything: the head moves.
    let w20 = weights(&run, 20);
    assert_ne!(w20["lm_head.weight"], t["lm_head.weight"]);

    // Resuming from step 8 (its later checkpoints removed) redoes steps 9-20 bit for bit.
    resumes_bit_for_bit(
        &run,
        8,
        distill_args(&dir.path().join("again"), &teacher_arg),
    );

    // The student checkpoint loads for inference with its encoders: `tern logits` on it.
    let ids = dir.path().join("ids.safetensors");
    write_input_ids(&ids, &[1, 5, 9, 300, 2, 7], [2, 3]);
    let out = dir.path().join("logits.safetensors");
    ok(&tern(&[
        "logits",
        "--model",
        s(&run),
        "--input-ids",
        s(&ids),
        "--out",
        s(&out),
    ]));
    let (shape, burn) = read_logits(&out);
    assert_eq!(shape, [2, 3, 4096]);
    // Packed, the encoders kept beside the ternary codes: the packed kernel's logits.
    packed_student_matches(&run, dir.path(), &ids, &burn);
}

/// `run`'s student exported packed computes the checkpoint's logits `burn` (of `ids`) on the
/// packed kernel; a Hugging Face or GGUF export of it is refused and writes nothing.
fn packed_student_matches(run: &Path, dir: &Path, ids: &Path, burn: &[f32]) {
    let packed = dir.join("student.tpk");
    #[rustfmt::skip]
    ok(&tern(&["export", "--checkpoint", s(run), "--format", "packed", "--out", s(&packed)]));
    let out = dir.join("packed-logits.safetensors");
    #[rustfmt::skip]
    ok(&tern(&["logits", "--model", s(&packed), "--input-ids", s(ids), "--out", s(&out)]));
    let (_, got) = read_logits(&out);
    assert_eq!(got.len(), burn.len());
    let d = got
        .iter()
        .zip(burn)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("packed student vs checkpoint: max |logit difference| {d}");
    assert!(
        d <= 1e-4,
        "packed student vs checkpoint: max |logit difference| {d}"
    );
    for (format, file) in [("hf", dir.join("hf")), ("gguf", dir.join("s.gguf"))] {
        #[rustfmt::skip]
        fails_with(
            &tern(&["export", "--checkpoint", s(run), "--format", format, "--out", s(&file)]),
            &["distillation student", "1-bit", "--format packed"],
        );
        assert!(!file.exists(), "{format}");
    }
}

/// A calibrated ternary student (the residual encoders with their offsets, 2 scale groups) runs
/// packed: its logits are the checkpoint's, `tern eval` gives the run's validation loss, and
/// `tern generate` writes text.
/// A Q-Sparse student: its distilled block keeps the top-K, its teacher copies do not (as
/// `studentize` builds them); the packed file computes exactly that.
#[test]
fn packed_qsparse_student_is_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("qsparse");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let mut a = distill_args(&run, &teacher_arg);
    #[rustfmt::skip]
    a.extend([
        "--set", "distill.blocks=[1]", "--set", "distill.block_steps=3", "--set", "distill.all_steps=0",
        "--set", "distill.e2e_steps=0", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.checkpoint_every=3", "--set", "model.sparsity.top_k=0.5",
    ]);
    ok(&tern(&a));
    let ids = dir.path().join("ids.safetensors");
    let values: Vec<i64> = (0..2 * 24).map(|i| (i * 97 + 3) % 4096).collect();
    write_input_ids(&ids, &values, [2, 24]);
    let out = dir.path().join("logits.safetensors");
    #[rustfmt::skip]
    ok(&tern(&["logits", "--model", s(&run), "--input-ids", s(&ids), "--out", s(&out)]));
    let (_, burn) = read_logits(&out);
    packed_student_matches(&run, dir.path(), &ids, &burn);
}

#[test]
fn packed_calibrated_student_is_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("calibrated");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let mut a = distill_args(&run, &teacher_arg);
    #[rustfmt::skip]
    a.extend([
        "--set", "distill.init=\"calibrated\"", "--set", "distill.calibration_batches=2",
        "--set", "distill.blocks=[1]", "--set", "distill.block_steps=4", "--set", "distill.all_steps=0",
        "--set", "distill.e2e_steps=0", "--set", "train.steps=4", "--set", "train.eval_every=4",
        "--set", "train.checkpoint_every=4", "--set", "model.scale_groups=2",
    ]);
    ok(&tern(&a));
    let ids = dir.path().join("ids.safetensors");
    let values: Vec<i64> = (0..2 * 24).map(|i| (i * 131 + 7) % 4096).collect();
    write_input_ids(&ids, &values, [2, 24]);
    let out = dir.path().join("logits.safetensors");
    #[rustfmt::skip]
    ok(&tern(&["logits", "--model", s(&run), "--input-ids", s(&ids), "--out", s(&out)]));
    let (_, burn) = read_logits(&out);
    packed_student_matches(&run, dir.path(), &ids, &burn);

    let packed = dir.path().join("student.tpk");
    let b = std::fs::read(&packed).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let student: Value =
        serde_json::from_str(header["__metadata__"]["student"].as_str().unwrap()).unwrap();
    assert_eq!(
        student,
        serde_json::json!({"layers": [1], "residual": true})
    );
    // Block 1's projections are codes, with their encoders in f32; block 0 stays float.
    assert!(header.get("layers.1.mlp.down_proj.weight.codes").is_some());
    assert!(header
        .get("layers.1.mlp.down_proj.encoder.offset")
        .is_some());
    assert!(header.get("layers.0.mlp.down_proj.weight").is_some());
    assert!(header.get("layers.0.mlp.down_proj.encoder.fc1").is_none());

    // The run's last validation loss, on the same blocks (eval_batches 2 x micro_batch 8 of 64 tokens).
    let val = metrics(&run)
        .iter()
        .filter_map(|m| m["val_loss"].as_f64())
        .next_back()
        .unwrap();
    #[rustfmt::skip]
    let out = tern(&["eval", "--model", s(&packed), "--recipe", "recipes/distill-tiny.toml", "--seq-len", "64", "--max-blocks", "16"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let loss: f64 = text
        .split("loss ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (loss - val).abs() < 1e-4 * val,
        "eval {loss} vs the run's val_loss {val}: {text}"
    );
    #[rustfmt::skip]
    let out = tern(&["generate", "--model", s(&packed), "--prompt", "The", "--max-tokens", "8", "--temperature", "0"]);
    ok(&out);
    assert!(!out.stdout.is_empty());
}

/// `args` (a run in a fresh directory) resumed from a copy of `run`'s checkpoint of `step` logs
/// the losses `run` logged after it, bit for bit.
fn resumes_bit_for_bit(run: &Path, step: u64, mut args: Vec<&str>) {
    let again = PathBuf::from(args[args.iter().position(|a| *a == "--run-dir").unwrap() + 1]);
    let name = format!("step_{step:08}");
    let copy = again.join("checkpoints").join(&name);
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(run.join("checkpoints").join(&name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    args.extend(["--resume", "auto"]);
    ok(&tern(&args));
    let losses = |m: &[Value]| -> Vec<(u64, String)> {
        m.iter()
            .filter(|l| l.get("loss").is_some() && l["step"].as_u64().unwrap() > step)
            .map(|l| (l["step"].as_u64().unwrap(), l["loss"].to_string()))
            .collect()
    };
    assert_eq!(losses(&metrics(&again)), losses(&metrics(run)));
}

/// GaLore in a layer-wise distillation: at the step-8 checkpoint block 1 has never been updated,
/// so its matrices have no projection yet; the run resumes from there bit for bit, and block 1's
/// first update takes the bias correction of a first step (its own update count, stored).
#[test]
fn galore_distillation_resumes_before_a_block_was_trained() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("student");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let mut args = distill_args(&run, &teacher_arg);
    args.extend(GALORE);
    ok(&tern(&args));
    let again_dir = dir.path().join("again");
    let mut again = distill_args(&again_dir, &teacher_arg);
    again.extend(GALORE);
    resumes_bit_for_bit(&run, 8, again);
}

/// A ramp into quantization over 12 steps (block 0 from step 1, block 1 from step 9): the losses
/// differ from a run without it, and a resume from step 8, in the middle of block 0's ramp,
/// continues bit for bit.
#[test]
fn quantization_ramp_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let ramp = ["--set", "distill.quant_ramp_steps=12"];
    let run = dir.path().join("ramp");
    let mut a = distill_args(&run, &teacher_arg);
    a.extend(ramp);
    ok(&tern(&a));
    let plain = dir.path().join("plain");
    #[rustfmt::skip]
    ok(&tern(&distill_args(&plain, &teacher_arg)));
    let first = |r: &Path| {
        let m = metrics(r);
        m.iter()
            .find(|l| l["step"] == 1 && l.get("loss").is_some())
            .unwrap()["loss"]
            .clone()
    };
    assert_ne!(first(&run), first(&plain));
    let again = dir.path().join("again");
    let mut a = distill_args(&again, &teacher_arg);
    a.extend(ramp);
    resumes_bit_for_bit(&run, 8, a);
}

/// Runs the short distillation in one process with `one` and under `mpirun -np 2` with `two`,
/// and checks that the two log the same losses, step by step, and the same validation MSEs.
fn same_as_one_process(one: &[&str], two: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let (r1, r2) = (dir.path().join("one"), dir.path().join("two"));
    #[rustfmt::skip]
    let short = [
        "--set", "train.micro_batch=4", "--set", "train.steps=10", "--set", "train.eval_every=8",
        "--set", "distill.block_steps=4", "--set", "distill.e2e_steps=0",
    ];
    let mut a = distill_args(&r1, &teacher_arg);
    a.extend(short);
    a.extend(one);
    ok(&tern(&a));
    let mut a = distill_args(&r2, &teacher_arg);
    a.extend(short);
    a.extend(two);
    ok(&tern_cmd(2).args(&a).output().unwrap());
    let (m1, m2) = (metrics(&r1), metrics(&r2));
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1e-3),
            "{what}: {a} (1 process) vs {b} (2)"
        );
    };
    let steps = |m: &[Value]| -> Vec<Value> {
        m.iter()
            .filter(|l| l.get("loss").is_some())
            .cloned()
            .collect()
    };
    let (s1, s2) = (steps(&m1), steps(&m2));
    assert_eq!(s1.len(), 10);
    assert_eq!(s1.len(), s2.len());
    let relations = one.contains(&"distill.attention_weight=1");
    assert_eq!(
        s1.iter().any(|x| x.get("attention").is_some()),
        relations,
        "attention logged when its weight is set"
    );
    for (x, y) in s1.iter().zip(&s2) {
        assert_eq!(x["phase"], y["phase"]);
        assert_eq!(x.get("attention").is_some(), y.get("attention").is_some());
        let keys = ["loss", "mse", "ce", "attention"];
        for key in keys.into_iter().filter(|k| x.get(*k).is_some()) {
            close(
                x[key].as_f64().unwrap(),
                y[key].as_f64().unwrap(),
                &format!("step {} {key}", x["step"]),
            );
        }
    }
    let val_mse = |m: &[Value]| -> Vec<Value> {
        m.iter().filter_map(|l| l.get("val_mse").cloned()).collect()
    };
    let (v1, v2) = (val_mse(&m1), val_mse(&m2));
    assert_eq!(v1.len(), 3, "steps 0, 8, 10");
    assert_eq!(v1.len(), v2.len());
    for (x, y) in v1.iter().zip(&v2) {
        for (name, a) in x.as_object().unwrap() {
            close(a.as_f64().unwrap(), y[name].as_f64().unwrap(), name);
        }
    }
}

#[test]
fn data_parallel_distillation_logs_the_single_process_losses() {
    same_as_one_process(&[], &[]);
}

/// The student and the teacher split two ways; one ternary scale per shard, as one process with
/// two scale groups.
/// With the attention-relation loss on block 1 too: each rank holds its heads' share of it.
#[test]
fn tensor_parallel_distillation_logs_the_single_process_losses() {
    #[rustfmt::skip]
    let one = ["--set", "model.scale_groups=2", "--set", "distill.attention_weight=1", "--set", "distill.attention_layer=1"];
    let mut two = one.to_vec();
    two.extend(["--set", "parallel.tp=2"]);
    same_as_one_process(&one, &two);
}

/// With CE and KL off, a block phase runs only the teacher up to the block and the block's
/// projections: the loss is the MSE, and no CE is logged.
#[test]
fn mse_only_distillation_logs_no_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mse");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let mut a = distill_args(&run, &teacher_arg);
    #[rustfmt::skip]
    a.extend([
        "--set", "distill.ce_weight=0", "--set", "distill.mse_weight=1", "--set", "distill.e2e_steps=0",
        "--set", "train.steps=18", "--set", "train.eval_every=0",
    ]);
    ok(&tern(&a));
    let steps: Vec<Value> = metrics(&run)
        .into_iter()
        .filter(|l| l.get("loss").is_some())
        .collect();
    assert_eq!(steps.len(), 18);
    for l in &steps {
        assert!(l.get("ce").is_none(), "{l}");
        assert_eq!(l["loss"], l["mse"], "{l}");
    }
    let mse = |i: usize| steps[i]["mse"].as_f64().unwrap();
    assert!(mse(7) < 0.8 * mse(0) && mse(15) < 0.8 * mse(8), "{steps:?}");
}

#[test]
fn bad_distillation_settings_are_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    let teacher_arg = format!("distill.teacher=\"{}\"", teacher().display());
    let with = |more: &[&str]| {
        let mut a = distill_args(&run, &teacher_arg);
        a.extend(more);
        tern(&a)
    };
    fails_with(
        &with(&["--set", "model.hidden=32"]),
        &["model.hidden = 32 but the teacher", "has 64"],
    );
    fails_with(
        &with(&["--set", "distill.blocks=[0, 2]"]),
        &["distill.blocks", "block 2 does not exist"],
    );
    fails_with(
        &with(&[
            "--set",
            "distill.blocks=[0]",
            "--set",
            "distill.attention_layer=1",
        ]),
        &[
            "distill.attention_layer",
            "block 1 is not one of distill.blocks",
        ],
    );
    fails_with(
        &with(&["--set", "distill.attention_weight=-1"]),
        &["distill.attention_weight", "at least 0"],
    );
    fails_with(
        &with(&["--set", "train.steps=21"]),
        &["the schedule has 20 steps", "train.steps = 21"],
    );
    fails_with(
        &with(&["--set", "distill.block_step=3"]),
        &["distill", "block_step"],
    );
    fails_with(
        &with(&["--set", "train.recompute=\"block\""]),
        &["train.recompute", "pretraining"],
    );
    fails_with(
        &with(&["--set", "distill.surrogate=\"sigmoid\""]),
        &["distill.surrogate", "sigmoid"],
    );
    fails_with(
        &with(&["--set", "distill.teacher=\"/nonexistent/teacher\""]),
        &["distill.teacher", "/nonexistent/teacher"],
    );
    fails_with(
        &with(&["--set", "model.mlp=relu2glu"]),
        &["model.mlp = Relu2glu but the teacher", "Swiglu"],
    );
    fails_with(
        &with(&["--set", "model.linear=bitnet"]),
        &["model.linear", "bitnet", "encoder"],
    );
    for key in ["parallel.vocab", "parallel.sequence"] {
        fails_with(
            &with(&[
                "--set",
                &format!("{key}=true"),
                "--set",
                "parallel.tp=2",
                "--set",
                "model.scale_groups=2",
            ]),
            &[key, "pretraining"],
        );
    }
    assert!(!run.join("checkpoints").exists());
}
