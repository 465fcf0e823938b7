//! A long task that survives interruptions: STEPS rounds of integer mixing over a 4-word
//! state, checkpointing every EVERY steps through the Peergrid checkpoint API, so a worker
//! that is killed resumes from the newest checkpoint. Args: `STEPS [EVERY] [WORK]` (WORK:
//! mixing rounds per step, default 20000). Output: `steps STEPS state HEX\n`, the same
//! whether or not the run was resumed. Stderr says where it started.
use std::io::Write;

mod peergrid;

const STATE_BYTES: usize = 40;

struct State {
    step: u64,
    acc: [u64; 4],
}

impl State {
    fn fresh() -> State {
        State {
            step: 0,
            acc: [
                0x6a09e667f3bcc908,
                0xbb67ae8584caa73b,
                0x3c6ef372fe94f82b,
                0xa54ff53a5f1d36f1,
            ],
        }
    }

    fn encode(&self) -> [u8; STATE_BYTES] {
        let mut b = [0u8; STATE_BYTES];
        b[..8].copy_from_slice(&self.step.to_le_bytes());
        for (i, a) in self.acc.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<State> {
        if b.len() != STATE_BYTES {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(w)
        };
        Some(State {
            step: word(0),
            acc: [word(1), word(2), word(3), word(4)],
        })
    }

    fn step(&mut self, work: u64) {
        let [mut a, mut b, mut c, mut d] = self.acc;
        for i in 0..work {
            a = a.wrapping_add(b ^ i).rotate_left(13);
            b = b.wrapping_mul(0x9e3779b97f4a7c15) ^ c;
            c = c.wrapping_add(d).rotate_right(29);
            d ^= a.wrapping_add(self.step);
        }
        self.acc = [a, b, c, d];
        self.step += 1;
    }
}

fn usage() -> ! {
    eprintln!("usage: longrun STEPS [EVERY] [WORK]  (numbers; EVERY >= 1)");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        match args.get(i) {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| usage()),
        }
    };
    if args.is_empty() || args.len() > 3 {
        usage();
    }
    let steps = num(0, 0);
    let every = num(1, 100);
    let work = num(2, 20_000);
    if every == 0 {
        usage();
    }
    let mut state = match peergrid::restore().and_then(|b| State::decode(&b)) {
        Some(s) if s.step <= steps => {
            eprintln!("longrun: resumed at step {}", s.step);
            s
        }
        _ => {
            eprintln!("longrun: fresh start");
            State::fresh()
        }
    };
    while state.step < steps {
        state.step(work);
        if state.step % every == 0 {
            let _ = peergrid::checkpoint(&state.encode());
            peergrid::progress(state.step as f64 / steps as f64);
        }
    }
    let mut hex = String::new();
    for a in &state.acc {
        hex.push_str(&format!("{:016x}", a));
    }
    let out = format!("steps {} state {}\n", state.step, hex);
    std::io::stdout().write_all(out.as_bytes()).unwrap();
}
