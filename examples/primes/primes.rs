//! Peergrid sample task: count the primes in a half-open range with a segmented sieve.
//!
//! Guest ABI: a WASI command. argv = [job name, args...]; stdin is ignored; stdout is the
//! count in ASCII decimal followed by "\n".
//!
//! Args (two forms):
//!   FROM TO            count the primes p with FROM <= p < TO
//!   block I SIZE       count the primes in [I*SIZE, (I+1)*SIZE)  (for `{i}` job files)
//!
//! TO may be at most 10^14 (the base sieve up to sqrt(TO) stays under 5 MiB). The segment
//! sieve uses a fixed 256 KiB buffer (odd numbers only), so memory stays small.
//! Build: /usr/bin/rustc -O --target wasm32-wasi -C strip=symbols -C target-feature=+simd128 primes.rs -o primes.wasm

use std::io::Write;
use std::process::exit;

const MAX_TO: u64 = 100_000_000_000_000; // 10^14
const SEGMENT: usize = 1 << 18; // odd numbers per segment (256 KiB of flags)

fn isqrt(n: u64) -> u64 {
    let mut r = (n as f64).sqrt() as u64;
    while r > 0 && r.saturating_mul(r) > n {
        r -= 1;
    }
    while (r + 1).saturating_mul(r + 1) <= n {
        r += 1;
    }
    r
}

/// Odd primes up to and including `limit`.
fn base_primes(limit: u64) -> Vec<u32> {
    let mut primes = Vec::new();
    if limit < 3 {
        return primes;
    }
    // flags[j] is 2j+1
    let n = (limit as usize - 1) / 2 + 1;
    let mut flags = vec![true; n];
    flags[0] = false;
    let mut j = 1;
    while (2 * j + 1) * (2 * j + 1) <= limit as usize {
        if flags[j] {
            let p = 2 * j + 1;
            let mut k = (p * p - 1) / 2;
            while k < n {
                flags[k] = false;
                k += p;
            }
        }
        j += 1;
    }
    for (j, &f) in flags.iter().enumerate() {
        if f {
            primes.push((2 * j + 1) as u32);
        }
    }
    primes
}

/// Number of primes p with from <= p < to.
fn count_primes(from: u64, to: u64) -> u64 {
    if to <= from {
        return 0;
    }
    let mut count = 0u64;
    if from <= 2 && 2 < to {
        count += 1;
    }
    let mut lo = if from < 3 { 3 } else { from };
    if lo % 2 == 0 {
        lo += 1;
    }
    if lo >= to {
        return count;
    }
    let primes = base_primes(isqrt(to - 1));
    let mut seg = vec![0u8; SEGMENT];
    let mut start = lo; // odd
    while start < to {
        let end = if to - start > 2 * SEGMENT as u64 { start + 2 * SEGMENT as u64 } else { to };
        let n = ((end - start + 1) / 2) as usize; // odd numbers start, start+2, ... < end
        let flags = &mut seg[..n];
        for f in flags.iter_mut() {
            *f = 1;
        }
        for &p in &primes {
            let p = p as u64;
            let pp = p * p;
            if pp >= end {
                break;
            }
            // first odd multiple of p that is >= max(start, p*p)
            let mut m = if pp >= start { pp } else { (start + p - 1) / p * p };
            if m % 2 == 0 {
                m += p;
            }
            let mut k = ((m - start) / 2) as usize;
            let step = p as usize;
            while k < n {
                flags[k] = 0;
                k += step;
            }
        }
        count += flags.iter().map(|&f| f as u64).sum::<u64>();
        start = end + (end % 2 == 0) as u64;
    }
    count
}

fn parse(what: &str, s: &str) -> u64 {
    match s.trim().parse::<u64>() {
        Ok(v) => v,
        Err(_) => fail(&format!("{what} must be a non-negative integer, got {s:?}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("primes: {msg}");
    eprintln!("usage: primes FROM TO | primes block I SIZE   (counts primes in [FROM, TO) or [I*SIZE, (I+1)*SIZE))");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (from, to) = match args.len() {
        2 => (parse("FROM", &args[0]), parse("TO", &args[1])),
        3 if args[0] == "block" => {
            let i = parse("I", &args[1]);
            let size = parse("SIZE", &args[2]);
            match (i.checked_mul(size), i.checked_add(1).and_then(|j| j.checked_mul(size))) {
                (Some(a), Some(b)) => (a, b),
                _ => fail("I*SIZE overflows"),
            }
        }
        _ => fail("expected 2 or 3 arguments"),
    };
    if to > MAX_TO {
        fail(&format!("TO must be at most {MAX_TO}"));
    }
    let n = count_primes(from, to);
    let out = std::io::stdout();
    let mut out = out.lock();
    if writeln!(out, "{n}").and_then(|_| out.flush()).is_err() {
        exit(1);
    }
}
