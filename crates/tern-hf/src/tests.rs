use super::*;
use tern_model::{LinearKind, ModelConfig};

fn config(tied: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny(40, LinearKind::Float);
    c.tie_embeddings = tied;
    c.rms_eps = 1e-5;
    c
}

/// Distinct values per tensor, so that a swap of two tensors shows.
fn tensors(c: &ModelConfig) -> Vec<NamedTensor> {
    c.param_shapes()
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|i| k as f32 + i as f32 * 1e-3).collect();
            NamedTensor {
                name,
                shape,
                values,
            }
        })
        .collect()
}

fn err(dir: &Path) -> String {
    format!("{:#}", load(dir).unwrap_err())
}

#[test]
fn save_then_load_round_trips_single_and_sharded() {
    for (tied, shard) in [(false, None), (true, None), (false, Some(20_000))] {
        let dir = tempfile::tempdir().unwrap();
        let c = config(tied);
        let t = tensors(&c);
        let special = Special {
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        };
        save(dir.path(), &c, &special, &t, 64, shard).unwrap();
        assert_eq!(dir.path().join(INDEX).is_file(), shard.is_some());
        if shard.is_some() {
            let parts = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("model-0")
                })
                .count();
            assert!(parts > 1, "{parts} parts");
            assert!(!dir.path().join(SINGLE).exists());
        }
        let m = load(dir.path()).unwrap();
        assert_eq!(m.config, c);
        assert_eq!(m.special, special);
        assert_eq!(m.tensors, t);
    }
}

#[test]
fn bf16_and_f16_tensors_are_read_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(true);
    let t = tensors(&c);
    save(dir.path(), &c, &Special::default(), &t, 64, None).unwrap();
    // Rewrite the embedding as bf16 and the first norm as f16, with values both represent exactly.
    let bytes = std::fs::read(dir.path().join(SINGLE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut expect = t.clone();
    for (name, view) in st.tensors() {
        let k = expect
            .iter()
            .position(|e| hf_name(&e.name) == name)
            .unwrap();
        let n = view.shape().iter().product::<usize>();
        let vals: Vec<f32> = (0..n).map(|i| (i % 64) as f32 * 0.25 - 4.0).collect();
        let (dtype, data) = match name.as_str() {
            "model.embed_tokens.weight" => (
                Dtype::BF16,
                vals.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            "model.layers.0.input_layernorm.weight" => (
                Dtype::F16,
                vals.iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            _ => (
                Dtype::F32,
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        expect[k].values = vals;
        owned.push((name, dtype, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.path().join(SINGLE),
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
    assert_eq!(load(dir.path()).unwrap().tensors, expect);
}

#[test]
fn both_rope_theta_spellings_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(false);
    save(dir.path(), &c, &Special::default(), &tensors(&c), 64, None).unwrap();
    let path = dir.path().join(CONFIG);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.insert(
        "rope_parameters".into(),
        json!({"rope_theta": 500000.0, "rope_type": "default"}),
    );
    std::fs::write(&path, v.to_string()).unwrap();
    assert_eq!(read_config(dir.path()).unwrap().0.rope_theta, 500000.0);
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("num_key_value_heads");
    std::fs::write(&path, v.to_string()).unwrap();
    let (c2, _) = read_config(dir.path()).unwrap();
    assert_eq!(c2.rope_theta, 10_000.0);
    assert_eq!(c2.n_kv_heads, Some(c2.n_heads));
}

#[test]
fn bad_directories_are_errors_naming_what_is_wrong() {
    let c = config(false);
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &c, &Special::default(), &tensors(&c), 64, None).unwrap();
        dir
    };
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let path = dir.join(CONFIG);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&path, v.to_string()).unwrap();
    };

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.insert("architectures".into(), json!(["MistralForCausalLM"]));
    });
    assert!(
        err(d.path()).contains("MistralForCausalLM"),
        "{}",
        err(d.path())
    );

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": 8.0}),
        );
    });
    assert!(
        err(d.path()).contains("rope_scaling.rope_type = \"llama3\""),
        "{}",
        err(d.path())
    );

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.insert("num_hidden_layers".into(), json!(3));
    });
    assert!(
        err(d.path()).contains("tensor model.layers.2.input_layernorm.weight is missing"),
        "{}",
        err(d.path())
    );

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.insert("intermediate_size".into(), json!(48));
    });
    let e = err(d.path());
    assert!(
        e.contains(
            "model.layers.0.mlp.gate_proj.weight has shape [64, 32]; config.json implies [48, 32]"
        ),
        "{e}"
    );

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.remove("hidden_size");
    });
    assert!(
        err(d.path()).contains("hidden_size is missing"),
        "{}",
        err(d.path())
    );

    let d = fresh();
    edit_config(d.path(), &|o| {
        o.insert("tie_word_embeddings".into(), json!(true));
        o.insert("num_hidden_layers".into(), json!(1));
    });
    // Layer 1's tensors are now unknown.
    assert!(
        err(d.path()).contains("model.layers.1."),
        "{}",
        err(d.path())
    );

    let d = tempfile::tempdir().unwrap();
    assert!(err(d.path()).contains("config.json"), "{}", err(d.path()));
    let d = fresh();
    std::fs::remove_file(d.path().join(SINGLE)).unwrap();
    assert!(
        err(d.path()).contains("neither model.safetensors nor"),
        "{}",
        err(d.path())
    );
}
