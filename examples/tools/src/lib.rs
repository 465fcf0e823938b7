//! Host-side helpers for Peergrid's sample workloads (see `examples/README.md`).
//!
//! - [`seti`]: the input generator behind `seti-gen` (noise + injected drifting tones, with a
//!   truth file) and a parser for the guest's candidate lines.
//! - [`mandel`]: assembling Mandelbrot tile outputs (PGM tiles) into one image / PNG.
//! - [`pi`]: combining Monte Carlo `hits samples` outputs into an estimate of pi.
//! - [`results`]: reading a `coordinator results --out DIR` directory.
//! - [`rng`]: the deterministic PRNG (xoshiro256**, seeded by splitmix64) the samples use.

pub mod mandel;
pub mod pi;
pub mod results;
pub mod rng;
pub mod seti;

/// The `examples/` directory of this source tree (for tests and defaults).
pub fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("examples/tools has a parent")
        .to_path_buf()
}
