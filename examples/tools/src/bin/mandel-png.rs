//! `mandel-png`: assemble the tile outputs of a mandelbrot job into one PNG.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use peergrid_examples::{mandel, results};

/// Assemble DIR/<task-index>.out tiles (from `coordinator results --out DIR`) into a PNG.
#[derive(Parser, Debug)]
#[command(name = "mandel-png")]
struct Args {
    /// Results directory
    dir: PathBuf,
    /// Output PNG file
    #[arg(long, short, default_value = "mandelbrot.png")]
    out: PathBuf,
    /// Write the image even if some tiles are missing (their pixels are mid-gray)
    #[arg(long)]
    allow_missing: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let r = results::read_dir(&a.dir)?;
    let img = mandel::assemble(r.outputs.values().map(|v| v.as_slice()), 128)?;
    if img.uncovered > 0 && !a.allow_missing {
        bail!(
            "{} pixels are not covered by any tile ({} tiles read, {} tasks without a result); pass --allow-missing to write the image anyway",
            img.uncovered,
            r.outputs.len(),
            r.missing.len()
        );
    }
    mandel::write_png(&img, &a.out)?;
    println!(
        "wrote {} ({}x{}, {} tiles)",
        a.out.display(),
        img.width,
        img.height,
        r.outputs.len()
    );
    Ok(())
}
