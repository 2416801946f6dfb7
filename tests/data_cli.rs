//! `tern prep` and `tern data` on real shards: the LITPKDS fixture (shards TinyLlama's builder
//! wrote, data-prep/litpkds_fixture.py), tern's HDF5 shards read by h5py, and training on a
//! weighted mix of both.

mod common;

use common::{fails_with, ok, repo, tern, tern_cmd, SMALL_MODEL};
use serde_json::Value;

/// `tern prep --input INPUT --tokenizer <the sample's> --out OUT EXTRA...`, which must succeed.
fn prep(input: &str, out: &str, extra: &[&str]) -> std::process::Output {
    #[rustfmt::skip]
    let mut args = vec![
        "prep", "--input", input, "--tokenizer", "data/sample/tokenizer.json", "--out", out,
    ];
    args.extend_from_slice(extra);
    let o = tern(&args);
    ok(&o);
    o
}

#[test]
fn stats_and_head_of_tinyllama_shards() {
    let dir = "tests/fixtures/litpkds";
    let out = tern(&["data", "stats", dir]);
    ok(&out);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let docs: Vec<Vec<u32>> = serde_json::from_str(
        &std::fs::read_to_string(repo().join(dir).join("documents.json")).unwrap(),
    )
    .unwrap();
    let kept: Vec<u32> = docs.concat()[..48].to_vec();
    assert_eq!(s["files"], 3);
    assert_eq!(s["tokens"], 48);
    assert_eq!(s["dtype"], "u16");
    assert_eq!(s["documents"], kept.iter().filter(|&&t| t == 2).count());
    assert_eq!(s["max_token_id"], *kept.iter().max().unwrap());

    let out = tern(&[
        "data",
        "head",
        &format!("{dir}/train_slimpajama_0_0000000001.bin"),
        "--tokens",
        "5",
    ]);
    ok(&out);
    let head: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(head, kept[16..21]);

    // A corrupt shard: an error naming the file, no panic.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.bin");
    let mut bytes =
        std::fs::read(repo().join(dir).join("train_slimpajama_0_0000000000.bin")).unwrap();
    bytes.truncate(40);
    std::fs::write(&bad, bytes).unwrap();
    let out = tern(&["data", "stats", bad.to_str().unwrap()]);
    fails_with(&out, &["bad.bin", "truncated"]);
}

#[test]
fn prep_writes_shards_that_stats_reads_and_a_rerun_skips() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let args = ["--chunk-size", "4098", "--split", "validation"];
    let first = prep("data/sample/validation", o, &args);
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(text.contains("1 worker(s) ran, 0 already done"), "{text}");
    let shards: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    assert!(
        shards.contains(&"validation_slimpajama_0_0000000000.bin".to_string()),
        "{shards:?}"
    );
    let stats = tern(&["data", "stats", o]);
    let s: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(s["tokens"], 4098 * shards.len());
    assert_eq!(s["dtype"], "u16");
    let again = prep("data/sample/validation", o, &args);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 worker(s) ran, 1 already done"));
}

/// h5py's view of a shard: attributes, dtype, layout, the first tokens and the document offsets.
fn h5py_view(path: &str) -> Value {
    let script = r#"
import json, sys, h5py
f = h5py.File(sys.argv[1], "r")
t = f["tokens"]
print(json.dumps({
    "attrs": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()},
    "dtype": str(t.dtype), "chunks": t.chunks, "compression": t.compression,
    "tokens": t[:].tolist(), "doc_offsets": f["doc_offsets"][:].tolist(),
}))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, path])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 with h5py (launch/setup.sh installs it) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn hdf5_shards_are_what_h5py_reads_and_the_tokenizer_encodes() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    #[rustfmt::skip]
    prep("data/sample/validation", o, &[
        "--format", "hdf5", "--chunk-size", "20000", "--split", "validation",
    ]);
    let mut shards: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|n| n.ends_with(".h5"))
        .collect();
    shards.sort();
    assert!(shards.len() > 1, "{shards:?}");
    assert!(shards[0].ends_with("validation_slimpajama_0_0000000000.h5"));
    let (mut all, mut docs) = (Vec::<u64>::new(), 0u64);
    for s in &shards {
        let v = h5py_view(s);
        let a = &v["attrs"];
        assert_eq!(a["format"], "tern-tokens");
        assert_eq!(a["version"], 1);
        assert_eq!(a["vocab_size"], 4096);
        assert_eq!(a["eos_id"], 2);
        assert_eq!(a["tokenizer_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(v["dtype"], "uint16");
        assert_eq!(v["chunks"], Value::Null, "contiguous");
        assert_eq!(v["compression"], Value::Null);
        let t: Vec<u64> = serde_json::from_value(v["tokens"].clone()).unwrap();
        let offs: Vec<u64> = serde_json::from_value(v["doc_offsets"].clone()).unwrap();
        assert_eq!(a["tokens"], t.len());
        assert_eq!(a["documents"], offs.len() - 1);
        assert_eq!((offs[0], *offs.last().unwrap()), (0, t.len() as u64));
        // Each document ends with EOS, and only there.
        for w in offs.windows(2) {
            let d = &t[w[0] as usize..w[1] as usize];
            assert_eq!(d.last(), Some(&2));
            assert!(!d[..d.len() - 1].contains(&2));
        }
        docs += offs.len() as u64 - 1;
        all.extend(t);
    }
    // The tokens are the tokenizer's own encoding of the text: Python's `tokenizers` (the
    // reference) encoded the validation split into this fixture.
    let want: Vec<u64> = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/sample_validation_ids.json")).unwrap(),
    )
    .unwrap();
    assert!(
        all == want,
        "{} tokens vs {} from Python",
        all.len(),
        want.len()
    );
    // tern data stats agrees, and names the tokenizer.
    let stats: Value = serde_json::from_slice(&tern(&["data", "stats", o]).stdout).unwrap();
    assert_eq!(stats["tokens"], all.len());
    assert_eq!(stats["documents"], docs);
    assert_eq!(stats["format"], "hdf5");
    assert_eq!(stats["vocab_size"], 4096);
    let head: Vec<u64> =
        serde_json::from_slice(&tern(&["data", "head", &shards[1], "--tokens", "7"]).stdout)
            .unwrap();
    let first_len = h5py_view(&shards[0])["tokens"].as_array().unwrap().len();
    assert_eq!(head, all[first_len..first_len + 7]);
}

#[test]
fn prep_tokenizer_trains_a_tokenizer_that_prep_and_training_use() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok.json");
    #[rustfmt::skip]
    let out = tern(&[
        "prep", "tokenizer", "--input", "data/sample/train", "--out", tok.to_str().unwrap(),
        "--vocab-size", "512",
    ]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(512 tokens)"));
    let shards = dir.path().join("shards");
    #[rustfmt::skip]
    let out = tern(&[
        "prep", "--input", "data/sample/validation", "--tokenizer", tok.to_str().unwrap(),
        "--out", shards.to_str().unwrap(), "--format", "hdf5",
    ]);
    ok(&out);
    let stats: Value =
        serde_json::from_slice(&tern(&["data", "stats", shards.to_str().unwrap()]).stdout).unwrap();
    assert_eq!(stats["vocab_size"], 512);
    assert!(stats["max_token_id"].as_u64().unwrap() < 512);
    // Training on these shards with the sample's own tokenizer is refused: another tokenizer.
    let run = tempfile::tempdir().unwrap();
    let train = format!("data.train=[\"{}\"]", shards.display());
    let mut args = vec![
        "train",
        "recipes/tiny.toml",
        "--run-dir",
        run.path().to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL_MODEL);
    args.extend_from_slice(&["--set", &train, "--set", "train.steps=1"]);
    let out = tern(&args);
    fails_with(
        &out,
        &["data.train", ".h5: tokenised with a tokenizer of sha256"],
    );
}

#[test]
fn training_reads_packed_shards_as_they_are() {
    let shards = tempfile::tempdir().unwrap();
    let dir = shards.path().to_str().unwrap();
    prep("data/sample/train", dir, &["--chunk-size", "65536"]);
    let run = tempfile::tempdir().unwrap();
    let train = format!("data.train=[\"{dir}\"]");
    let mut args = vec![
        "train",
        "recipes/tiny.toml",
        "--run-dir",
        run.path().to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL_MODEL);
    #[rustfmt::skip]
    args.extend_from_slice(&[
        "--set", &train, "--set", "train.steps=12", "--set", "train.micro_batch=4",
        "--set", "train.checkpoint_every=0",
    ]);
    let out = tern(&args);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 11 shards of 65536 tokens: the train split as the shards hold it.
    assert!(stdout.contains("11 shard(s), 720896 tokens"), "{stdout}");
    let l = losses(run.path());
    assert!(l[11] < l[0] - 0.2, "{l:?}");
}

/// Losses by step from a run's metrics.
fn losses(run: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

#[test]
fn a_weighted_mix_of_hdf5_and_packed_shards_resumes_exactly_on_another_dp_size() {
    let shards = tempfile::tempdir().unwrap();
    let (a, b) = (shards.path().join("slim"), shards.path().join("star"));
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    prep(
        "data/sample/train",
        sa,
        &["--format", "hdf5", "--chunk-size", "20000"],
    );
    prep("data/sample/validation", sb, &["--chunk-size", "2049"]);
    // TinyLlama's mix, given on the command line as the recipe would give [[data.sources]].
    let sources = format!(
        "data.sources=[{{paths=[\"{}/*.h5\"], weight=0.693584, name=\"slimpajama\"}}, \
         {{paths=[\"{}\"], weight=0.306416, name=\"starcoder\"}}]",
        a.display(),
        b.display()
    );
    let runs = tempfile::tempdir().unwrap();
    let args = |run: &str, steps: &'static str| -> Vec<String> {
        let mut v: Vec<String> = ["train", "recipes/tiny.toml", "--run-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(runs.path().join(run).display().to_string());
        v.extend(SMALL_MODEL.iter().map(|s| s.to_string()));
        #[rustfmt::skip]
        v.extend([
            "--set", "data.train=[]", "--set", &sources, "--set", steps,
            "--set", "train.micro_batch=2", "--set", "train.checkpoint_every=3",
            "--set", "train.eval_every=0",
        ].iter().map(|s| s.to_string()));
        v
    };
    let go = |n: usize, a: Vec<String>| {
        let out = tern_cmd(n).args(&a).output().unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let log = go(0, args("straight", "train.steps=6"));
    // HDF5 shards keep every token of the split; TinyLlama's drop the last partial chunk.
    assert!(
        log.contains("data: slimpajama (weight 0.693584): "),
        "{log}"
    );
    assert!(log.contains(" 757220 tokens, 99 docs"), "{log}");
    assert!(
        log.contains("data: starcoder (weight 0.306416): 16 shard(s), 32784 tokens"),
        "{log}"
    );
    let straight = losses(&runs.path().join("straight"));
    // Two data-parallel ranks for 3 steps, then one process resumes from their checkpoint.
    go(2, args("switched", "train.steps=3"));
    let mut resume = args("switched", "train.steps=6");
    resume.extend(["--resume".to_string(), "auto".to_string()]);
    go(0, resume);
    let switched = losses(&runs.path().join("switched"));
    assert_eq!(straight.len(), 6);
    assert_eq!(switched.len(), 6);
    for (i, (x, y)) in straight.iter().zip(&switched).enumerate() {
        assert!(((x - y) / x).abs() < 1e-5, "step {}: {x} vs {y}", i + 1);
    }
    assert!(!runs.path().join("switched.1").exists(), "it resumed");
}
