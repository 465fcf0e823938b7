//! Peergrid sample task: Monte Carlo estimate of pi.
//!
//! Guest ABI: a WASI command. argv = [job name, TASK_INDEX, SAMPLES, (SEED)]; stdin is
//! ignored; stdout is "HITS SAMPLES\n" in ASCII decimal.
//!
//! Each task draws SAMPLES points (x, y) uniformly from the integer grid [0, 2^32)^2 with its
//! own xoshiro256** stream, seeded by splitmix64 from (SEED, TASK_INDEX), and counts the
//! points with x^2 + y^2 < 2^64 (inside the quarter circle). HITS / SAMPLES estimates pi/4.
//! The result depends only on the args: every replica, and a native build, prints the same.
//! Combine the outputs of many tasks with `pi-combine` (examples/tools).
//! Build: /usr/bin/rustc -O --target wasm32-wasi -C strip=symbols -C target-feature=+simd128 pi.rs -o pi.wasm

use std::io::Write;
use std::process::exit;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Xoshiro256ss {
    s: [u64; 4],
}

impl Xoshiro256ss {
    fn new(seed: u64, stream: u64) -> Self {
        let mut sm = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut s = [0u64; 4];
        for x in s.iter_mut() {
            *x = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro256ss { s }
    }

    #[inline(always)]
    fn next(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

fn count_hits(task: u64, samples: u64, seed: u64) -> u64 {
    let mut rng = Xoshiro256ss::new(seed, task);
    let mut hits = 0u64;
    for _ in 0..samples {
        let r = rng.next();
        let x = r >> 32;
        let y = r & 0xFFFF_FFFF;
        // x^2 + y^2 < 2^64  <=>  the sum does not overflow a u64
        hits += !(x * x).overflowing_add(y * y).1 as u64;
    }
    hits
}

fn parse(what: &str, s: &str) -> u64 {
    match s.trim().parse::<u64>() {
        Ok(v) => v,
        Err(_) => fail(&format!("{what} must be a non-negative integer, got {s:?}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("pi: {msg}");
    eprintln!("usage: pi TASK_INDEX SAMPLES [SEED]   (prints \"HITS SAMPLES\")");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        fail("expected 2 or 3 arguments");
    }
    let task = parse("TASK_INDEX", &args[0]);
    let samples = parse("SAMPLES", &args[1]);
    let seed = if args.len() == 3 { parse("SEED", &args[2]) } else { 0x5EED_0F_91 };
    let hits = count_hits(task, samples, seed);
    let out = std::io::stdout();
    let mut out = out.lock();
    if writeln!(out, "{hits} {samples}").and_then(|_| out.flush()).is_err() {
        exit(1);
    }
}
