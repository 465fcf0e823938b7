//! Known-answer tests of the sample workloads, run through the worker's wasmtime sandbox
//! (`worker::sandbox`), the same code path as `worker exec` and `worker join`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use peergrid_examples::{examples_dir, mandel, pi, seti};
use tasks::job::{JobId, JobSpec};
use tasks::Status;
use worker::sandbox::{RunControl, RunOutput, RunSpec, Sandbox, SandboxConfig};

const SAMPLES: [&str; 4] = ["primes", "pi", "mandelbrot", "seti"];

fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| Sandbox::new(SandboxConfig::default()).expect("sandbox"))
}

/// The sandbox of the `native` determinism class: the fixed ISA baseline, no NaN
/// canonicalization.
fn sandbox_native() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| {
        Sandbox::new(SandboxConfig {
            deterministic: false,
            ..SandboxConfig::default()
        })
        .expect("sandbox")
    })
}

fn wasm(name: &str) -> Vec<u8> {
    let p = examples_dir().join(name).join(format!("{name}.wasm"));
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (run examples/build.sh)", p.display()))
}

/// Run a sample with the given args and stdin; assert it succeeded; return the run.
fn run_in(sb: &Sandbox, name: &str, args: &[&str], input: Vec<u8>) -> RunOutput {
    let spec = RunSpec {
        argv: std::iter::once(name.to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .collect(),
        input,
        fuel: 20_000_000_000,
        memory_mb: 256,
        max_output: 1 << 20,
        seed: [7; 32],
    };
    let out = sb
        .run_bytes(&wasm(name), &spec, &RunControl::default())
        .expect("not cancelled");
    assert_eq!(
        out.result.status,
        Status::Ok,
        "{name} {args:?}: {:?} {:?} stderr={}",
        out.result,
        out.error,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(name: &str, args: &[&str], input: Vec<u8>) -> RunOutput {
    run_in(sandbox(), name, args, input)
}

fn text(out: &RunOutput) -> String {
    String::from_utf8(out.output.clone()).expect("utf-8 output")
}

/// Run every task of a job file as a worker would (argv, input, limits from the manifest).
fn run_job(job: &Path, only: Option<&[u32]>) -> Vec<(u32, RunOutput)> {
    let spec = JobSpec::from_file(job).unwrap_or_else(|e| panic!("{e}"));
    let (manifest, blobs) = spec.load_blobs().unwrap_or_else(|e| panic!("{e}"));
    let module = &blobs[&manifest.module.id];
    let mut outs = Vec::new();
    for index in 0..manifest.tasks.len() as u32 {
        if only.is_some_and(|o| !o.contains(&index)) {
            continue;
        }
        let t = manifest.task(JobId(1), index).unwrap();
        let input = t.input.map(|r| blobs[&r.id].clone()).unwrap_or_default();
        let out = sandbox()
            .run_bytes(
                module,
                &RunSpec::from_manifest(&t, input),
                &RunControl::default(),
            )
            .unwrap();
        assert_eq!(
            out.result.status,
            Status::Ok,
            "{} task {index}: {:?} {:?}",
            job.display(),
            out.result,
            out.error
        );
        outs.push((index, out));
    }
    outs
}

#[test]
fn primes_known_answers() {
    let count = |from: u64, to: u64| -> u64 {
        let out = run("primes", &[&from.to_string(), &to.to_string()], Vec::new());
        let t = text(&out);
        assert!(
            t.ends_with('\n') && !t[..t.len() - 1].contains('\n'),
            "{t:?}"
        );
        t.trim().parse().unwrap()
    };
    assert_eq!(count(0, 10), 4);
    assert_eq!(count(2, 3), 1);
    assert_eq!(count(3, 3), 0);
    assert_eq!(count(10, 0), 0);
    assert_eq!(count(0, 10_000_000), 664_579);
    assert_eq!(count(1_000_000_000, 1_000_100_000), 4_832);
    // block form: [i*SIZE, (i+1)*SIZE)
    let blocks: u64 = (0..10)
        .map(|i| {
            text(&run(
                "primes",
                &["block", &i.to_string(), "1000000"],
                Vec::new(),
            ))
            .trim()
            .parse::<u64>()
            .unwrap()
        })
        .sum();
    assert_eq!(blocks, 664_579);
}

/// The committed job file: 100 tasks over [0, 10^8), summing to pi(10^8) = 5761455, each
/// within the job's fuel budget. About a second in the sandbox.
#[test]
fn primes_job_sums_to_pi_of_1e8() {
    let outs = run_job(&examples_dir().join("primes/job.toml"), None);
    assert_eq!(outs.len(), 100);
    let total: u64 = outs
        .iter()
        .map(|(_, o)| text(o).trim().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 5_761_455);
    let max_fuel = outs.iter().map(|(_, o)| o.result.fuel_used).max().unwrap();
    eprintln!("primes: max fuel per task {max_fuel}");
}

#[test]
fn pi_estimate_is_within_the_statistical_bound() {
    let outs: Vec<Vec<u8>> = (0..8)
        .map(|i| run("pi", &[&i.to_string(), "1000000"], Vec::new()).output)
        .collect();
    // the committed job's task size (10^7 samples) fits its fuel budget
    let job = run_job(&examples_dir().join("pi/job.toml"), Some(&[0]));
    eprintln!("pi: fuel per job task {}", job[0].1.result.fuel_used);
    for o in &outs {
        let (h, n) = pi::parse_output(o).unwrap();
        assert_eq!(n, 1_000_000);
        assert!(h > 700_000 && h < 870_000, "{h}");
    }
    // different tasks draw different streams
    assert_ne!(outs[0], outs[1]);
    let e = pi::combine(outs.iter().map(|o| o.as_slice())).unwrap();
    assert_eq!(e.samples, 8_000_000);
    let p = std::f64::consts::FRAC_PI_4;
    assert!((e.stderr - 4.0 * (p * (1.0 - p) / 8e6).sqrt()).abs() < 1e-5);
    // 4 standard errors: the outputs are deterministic, so this either always holds or never.
    assert!(
        (e.pi - std::f64::consts::PI).abs() < 4.0 * e.stderr,
        "{e:?}"
    );
    let (lo, hi) = e.ci95();
    assert!(lo < e.pi && e.pi < hi);
}

/// Render a small image in uneven tiles through the sandbox, write the outputs as
/// `coordinator results` does, assemble them with the library behind `mandel-png`, and decode
/// the PNG: full size, and the same pixels as the image rendered as one tile.
#[test]
fn mandelbrot_tiles_assemble_into_a_full_size_png() {
    let (w, h, tx, ty) = (203u32, 121u32, 4u32, 3u32);
    let dir = tempfile::tempdir().unwrap();
    for i in 0..tx * ty {
        let out = run(
            "mandelbrot",
            &[
                &i.to_string(),
                &tx.to_string(),
                &ty.to_string(),
                &w.to_string(),
                &h.to_string(),
                "200",
            ],
            Vec::new(),
        );
        std::fs::write(dir.path().join(format!("{i}.out")), &out.output).unwrap();
    }
    let r = peergrid_examples::results::read_dir(dir.path()).unwrap();
    let img = mandel::assemble(r.outputs.values().map(|v| v.as_slice()), 128).unwrap();
    assert_eq!((img.width, img.height, img.uncovered), (w, h, 0));
    let png_path = dir.path().join("m.png");
    mandel::write_png(&img, &png_path).unwrap();

    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    assert_eq!(info.color_type, png::ColorType::Grayscale);

    let whole = run(
        "mandelbrot",
        &["0", "1", "1", &w.to_string(), &h.to_string(), "200"],
        Vec::new(),
    );
    let whole = mandel::parse_tile(&whole.output).unwrap();
    assert_eq!(&buf[..info.buffer_size()], &whole.pixels[..]);
    // the set is black, the far corners dark gray
    assert_eq!(whole.pixels[(h / 2 * w + w * 2 / 3) as usize], 0);
    assert!(
        whole.pixels[0] > 0 && whole.pixels[0] < 128,
        "far corner: few iterations, dark but not black"
    );
}

/// The committed job file's tiles: 64 tiles of 256x256 in a 2048x2048 image. Its 64 tasks are
/// tiles 0..63 of one 8x8 grid, so they cover the image if a tile's index places it as
/// `(i % 8, i / 8)`; three tiles (first, a middle one, last) are run to check that placement
/// and that they fit the job's fuel and output limits.
#[test]
fn mandelbrot_job_tiles_cover_the_image() {
    let job = examples_dir().join("mandelbrot/job.toml");
    let spec = JobSpec::from_file(&job).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.tasks.len(), 64);
    for (i, t) in spec.tasks.iter().enumerate() {
        let mut want = vec![i.to_string()];
        want.extend(["8", "8", "2048", "2048", "1000"].map(String::from));
        assert_eq!(t.args, want, "task {i}");
    }
    let outs = run_job(&job, Some(&[0, 27, 63]));
    assert_eq!(outs.len(), 3);
    for (i, o) in &outs {
        let t = mandel::parse_tile(&o.output).unwrap();
        assert_eq!(
            (t.image_width, t.image_height, t.width, t.height),
            (2048, 2048, 256, 256)
        );
        assert_eq!((t.x0, t.y0), ((i % 8) * 256, (i / 8) * 256));
        eprintln!("mandelbrot tile {i}: fuel {}", o.result.fuel_used);
    }
}

fn check_seti(truth: &seti::Truth, read: impl Fn(&str) -> Vec<u8>, args: &[&str]) {
    for f in &truth.files {
        let out = run("seti", args, read(&f.file));
        let cands = seti::parse_candidates(&out.output).unwrap();
        match &f.signal {
            None => assert!(
                cands.is_empty(),
                "{}: false candidates in pure noise: {cands:?}",
                f.file
            ),
            Some(s) => {
                assert!(
                    cands.iter().any(|c| seti::matches(c, s, truth.params.fft)),
                    "{}: signal {s:?} not found in {cands:?}",
                    f.file
                );
                let false_ones: Vec<_> = cands
                    .iter()
                    .filter(|c| !seti::matches(c, s, truth.params.fft))
                    .collect();
                assert!(
                    false_ones.is_empty(),
                    "{}: false candidates {false_ones:?} beside {s:?}",
                    f.file
                );
            }
        }
    }
}

/// Freshly generated inputs (not the committed ones): every injected signal is found within
/// one bin (and two bins of drift), and pure-noise files give no candidates.
#[test]
fn seti_finds_every_injected_signal_and_nothing_in_noise() {
    let p = seti::GenParams {
        seed: 42,
        count: 12,
        signals: 6,
        ..Default::default()
    };
    let truth = seti::plan(&p);
    assert_eq!(truth.files.iter().filter(|f| f.signal.is_some()).count(), 6);
    let files: Vec<Vec<u8>> = truth
        .files
        .iter()
        .map(|f| seti::generate_file(&p, truth.windows, f))
        .collect();
    assert!(files.iter().all(|f| f.len() >= 256 * 1024));
    check_seti(
        &truth,
        |name| files[name.trim_end_matches(".bin").parse::<usize>().unwrap()].clone(),
        &[],
    );
}

/// The committed job inputs are exactly what `seti-gen` (defaults) writes, and the committed
/// job file finds exactly the signals of the committed truth.json.
#[test]
fn seti_committed_inputs_and_job() {
    let dir = examples_dir().join("seti/inputs");
    let text = std::fs::read_to_string(dir.join("truth.json")).unwrap();
    let truth = seti::plan(&seti::GenParams::default());
    // compare as text: serde_json's float parsing may differ in the last bit
    assert_eq!(
        text,
        serde_json::to_string_pretty(&truth).unwrap() + "\n",
        "inputs/truth.json is not what seti-gen's defaults give"
    );
    for f in &truth.files {
        let bytes = std::fs::read(dir.join(&f.file)).unwrap();
        assert!(
            bytes == seti::generate_file(&truth.params, truth.windows, f),
            "{} differs from seti-gen's output",
            f.file
        );
    }
    let outs = run_job(&examples_dir().join("seti/job.toml"), None);
    assert_eq!(outs.len(), truth.files.len());
    eprintln!(
        "seti: max fuel per task {}",
        outs.iter().map(|(_, o)| o.result.fuel_used).max().unwrap()
    );
    let by_index: Vec<Vec<u8>> = outs.into_iter().map(|(_, o)| o.output).collect();
    for f in &truth.files {
        let cands = seti::parse_candidates(&by_index[f.index as usize]).unwrap();
        match &f.signal {
            None => assert!(cands.is_empty(), "{}: {cands:?}", f.file),
            Some(s) => assert!(
                cands.len() == 1 && seti::matches(&cands[0], s, truth.params.fft),
                "{}: {s:?} vs {cands:?}",
                f.file
            ),
        }
    }
}

/// Every sample gives the same result digest on repeated runs, also in a second sandbox.
#[test]
fn repeated_runs_give_the_same_digest() {
    let p = seti::GenParams {
        seed: 5,
        count: 1,
        signals: 1,
        ..Default::default()
    };
    let truth = seti::plan(&p);
    let seti_input = seti::generate_file(&p, truth.windows, &truth.files[0]);
    let cases: [(&str, Vec<&str>, Vec<u8>); 4] = [
        ("primes", vec!["0", "2000000"], Vec::new()),
        ("pi", vec!["3", "200000"], Vec::new()),
        (
            "mandelbrot",
            vec!["5", "4", "4", "256", "256", "300"],
            Vec::new(),
        ),
        ("seti", vec![], seti_input),
    ];
    let other = Sandbox::new(SandboxConfig::default()).unwrap();
    for (name, args, input) in cases {
        let a = run(name, &args, input.clone());
        let b = run(name, &args, input.clone());
        let c = run_in(&other, name, &args, input);
        assert_eq!(a.result.digest(), b.result.digest(), "{name}");
        assert_eq!(
            a.result.digest(),
            c.result.digest(),
            "{name} in a second sandbox"
        );
        assert_eq!(a.output, c.output);
        assert!(a.result.fuel_used > 0);
    }
}

/// The committed job files parse, and their modules and inputs load.
#[test]
fn job_files_are_valid() {
    for name in SAMPLES {
        let job = examples_dir().join(name).join("job.toml");
        let spec = JobSpec::from_file(&job).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.name, name);
        spec.load_blobs().unwrap_or_else(|e| panic!("{e}"));
    }
}

fn have_debian_wasm_rustc() -> Result<(), String> {
    let rustc = Path::new("/usr/bin/rustc");
    if !rustc.exists() {
        return Err(
            "/usr/bin/rustc is missing (apt-get install rustc libstd-rust-dev-wasm32 lld)".into(),
        );
    }
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| e.to_string())?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib/wasm32-wasi").is_dir() {
        return Err(
            "no wasm32-wasi std for /usr/bin/rustc (apt-get install libstd-rust-dev-wasm32 lld)"
                .into(),
        );
    }
    Ok(())
}

/// Each committed .wasm is byte for byte what `examples/build.sh` builds from its source.
#[test]
fn committed_wasm_is_what_the_source_builds_to() {
    if let Err(why) = have_debian_wasm_rustc() {
        eprintln!("skipping committed_wasm_is_what_the_source_builds_to: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(examples_dir().join("build.sh"))
        .env("BUILD_DIR", dir.path())
        .env("SKIP_INPUTS", "1")
        .status()
        .unwrap();
    assert!(status.success(), "build.sh failed");
    for name in SAMPLES {
        let built = std::fs::read(dir.path().join(name).join(format!("{name}.wasm"))).unwrap();
        assert!(
            built == wasm(name),
            "examples/{name}/{name}.wasm is stale: run examples/build.sh"
        );
    }
}

/// The native builds (the benchmark baseline: `rustc -O <name>.rs`) compute the same bytes as
/// the sandboxed modules, in both determinism classes (`portable`: NaN canonicalization;
/// `native`: the ISA baseline without it). Skipped if no host `rustc` is on PATH.
#[test]
fn native_builds_agree_with_the_sandbox() {
    if Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("skipping native_builds_agree_with_the_sandbox: no rustc on PATH");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = seti::GenParams {
        seed: 9,
        count: 1,
        signals: 1,
        ..Default::default()
    };
    let truth = seti::plan(&p);
    let seti_input = seti::generate_file(&p, truth.windows, &truth.files[0]);
    let cases: [(&str, Vec<&str>, Vec<u8>); 4] = [
        ("primes", vec!["999000", "2000000"], Vec::new()),
        ("pi", vec!["11", "300000"], Vec::new()),
        (
            "mandelbrot",
            vec![
                "2", "2", "2", "160", "100", "500", "-0.7436", "0.1318", "0.01",
            ],
            Vec::new(),
        ),
        ("seti", vec!["drift=40"], seti_input),
    ];
    for (name, args, input) in cases {
        let exe = dir.path().join(name);
        let src = examples_dir().join(name).join(format!("{name}.rs"));
        let st = Command::new("rustc")
            .args(["-O"])
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .unwrap();
        assert!(st.success(), "native build of {name} failed");
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = input.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&feed);
        });
        let native = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(native.status.success(), "{name}");
        let sandboxed = run(name, &args, input.clone());
        assert!(
            native.stdout == sandboxed.output,
            "{name}: native and sandboxed (portable class) outputs differ"
        );
        let fast = run_in(sandbox_native(), name, &args, input);
        assert!(
            native.stdout == fast.output,
            "{name}: native and sandboxed (native class) outputs differ"
        );
    }
}
