//! Assembling Mandelbrot tiles into one image.
//!
//! Each task output is a binary PGM tile with a placement comment:
//! `P5\n# peergrid-mandelbrot x=X0 y=Y0 image=WIDTHxHEIGHT tile=T\nW H\n255\n` + W*H bytes.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One parsed tile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub x0: u32,
    pub y0: u32,
    pub image_width: u32,
    pub image_height: u32,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

fn field<'a>(comment: &'a str, key: &str) -> Result<&'a str> {
    comment
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .with_context(|| format!("tile header has no {key}= field"))
}

/// Parse one tile output.
pub fn parse_tile(bytes: &[u8]) -> Result<Tile> {
    // Header: 4 lines.
    let mut lines = Vec::new();
    let mut pos = 0;
    while lines.len() < 4 {
        let nl = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .context("truncated tile header")?;
        lines.push(std::str::from_utf8(&bytes[pos..pos + nl]).context("tile header is not text")?);
        pos += nl + 1;
        if pos > 4096 {
            bail!("tile header too long");
        }
    }
    if lines[0] != "P5" || lines[3] != "255" {
        bail!("not an 8-bit binary PGM tile (expected P5 ... 255)");
    }
    let comment = lines[1]
        .strip_prefix("# peergrid-mandelbrot")
        .context("missing '# peergrid-mandelbrot' placement comment")?;
    let num = |s: &str, what: &str| {
        s.parse::<u32>()
            .with_context(|| format!("bad {what} {s:?} in tile header"))
    };
    let x0 = num(field(comment, "x")?, "x")?;
    let y0 = num(field(comment, "y")?, "y")?;
    let (iw, ih) = field(comment, "image")?
        .split_once('x')
        .context("image= must be WIDTHxHEIGHT")?;
    let (image_width, image_height) = (num(iw, "image width")?, num(ih, "image height")?);
    let (w, h) = lines[2].split_once(' ').context("bad PGM size line")?;
    let (width, height) = (num(w, "width")?, num(h, "height")?);
    let pixels = bytes[pos..].to_vec();
    if pixels.len() as u64 != width as u64 * height as u64 {
        bail!(
            "tile has {} pixel bytes, expected {width}x{height}",
            pixels.len()
        );
    }
    if x0 as u64 + width as u64 > image_width as u64
        || y0 as u64 + height as u64 > image_height as u64
    {
        bail!("tile at ({x0},{y0}) size {width}x{height} does not fit in a {image_width}x{image_height} image");
    }
    Ok(Tile {
        x0,
        y0,
        image_width,
        image_height,
        width,
        height,
        pixels,
    })
}

/// The assembled image: 8-bit grayscale, row-major.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    /// Pixels no tile covered (left at `fill`).
    pub uncovered: u64,
}

/// Place `tiles` (any order) into one image. Uncovered pixels get `fill`.
pub fn assemble<'a>(tiles: impl IntoIterator<Item = &'a [u8]>, fill: u8) -> Result<Image> {
    let mut image: Option<Image> = None;
    let mut covered: Vec<bool> = Vec::new();
    for (n, bytes) in tiles.into_iter().enumerate() {
        let t = parse_tile(bytes).with_context(|| format!("tile #{n}"))?;
        let img = image.get_or_insert_with(|| {
            let size = t.image_width as usize * t.image_height as usize;
            covered = vec![false; size];
            Image {
                width: t.image_width,
                height: t.image_height,
                pixels: vec![fill; size],
                uncovered: 0,
            }
        });
        if (img.width, img.height) != (t.image_width, t.image_height) {
            bail!(
                "tiles disagree on the image size: {}x{} vs {}x{}",
                img.width,
                img.height,
                t.image_width,
                t.image_height
            );
        }
        for row in 0..t.height as usize {
            let dst = (t.y0 as usize + row) * img.width as usize + t.x0 as usize;
            let src = row * t.width as usize;
            img.pixels[dst..dst + t.width as usize]
                .copy_from_slice(&t.pixels[src..src + t.width as usize]);
            covered[dst..dst + t.width as usize]
                .iter_mut()
                .for_each(|c| *c = true);
        }
    }
    let mut img = image.context("no tiles")?;
    img.uncovered = covered.iter().filter(|c| !**c).count() as u64;
    Ok(img)
}

/// Write an 8-bit grayscale PNG.
pub fn write_png(img: &Image, path: &Path) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), img.width, img.height);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().context("cannot write PNG header")?;
    w.write_image_data(&img.pixels)
        .context("cannot write PNG data")?;
    w.finish().context("cannot finish PNG")?;
    Ok(())
}
