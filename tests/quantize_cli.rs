//! `tern quantize` end to end: GPTQ and round-to-nearest at every width on a small float model,
//! its packed, Hugging Face and GGUF outputs, and its refusals.

mod common;

use std::path::Path;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn eval_loss(model: &Path) -> f64 {
    #[rustfmt::skip]
    let out = tern(&["eval", "--model", s(model), "--recipe", "recipes/tiny.toml", "--seq-len", "64", "--max-blocks", "32"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let i = text.find("| loss ").expect("a loss") + 7;
    text[i..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A float model of the tiny recipe's shape, 100 steps: quantized weights
/// cost the validation loss little at 8 bits and GPTQ less than round-to-nearest at 3; the packed
/// file is its Hugging Face export's model (dequantized), and the GGUF's Q4_0 / Q8_0 blocks hold
/// exactly those values (gguf-py, data-prep/check_gguf.py). Widths llama.cpp's blocks cannot
/// hold, a missing calibration and a ternary model are refused by name.
#[test]
fn gptq_and_rtn_quantize_a_float_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("float");
    let mut args = tiny_train(&run);
    #[rustfmt::skip]
    args.extend(["--set", "model.linear=\"float\"", "--set", "train.steps=100", "--set", "optim.decay_steps=100"]);
    ok(&tern(&args));
    let float = eval_loss(&run);
    let calib = ["--calib", "data/sample/train", "--calib-seqs", "16"];
    let mut loss = std::collections::HashMap::new();
    for method in ["rtn", "gptq"] {
        for bits in ["8", "4", "3"] {
            let out = dir.path().join(format!("{method}{bits}.tpk"));
            #[rustfmt::skip]
            let mut a = vec!["quantize", "--checkpoint", s(&run), "--method", method, "--bits", bits, "--out", s(&out)];
            if method == "gptq" {
                a.extend(calib);
            }
            let r = tern(&a);
            ok(&r);
            let text = String::from_utf8_lossy(&r.stdout).to_string();
            // 4 blocks x 7 projections, `bits` a code plus an f16 scale per 32 weights.
            let want = format!("{:.3} bits/param", bits.parse::<f64>().unwrap() + 0.5);
            assert!(
                text.contains("28 projections") && text.contains(&want),
                "{text}"
            );
            let l = eval_loss(&out);
            eprintln!("{method} {bits} bits: loss {l:.6} (float {float:.6})");
            loss.insert((method, bits), l);
        }
    }
    for method in ["rtn", "gptq"] {
        let l8 = loss[&(method, "8")];
        assert!(
            (l8 - float).abs() < 2e-3 * float,
            "{method} 8 bits: {l8} vs float {float}"
        );
    }
    assert!(
        loss[&("gptq", "3")] < loss[&("rtn", "3")],
        "GPTQ at 3 bits ({}) should beat round-to-nearest ({})",
        loss[&("gptq", "3")],
        loss[&("rtn", "3")]
    );

    // The packed file against its Hugging Face export (dequantized f32), through two runtimes.
    let packed = dir.path().join("gptq4.tpk");
    let hf = dir.path().join("gptq4-hf");
    #[rustfmt::skip]
    ok(&tern(&["export", "--checkpoint", s(&packed), "--format", "hf", "--out", s(&hf)]));
    let ids = dir.path().join("ids.safetensors");
    let id_list: Vec<i64> = (0..2 * 16).map(|i| (i * 211 + 3) % 4096).collect();
    write_input_ids(&ids, &id_list, [2, 16]);
    let logits = |m: &Path| {
        let out = dir.path().join("l.safetensors");
        #[rustfmt::skip]
        ok(&tern(&["logits", "--model", s(m), "--input-ids", s(&ids), "--out", s(&out)]));
        read_logits(&out).1
    };
    let (a, b) = (logits(&packed), logits(&hf));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-4, "packed vs its Hugging Face export: {d}");

    // GGUF: 4 and 8 bits in Q4_0 / Q8_0, read back exactly by gguf-py.
    for (bits, ty) in [("4", "Q4_0"), ("8", "Q8_0")] {
        let g = dir.path().join(format!("q{bits}.gguf"));
        let hf = dir.path().join(format!("q{bits}-hf"));
        #[rustfmt::skip]
        let base = ["quantize", "--checkpoint", s(&run), "--bits", bits, "--calib", "data/sample/train", "--calib-seqs", "8"];
        let mut a = base.to_vec();
        a.extend(["--format", "gguf", "--out", s(&g)]);
        ok(&tern(&a));
        let mut a = base.to_vec();
        a.extend(["--format", "hf", "--out", s(&hf)]);
        ok(&tern(&a));
        let out = std::process::Command::new("python3")
            .arg(repo().join("data-prep/check_gguf.py"))
            .args([s(&g), s(&hf), "--ternary", ty, "--embed", "F32"])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "check_gguf.py {ty}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Refusals.
    let g = dir.path().join("q6.gguf");
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&run), "--bits", "6", "--method", "rtn", "--format", "gguf", "--out", s(&g)]);
    fails_with(&r, &["Q6_K", "--format packed"]);
    assert!(!g.exists());
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&run), "--bits", "4", "--group-size", "64", "--method", "rtn", "--format", "gguf", "--out", s(&g)]);
    fails_with(&r, &["--group-size 64", "32"]);
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&run), "--bits", "4", "--method", "rtn", "--act-order", "--out", s(&g)]);
    fails_with(&r, &["--act-order", "rtn"]);
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&run), "--bits", "4", "--out", s(&g)]);
    fails_with(&r, &["--calib"]);
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&run), "--bits", "5", "--method", "rtn", "--out", s(&g)]);
    fails_with(&r, &["--bits 5", "3, 4, 6 and 8"]);
    let tri = dir.path().join("tri");
    let mut args = tiny_train(&tri);
    args.extend(SMALL_MODEL);
    args.extend(["--set", "train.steps=2"]);
    ok(&tern(&args));
    #[rustfmt::skip]
    let r = tern(&["quantize", "--checkpoint", s(&tri), "--bits", "4", "--method", "rtn", "--out", s(&g)]);
    fails_with(&r, &["float model", "Ternary"]);
}
