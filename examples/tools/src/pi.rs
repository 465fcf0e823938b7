//! Combining the `HITS SAMPLES` outputs of the pi sample.

use anyhow::{bail, Context, Result};

/// The combined Monte Carlo estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub hits: u64,
    pub samples: u64,
    pub tasks: usize,
    /// 4 * hits / samples
    pub pi: f64,
    /// Standard error of `pi`: 4 * sqrt(p (1 - p) / samples), p = hits / samples.
    pub stderr: f64,
}

impl Estimate {
    /// The 95% confidence interval (±1.96 standard errors).
    pub fn ci95(&self) -> (f64, f64) {
        (self.pi - 1.96 * self.stderr, self.pi + 1.96 * self.stderr)
    }
}

/// Parse one task output: `HITS SAMPLES\n`.
pub fn parse_output(bytes: &[u8]) -> Result<(u64, u64)> {
    let text = std::str::from_utf8(bytes).context("output is not UTF-8")?;
    let mut it = text.split_whitespace();
    let (Some(h), Some(n), None) = (it.next(), it.next(), it.next()) else {
        bail!("expected \"HITS SAMPLES\", got {:?}", text.trim());
    };
    let hits: u64 = h.parse().with_context(|| format!("bad hit count {h:?}"))?;
    let samples: u64 = n
        .parse()
        .with_context(|| format!("bad sample count {n:?}"))?;
    if hits > samples {
        bail!("more hits ({hits}) than samples ({samples})");
    }
    Ok((hits, samples))
}

/// Sum the outputs into one estimate.
pub fn combine<'a>(outputs: impl IntoIterator<Item = &'a [u8]>) -> Result<Estimate> {
    let (mut hits, mut samples, mut tasks) = (0u64, 0u64, 0usize);
    for o in outputs {
        let (h, n) = parse_output(o)?;
        hits = hits.checked_add(h).context("hit count overflows")?;
        samples = samples.checked_add(n).context("sample count overflows")?;
        tasks += 1;
    }
    if samples == 0 {
        bail!("no samples");
    }
    let p = hits as f64 / samples as f64;
    Ok(Estimate {
        hits,
        samples,
        tasks,
        pi: 4.0 * p,
        stderr: 4.0 * (p * (1.0 - p) / samples as f64).sqrt(),
    })
}
