//! Per-parameter random streams: each parameter draws from a generator seeded by the run seed and
//! its name, so initial values do not depend on the order things are built in, on the backend or
//! on the parallel layout.

/// `seed` mixed with the FNV-1a hash of `name` (stable across Rust versions, unlike std's hasher).
pub fn name_seed(seed: u64, name: &str) -> u64 {
    seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
