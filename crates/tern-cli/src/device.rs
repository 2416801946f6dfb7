//! The device a rank computes on: the driver check, the GPU it takes, its name and matmul peak
//! (for the MFU), and where cubecl keeps its compiled kernels and autotune results.

use anyhow::Result;
use tern_train::mfu::{known_peak_tflops, MatmulPrecision};

/// The `cuda` build loads the NVIDIA driver at run time; without one, burn-cuda panics deep inside.
/// Checking first turns that into a plain error.
#[cfg(feature = "cuda")]
pub fn check_driver() -> Result<()> {
    for name in ["libcuda.so.1", "libcuda.so"] {
        // SAFETY: loading the driver library runs its initialisers, as burn-cuda itself would.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    anyhow::bail!("this tern is built with --features cuda, but no NVIDIA driver (libcuda.so.1) was found: run it on a GPU machine or build without the cuda feature")
}

#[cfg(not(feature = "cuda"))]
pub fn check_driver() -> Result<()> {
    Ok(())
}

/// The GPU of this rank: its node-local rank among the visible devices.
#[cfg(feature = "cuda")]
pub fn compute_device(topo: &tern_dist::Topology) -> Result<burn::backend::cuda::CudaDevice> {
    let ordinal = tern_dist::launch::gpu_ordinal(topo)?;
    Ok(burn::backend::cuda::CudaDevice::new(ordinal))
}

#[cfg(not(feature = "cuda"))]
pub fn compute_device(
    _: &tern_dist::Topology,
) -> Result<<crate::Compute as burn::tensor::backend::BackendTypes>::Device> {
    Ok(Default::default())
}

/// What this rank computes on, by name, and one device's dense matmul peak in TFLOP/s: the
/// recipe's `run.peak_tflops`, else the table of known GPUs at the products' precision (f32
/// tensors run as TF32 on tensor cores), else none (the CPU).
pub fn device_and_peak(
    topo: &tern_dist::Topology,
    recipe: &tern_train::Recipe,
    precision: tern_kernels::precision::Precision,
) -> (String, Option<f64>) {
    let name = device_name(topo);
    let p = match precision {
        tern_kernels::precision::Precision::Bf16 => MatmulPrecision::Bf16,
        tern_kernels::precision::Precision::F32 => MatmulPrecision::Tf32,
    };
    let peak = recipe
        .run
        .peak_tflops
        .or_else(|| known_peak_tflops(&name, p));
    (name, peak)
}

#[cfg(feature = "cuda")]
fn device_name(topo: &tern_dist::Topology) -> String {
    tern_dist::launch::gpu_ordinal(topo)
        .and_then(tern_dist::nccl::device_name)
        .unwrap_or_else(|e| format!("GPU (name unknown: {e})"))
}

#[cfg(not(feature = "cuda"))]
fn device_name(_: &tern_dist::Topology) -> String {
    "cpu".into()
}

/// cubecl compiles its kernels and autotunes its matmuls at run time, which made the first step
/// of a GPU run take minutes; both results are kept on disk across runs, in `TERN_KERNEL_CACHE`
/// or `~/.cache/tern/cubecl`, unless a `cubecl.toml` chose other places.
#[cfg(feature = "cuda")]
pub fn persist_kernel_caches() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    let Some(dir) = kernel_cache_dir() else {
        return;
    };
    let mut c = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(c.autotune.cache, CacheConfig::Target) {
        c.autotune.cache = CacheConfig::File(dir.join("autotune"));
    }
    if c.compilation.cache.is_none() {
        c.compilation.cache = Some(CacheConfig::File(dir.join("kernels")));
    }
    CubeClRuntimeConfig::set(c);
}

#[cfg(not(feature = "cuda"))]
pub fn persist_kernel_caches() {}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("TERN_KERNEL_CACHE") {
        return Some(d.into());
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(home.join("tern").join("cubecl"))
}
