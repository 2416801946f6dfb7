//! Per-parameter random streams: each parameter draws from a generator seeded by the run seed and
//! its name, so initial values do not depend on the order things are built in, on the backend or
//! on the parallel layout.

/// `seed` mixed with the FNV-1a hash of `name` (stable across Rust versions, unlike std's hasher).
pub fn name_seed(seed: u64, name: &str) -> u64 {
    seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` draws uniform in `[lo, hi)` from the stream of (`seed`, `name`) (SplitMix64).
pub fn uniform_values(seed: u64, name: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut state = name_seed(seed, name);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

/// The initial value of a parameter whose initialisation is not the run's N(0, init_std) for
/// matrices and the module's constant for vectors: Mamba's ([`crate::mamba`]) and the
/// Mixture-of-Depths router's (N(0, `std`), a vector that must still differ from zero). `None`
/// for every other parameter. Seeded by name, so every rank draws the same values.
pub fn special_initial_values(
    seed: u64,
    name: &str,
    shape: &[usize],
    std: f64,
) -> Option<Vec<f32>> {
    let n: usize = shape.iter().product();
    let last = name.rsplit('.').next()?;
    if name.ends_with(".mod_router.weight") {
        let v = uniform_values(seed, name, n, -std * 3f64.sqrt(), std * 3f64.sqrt());
        return Some(v);
    }
    if !name.contains(".mamba.") {
        return None;
    }
    let cols = *shape.last()?;
    Some(match last {
        "a_log" => (0..n).map(|i| ((i % cols) as f32 + 1.0).ln()).collect(),
        "d" => vec![1.0; n],
        "conv_bias" => vec![0.0; n],
        "conv_weight" | "dt_proj_weight" => {
            let bound = (cols as f64).powf(-0.5);
            uniform_values(seed, name, n, -bound, bound)
        }
        "dt_proj_bias" => {
            let (lo, hi) = (0.001f64.ln(), 0.1f64.ln());
            uniform_values(seed, name, n, lo, hi)
                .into_iter()
                .map(|l| {
                    let dt = (l as f64).exp();
                    // softplus^-1(dt) = dt + log(1 - exp(-dt))
                    (dt + (-(-dt).exp()).ln_1p()) as f32
                })
                .collect()
        }
        _ => return None,
    })
}
