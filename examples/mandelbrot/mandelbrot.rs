//! Peergrid sample task: render one tile of a large Mandelbrot image.
//!
//! Guest ABI: a WASI command. argv = [job name, TILE, TILES_X, TILES_Y, WIDTH, HEIGHT,
//! MAX_ITER, (CX, CY, VIEW_WIDTH)]; stdin is ignored.
//!
//! The image is WIDTH x HEIGHT pixels, cut into TILES_X x TILES_Y tiles; tile TILE (row-major:
//! column TILE % TILES_X, row TILE / TILES_X) spans columns [tx*TW, min((tx+1)*TW, WIDTH)) and
//! rows [ty*TH, min((ty+1)*TH, HEIGHT)) where TW = ceil(WIDTH / TILES_X), TH likewise.
//! The view is centred on CX + CY*i (default -0.75 + 0i) and VIEW_WIDTH wide in the complex
//! plane (default 3.5); pixels are square.
//!
//! Output: the tile as a binary PGM (P5) image, so each output can be viewed on its own:
//!   "P5\n# peergrid-mandelbrot x=X0 y=Y0 image=WIDTHxHEIGHT tile=TILE\nW H\n255\n" + W*H bytes
//! (row-major, 8-bit gray: 0 for points in the set, else 255*(n/MAX_ITER)^(1/4) after n
//! escape iterations, so the set is black on a background that brightens towards its edge). All arithmetic is plain IEEE f64 (+, -, *, /, sqrt): deterministic.
//! `mandel-png` (examples/tools) assembles the tiles of a job into one PNG.
//! Build: /usr/bin/rustc -O --target wasm32-wasi -C strip=symbols -C target-feature=+simd128 mandelbrot.rs -o mandelbrot.wasm

use std::io::Write;
use std::process::exit;

fn escape_iterations(cr: f64, ci: f64, max_iter: u32) -> u32 {
    // Skip the main cardioid and the period-2 bulb: their points never escape.
    let y2 = ci * ci;
    let q = (cr - 0.25) * (cr - 0.25) + y2;
    if q * (q + (cr - 0.25)) <= 0.25 * y2 || (cr + 1.0) * (cr + 1.0) + y2 <= 0.0625 {
        return max_iter;
    }
    let (mut zr, mut zi) = (0.0f64, 0.0f64);
    let (mut zr2, mut zi2) = (0.0f64, 0.0f64);
    let mut n = 0;
    while n < max_iter && zr2 + zi2 <= 4.0 {
        zi = 2.0 * zr * zi + ci;
        zr = zr2 - zi2 + cr;
        zr2 = zr * zr;
        zi2 = zi * zi;
        n += 1;
    }
    n
}

fn shade(n: u32, max_iter: u32) -> u8 {
    if n >= max_iter {
        0
    } else {
        let v = 255.0 * (n as f64 / max_iter as f64).sqrt().sqrt();
        v as u8
    }
}

fn parse_u(what: &str, s: &str) -> u64 {
    match s.trim().parse::<u64>() {
        Ok(v) => v,
        Err(_) => fail(&format!("{what} must be a non-negative integer, got {s:?}")),
    }
}

fn parse_f(what: &str, s: &str) -> f64 {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        _ => fail(&format!("{what} must be a finite number, got {s:?}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("mandelbrot: {msg}");
    eprintln!("usage: mandelbrot TILE TILES_X TILES_Y WIDTH HEIGHT MAX_ITER [CX CY VIEW_WIDTH]");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 6 && args.len() != 9 {
        fail("expected 6 or 9 arguments");
    }
    let tile = parse_u("TILE", &args[0]);
    let tiles_x = parse_u("TILES_X", &args[1]);
    let tiles_y = parse_u("TILES_Y", &args[2]);
    let width = parse_u("WIDTH", &args[3]);
    let height = parse_u("HEIGHT", &args[4]);
    let max_iter = parse_u("MAX_ITER", &args[5]);
    let (cx, cy, view) = if args.len() == 9 {
        (parse_f("CX", &args[6]), parse_f("CY", &args[7]), parse_f("VIEW_WIDTH", &args[8]))
    } else {
        (-0.75, 0.0, 3.5)
    };
    if tiles_x == 0 || tiles_y == 0 || width == 0 || height == 0 {
        fail("TILES_X, TILES_Y, WIDTH and HEIGHT must be positive");
    }
    if width > 1 << 20 || height > 1 << 20 || tiles_x > width || tiles_y > height {
        fail("WIDTH and HEIGHT must be at most 2^20, and at least TILES_X and TILES_Y");
    }
    if max_iter == 0 || max_iter > 1 << 24 {
        fail("MAX_ITER must be between 1 and 2^24");
    }
    if tile >= tiles_x * tiles_y {
        fail(&format!("TILE must be less than TILES_X*TILES_Y = {}", tiles_x * tiles_y));
    }
    let tw = (width + tiles_x - 1) / tiles_x;
    let th = (height + tiles_y - 1) / tiles_y;
    let x0 = (tile % tiles_x) * tw;
    let y0 = (tile / tiles_x) * th;
    let x1 = if x0 + tw < width { x0 + tw } else { width };
    let y1 = if y0 + th < height { y0 + th } else { height };
    if x0 >= x1 || y0 >= y1 {
        fail("this tile is empty: use fewer tiles for this image size");
    }
    let (w, h) = (x1 - x0, y1 - y0);
    let pixel = view / width as f64;
    let max_iter = max_iter as u32;

    let mut out = format!(
        "P5\n# peergrid-mandelbrot x={x0} y={y0} image={width}x{height} tile={tile}\n{w} {h}\n255\n"
    )
    .into_bytes();
    out.reserve((w * h) as usize);
    for py in y0..y1 {
        // row 0 is the top of the image (largest imaginary part)
        let ci = cy - (py as f64 + 0.5 - height as f64 / 2.0) * pixel;
        for px in x0..x1 {
            let cr = cx + (px as f64 + 0.5 - width as f64 / 2.0) * pixel;
            out.push(shade(escape_iterations(cr, ci, max_iter), max_iter));
        }
    }
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    if stdout.write_all(&out).and_then(|_| stdout.flush()).is_err() {
        exit(1);
    }
}
