//! The SETI sample's input generator and candidate parser.
//!
//! Input format (the guest's stdin): complex baseband samples, interleaved little-endian f32
//! pairs (I, Q), 8 bytes per sample. Noise is complex Gaussian with unit variance per
//! component (Irwin–Hall approximation). A signal is a complex tone of amplitude `A` whose
//! frequency, measured in FFT bins of `fft` points, is `bin + drift * w / (W - 1)` at the
//! centre of window `w` of `W = samples / fft` (a linear chirp: a Doppler-drifting carrier).
//! Everything is computed with +, -, *, / and floor only, so a seed gives the same bytes on
//! every platform.

use serde::{Deserialize, Serialize};

use crate::rng::Xoshiro256ss;

/// Generator settings (the `seti-gen` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    pub seed: u64,
    pub count: u32,
    /// How many of the files get a signal (distinct files, chosen by the seed).
    pub signals: u32,
    /// Complex samples per file (8 bytes each).
    pub samples: u32,
    /// The FFT length the signal's bins refer to (the guest's `fft=`).
    pub fft: u32,
    /// Signal amplitude (noise has unit variance per component, so noise power 2).
    pub amplitude: f64,
    /// Largest |total drift| injected, in bins over the observation (the guest searches 32).
    pub max_drift: f64,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            seed: 1,
            count: 16,
            signals: 4,
            samples: 32768,
            fft: 2048,
            amplitude: 0.12,
            max_drift: 24.0,
        }
    }
}

/// An injected signal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Frequency in bins (0..fft, fractional) at the centre of the first window.
    pub bin: f64,
    /// Total drift in bins from the first window's centre to the last window's.
    pub drift: f64,
    pub amplitude: f64,
}

/// One generated file in `truth.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileTruth {
    pub index: u32,
    pub file: String,
    pub signal: Option<Signal>,
}

/// `truth.json`: the parameters and which files hold which signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    pub params: GenParams,
    pub windows: u32,
    pub files: Vec<FileTruth>,
}

/// (sin, cos) of 2*pi*turns from +, -, *, / and floor (the same routine as the guest's).
pub fn sincos_turns(turns: f64) -> (f64, f64) {
    let t = turns - (turns + 0.5).floor();
    let q = (t * 4.0 + 0.5).floor();
    let x = (t - q * 0.25) * std::f64::consts::TAU;
    let x2 = x * x;
    let sin = x
        * (1.0
            - x2 / 6.0
                * (1.0
                    - x2 / 20.0
                        * (1.0
                            - x2 / 42.0
                                * (1.0
                                    - x2 / 72.0
                                        * (1.0
                                            - x2 / 110.0
                                                * (1.0
                                                    - x2 / 156.0
                                                        * (1.0
                                                            - x2 / 210.0
                                                                * (1.0 - x2 / 272.0))))))));
    let cos = 1.0
        - x2 / 2.0
            * (1.0
                - x2 / 12.0
                    * (1.0
                        - x2 / 30.0
                            * (1.0
                                - x2 / 56.0
                                    * (1.0
                                        - x2 / 90.0
                                            * (1.0
                                                - x2 / 132.0
                                                    * (1.0
                                                        - x2 / 182.0
                                                            * (1.0
                                                                - x2 / 240.0
                                                                    * (1.0 - x2 / 306.0))))))));
    match (q as i64).rem_euclid(4) {
        0 => (sin, cos),
        1 => (cos, -sin),
        2 => (-sin, -cos),
        _ => (-cos, sin),
    }
}

/// The plan: which files get which signal. Deterministic in `p`.
pub fn plan(p: &GenParams) -> Truth {
    assert!(
        p.fft >= 16 && p.fft.is_power_of_two(),
        "fft must be a power of two >= 16"
    );
    assert!(
        p.samples >= p.fft,
        "samples must be at least one fft window"
    );
    let windows = p.samples / p.fft;
    let mut rng = Xoshiro256ss::new(p.seed, u64::MAX);
    // Choose `signals` distinct files (partial Fisher-Yates).
    let mut order: Vec<u32> = (0..p.count).collect();
    let k = p.signals.min(p.count) as usize;
    for i in 0..k {
        let j = i + rng.below((order.len() - i) as u64) as usize;
        order.swap(i, j);
    }
    let chosen = &order[..k];
    let files = (0..p.count)
        .map(|index| {
            let signal = chosen.contains(&index).then(|| {
                let mut r = Xoshiro256ss::new(p.seed, u64::MAX - 1 - index as u64);
                let bin = r.next_f64() * p.fft as f64;
                let drift = if windows > 1 {
                    (r.next_f64() * 2.0 - 1.0) * p.max_drift
                } else {
                    0.0
                };
                Signal {
                    bin,
                    drift,
                    amplitude: p.amplitude,
                }
            });
            FileTruth {
                index,
                file: format!("{index}.bin"),
                signal,
            }
        })
        .collect();
    Truth {
        params: p.clone(),
        windows,
        files,
    }
}

/// The bytes of file `f` of the plan.
pub fn generate_file(p: &GenParams, windows: u32, f: &FileTruth) -> Vec<u8> {
    let mut rng = Xoshiro256ss::new(p.seed, f.index as u64);
    let n = p.fft as f64;
    let mut out = Vec::with_capacity(p.samples as usize * 8);
    for t in 0..p.samples {
        let mut i = rng.next_gaussian();
        let mut q = rng.next_gaussian();
        if let Some(s) = &f.signal {
            let t = t as f64;
            // frequency (bins) = bin + drift * (t - n/2) / (n (W-1)); phase = integral.
            let rate = if windows > 1 {
                s.drift / (n * (windows as f64 - 1.0))
            } else {
                0.0
            };
            let cycles = (s.bin * t + rate * (0.5 * t * t - 0.5 * n * t)) / n;
            let (sin, cos) = sincos_turns(cycles);
            i += s.amplitude * cos;
            q += s.amplitude * sin;
        }
        out.extend_from_slice(&(i as f32).to_le_bytes());
        out.extend_from_slice(&(q as f32).to_le_bytes());
    }
    out
}

/// A candidate line of the guest's output: `FREQ_BIN DRIFT POWER SNR`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub bin: u32,
    pub drift: i64,
    pub power: f64,
    pub snr: f64,
}

/// Parse the guest's output.
pub fn parse_candidates(out: &[u8]) -> anyhow::Result<Vec<Candidate>> {
    use anyhow::Context;
    let text = std::str::from_utf8(out).context("seti output is not UTF-8")?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            anyhow::ensure!(f.len() == 4, "bad candidate line {l:?}");
            Ok(Candidate {
                bin: f[0].parse()?,
                drift: f[1].parse()?,
                power: f[2].parse()?,
                snr: f[3].parse()?,
            })
        })
        .collect()
}

/// Circular distance between a candidate bin and a (fractional) true bin, in bins.
pub fn bin_distance(candidate: u32, truth: f64, fft: u32) -> f64 {
    let d = (candidate as f64 - truth).rem_euclid(fft as f64);
    d.min(fft as f64 - d)
}

/// Does `c` match signal `s` (frequency within one bin, drift within two)?
pub fn matches(c: &Candidate, s: &Signal, fft: u32) -> bool {
    bin_distance(c.bin, s.bin, fft) <= 1.0 && (c.drift as f64 - s.drift).abs() <= 2.0
}
