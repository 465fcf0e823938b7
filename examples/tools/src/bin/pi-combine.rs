//! `pi-combine`: sum the `HITS SAMPLES` outputs of a pi job into an estimate of pi.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use peergrid_examples::{pi, results};

/// Combine DIR/<task-index>.out files (from `coordinator results --out DIR`) into an estimate
/// of pi with its standard error and 95% confidence interval.
#[derive(Parser, Debug)]
#[command(name = "pi-combine")]
struct Args {
    /// Results directory
    dir: PathBuf,
    /// Print JSON: {"tasks","missing","hits","samples","pi","stderr","ci95":[lo,hi],"error"}
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let r = results::read_dir(&a.dir)?;
    let e = pi::combine(r.outputs.values().map(|v| v.as_slice()))?;
    let (lo, hi) = e.ci95();
    if a.json {
        let v = serde_json::json!({
            "tasks": e.tasks, "missing": r.missing, "hits": e.hits, "samples": e.samples,
            "pi": e.pi, "stderr": e.stderr, "ci95": [lo, hi], "error": e.pi - std::f64::consts::PI,
        });
        println!("{v}");
    } else {
        println!(
            "tasks:    {}{}",
            e.tasks,
            if r.missing.is_empty() {
                String::new()
            } else {
                format!(" ({} without an accepted result)", r.missing.len())
            }
        );
        println!("samples:  {}", e.samples);
        println!("hits:     {}", e.hits);
        println!("pi      ~ {:.9} ± {:.9} (1 standard error)", e.pi, e.stderr);
        println!("95% CI:   [{lo:.9}, {hi:.9}]");
        println!(
            "error:    {:+.3e} ({:+.2} standard errors)",
            e.pi - std::f64::consts::PI,
            (e.pi - std::f64::consts::PI) / e.stderr
        );
    }
    Ok(())
}
