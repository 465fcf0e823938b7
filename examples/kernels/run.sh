#!/usr/bin/env bash
# Sandbox vs native on the samples and on PolyBench/C-style C kernels, in both determinism
# classes. A benchmark, not a test (never run by CI): prints one table of ratios from one run.
#
#   examples/kernels/run.sh [RUNS]        (default 5 runs of each, interleaved)
#   WORKER=path/to/worker                 the worker binary (default: $CARGO_TARGET_DIR or
#                                         target/, release if built, else debug)
#   BASE_WORKER=path/to/other/worker      also time another build (e.g. the previous release)
#                                         in the `native` class, interleaved with the rest,
#                                         and print its ratios beside WORKER's
#   POLYBENCH=path/to/PolyBenchC-4.2.1    also run the external suite: the 30 kernels of
#                                         PolyBench/C 4.2.1 (utilities/benchmark_list), not
#                                         shipped here (download it from its authors)
#   POLYBENCH_DATASET=LARGE               its dataset size (MINI, SMALL, MEDIUM, LARGE,
#                                         EXTRALARGE)
#   ONLY=name,name                        run only these kernels (e.g. ONLY=gemm,pb/lu)
#   NATIVE_CPU=x86-64-v2                  the CPU the native builds target (`-march` for clang,
#                                         `-C target-cpu` for rustc); default: the sandbox's
#                                         ISA baseline on x86_64 (x86-64-v2), the compilers'
#                                         default elsewhere. The same baseline both ways:
#                                         SSE4 is what the sandbox's code may use too.
#
# PolyBench kernels are built the same way (`-D<SIZE>_DATASET`, its utilities/polybench.c,
# -lm; wasm also with wasi-libc's emulated process clocks, which its timer code includes).
# The timed builds print nothing; a second build of each with POLYBENCH_DUMP_ARRAYS (its
# arrays printed to stdout) is run once per side to check the outputs are byte-identical.
#
# C kernels: built with `clang -O2 -msimd128 --target=wasm32-wasi` (Debian's wasi-libc) and
# natively with `clang -O2 -march=$NATIVE_CPU`. Samples: the committed .wasm
# (examples/build.sh: Debian's /usr/bin/rustc, -O -C codegen-units=1, wasm SIMD) against the same
# compiler's native build (`$NATIVE_RUSTC -O -C codegen-units=1 -C target-cpu=$NATIVE_CPU`,
# default /usr/bin/rustc, so both sides come from one LLVM), with examples/<name>/bench.args. Both sides are
# timed the same two ways, in the same runs, medians of interleaved runs:
# - whole process: the wall time of the native binary, or of `worker exec` with a warm
#   --cache-dir (so compilation is not counted), from fork to exit;
# - in-process: what a worker pays per task, without loading either program. Native: from a
#   constructor to a destructor of a preloaded timer library (before the program's own
#   initializers, after its exit handlers), in a second run of its own, since loading the
#   library adds to the whole process's time; sandbox: `worker exec --json`'s `wall_ms` (the
#   instantiation, the run and hashing its output; a worker keeps its engine and compiled
#   modules, so it pays no process start per task).
# Each sandboxed output is checked byte-for-byte against the native one.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
RUNS=${1:-5}
CLANG=${CLANG:-$(command -v clang || command -v clang-14 || true)}
NATIVE_RUSTC=${NATIVE_RUSTC:-/usr/bin/rustc}
[ -x "$NATIVE_RUSTC" ] || { echo "run.sh: needs $NATIVE_RUSTC, the compiler of the samples' .wasm (apt-get install rustc libstd-rust-dev-wasm32 lld)" >&2; exit 2; }
if [ -z "${NATIVE_CPU+set}" ] && [ "$(uname -m)" = x86_64 ]; then NATIVE_CPU=x86-64-v2; fi
NATIVE_CPU=${NATIVE_CPU:-}
cflags_cpu=(); rustc_cpu=()
if [ -n "$NATIVE_CPU" ]; then cflags_cpu=("-march=$NATIVE_CPU"); rustc_cpu=(-C "target-cpu=$NATIVE_CPU"); fi
[ -n "$CLANG" ] || { echo "run.sh: needs clang (apt-get install clang lld wasi-libc)" >&2; exit 2; }
if [ -z "${WORKER:-}" ]; then
    t=${CARGO_TARGET_DIR:-$root/target}
    if [ -x "$t/release/worker" ]; then WORKER=$t/release/worker; else WORKER=$t/debug/worker; fi
fi
[ -x "$WORKER" ] || { echo "run.sh: no worker binary at $WORKER (cargo build -p worker --release)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The native side's in-process timer: preloaded, it starts before the program's own
# initializers and stops after its exit handlers, and writes the seconds to $INPROC_TIME_FILE.
cat > "$work/inproc.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static struct timespec t0;
__attribute__((constructor(101))) static void inproc_start(void) { clock_gettime(CLOCK_MONOTONIC, &t0); }
__attribute__((destructor(101))) static void inproc_stop(void) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const char *path = getenv("INPROC_TIME_FILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fprintf(f, "%.9f\n", (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9); fclose(f); }
}
C
"$CLANG" -O2 -shared -fPIC "$work/inproc.c" -o "$work/inproc.so"

list=()
for k in gemm 2mm heat-3d doitgen jacobi-2d; do
    "$CLANG" -O2 -msimd128 --target=wasm32-wasi --sysroot=/usr -isystem /usr/include/wasm32-wasi \
        -L/usr/lib/wasm32-wasi "$here/$k.c" -o "$work/$k.wasm"
    "$CLANG" -O2 "${cflags_cpu[@]}" "$here/$k.c" -o "$work/$k"
    list+=("own|$k|$work/$k.wasm|$work/$k||||")
done
if [ -n "${POLYBENCH:-}" ]; then
    pb=$(cd "$POLYBENCH" && pwd)
    [ -f "$pb/utilities/benchmark_list" ] || { echo "run.sh: POLYBENCH=$POLYBENCH has no utilities/benchmark_list (a PolyBench/C 4.2.1 tree?)" >&2; exit 2; }
    size=${POLYBENCH_DATASET:-LARGE}
    # The dump goes to stderr in PolyBench; the check builds send it to stdout, which is what
    # `worker exec` captures as the task's output.
    mkdir -p "$work/pbcheck"
    sed 's/^#define POLYBENCH_DUMP_TARGET stderr/#define POLYBENCH_DUMP_TARGET stdout/' \
        "$pb/utilities/polybench.h" > "$work/pbcheck/polybench.h"
    while read -r src; do
        k=$(basename "$src" .c)
        d=$(dirname "$pb/$src")
        for v in time check; do
            inc=(-I "$pb/utilities" -I "$d")
            extra=()
            if [ $v = check ]; then inc=(-I "$work/pbcheck" "${inc[@]}"); extra=(-DPOLYBENCH_DUMP_ARRAYS); fi
            "$CLANG" -O2 -msimd128 --target=wasm32-wasi --sysroot=/usr -isystem /usr/include/wasm32-wasi \
                -L/usr/lib/wasm32-wasi -D_WASI_EMULATED_PROCESS_CLOCKS "${inc[@]}" "-D${size}_DATASET" "${extra[@]}" \
                "$pb/utilities/polybench.c" "$pb/$src" -o "$work/pb-$k-$v.wasm" -lm -lwasi-emulated-process-clocks
            "$CLANG" -O2 "${cflags_cpu[@]}" "${inc[@]}" "-D${size}_DATASET" "${extra[@]}" \
                "$pb/utilities/polybench.c" "$pb/$src" -o "$work/pb-$k-$v" -lm
        done
        list+=("polybench|pb/$k|$work/pb-$k-time.wasm|$work/pb-$k-time|||$work/pb-$k-check.wasm|$work/pb-$k-check")
    done < "$pb/utilities/benchmark_list"
fi
for s in primes pi mandelbrot seti; do
    d=$root/examples/$s
    args=$(sed -n 1p "$d/bench.args")
    input=$(sed -n 2p "$d/bench.args")
    if [ -n "$input" ] && [ ! -f "$d/$input" ]; then
        echo "SKIP $s: no $d/$input (examples/build.sh generates it)" >&2
        continue
    fi
    "$NATIVE_RUSTC" -O -C codegen-units=1 "${rustc_cpu[@]}" "$d/$s.rs" -o "$work/$s" 2>/dev/null
    list+=("sample|$s|$d/$s.wasm|$work/$s|$args|${input:+$d/$input}||")
done

echo "native builds: -march / target-cpu ${NATIVE_CPU:-(compiler default)}; sandbox: $WORKER"
python3 - "$WORKER" "$RUNS" "$work" "${BASE_WORKER:-}" "${ONLY:-}" "${list[@]}" <<'PY'
import json, math, os, statistics, subprocess, sys, time
worker, runs, work, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
only = set(x for x in sys.argv[5].split(",") if x)
timer = os.path.join(work, "inproc.time")
def timed(cmd, stdin, inproc_timer=False):
    """(whole-process seconds, in-process seconds, stdout). inproc_timer: run a native
    command with the preloaded timer (it costs ~0.1-0.3 ms of process start itself, so
    whole-process times come from runs without it); `worker exec --json` reports its own
    `wall_ms`."""
    env = os.environ.copy()
    if inproc_timer:
        env["LD_PRELOAD"] = os.path.join(work, "inproc.so")
        env["INPROC_TIME_FILE"] = timer
        if os.path.exists(timer):
            os.remove(timer)
    with open(stdin or os.devnull, "rb") as f:
        t = time.perf_counter()
        p = subprocess.run(cmd, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, env=env)
        whole = time.perf_counter() - t
    if inproc_timer:
        if not os.path.exists(timer):
            sys.exit(f"run.sh: {cmd[0]} left no in-process time (it ended without running its "
                     "exit handlers, e.g. through _exit)")
        with open(timer) as f:
            inproc = float(f.read())
    elif "--json" in cmd:
        inproc = json.loads(p.stdout)["wall_ms"] / 1e3
    else:
        inproc = None
    return whole, inproc, p.stdout
rows = []
for item in sys.argv[6:]:
    suite, name, wasm, native, args, inp, check_wasm, check_native = item.split("|")
    if only and name not in only:
        continue
    args = args.split()
    cache = os.path.join(work, "cache")
    sb = lambda cls, w=worker, wasm=wasm, json=False: [w, "exec", wasm, "--name", name, "--cache-dir", cache + ("-base" if w != worker else ""),
                      "--determinism", cls, "--fuel", "1000000000000000", "--memory-mb", "1024",
                      "--max-output", "268435456"] + (["--json"] if json else []) + \
                     (["--input", inp] if inp else []) + [a for x in args for a in ("--arg", x)]
    cmds = {"native": [native] + args, "sb-native": sb("native"), "sb-portable": sb("portable")}
    if base:
        cmds["base-native"] = sb("native", base)
    want = timed(cmds["native"], inp)[2]
    for c in [c for c in cmds if c != "native"]:  # warm the compile cache, check the output
        out = timed(cmds[c], inp)[2]
        if out != want:
            sys.exit(f"{name}: {c} output differs from the native build")
    if check_wasm:  # the timed builds print nothing: compare the dumps of the check builds
        want = timed([check_native], inp)[2]
        for cls in ("native", "portable"):
            out = timed(sb(cls, wasm=check_wasm), inp)[2]
            if out != want:
                sys.exit(f"{name}: the `{cls}` class's array dump differs from the native build's")
        if not want:
            sys.exit(f"{name}: the check build printed nothing")
    # The timed runs: the sandbox with --json (its output was checked above).
    timed_cmds = {c: (cmd if c == "native" else cmd + ["--json"]) for c, cmd in cmds.items()}
    t = {c: [] for c in cmds}
    ti = {c: [] for c in cmds}
    for _ in range(runs):
        for c in cmds:
            whole, inproc, _ = timed(timed_cmds[c], inp)
            if c == "native":  # a second run for the in-process time, with the timer
                inproc = timed(timed_cmds[c], inp, inproc_timer=True)[1]
            t[c].append(whole)
            ti[c].append(inproc)
    m = {c: statistics.median(v) for c, v in t.items()}
    mi = {c: statistics.median(v) for c, v in ti.items()}
    rows.append((name, m["native"], m["sb-native"], m["sb-portable"], m.get("base-native"), suite,
                 mi["native"], mi["sb-native"], mi["sb-portable"], mi.get("base-native")))
    print(f"{name:10} whole process: native {m['native']:.3f} s, native class {m['sb-native']/m['native']:.2f}x,"
          f" portable class {m['sb-portable']/m['native']:.2f}x"
          + (f", BASE_WORKER {m['base-native']/m['native']:.2f}x" if base else "")
          + f" | in-process: native {mi['native']:.4f} s, native class {mi['sb-native']/mi['native']:.2f}x,"
          f" portable class {mi['sb-portable']/mi['native']:.2f}x"
          + (f", BASE_WORKER {mi['base-native']/mi['native']:.2f}x" if base else ""),
          flush=True)
if not rows:
    sys.exit("run.sh: no kernel selected")
# Geo-mean of column i against native column n (1: whole process, 6: in-process).
g = lambda i, n, rs=rows: math.exp(sum(math.log(r[i] / r[n]) for r in rs) / len(rs))
def means(rs):
    return (f"whole process: native class {g(2, 1, rs):.2f}x, portable class {g(3, 1, rs):.2f}x"
            + (f", BASE_WORKER {g(4, 1, rs):.2f}x" if base else "")
            + f"; in-process: native class {g(7, 6, rs):.2f}x, portable class {g(8, 6, rs):.2f}x"
            + (f", BASE_WORKER {g(9, 6, rs):.2f}x" if base else ""))
for label, rs in [("own kernels and samples", [r for r in rows if r[5] != "polybench"]),
                  ("PolyBench/C", [r for r in rows if r[5] == "polybench"])]:
    if rs and len(rs) < len(rows):
        print(f"geo-mean over {len(rs)} ({label}): {means(rs)}")
print(f"geo-mean over {len(rows)}: {means(rows)} (target <= 1.15x for the native class)")
print()
extra = " BASE_WORKER | in-process |" if base else ""
print("| kernel | native | sandbox, `native` class | ratio | in-process: native | `native` class | ratio "
      "| sandbox, `portable` class | ratio | in-process ratio |" + extra)
print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if base else ""))
for r in rows:
    n, a, b, c, d, _, ia, ib, ic, id_ = r
    print(f"| {n} | {a:.3f} s | {b:.3f} s | {b/a:.2f}x | {ia:.4f} s | {ib:.4f} s | {ib/ia:.2f}x "
          f"| {c:.3f} s | {c/a:.2f}x | {ic/ia:.2f}x |"
          + (f" {d/a:.2f}x | {id_/ia:.2f}x |" if base else ""))
print(f"| **geo-mean** | | | **{g(2, 1):.2f}x** | | | **{g(7, 6):.2f}x** | | **{g(3, 1):.2f}x** | **{g(8, 6):.2f}x** |"
      + (f" **{g(4, 1):.2f}x** | **{g(9, 6):.2f}x** |" if base else ""))
PY
