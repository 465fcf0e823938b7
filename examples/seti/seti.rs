//! Peergrid sample task: a SETI@home-style narrowband signal search.
//!
//! Guest ABI: a WASI command. stdin = complex baseband samples: interleaved little-endian
//! f32 pairs (I, Q), 8 bytes per sample (`seti-gen` writes them). argv = [job name,
//! KEY=VALUE...] with optional keys:
//!   fft=2048     FFT length (power of two, 16..=65536)
//!   drift=32     largest |total drift| searched, in bins over the whole observation
//!   snr=9        detection threshold (see below)
//!   max=32       at most this many candidates are printed
//!
//! Method: the samples are cut into W = len/fft consecutive windows (a partial last window is
//! ignored). Each window is Hann-weighted and gets a radix-2 FFT (f64, own code, twiddles from a polynomial sincos,
//! so no libm is involved) and a power spectrum, normalised by that window's noise floor
//! (median power / ln 2, the mean of exponentially distributed noise power). A de-Doppler
//! search then sums the normalised power along every drift line: start bin k at window 0,
//! total drift D in -drift..=drift bins at the last window, bin at window w =
//! k + round(D*w/(W-1)) (mod fft). For pure noise a line's sum has mean W and standard
//! deviation sqrt(W); its SNR is (sum - W) / sqrt(W). Lines with SNR >= snr are hits; hits
//! whose track passes within two bins of a stronger hit's track in any window are the same
//! signal and are dropped.
//!
//! Output: one line per candidate, strongest first:
//!   "FREQ_BIN DRIFT POWER SNR\n"
//! FREQ_BIN = k (0..fft, bin of window 0; bins >= fft/2 are negative frequencies),
//! DRIFT = D (integer bins from the first to the last window), POWER = the line's summed
//! normalised power (3 decimals), SNR (2 decimals). No candidates: empty output.
//! Build: /usr/bin/rustc -O --target wasm32-wasi -C strip=symbols -C target-feature=+simd128 seti.rs -o seti.wasm

use std::cmp::Ordering;
use std::io::{Read, Write};
use std::process::exit;

/// (sin, cos) of 2*pi*turns, from +, -, *, /, floor only (bit-identical on every platform).
fn sincos_turns(turns: f64) -> (f64, f64) {
    let t = turns - (turns + 0.5).floor(); // [-0.5, 0.5)
    let q = (t * 4.0 + 0.5).floor(); // nearest quarter turn: -2..=2
    let x = (t - q * 0.25) * std::f64::consts::TAU; // [-pi/4, pi/4]
    let x2 = x * x;
    // Taylor series to x^17 / x^18: truncation error < 1e-17 on [-pi/4, pi/4]
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
                                                * (1.0 - x2 / 156.0 * (1.0 - x2 / 210.0 * (1.0 - x2 / 272.0))))))));
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
                                                    * (1.0 - x2 / 182.0 * (1.0 - x2 / 240.0 * (1.0 - x2 / 306.0))))))));
    match (q as i64).rem_euclid(4) {
        0 => (sin, cos),
        1 => (cos, -sin),
        2 => (-sin, -cos),
        _ => (-cos, sin),
    }
}

/// In-place iterative radix-2 decimation-in-time FFT (forward, unnormalised).
struct Fft {
    n: usize,
    bits: u32,
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl Fft {
    fn new(n: usize) -> Fft {
        let half = n / 2;
        let mut cos = Vec::with_capacity(half);
        let mut sin = Vec::with_capacity(half);
        for k in 0..half {
            // twiddle exp(-2 pi i k / n)
            let (s, c) = sincos_turns(k as f64 / n as f64);
            cos.push(c);
            sin.push(-s);
        }
        Fft { n, bits: n.trailing_zeros(), cos, sin }
    }

    fn run(&self, re: &mut [f64], im: &mut [f64]) {
        let n = self.n;
        for i in 0..n {
            let j = (i.reverse_bits() >> (usize::BITS - self.bits)) as usize;
            if j > i {
                re.swap(i, j);
                im.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= n {
            let half = len / 2;
            let stride = n / len;
            let mut start = 0;
            while start < n {
                for k in 0..half {
                    let (wr, wi) = (self.cos[k * stride], self.sin[k * stride]);
                    let a = start + k;
                    let b = a + half;
                    let tr = re[b] * wr - im[b] * wi;
                    let ti = re[b] * wi + im[b] * wr;
                    re[b] = re[a] - tr;
                    im[b] = im[a] - ti;
                    re[a] += tr;
                    im[a] += ti;
                }
                start += len;
            }
            len *= 2;
        }
    }
}

struct Params {
    fft: usize,
    drift: i64,
    snr: f64,
    max: usize,
}

/// Hits whose tracks come within this many bins of a stronger candidate's are the same signal
/// (a Hann-windowed tone spreads over about +-2 bins).
const NEAR: i64 = 2;

#[derive(Clone, Copy)]
struct Hit {
    sum: f64,
    bin: usize,
    drift: i64,
}

/// Bin offset of drift line `d` at window `w` of `nw`: round(d*w/(nw-1)), halves up.
fn offset(d: i64, w: usize, nw: usize) -> i64 {
    if nw < 2 {
        return 0;
    }
    let den = 2 * (nw as i64 - 1);
    (2 * d * w as i64 + (nw as i64 - 1)).div_euclid(den)
}

fn search(samples: &[(f32, f32)], p: &Params) -> (usize, Vec<Hit>) {
    let n = p.fft;
    let nw = samples.len() / n;
    if nw == 0 {
        return (0, Vec::new());
    }
    let fft = Fft::new(n);
    // Hann window: keeps a strong tone's spectral leakage (sidelobes) from looking like
    // separate signals. w[k] = sin^2(pi k / n).
    let hann: Vec<f64> = (0..n)
        .map(|k| {
            let (s, _) = sincos_turns(k as f64 / (2 * n) as f64);
            s * s
        })
        .collect();
    let mut spectra = vec![0.0f64; nw * n];
    let mut re = vec![0.0f64; n];
    let mut im = vec![0.0f64; n];
    let mut scratch = vec![0.0f64; n];
    for w in 0..nw {
        for (k, &(i, q)) in samples[w * n..(w + 1) * n].iter().enumerate() {
            re[k] = i as f64 * hann[k];
            im[k] = q as f64 * hann[k];
        }
        fft.run(&mut re, &mut im);
        let spec = &mut spectra[w * n..(w + 1) * n];
        for k in 0..n {
            spec[k] = re[k] * re[k] + im[k] * im[k];
        }
        scratch.copy_from_slice(spec);
        let mid = n / 2;
        let (_, median, _) = scratch.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
        let floor = *median / std::f64::consts::LN_2;
        let scale = if floor > 0.0 { 1.0 / floor } else { 0.0 };
        for v in spec.iter_mut() {
            *v *= scale;
        }
    }

    // De-Doppler: incoherent sums along drift lines.
    let drift = if nw < 2 { 0 } else { p.drift };
    let threshold = nw as f64 + p.snr * (nw as f64).sqrt();
    let mut acc = vec![0.0f64; n];
    let mut hits = Vec::new();
    for d in -drift..=drift {
        for a in acc.iter_mut() {
            *a = 0.0;
        }
        for w in 0..nw {
            let o = offset(d, w, nw).rem_euclid(n as i64) as usize;
            let spec = &spectra[w * n..(w + 1) * n];
            let (head, tail) = acc.split_at_mut(n - o);
            for (a, s) in head.iter_mut().zip(&spec[o..]) {
                *a += *s;
            }
            for (a, s) in tail.iter_mut().zip(&spec[..o]) {
                *a += *s;
            }
        }
        for (k, &s) in acc.iter().enumerate() {
            if s >= threshold {
                hits.push(Hit { sum: s, bin: k, drift: d });
            }
        }
    }
    hits.sort_by(|a, b| match b.sum.total_cmp(&a.sum) {
        Ordering::Equal => (a.bin, a.drift).cmp(&(b.bin, b.drift)),
        o => o,
    });

    // Keep the strongest hit of each signal: drop hits whose track comes within one bin of
    // an accepted candidate's track in some window.
    let mut accepted: Vec<Hit> = Vec::new();
    for h in hits {
        if accepted.len() >= p.max {
            break;
        }
        let near = accepted.iter().any(|c| {
            (0..nw).any(|w| {
                let a = (h.bin as i64 + offset(h.drift, w, nw)).rem_euclid(n as i64);
                let b = (c.bin as i64 + offset(c.drift, w, nw)).rem_euclid(n as i64);
                let diff = (a - b).rem_euclid(n as i64);
                diff <= NEAR || diff >= n as i64 - NEAR
            })
        });
        if !near {
            accepted.push(h);
        }
    }
    (nw, accepted)
}

fn fail(msg: &str) -> ! {
    eprintln!("seti: {msg}");
    eprintln!("usage: seti [fft=2048] [drift=32] [snr=9] [max=32] < samples (interleaved f32le I/Q)");
    exit(2)
}

fn parse_params(args: &[String]) -> Params {
    let mut p = Params { fft: 2048, drift: 32, snr: 9.0, max: 32 };
    for a in args {
        let mut kv = a.splitn(2, '=');
        let key = kv.next().unwrap_or("");
        let value = match kv.next() {
            Some(v) => v.trim(),
            None => fail(&format!("argument {a:?} is not KEY=VALUE")),
        };
        let bad = || -> ! { fail(&format!("bad value in {a:?}")) };
        match key {
            "fft" => {
                p.fft = value.parse().unwrap_or_else(|_| bad());
                if !p.fft.is_power_of_two() || p.fft < 16 || p.fft > 65536 {
                    fail("fft must be a power of two in 16..=65536");
                }
            }
            "drift" => {
                p.drift = value.parse().unwrap_or_else(|_| bad());
                if p.drift < 0 || p.drift > 4096 {
                    fail("drift must be in 0..=4096");
                }
            }
            "snr" => {
                p.snr = value.parse().unwrap_or_else(|_| bad());
                if !p.snr.is_finite() {
                    bad();
                }
            }
            "max" => p.max = value.parse().unwrap_or_else(|_| bad()),
            _ => fail(&format!("unknown key {key:?}")),
        }
    }
    p
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let p = parse_params(&args);
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        fail("cannot read stdin");
    }
    if input.len() % 8 != 0 {
        fail("input length is not a multiple of 8 bytes (f32le I/Q pairs)");
    }
    let samples: Vec<(f32, f32)> = input
        .chunks_exact(8)
        .map(|c| {
            (
                f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                f32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    drop(input);
    if samples.iter().any(|&(i, q)| !i.is_finite() || !q.is_finite()) {
        fail("input contains NaN or infinite samples");
    }
    if samples.len() < p.fft {
        fail(&format!("input has {} samples, fewer than one window of {}", samples.len(), p.fft));
    }
    let (nw, hits) = search(&samples, &p);
    let mut out = String::new();
    for h in hits {
        let snr = (h.sum - nw as f64) / (nw as f64).sqrt();
        out.push_str(&format!("{} {} {:.3} {:.2}\n", h.bin, h.drift, h.sum, snr));
    }
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    if stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush()).is_err() {
        exit(1);
    }
}
