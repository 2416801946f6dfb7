//! Packed ternary export, inference on packed codes, generation, evaluation, Hugging Face and
//! GGUF export, end to end through the `tern` binary.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The number after "loss " in `tern eval`'s line.
fn eval_loss(text: &str) -> f64 {
    let after = text.split("loss ").nth(1).expect("a loss in the output");
    after.split(' ').next().unwrap().parse().unwrap()
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/packed-tiny")
}

/// A ternary run of the small model with 2 scale groups: 12 steps, validation at the end (made once).
fn run() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("run");
        let mut args = tiny_train(&dir);
        args.extend(SMALL_MODEL);
        #[rustfmt::skip]
        args.extend([
            "--set", "model.scale_groups=2", "--set", "train.steps=12", "--set", "train.eval_every=12",
            "--set", "train.eval_batches=2",
        ]);
        ok(&tern(&args));
        dir
    })
}

/// tern's packed file and its Hugging Face export give the logits transformers computes on that
/// export (tests/fixtures/packed-tiny, data-prep/hf_export_fixture.py): the packed kernel (AVX2
/// and portable), and burn on the exported directory.
#[test]
fn packed_and_hugging_face_exports_match_transformers() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (shape, want) = read_logits(&f.join("transformers_logits.safetensors"));
    let ids = f.join("input_ids.safetensors");
    let model = f.join("model.tpk");
    let hf = dir.path().join("hf");
    ok(&tern(&[
        "export",
        "--checkpoint",
        s(&model),
        "--format",
        "hf",
        "--out",
        s(&hf),
    ]));
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(name).is_file(), "{name} missing from the export");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["tie_word_embeddings"], true);
    // tokenizer_config.json names the special tokens (transformers' AutoTokenizer has no bos / eos
    // without it, and lm-evaluation-harness no prefix token); they are config.json's ids.
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    for (key, id_key, want) in [
        ("bos_token", "bos_token_id", "<s>"),
        ("eos_token", "eos_token_id", "</s>"),
    ] {
        assert_eq!(tc[key], want, "{tc}");
        assert_eq!(
            tok.token_to_id(want).map(|i| i as u64),
            cfg[id_key].as_u64(),
            "{key}"
        );
    }
    assert_eq!(tc["unk_token"], "<unk>");
    for (label, src, no_simd) in [
        ("packed", &model, false),
        ("packed, portable kernel", &model, true),
        ("hf export", &hf, false),
    ] {
        let out = dir.path().join("logits.safetensors");
        let mut cmd = tern_cmd(0);
        cmd.args([
            "logits",
            "--model",
            s(src),
            "--input-ids",
            s(&ids),
            "--out",
            s(&out),
        ]);
        if no_simd {
            cmd.env("TERN_NO_SIMD", "1");
        }
        ok(&cmd.output().unwrap());
        let (got_shape, got) = read_logits(&out);
        assert_eq!(got_shape, shape);
        let d = max_diff(&got, &want);
        // Measured 8.3e-7 (packed, either kernel) and 7.2e-7 (burn on the export).
        assert!(d < 2e-6, "{label}: max |logit - transformers| = {d}");
    }
}

/// The packed file computes what the checkpoint computes: logits (2-bit and base-3 codes give the
/// same), `tern eval` reproduces the run's validation loss on the same blocks, sizes are counted.
#[test]
fn packed_model_is_the_trained_checkpoint() {
    let run = run();
    let dir = tempfile::tempdir().unwrap();
    let p2 = dir.path().join("m2.tpk");
    let p3 = dir.path().join("m3.tpk");
    let p3h = dir.path().join("m3h.tpk");
    let out = tern(&[
        "export",
        "--checkpoint",
        s(run),
        "--format",
        "packed",
        "--out",
        s(&p2),
    ]);
    ok(&out);
    let report = stdout(&out);
    assert!(
        report.contains("2.0") && report.contains("bits/param"),
        "{report}"
    );
    #[rustfmt::skip]
    ok(&tern(&["export", "--checkpoint", s(run), "--format", "packed", "--codes", "base3", "--out", s(&p3)]));
    #[rustfmt::skip]
    let out = tern(&["export", "--checkpoint", s(run), "--format", "packed", "--codes", "base3", "--float-dtype", "f16", "--out", s(&p3h)]);
    ok(&out);
    // Ternary bytes from the shapes (hidden 64, kv 32, intermediate 128, 2 layers): rows of
    // ceil(cols / 5) bytes, plus 2 f32 scales a matrix.
    let shapes = [
        (64, 64),
        (32, 64),
        (32, 64),
        (64, 64),
        (128, 64),
        (128, 64),
        (64, 128),
    ];
    let params: usize = 2 * shapes.iter().map(|(r, c)| r * c).sum::<usize>();
    let bytes: usize = 2 * shapes
        .iter()
        .map(|(r, c)| r * c.div_ceil(5) + 8)
        .sum::<usize>();
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "ternary matrices: {params} params in {bytes} bytes = {:.3} bits/param",
            8.0 * bytes as f64 / params as f64
        )),
        "{text}"
    );
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&p3) < size(&p2) && size(&p3h) < size(&p3));
    // A packed file re-exported with other codes is stored as asked.
    let p3b = dir.path().join("m3b.tpk");
    #[rustfmt::skip]
    ok(&tern(&["export", "--checkpoint", s(&p2), "--format", "packed", "--codes", "base3", "--out", s(&p3b)]));
    let b = std::fs::read(&p3b).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["encoding"], "base3");
    // down_proj [64, 128]: 26 bytes a row in base 3.
    assert_eq!(
        header["layers.0.mlp.down_proj.weight.codes"]["shape"],
        serde_json::json!([64, 26])
    );

    // Logits: checkpoint through burn vs the packed kernel.
    let ids_file = dir.path().join("ids.safetensors");
    let ids: Vec<i64> = (0..2 * 20).map(|i| (i * 97 + 5) % 4096).collect();
    write_input_ids(&ids_file, &ids, [2, 20]);
    let logits = |m: &Path| {
        let out = dir.path().join("l.safetensors");
        ok(&tern(&[
            "logits",
            "--model",
            s(m),
            "--input-ids",
            s(&ids_file),
            "--out",
            s(&out),
        ]));
        read_logits(&out).1
    };
    let burn = logits(run);
    let l2 = logits(&p2);
    let l3 = logits(&p3);
    let d = max_diff(&burn, &l2);
    // Measured 4.2e-7: the same codes and scales, products summed in another order.
    assert!(d < 1e-6, "checkpoint vs packed: {d}");
    assert_eq!(l2, l3, "2-bit and base-3 codes are the same model");

    // Validation loss of the run's last evaluation: 2 micro-batches of 8 blocks of 64 tokens.
    let val = metrics(run)
        .iter()
        .filter_map(|m| m["val_loss"].as_f64())
        .next_back()
        .unwrap();
    for m in [&p2, &p3h] {
        #[rustfmt::skip]
        let out = tern(&["eval", "--model", s(m), "--recipe", "recipes/tiny.toml", "--seq-len", "64", "--max-blocks", "16"]);
        ok(&out);
        let text = stdout(&out);
        let loss = eval_loss(&text);
        // f16 embeddings (p3h) move it slightly; the f32 file is the run's model.
        let tol = if m == &p2 { 1e-5 } else { 1e-3 };
        assert!(
            (loss - val).abs() < tol * val,
            "eval {loss} vs run's val_loss {val}"
        );
        assert!(
            text.contains("16 blocks of 64 tokens") && text.contains("perplexity"),
            "{text}"
        );
    }
    // --data with the tokenizer packed in the file: the same blocks, the same loss.
    #[rustfmt::skip]
    let out = tern(&["eval", "--model", s(&p2), "--data", "data/sample/validation", "--seq-len", "64", "--max-blocks", "16"]);
    ok(&out);
    let text = stdout(&out);
    let loss = eval_loss(&text);
    assert!(
        (loss - val).abs() < 1e-5 * val,
        "eval --data {loss} vs run's val_loss {val}"
    );
}

/// Generation: the same seed gives the same text, another seed another; greedy decoding with the
/// KV cache picks, at every step, the argmax of a full forward pass of burn's model on the
/// Hugging Face export.
#[test]
fn generation_is_seeded_and_agrees_with_full_forward_passes() {
    let model = fixture().join("model.tpk");
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "The city of",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--print-ids",
        ];
        a.extend(extra);
        let out = tern(&a);
        ok(&out);
        let text = stdout(&out);
        let ids: Vec<i64> =
            serde_json::from_str(text.lines().find_map(|l| l.strip_prefix("ids: ")).unwrap())
                .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("tokens/s"), "{err}");
        (text, ids)
    };
    let a = gen(&["--seed", "1", "--temperature", "1.0"]);
    let b = gen(&["--seed", "1", "--temperature", "1.0"]);
    let c = gen(&["--seed", "2", "--temperature", "1.0"]);
    assert_eq!(a, b);
    assert_eq!(a.1.len(), 12);
    assert_ne!(a.1, c.1);
    assert!(a.0.starts_with("The city of"), "{}", a.0);

    let (_, greedy) = gen(&["--temperature", "0", "--repetition-penalty", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    ok(&tern(&[
        "export",
        "--checkpoint",
        s(&model),
        "--format",
        "hf",
        "--out",
        s(&hf),
    ]));
    let tok = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let prompt: Vec<i64> = tok
        .encode("The city of", false)
        .unwrap()
        .get_ids()
        .iter()
        .map(|&i| i as i64)
        .collect();
    let all: Vec<i64> = prompt.iter().chain(&greedy).copied().collect();
    let ids_file = dir.path().join("ids.safetensors");
    write_input_ids(&ids_file, &all, [1, all.len()]);
    let out = dir.path().join("l.safetensors");
    ok(&tern(&[
        "logits",
        "--model",
        s(&hf),
        "--input-ids",
        s(&ids_file),
        "--out",
        s(&out),
    ]));
    let (shape, logits) = read_logits(&out);
    let vocab = shape[2];
    for (k, &tok_id) in greedy.iter().enumerate() {
        let row = &logits[(prompt.len() + k - 1) * vocab..][..vocab];
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        // A near-tie may flip between the two implementations' roundings; anything else is a bug.
        assert!(
            best.0 as i64 == tok_id || (best.1 - row[tok_id as usize]).abs() < 1e-4,
            "step {k}: generated {tok_id}, full forward argmax {}",
            best.0
        );
    }

    // --interactive: two lines, two continuations of the same conversation, then end of input.
    let mut child = tern_cmd(0)
        .args([
            "generate",
            "--model",
            s(&model),
            "--interactive",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The river\nIn the year\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("generated in").count(), 2, "{err}");
}

/// Reads a GGUF v3 header: tensor name -> (dims in ggml order, type, absolute data offset).
fn gguf_tensors(bytes: &[u8]) -> std::collections::HashMap<String, (Vec<u64>, u32, usize)> {
    let mut p = 0usize;
    let mut take = |n: usize| {
        let s = &bytes[p..p + n];
        p += n;
        s
    };
    assert_eq!(take(4), b"GGUF");
    assert_eq!(u32::from_le_bytes(take(4).try_into().unwrap()), 3);
    let n_tensors = u64::from_le_bytes(take(8).try_into().unwrap());
    let n_kv = u64::from_le_bytes(take(8).try_into().unwrap());
    fn skip_value(take: &mut dyn FnMut(usize) -> Vec<u8>, ty: u32) {
        let u64_of = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => drop(take(1)),
            2 | 3 => drop(take(2)),
            4..=6 => drop(take(4)),
            10..=12 => drop(take(8)),
            8 => {
                let n = u64_of(take(8));
                take(n);
            }
            9 => {
                let et = u32::from_le_bytes(take(4).try_into().unwrap());
                let n = u64_of(take(8));
                for _ in 0..n {
                    skip_value(take, et);
                }
            }
            _ => panic!("value type {ty}"),
        }
    }
    let mut owned = |n: usize| take(n).to_vec();
    for _ in 0..n_kv {
        let n = u64::from_le_bytes(owned(8).try_into().unwrap()) as usize;
        owned(n);
        let ty = u32::from_le_bytes(owned(4).try_into().unwrap());
        skip_value(&mut owned, ty);
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let n = u64::from_le_bytes(owned(8).try_into().unwrap()) as usize;
        let name = String::from_utf8(owned(n)).unwrap();
        let nd = u32::from_le_bytes(owned(4).try_into().unwrap());
        let dims: Vec<u64> = (0..nd)
            .map(|_| u64::from_le_bytes(owned(8).try_into().unwrap()))
            .collect();
        let ty = u32::from_le_bytes(owned(4).try_into().unwrap());
        let off = u64::from_le_bytes(owned(8).try_into().unwrap()) as usize;
        infos.push((name, dims, ty, off));
    }
    let data_start = p.div_ceil(32) * 32;
    infos
        .into_iter()
        .map(|(n, d, t, o)| (n, (d, t, data_start + o)))
        .collect()
}

/// GGUF export: gguf-py (llama.cpp's reader) finds the types, shapes and every dequantized value
/// of the Hugging Face export (data-prep/check_gguf.py), for TQ2_0 and TQ1_0; one TQ2_0 block
/// equals its hand-computed bytes; a model whose rows do not fill 256-weight blocks is refused
/// naming the tensor.
#[test]
fn gguf_export_is_read_back_by_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run512");
    let mut args = tiny_train(&run);
    #[rustfmt::skip]
    args.extend([
        "--set", "model.hidden=512", "--set", "model.intermediate=1024", "--set", "model.n_layers=1",
        "--set", "model.n_heads=8", "--set", "model.n_kv_heads=2", "--set", "model.scale_groups=2",
        "--set", "data.seq_len=32", "--set", "train.global_batch=8", "--set", "train.steps=2",
        "--set", "optim.warmup_steps=1", "--set", "optim.decay_steps=2", "--set", "train.eval_every=0",
    ]);
    ok(&tern(&args));
    let hf = dir.path().join("hf");
    ok(&tern(&[
        "export",
        "--checkpoint",
        s(&run),
        "--format",
        "hf",
        "--out",
        s(&hf),
    ]));
    for (codes, embed) in [("tq2_0", "f32"), ("tq1_0", "f16")] {
        let g = dir.path().join(format!("{codes}.gguf"));
        #[rustfmt::skip]
        ok(&tern(&["export", "--checkpoint", s(&run), "--format", "gguf", "--codes", codes, "--float-dtype", embed, "--out", s(&g)]));
        let out = std::process::Command::new("python3")
            .arg(repo().join("data-prep/check_gguf.py"))
            .args([
                s(&g),
                s(&hf),
                "--ternary",
                &codes.to_uppercase(),
                "--embed",
                &embed.to_uppercase(),
            ])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "check_gguf.py {codes}: {}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(report["tensors"], 12);
    }

    // The first TQ2_0 block of blk.0.attn_v.weight by hand from the Hugging Face export's values
    // (v has no rotary permutation): d = the block's |w| (all nonzero |w| equal), code = w / d + 1,
    // byte m of each 32-byte half holds weights m + 32 n of that half's 128 at bits 2n.
    let bytes = std::fs::read(dir.path().join("tq2_0.gguf")).unwrap();
    let tensors = gguf_tensors(&bytes);
    let (dims, ty, off) = &tensors["blk.0.attn_v.weight"];
    assert_eq!((dims.as_slice(), *ty), (&[512u64, 128][..], 35));
    let st_bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let v: Vec<f32> = st
        .tensor("model.layers.0.self_attn.v_proj.weight")
        .unwrap()
        .data()
        .chunks_exact(4)
        .take(256)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let d = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut want = [0u8; 66];
    for (i, &w) in v.iter().enumerate() {
        let code = ((w / d).round() + 1.0) as u8;
        let (half, j) = (i / 128, i % 128);
        want[32 * half + j % 32] |= code << (2 * (j / 32));
    }
    let d16 = f16_bits(d);
    want[64..].copy_from_slice(&d16.to_le_bytes());
    assert_eq!(&bytes[*off..*off + 66], &want[..]);
    // output_norm.weight is f32, bytes as in the export.
    let (_, ty, off) = &tensors["output_norm.weight"];
    assert_eq!(*ty, 0);
    assert_eq!(
        &bytes[*off..*off + 2048],
        st.tensor("model.norm.weight").unwrap().data()
    );

    // Rows of 64 weights do not fill a block.
    let small = run_small(dir.path());
    let out = tern(&[
        "export",
        "--checkpoint",
        s(&small),
        "--format",
        "gguf",
        "--out",
        s(&dir.path().join("x.gguf")),
    ]);
    fails_with(&out, &["blk.0.attn_q.weight", "256"]);
}

/// fp16 bits of a float (round to nearest even), written out for the hand-computed block.
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let mant = b & 0x7f_ffff;
    assert!((1..31).contains(&exp), "normal fp16 range only");
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// The small model trained 2 steps (hidden 64).
fn run_small(dir: &Path) -> PathBuf {
    let run = dir.join("small");
    let mut args = tiny_train(&run);
    args.extend(SMALL_MODEL);
    args.extend(["--set", "train.steps=2", "--set", "train.eval_every=0"]);
    ok(&tern(&args));
    run
}

/// Bad input: a damaged packed file names the file or tensor; option mistakes name the option.
#[test]
fn bad_packed_files_and_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture().join("model.tpk");
    let mut bytes = std::fs::read(&src).unwrap();
    // A 2-bit code of 3 in the first codes byte of a ternary matrix.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = header["layers.0.mlp.up_proj.weight.codes"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[8 + header_len + start] = 0xff;
    let bad = dir.path().join("bad.tpk");
    std::fs::write(&bad, &bytes).unwrap();
    let ids = fixture().join("input_ids.safetensors");
    let out_file = dir.path().join("l.safetensors");
    let out = tern(&[
        "logits",
        "--model",
        s(&bad),
        "--input-ids",
        s(&ids),
        "--out",
        s(&out_file),
    ]);
    fails_with(&out, &["bad.tpk", "layers.0.mlp.up_proj.weight", "code 3"]);
    // Truncated.
    let cut = dir.path().join("cut.tpk");
    std::fs::write(&cut, &std::fs::read(&src).unwrap()[..1000]).unwrap();
    fails_with(
        &tern(&["generate", "--model", s(&cut), "--prompt", "a"]),
        &["cut.tpk"],
    );
    // Options.
    #[rustfmt::skip]
    fails_with(&tern(&["export", "--checkpoint", s(&src), "--format", "packed", "--codes", "tq2_0", "--out", "x"]), &["--codes", "tq2_0"]);
    #[rustfmt::skip]
    fails_with(&tern(&["generate", "--model", s(&src), "--prompt", "a", "--top-p", "0"]), &["--top-p"]);
    fails_with(&tern(&["generate", "--model", s(&src)]), &["--prompt"]);
    #[rustfmt::skip]
    fails_with(&tern(&["eval", "--model", s(&src), "--data", "data/sample/validation"]), &["--seq-len"]);
    assert!(!out_file.exists());
}

/// BitNet b1.58, Q-Sparse (top-K, quantized and rescaled, on float, ternary and BitNet
/// projections) and ReLU² GLU run packed: the packed file's logits are the checkpoint's (burn),
/// on every instruction set; `--activations int8` leaves BitNet exact (its inputs are 8-bit
/// integers already) and moves a TriLM only a little; the exports to Llama formats are refused by
/// name, writing nothing.
#[test]
fn bitnet_qsparse_and_relu2_packed_models_are_their_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ids_file = dir.path().join("ids.safetensors");
    let ids: Vec<i64> = (0..2 * 24).map(|i| (i * 131 + 7) % 4096).collect();
    write_input_ids(&ids_file, &ids, [2, 24]);
    let logits = |m: &Path, extra: &[&str], env: Option<&str>| {
        let out = dir.path().join("l.safetensors");
        let mut cmd = tern_cmd(0);
        #[rustfmt::skip]
        cmd.args(["logits", "--model", s(m), "--input-ids", s(&ids_file), "--out", s(&out)]);
        cmd.args(extra);
        if let Some(var) = env {
            cmd.env(var, "1");
        }
        ok(&cmd.output().unwrap());
        read_logits(&out).1
    };
    #[rustfmt::skip]
    let kinds: [(&str, &[&str]); 5] = [
        ("bitnet", &["--set", "model.linear=\"bitnet\"", "--set", "model.scale_groups=2"]),
        ("bitnet-qsparse", &["--set", "model.linear=\"bitnet\"", "--set", "model.sparsity.top_k=0.5",
            "--set", "model.sparsity.quantized=true", "--set", "model.sparsity.rescale=true"]),
        ("ternary-relu2-qsparse", &["--set", "model.mlp=\"relu2glu\"", "--set", "model.sparsity.top_k=0.5",
            "--set", "model.sparsity.attn_top_k=0.75"]),
        ("ternary-qsparse-quantized", &["--set", "model.sparsity.mlp_top_k=0.4",
            "--set", "model.sparsity.quantized=true", "--set", "model.sparsity.rescale=true"]),
        ("float-relu2-qsparse", &["--set", "model.linear=\"float\"", "--set", "model.mlp=\"relu2glu\"",
            "--set", "model.sparsity.top_k=0.3", "--set", "model.sparsity.rescale=true"]),
    ];
    for (name, sets) in kinds {
        let run = dir.path().join(name);
        let mut args = tiny_train(&run);
        args.extend(SMALL_MODEL);
        args.extend(["--set", "train.steps=6"]);
        args.extend(sets);
        ok(&tern(&args));
        let packed = dir.path().join(format!("{name}.tpk"));
        #[rustfmt::skip]
        ok(&tern(&["export", "--checkpoint", s(&run), "--format", "packed", "--out", s(&packed)]));
        let burn = logits(&run, &[], None);
        for env in [None, Some("TERN_NO_AVX512"), Some("TERN_NO_SIMD")] {
            let d = max_diff(&burn, &logits(&packed, &[], env));
            eprintln!("{name} ({env:?}): checkpoint vs packed {d:.2e}");
            assert!(
                d < 1e-4,
                "{name} ({env:?}): checkpoint vs packed logits differ by {d}"
            );
        }
        let int8 = logits(&packed, &["--activations", "int8"], None);
        let d = max_diff(&burn, &int8);
        let top = burn.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!(
            "{name}: checkpoint vs packed with int8 activations {d:.2e} (logits up to {top:.2})"
        );
        if name.starts_with("bitnet") {
            assert!(
                d < 1e-4,
                "{name}: --activations int8 moved BitNet's logits by {d}"
            );
        } else if name.starts_with("ternary") {
            assert!(
                d > 0.0 && d < 0.1,
                "{name}: int8 activations moved logits by {d}"
            );
        }
        for (format, what) in [("hf", "Llama"), ("gguf", "Llama")] {
            let out = dir.path().join(format!("{name}.{format}"));
            #[rustfmt::skip]
            let r = tern(&["export", "--checkpoint", s(&run), "--format", format, "--out", s(&out),
                "--tokenizer", "data/sample/tokenizer.json"]);
            let err = String::from_utf8_lossy(&r.stderr).to_string();
            assert!(
                !r.status.success() && err.contains(what) && err.contains("--format packed"),
                "{name} {format}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                !out.exists(),
                "{name} {format}: a refused export wrote {}",
                out.display()
            );
        }
    }
}

/// Unpacked TriLMs (data-prep/trilm_fixture.py: f16 values `scale_g * {-1, 0, 1}`, 2 shards named
/// in config.json, 3 found from the values) pack losslessly: the packed model's logits are
/// transformers' on the unpacked directory, its scales one per shard along the right axis, and
/// its Hugging Face re-export is the same model again. A float Llama is refused by tensor name.
#[test]
fn unpacked_trilms_import_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    for (mp, how) in [
        (2, "pretraining_model_parallel"),
        (3, "found from the values"),
    ] {
        let src = repo().join(format!("tests/fixtures/trilm-mp{mp}"));
        let packed = dir.path().join(format!("mp{mp}.tpk"));
        #[rustfmt::skip]
        let out = tern(&["export", "--from-hf", s(&src), "--format", "packed", "--out", s(&packed)]);
        ok(&out);
        let text = stdout(&out);
        assert!(
            text.contains(&format!("a TriLM with {mp} scale group(s)")) && text.contains(how),
            "{text}"
        );
        let b = std::fs::read(&packed).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        for (name, shape) in [
            ("layers.1.self_attn.k_proj", [mp, 1]),
            ("layers.0.mlp.down_proj", [1, mp]),
        ] {
            assert_eq!(
                header[format!("{name}.weight.scales")]["shape"],
                serde_json::json!(shape),
                "{name}"
            );
        }
        let (_, want) = read_logits(&src.join("transformers_logits.safetensors"));
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let ids = src.join("input_ids.safetensors");
        let logits = |m: &Path| {
            let out = dir.path().join("l.safetensors");
            #[rustfmt::skip]
            ok(&tern(&["logits", "--model", s(m), "--input-ids", s(&ids), "--out", s(&out)]));
            read_logits(&out).1
        };
        let d = max_diff(&logits(&packed), &want);
        eprintln!("mp {mp}: packed vs transformers {d:.2e} (logits up to {top:.1})");
        assert!(
            d <= 1e-4 * top,
            "mp {mp}: packed vs transformers differ by {d}"
        );
        // Back to an unpacked directory (scale x code in f32): the same function, and importable.
        let hf = dir.path().join(format!("mp{mp}-hf"));
        #[rustfmt::skip]
        ok(&tern(&["export", "--checkpoint", s(&packed), "--format", "hf", "--out", s(&hf)]));
        let d = max_diff(&logits(&hf), &want);
        assert!(
            d <= 1e-4 * top,
            "mp {mp}: re-exported directory differs by {d}"
        );
        let again = dir.path().join(format!("mp{mp}-again.tpk"));
        #[rustfmt::skip]
        ok(&tern(&["export", "--from-hf", s(&hf), "--format", "packed", "--out", s(&again)]));
        assert_eq!(
            logits(&again),
            logits(&packed),
            "mp {mp}: the round trip changed the model"
        );
    }
    let float = repo().join("tests/fixtures/hf-llama/untied-f32");
    let out = dir.path().join("float.tpk");
    #[rustfmt::skip]
    let r = tern(&["export", "--from-hf", s(&float), "--format", "packed", "--out", s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success()
            && err
                .contains("layers.0.self_attn.q_proj.weight is not ternary times per-shard scales")
            && err.contains("distinct nonzero magnitudes"),
        "{err}"
    );
    assert!(!out.exists() && !err.contains("panicked"));
}
