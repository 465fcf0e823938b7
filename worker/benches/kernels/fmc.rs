//! Benchmark kernel (std only, built natively and for wasm32-wasi by benches/sandbox.rs):
//! a floating-point Monte Carlo estimate of pi plus a sum of square roots, so NaN
//! canonicalization has float arithmetic to cost. argv = [name, SAMPLES]; prints the result.

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10_000_000);
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    };
    let (mut hits, mut acc) = (0u64, 0.0f64);
    for _ in 0..n {
        let (x, y) = (next(), next());
        let r2 = x * x + y * y;
        if r2 < 1.0 {
            hits += 1;
        }
        acc += r2.sqrt() * 0.5 + x.mul_add(y, -0.25).abs();
    }
    println!("{} {} {:.6} {:.3}", hits, n, 4.0 * hits as f64 / n as f64, acc);
}
