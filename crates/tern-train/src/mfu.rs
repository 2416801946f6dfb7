//! Model FLOPs utilisation: the training FLOPs a step's tokens need (the plan's count, PaLM's
//! accounting: 6 x matrix parameters + attention, no credit for recomputation) over what the
//! devices could do at their dense peak in the precision the matmuls run in.

/// What a device's matmuls run in, for its peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    Bf16,
    /// f32 tensors, which NVIDIA tensor cores take as TF32 (cubek's matmul does).
    Tf32,
}

/// Dense tensor-core peaks in TFLOP/s (bf16, tf32) from NVIDIA's data sheets, without
/// structured sparsity; the first entry whose name occurs in the device's name applies.
const PEAKS: [(&str, f64, f64); 9] = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H200 NVL", 835.0, 417.5),
    ("H200", 989.4, 494.7),
    ("H100", 989.4, 494.7),
    ("H800", 989.4, 494.7),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("L40S", 362.05, 183.0),
];

/// The peak of the device named `device` (as the CUDA driver names it), if it is in the table.
pub fn known_peak_tflops(device: &str, precision: MatmulPrecision) -> Option<f64> {
    PEAKS.iter().find(|(name, _, _)| device.contains(name)).map(
        |&(_, bf16, tf32)| match precision {
            MatmulPrecision::Bf16 => bf16,
            MatmulPrecision::Tf32 => tf32,
        },
    )
}

/// Achieved TFLOP/s per device and, with a peak, the MFU (0..1), from the job's tokens per
/// second, the training FLOPs per token and the number of devices.
pub fn utilisation(
    tokens_per_s: f64,
    train_flops_per_token: f64,
    devices: usize,
    peak_tflops: Option<f64>,
) -> (f64, Option<f64>) {
    let tflops = tokens_per_s * train_flops_per_token / devices.max(1) as f64 / 1e12;
    (tflops, peak_tflops.map(|p| tflops / p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_driver_gives_them() {
        let bf16 = |n| known_peak_tflops(n, MatmulPrecision::Bf16);
        assert_eq!(bf16("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(bf16("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(bf16("NVIDIA H200"), Some(989.4));
        assert_eq!(bf16("NVIDIA H200 NVL"), Some(835.0));
        assert_eq!(bf16("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(
            known_peak_tflops("NVIDIA A100-SXM4-40GB", MatmulPrecision::Tf32),
            Some(156.0)
        );
        assert_eq!(bf16("Tesla V100-SXM2-16GB"), None);
    }

    /// trilm-1.1b's 6.9 GFLOPs a token (the plan's figure rounded) at 40,000 tokens/s on 1 device
    /// is 276 TFLOP/s: 27.9 % of an H100's bf16 peak.
    #[test]
    fn utilisation_is_flops_over_peak() {
        let (t, m) = utilisation(40_000.0, 6.9e9, 1, Some(989.4));
        assert!((t - 276.0).abs() < 1e-9, "{t}");
        assert!((m.unwrap() - 276.0 / 989.4).abs() < 1e-12);
        let (t8, none) = utilisation(8.0 * 40_000.0, 6.9e9, 8, None);
        assert!((t8 - t).abs() < 1e-9 && none.is_none());
    }
}
