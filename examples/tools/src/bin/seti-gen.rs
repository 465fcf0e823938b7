//! `seti-gen`: write input blobs for the seti sample (noise, with drifting tones injected into
//! some files) plus `truth.json` naming which file holds which signal.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use peergrid_examples::seti::{generate_file, plan, GenParams};

/// Generate seti input files DIR/<i>.bin (i = 0..count) and DIR/truth.json.
/// The same flags always give the same bytes.
#[derive(Parser, Debug)]
#[command(name = "seti-gen")]
struct Args {
    /// Output directory (created if missing), e.g. examples/seti/inputs
    #[arg(long)]
    out: PathBuf,
    /// Number of input files
    #[arg(long, default_value_t = 16)]
    count: u32,
    /// Seed of every random choice
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many files get an injected signal
    #[arg(long, default_value_t = 4)]
    signals: u32,
    /// Complex samples per file (8 bytes each; 32768 = 256 KiB)
    #[arg(long, default_value_t = 32768)]
    samples: u32,
    /// FFT length the guest will use (the signal's bins refer to it)
    #[arg(long, default_value_t = 2048)]
    fft: u32,
    /// Signal amplitude (noise: unit variance per component)
    #[arg(long, default_value_t = 0.12)]
    amplitude: f64,
    /// Largest |total drift| injected, in bins over the observation
    #[arg(long, default_value_t = 24.0)]
    max_drift: f64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        a.fft >= 16 && a.fft.is_power_of_two(),
        "--fft must be a power of two >= 16"
    );
    ensure!(a.samples >= a.fft, "--samples must be at least --fft");
    ensure!(
        a.signals <= a.count,
        "--signals ({}) is more than --count ({})",
        a.signals,
        a.count
    );
    ensure!(
        a.amplitude.is_finite() && a.max_drift.is_finite() && a.max_drift >= 0.0,
        "bad --amplitude or --max-drift"
    );
    let p = GenParams {
        seed: a.seed,
        count: a.count,
        signals: a.signals,
        samples: a.samples,
        fft: a.fft,
        amplitude: a.amplitude,
        max_drift: a.max_drift,
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let truth = plan(&p);
    for f in &truth.files {
        let path = a.out.join(&f.file);
        std::fs::write(&path, generate_file(&p, truth.windows, f))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let tpath = a.out.join("truth.json");
    std::fs::write(&tpath, serde_json::to_string_pretty(&truth)? + "\n")
        .with_context(|| format!("cannot write {}", tpath.display()))?;
    for f in &truth.files {
        if let Some(s) = &f.signal {
            println!(
                "{}: signal at bin {:.2}, drift {:+.2} bins, amplitude {}",
                f.file, s.bin, s.drift, s.amplitude
            );
        }
    }
    println!(
        "wrote {} files of {} bytes and truth.json to {}",
        truth.files.len(),
        p.samples as u64 * 8,
        a.out.display()
    );
    Ok(())
}
