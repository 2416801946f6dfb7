//! `tern data` on the LITPKDS fixture (shards TinyLlama's builder wrote, data-prep/litpkds_fixture.py).

mod common;

use common::{repo, tern_cmd, SMALL_MODEL};
use serde_json::Value;

fn tern(args: &[&str]) -> std::process::Output {
    tern_cmd(0).args(args).output().expect("tern runs")
}

#[test]
fn stats_and_head_of_tinyllama_shards() {
    let dir = "tests/fixtures/litpkds";
    let out = tern(&["data", "stats", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(out.status.success());
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
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.bin") && err.contains("truncated"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn prep_writes_shards_that_stats_reads_and_a_rerun_skips() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    #[rustfmt::skip]
    let args = [
        "prep", "--input", "data/sample/validation", "--tokenizer", "data/sample/tokenizer.json",
        "--out", o, "--chunk-size", "4098", "--split", "validation",
    ];
    let first = tern(&args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
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
    let again = tern(&args);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 worker(s) ran, 1 already done"));

    let hdf5 = tern(&[&args[..], &["--format", "hdf5"]].concat());
    assert!(!hdf5.status.success());
    assert!(String::from_utf8_lossy(&hdf5.stderr).contains("--format hdf5"));
}

#[test]
fn training_reads_packed_shards_as_they_are() {
    let shards = tempfile::tempdir().unwrap();
    let dir = shards.path().to_str().unwrap();
    #[rustfmt::skip]
    let prep = tern(&[
        "prep", "--input", "data/sample/train", "--tokenizer", "data/sample/tokenizer.json",
        "--out", dir, "--chunk-size", "65536",
    ]);
    assert!(
        prep.status.success(),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 11 shards of 65536 tokens: the train split as the shards hold it.
    assert!(stdout.contains("720896 train tokens"), "{stdout}");
    let losses: Vec<f64> = std::fs::read_to_string(run.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect();
    assert!(losses[11] < losses[0] - 0.2, "{losses:?}");
}
