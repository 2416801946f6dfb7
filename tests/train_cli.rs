//! End-to-end tests of `tern train` on the embedded sample data.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fails_with, metrics, ok, repo, tern, tiny_train, GALORE, SMALL_MODEL};
use serde_json::Value;

/// `(step, loss)` of the training lines, the loss as printed (bitwise comparable).
fn losses(run: &Path) -> Vec<(u64, String)> {
    metrics(run)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].to_string()))
        .collect()
}

/// A small model so the resume test runs in seconds.
#[rustfmt::skip]
const SMALL: &[&str] = &[
    "--set", "model.scale_groups=2", "--set", "train.micro_batch=4",
    "--set", "train.eval_every=4", "--set", "train.checkpoint_every=3",
];

fn train(run: &Path, steps: u32, extra: &[&str]) -> Output {
    let steps = format!("train.steps={steps}");
    let mut args = vec![
        "train",
        "recipes/tiny.toml",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        &steps,
    ];
    args.extend_from_slice(SMALL_MODEL);
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    tern(&args)
}

#[test]
fn resume_continues_with_bitwise_equal_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    ok(&train(&full, 12, &[]));
    ok(&train(&split, 7, &[]));
    // The 7-step run saved at steps 3, 6 and 7; resume takes the newest.
    let out = train(&split, 12, &["--resume", "auto"]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed from"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let a = losses(&full);
    let b = losses(&split);
    assert_eq!(a.len(), 12);
    assert_eq!(
        a, b,
        "losses of the uninterrupted and the resumed run differ"
    );
    // Validation losses match too.
    let val = |run: &Path| -> Vec<String> {
        metrics(run)
            .iter()
            .filter(|v| v.get("val_loss").is_some())
            .map(|v| v.to_string())
            .collect()
    };
    let (vf, vs) = (val(&full), val(&split));
    // The split run also validated at its last step, 7.
    assert_eq!(vs.len(), vf.len() + 1);
    assert!(vf.iter().all(|v| vs.contains(v)), "{vf:?} vs {vs:?}");

    // A run that logged steps past its newest checkpoint (a crash after step 7 with the
    // checkpoints of steps 6 and 7 lost) redoes them: metrics.jsonl and TensorBoard keep one
    // value per step.
    let crashed = dir.path().join("crashed");
    ok(&train(&crashed, 7, &[]));
    for s in ["step_00000006", "step_00000007"] {
        std::fs::remove_dir_all(crashed.join("checkpoints").join(s)).unwrap();
    }
    ok(&train(&crashed, 12, &["--resume", "auto"]));
    assert_eq!(losses(&crashed), a);
    let tb = tensorboard_scalars(&crashed);
    let tb_steps: Vec<u64> = tb["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(tb_steps, (1..=12).collect::<Vec<_>>());

    // Resuming from an explicit checkpoint of step 3 redoes steps 4..12 identically.
    let again = dir.path().join("again");
    ok(&train(&again, 3, &[]));
    let ckpt = again.join("checkpoints/step_00000003");
    ok(&train(&again, 12, &["--resume", ckpt.to_str().unwrap()]));
    assert_eq!(losses(&again), a);
}

/// Names and shapes of the tensors of a safetensors file (its JSON header).
fn safetensors_shapes(path: &Path) -> Vec<(String, Vec<u64>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap();
            (
                k.clone(),
                shape.iter().map(|x| x.as_u64().unwrap()).collect(),
            )
        })
        .collect()
}

#[test]
fn galore_trains_checkpoints_low_rank_state_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let galore = GALORE;
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    ok(&train(&full, 12, galore));
    let a = losses(&full);
    let first: f64 = a[0].1.parse().unwrap();
    let last: f64 = a[11].1.parse().unwrap();
    assert!(last < first - 0.3, "GaLore's loss falls: {first} -> {last}");
    // Stopped at 7 (checkpoints 3, 6, 7), resumed across the projection refresh of step 8.
    ok(&train(&split, 7, galore));
    ok(&train(
        &split,
        12,
        &[galore, &["--resume", "auto"]].concat(),
    ));
    assert_eq!(
        a,
        losses(&split),
        "GaLore resumed differs from uninterrupted"
    );

    // The moments are low rank; the projections are saved. hidden 64, intermediate 128, rank 16:
    // q (64 x 64, right) -> 64 x 16 and P 16 x 64; down (64 x 128, left) -> 16 x 128, P 64 x 16.
    let shapes =
        safetensors_shapes(&full.join("checkpoints/step_00000012/optim-tp00-of-01.safetensors"));
    let shape = |name: &str| {
        shapes
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1
            .clone()
    };
    assert_eq!(shape("layers.0.self_attn.q_proj.weight.exp_avg"), [64, 16]);
    assert_eq!(
        shape("layers.0.self_attn.q_proj.weight.galore_proj"),
        [16, 64]
    );
    assert_eq!(shape("layers.1.mlp.down_proj.weight.exp_avg_sq"), [16, 128]);
    assert_eq!(shape("layers.1.mlp.down_proj.weight.galore_proj"), [64, 16]);
    assert_eq!(shape("embed_tokens.weight.exp_avg"), [4096, 64]);

    // Randomized subspace iteration instead of the exact SVD: it trains as well here.
    let rand = dir.path().join("randomized");
    ok(&train(
        &rand,
        12,
        &[galore, &["--set", "optim.svd=\"randomized\""]].concat(),
    ));
    let r = losses(&rand);
    let last_r: f64 = r[11].1.parse().unwrap();
    assert!(
        (last_r - last).abs() < 0.05,
        "randomized {last_r} vs exact {last}"
    );
}

#[test]
fn plan_reports_galores_saving_without_building() {
    let galore = [
        "--set",
        "optim.name=\"galore_adamw\"",
        "--set",
        "optim.rank=128",
    ];
    let out = tern(&[&["plan", "recipes/trilm-99m.toml"][..], &galore].concat());
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    // 16 layers x (4 x (2 x 512 x 128 + 128 x 512) + 3 x (2 x 1280 x 128 + 512 x 128)) floats
    // = 125.8 MB against AdamW's 2 x 48.23M floats = 385.9 MB.
    assert!(text.contains("parameters            99.76 M"), "{text}");
    assert!(
        text.contains("optimizer, block matrices 125.8 MB (AdamW 385.9 MB: 67.4% less)"),
        "{text}"
    );
    // The MoM-like recipe: its size without building it (blocks of every kind, docs/architectures.md).
    let out = tern(&["plan", "recipes/mom-99m.toml"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parameters            99.68 M"), "{text}");
    // The data of the recipe does not exist here: plan reads none of it.
    assert!(!repo().join("data/slimpajama").exists());
    // tern bench times the projection refresh both ways.
    #[rustfmt::skip]
    let out = tern(&[
        "bench", "recipes/tiny.toml", "--steps", "1",
        "--set", "optim.name=\"galore_adamw\"", "--set", "optim.rank=32",
    ]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("galore refresh, rank 32 | exact SVD")
            && text.contains("| randomized (8 oversample, 2 iterations)"),
        "{text}"
    );
    let bad = tern(&["plan", "recipes/trilm-99m.toml", "--set", "parallel.tp=3"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("parallel.tp = 3"));
}

#[test]
fn corrupt_checkpoint_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    ok(&train(&run, 2, &[]));
    // A fresh run into the same folder moves the earlier run aside instead of mixing the two.
    ok(&train(&run, 3, &[]));
    assert!(dir
        .path()
        .join("r.1/checkpoints/step_00000002/manifest.json")
        .exists());
    assert!(!run.join("checkpoints/step_00000002").exists());
    assert_eq!(losses(&dir.path().join("r.1")).len(), 2);
    // Resuming with another model is refused, and the run's files are left as they were.
    let before = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    let out = train(&run, 6, &["--resume", "auto", "--set", "model.n_layers=3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step_00000003") && err.contains("[model] differs"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("recipe.toml")).unwrap(),
        before
    );
    assert_eq!(losses(&run).len(), 3);

    let f = run.join("checkpoints/step_00000003/optim-tp00-of-01.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let out = train(&run, 6, &["--resume", "auto"]);
    fails_with(&out, &["optim-tp00-of-01.safetensors", "checksum mismatch"]);
}

#[test]
fn tiny_recipe_loss_falls_and_tensorboard_reads_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("tiny");
    let out = tern(&[
        "train",
        "recipes/tiny.toml",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "train.steps=40",
        "--set",
        "train.eval_every=20",
        "--set",
        "train.checkpoint_every=0",
        "--set",
        "run.peak_tflops=0.5",
    ]);
    ok(&out);
    let m = metrics(&run);
    let l = losses(&run);
    assert_eq!(l.len(), 40);
    assert!(m
        .iter()
        .any(|v| v["first_step_s"].as_f64().is_some_and(|s| s > 0.0)));
    let first: f64 = l[0].1.parse().unwrap();
    let last5: f64 = l[35..]
        .iter()
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum::<f64>()
        / 5.0;
    assert!(
        last5 < first - 1.0,
        "loss did not fall: first {first}, mean of last five {last5}"
    );
    let vals: Vec<f64> = m
        .iter()
        .filter_map(|v| v.get("val_loss")?.as_f64())
        .collect();
    assert_eq!(vals.len(), 2);
    assert!(vals[1] < vals[0], "{vals:?}");
    for v in m.iter().filter(|v| v.get("loss").is_some()) {
        for key in [
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_s",
            "mfu",
        ] {
            assert!(v.get(key).is_some(), "metrics line without {key}: {v}");
        }
        let tflops = v["tflops_per_device"].as_f64().unwrap();
        assert!(
            (v["mfu"].as_f64().unwrap() - tflops / 0.5).abs() < 1e-12,
            "{v}"
        );
    }
    assert_eq!(
        m.iter().rev().find(|v| v.get("tokens").is_some()).unwrap()["tokens"],
        40 * 16 * 128
    );
    // The recipe as resolved is saved in the run dir, and the final checkpoint exists.
    assert!(std::fs::read_to_string(run.join("recipe.toml"))
        .unwrap()
        .contains("vocab_size = 4096"));
    assert!(run.join("checkpoints/step_00000040/manifest.json").exists());

    // TensorBoard's EventAccumulator reads the scalars tern wrote.
    let tb = tensorboard_scalars(&run);
    let tb_loss = tb["train/loss"].as_array().unwrap();
    assert_eq!(tb_loss.len(), 40);
    assert_eq!(tb_loss[39][0], 40);
    assert!((tb_loss[0][1].as_f64().unwrap() - first).abs() < 1e-4);
    assert_eq!(tb["val/loss"].as_array().unwrap().len(), 2);
    assert_eq!(tb["train/mfu"].as_array().unwrap().len(), 40);
    let zero = tb["ternary_zero_fraction/layers.0.self_attn.q_proj"]
        .as_array()
        .unwrap();
    let z = zero[39][1].as_f64().unwrap();
    assert!(z > 0.05 && z < 0.95, "zero fraction {z}");
}

/// `train.recompute = "block"` gives the losses of the plain backward pass (to float
/// rounding: the gradients are summed in another order) over eight steps of two micro-batches.
#[test]
fn block_recompute_follows_the_plain_losses() {
    let dir = tempfile::tempdir().unwrap();
    let run = |r: &str| {
        let run = dir.path().join(r);
        let set = format!("train.recompute=\"{r}\"");
        ok(&train(
            &run,
            8,
            &["--set", &set, "--set", "train.global_batch=8"],
        ));
        losses(&run)
    };
    let (plain, block) = (run("none"), run("block"));
    assert_eq!(plain.len(), 8);
    for ((s, a), (_, b)) in plain.iter().zip(&block) {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {s}: {a} against {b}");
    }
}

/// `train.precision = "bf16"` (products in bf16, everything else f32) follows f32's losses over
/// ten steps of the small ternary model with two scale groups, without being f32.
#[test]
fn bf16_products_follow_f32_losses() {
    let dir = tempfile::tempdir().unwrap();
    let run = |p: &str| {
        let run = dir.path().join(p);
        let set = format!("train.precision=\"{p}\"");
        ok(&train(&run, 10, &["--set", &set]));
        losses(&run)
    };
    let (f32s, bf16s) = (run("f32"), run("bf16"));
    assert_eq!(f32s.len(), bf16s.len());
    let mut differ = false;
    for ((s, a), (_, b)) in f32s.iter().zip(&bf16s) {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!(
            (a - b).abs() <= 5e-3 * a.abs(),
            "step {s}: f32 {a}, bf16 {b}"
        );
        differ |= a != b;
    }
    assert!(differ, "bf16 gave f32's losses bit for bit: {bf16s:?}");
}

/// `recipes/bitnet-b158-tiny.toml` and `recipes/qsparse-tiny.toml` (30 steps each): the loss falls;
/// BitNet's weight sparsity and Q-Sparse's achieved activation sparsity are in metrics.jsonl and
/// TensorBoard.
#[test]
fn bitnet_and_qsparse_recipes_train_and_report_sparsity() {
    let dir = tempfile::tempdir().unwrap();
    for recipe in ["bitnet-b158-tiny", "qsparse-tiny"] {
        let run = dir.path().join(recipe);
        let path = format!("recipes/{recipe}.toml");
        #[rustfmt::skip]
        ok(&tern(&["train", &path, "--run-dir", run.to_str().unwrap(), "--set", "train.steps=30",
                   "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]));
        let l: Vec<f64> = losses(&run)
            .iter()
            .map(|(_, v)| v.parse().unwrap())
            .collect();
        assert_eq!(l.len(), 30);
        let last5 = l[25..].iter().sum::<f64>() / 5.0;
        assert!(
            last5 < l[0] - 0.8,
            "{recipe}: loss did not fall: {} -> {last5}",
            l[0]
        );
        let m = metrics(&run);
        let last = m.iter().rev().find(|v| v.get("loss").is_some()).unwrap();
        let w = last["ternary_zero_fraction/layers.1.mlp.down_proj"]
            .as_f64()
            .unwrap();
        assert!(w > 0.05 && w < 0.95, "{recipe}: weight sparsity {w}");
        let tb = tensorboard_scalars(&run);
        if recipe == "qsparse-tiny" {
            // Top-K 50% of 128 or 384 entries: exactly half of each attention input is zero; the
            // MLP's down projection also sees ReLU²'s own zeros.
            for v in m.iter().filter(|v| v.get("loss").is_some()) {
                let attn = v["act_sparsity/attn"].as_f64().unwrap();
                let mlp = v["act_sparsity/mlp"].as_f64().unwrap();
                assert!((attn - 0.5).abs() < 1e-3, "act_sparsity/attn {attn}");
                assert!((0.5..0.9).contains(&mlp), "act_sparsity/mlp {mlp}");
            }
            assert_eq!(tb["act_sparsity/mlp"].as_array().unwrap().len(), 30);
        } else {
            assert!(
                last.get("act_sparsity/attn").is_none(),
                "dense BitNet has no top-K"
            );
            assert!(tb.get("act_sparsity/attn").is_none());
        }
    }
}

/// The run's TensorBoard scalars as TensorBoard's own `EventAccumulator` reads them:
/// `{tag: [[step, value], ...]}`.
fn tensorboard_scalars(run: &Path) -> Value {
    let py = Command::new("python3")
        .arg(repo().join("tests/tb_read.py"))
        .arg(run.join("tb"))
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "EventAccumulator failed (pip install tensorboard): {}",
        String::from_utf8_lossy(&py.stderr)
    );
    serde_json::from_slice(&py.stdout).unwrap()
}

fn bad_recipe(overrides: &[&str], expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = tiny_train(dir.path());
    for o in overrides {
        args.push("--set");
        args.push(o);
    }
    fails_with(&tern(&args), expect);
    // Rejected before any output was written.
    assert!(!dir.path().join("metrics.jsonl").exists());
}

#[test]
fn bad_recipes_fail_naming_the_key() {
    // The block kinds' sections (docs/recipes.md).
    bad_recipe(
        &["model.moe={experts=4, top_k=5}"],
        &["model.moe.top_k", "between 1 and the 4 experts"],
    );
    bad_recipe(
        &["model.mod={capacity=0.1, period=8, offset=5}"],
        &["model.mod", "no block of the 4"],
    );
    bad_recipe(
        &["model.mod={capacity=1.5}"],
        &["model.mod.capacity", "(0, 1]"],
    );
    bad_recipe(
        &[
            "model.attention_period=8",
            "model.attention_offset=5",
            "model.moa={experts=2, top_k=1}",
        ],
        &["model.moa", "no block of the 4"],
    );
    bad_recipe(
        &[
            "model.attention_period=2",
            "parallel.tp=2",
            "parallel.sequence=true",
        ],
        &["parallel.sequence", "LLaMA blocks only"],
    );
    bad_recipe(
        &["model.n_layer=3"],
        &["recipes/tiny.toml", "model.n_layer", "unknown field"],
    );
    bad_recipe(&["train.steps=\"many\""], &["train.steps", "invalid type"]);
    bad_recipe(
        &["model.n_heads=3"],
        &["model.n_heads", "model.hidden = 128"],
    );
    bad_recipe(&["model.scale_groups=3"], &["model.scale_groups"]);
    let galore = "optim.name=\"galore_adamw\"";
    bad_recipe(&[galore], &["optim.rank", "required"]);
    bad_recipe(
        &[galore, "optim.rank=200"],
        &["optim.rank", "min(m, n) = 128"],
    );
    bad_recipe(
        &[galore, "optim.rank=32", "optim.update_proj_gap=0"],
        &["optim.update_proj_gap"],
    );
    bad_recipe(&["optim.rank=32"], &["optim.rank", "only galore_adamw"]);
    bad_recipe(
        &["data.train=[\"/nonexistent/x\"]"],
        &["data.train", "/nonexistent/x"],
    );
    bad_recipe(&["train.max_bad_steps=0"], &["train.max_bad_steps"]);
    bad_recipe(
        &["train.precision=\"fp8\""],
        &["train.precision", "unknown variant"],
    );
    bad_recipe(
        &["train.recompute=\"full\""],
        &["train.recompute", "unknown variant"],
    );
    bad_recipe(&["parallel.zero=2"], &["parallel.zero = 2"]);
    bad_recipe(
        &["parallel.sequence=true"],
        &["parallel.sequence", "parallel.tp > 1"],
    );
    bad_recipe(
        &[
            "parallel.sequence=true",
            "parallel.tp=2",
            "model.scale_groups=2",
            "data.seq_len=127",
        ],
        &["data.seq_len", "127 positions", "parallel.tp = 2"],
    );
    bad_recipe(
        &[
            "parallel.vocab=true",
            "parallel.tp=2",
            "model.scale_groups=2",
            "model.vocab_size=4097",
        ],
        &["parallel.vocab", "4097 tokens", "multiple of 2"],
    );
    bad_recipe(
        &["model.sparsity.top_k=1.5"],
        &["model.sparsity.top_k", "(0, 1]"],
    );
    bad_recipe(&["model.sparsity.topk=0.5"], &["topk", "unknown field"]);
    bad_recipe(&["model.mlp=gelu"], &["model.mlp", "unknown variant"]);
    bad_recipe(
        &["model.linear=bitnet158"],
        &["model.linear", "unknown variant"],
    );
    bad_recipe(
        &["checkpoint.keep_lst=2"],
        &["checkpoint.keep_lst", "unknown field"],
    );
    bad_recipe(
        &["data.sources=[{paths=[\"data/sample/train\"]}]"],
        &["data.sources", "not both"],
    );
    bad_recipe(
        &[
            "data.train=[]",
            "data.sources=[{paths=[\"data/sample/train\"], weight=-1}]",
        ],
        &["data.sources[0].weight", "-1"],
    );
    bad_recipe(
        &[
            "data.train=[]",
            "data.sources=[{paths=[\"data/sample/train\"], wieght=1}]",
        ],
        &["data.sources[0].wieght", "unknown field"],
    );

    // The same from a file with a typo.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("recipes/tiny.toml"))
        .unwrap()
        .replace("seq_len", "seqlen");
    let p = dir.path().join("typo.toml");
    std::fs::write(&p, text).unwrap();
    let out = tern(&["train", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("typo.toml") && err.contains("data.seqlen"),
        "{err}"
    );
}

/// The block kinds' tiny recipes (Jamba, mixture of experts, mixture of attention heads,
/// Mixture-of-Depths): each trains from its recipe with a falling loss, and a run interrupted
/// at step 7 and resumed from its checkpoint repeats the uninterrupted run's losses bit for bit.
#[test]
fn every_block_kind_trains_and_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["jamba", "moe", "moa", "mod"] {
        let recipe = format!("recipes/{kind}-tiny.toml");
        let run = |name: &str, steps: u32, extra: &[&str]| {
            let path = dir.path().join(format!("{kind}-{name}"));
            let steps = format!("train.steps={steps}");
            #[rustfmt::skip]
            let mut args = vec![
                "train", &recipe, "--run-dir", path.to_str().unwrap(), "--set", &steps,
                "--set", "train.eval_every=4", "--set", "train.checkpoint_every=3",
                "--set", "data.seq_len=64",
            ];
            args.extend_from_slice(extra);
            ok(&tern(&args));
            losses(&path)
        };
        let full = run("full", 12, &[]);
        run("split", 7, &[]);
        let resumed = run("split", 12, &["--resume", "auto"]);
        assert_eq!(full.len(), 12, "{kind}");
        assert_eq!(full, resumed, "{kind}: resumed losses differ");
        let loss = |i: usize| full[i].1.parse::<f64>().unwrap();
        assert!(loss(11) < loss(0) - 0.3, "{kind}: the loss falls: {full:?}");
        // The weighted balancing and routing losses are logged beside the whole loss.
        let aux: Vec<f64> = metrics(&dir.path().join(format!("{kind}-full")))
            .iter()
            .filter_map(|v| v.get("aux_loss").and_then(Value::as_f64))
            .collect();
        assert_eq!(aux.len(), 12, "{kind}");
        assert!(aux.iter().all(|&a| a > 0.0 && a < 1.0), "{kind}: {aux:?}");
        // Block recompute: the same losses and auxiliary losses (3 steps).
        let recomputed = dir.path().join(format!("{kind}-recompute"));
        #[rustfmt::skip]
        ok(&tern(&[
            "train", &recipe, "--run-dir", recomputed.to_str().unwrap(), "--set", "train.steps=3",
            "--set", "train.eval_every=3", "--set", "train.checkpoint_every=3",
            "--set", "data.seq_len=64", "--set", "train.recompute=\"block\"",
        ]));
        let field = |run: &std::path::Path, key: &str| -> Vec<f64> {
            metrics(run)
                .iter()
                .filter_map(|v| v.get(key).and_then(Value::as_f64))
                .collect()
        };
        let plain_dir = dir.path().join(format!("{kind}-full"));
        for key in ["loss", "aux_loss"] {
            let (a, b) = (field(&plain_dir, key), field(&recomputed, key));
            assert_eq!(b.len(), 3, "{kind} {key}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * x.abs(), "{kind} {key}: {x} vs {y}");
            }
        }
        // Mixture-of-Depths logs the share of tokens its routed blocks pick.
        let shares: Vec<f64> = metrics(&dir.path().join(format!("{kind}-full")))
            .iter()
            .filter_map(|v| v.get("mod_share/layers.1").and_then(Value::as_f64))
            .collect();
        assert_eq!(shares.len(), if kind == "mod" { 12 } else { 0 }, "{kind}");
        assert!(shares.iter().all(|s| (0.0..=1.0).contains(s)), "{shares:?}");
        // Generation from the checkpoint (the burn path, with the blocks' caches).
        let run_dir = dir.path().join(format!("{kind}-full"));
        #[rustfmt::skip]
        let out = tern(&[
            "generate", "--model", run_dir.to_str().unwrap(), "--prompt", "The history of",
            "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--print-ids",
        ]);
        ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        let ids = text.lines().find_map(|l| l.strip_prefix("ids: ")).unwrap();
        assert_eq!(ids.split(',').count(), 6, "{kind}: {text}");
        // The packed format holds LLaMA blocks only, and says so.
        let packed = dir.path().join(format!("{kind}.tpk"));
        #[rustfmt::skip]
        let out = tern(&[
            "export", "--checkpoint", run_dir.to_str().unwrap(), "--format", "packed",
            "--out", packed.to_str().unwrap(),
        ]);
        fails_with(&out, &["LLaMA blocks only", "tern generate"]);
    }
}

/// GaLore over a Jamba's matrices (attention, experts, Mamba's projections): it trains, and
/// resumes bit for bit with its projections and low-rank moments from the checkpoint.
#[test]
fn galore_trains_a_jamba_and_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, steps: u32, extra: &[&str]| {
        let path = dir.path().join(name);
        let steps = format!("train.steps={steps}");
        #[rustfmt::skip]
        let mut args = vec![
            "train", "recipes/jamba-tiny.toml", "--run-dir", path.to_str().unwrap(),
            "--set", &steps, "--set", "train.eval_every=4", "--set", "train.checkpoint_every=3",
            "--set", "data.seq_len=64",
        ];
        args.extend_from_slice(GALORE);
        args.extend_from_slice(extra);
        ok(&tern(&args));
        losses(&path)
    };
    let full = run("full", 10, &[]);
    run("split", 6, &[]);
    assert_eq!(full, run("split", 10, &["--resume", "auto"]));
    let loss = |i: usize| full[i].1.parse::<f64>().unwrap();
    assert!(loss(9) < loss(0), "{full:?}");
}
