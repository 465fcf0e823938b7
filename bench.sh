#!/usr/bin/env bash
# Runs every Peergrid benchmark in release mode and writes BENCHMARKS.md: one table of medians
# over several runs, each result beside the baseline measured in the same run. The hand-written
# sections below the table (profiles, dated A/B runs) are kept as they are in the file.
#
#   bash bench.sh            # full sizes (~20-30 min on 2 cores, after the build)
#   bash bench.sh --smoke    # tiny sizes, one run each: checks the script and the benches
#   bash bench.sh --table-only   # rebuild the table from the logs in bench-out/ without running
#   BENCH_NOTE="..." adds a line to the notes (say how a --table-only table was put together).
#   options: --runs N (repeats of the cheap benches, default 3), --out FILE (default BENCHMARKS.md)
#
# Every bench prints `BENCH|what|result|baseline|ratio|target|met` lines (e2e, scale, netswarm) or a human
# table that this script turns into such lines (sandbox, swarm, ingest). For a bench run N
# times, the row whose result is the median is kept (its baseline comes from the same run).
# Raw logs: bench-out/<bench>.<run>.log.
set -uo pipefail
cd "$(dirname "$0")"

SMOKE=0
TABLE_ONLY=0
RUNS=3
OUT=BENCHMARKS.md
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --table-only) TABLE_ONLY=1 ;;
        --runs) RUNS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v python3 >/dev/null || { echo "bench.sh: needs python3 to build the table" >&2; exit 2; }

LOGS=bench-out
mkdir -p "$LOGS"
if [ "$TABLE_ONLY" = 0 ]; then rm -f "$LOGS"/*.log; fi
if [ "$SMOKE" = 1 ]; then
    export PEERGRID_BENCH_SMOKE=1
    RUNS=1
else
    unset PEERGRID_BENCH_SMOKE
fi
# Many QUIC sessions in the scale bench: more descriptors never hurt.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$TABLE_ONLY" = 0 ]; then
echo "== building (release): worker binary and every bench"
# Always the whole workspace: selecting one package (-p) resolves other features for the shared
# dependencies and would build wasmtime once more for each package.
cargo build --release --workspace --bins || { echo "bench.sh: building the binaries failed" >&2; exit 1; }
cargo bench --no-run --workspace || echo "bench.sh: some benches do not build; their rows will be missing" >&2
# The seti kernel's benchmark input (8 MiB, generated, not committed).
if [ ! -f examples/seti/bench/0.bin ] && [ -x target/release/seti-gen ]; then
    target/release/seti-gen --out examples/seti/bench --count 1 --seed 99 --signals 1 --samples 1048576 >/dev/null \
        && echo "generated examples/seti/bench/0.bin (seti benchmark input)"
fi

FAILED=()
# run_bench PACKAGE BENCH TIMES [ENV=VALUE...]
run_bench() {
    local pkg="$1" bench="$2" times="$3"; shift 3
    for i in $(seq 1 "$times"); do
        echo "== $bench run $i/$times"
        local start=$SECONDS
        if env "$@" cargo bench -q --workspace --bench "$bench" >"$LOGS/$bench.$i.log" 2>&1; then
            echo "   done in $((SECONDS - start)) s"
        else
            echo "   FAILED after $((SECONDS - start)) s (see $LOGS/$bench.$i.log)"
            FAILED+=("$bench#$i")
        fi
        tail -n 3 "$LOGS/$bench.$i.log" | sed 's/^/   | /'
    done
}

T0=$SECONDS
# sandbox and swarm take their medians internally (PEERGRID_BENCH_RUNS).
run_bench worker sandbox 1 PEERGRID_BENCH_RUNS="$RUNS"
run_bench worker swarm 1 PEERGRID_BENCH_RUNS="$RUNS"
run_bench coordinator ingest "$RUNS"
run_bench coordinator e2e "$RUNS"
# netswarm (real processes in network namespaces; needs root, else one `skipped` line)
# interleaves swarm and --central-only runs and takes the medians itself.
run_bench coordinator netswarm 1 PEERGRID_BENCH_RUNS="$RUNS"
# scale is minutes per run: once.
run_bench coordinator scale 1
TOTAL=$((SECONDS - T0))
else
    T0=$SECONDS
    TOTAL=${BENCH_TOTAL:-0}
    FAILED=()
fi

export BENCH_LOGS="$LOGS" BENCH_OUT="$OUT" BENCH_RUNS="$RUNS" BENCH_SMOKE="$SMOKE" BENCH_TOTAL="$TOTAL" BENCH_FAILED="${FAILED[*]:-}"
python3 - <<'PY' || { echo "bench.sh: building the table failed" >&2; exit 1; }
import glob, os, re, subprocess, datetime, statistics

logs = os.environ["BENCH_LOGS"]

def num(s):
    m = re.search(r"-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?", s or "")
    return float(m.group(0)) if m else float("nan")

def fmt(v):
    return f"{v:.0f}" if abs(v) >= 100 else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")

def ratio(a, b):
    if not b:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2e}x"

def parse_sandbox(text):
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+)x\s+([0-9.]+)x\s+(.*)$", line)
        if m:
            k, nat, det, nodet, rd, rn, rest = m.groups()
            check = "" if "output = native" in rest else " (OUTPUT DIFFERS)"
            # The bench's "det" engine is the `portable` class (NaN canonicalization), its
            # "no-det" engine the `native` class (the default); the target is the native one's.
            rows.append(f"BENCH|sandbox vs native: {k}, `native` class{check}|{nodet} ms|{nat} ms (native)|{rn}x|<= 1.15x|{'yes' if float(rn) <= 1.15 else 'no'}")
            rows.append(f"BENCH|sandbox vs native: {k}, `portable` class{check}|{det} ms|{nat} ms (native)|{rd}x|-|-")
            continue
        m = re.match(r"^(\S+)\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+) ms\s+([0-9.]+)x\s+([0-9.]+)x\s+([0-9.]+)x\s+([0-9.]+)x\s*$", line)
        if m:
            k, plain, fuel, epoch, nan, rp, rf, re_, rn = m.groups()
            native = float(plain) / float(rp) if float(rp) else float("nan")
            rows.append(f"BENCH|plain wasmtime vs native: {k} (none of the settings below)|{plain} ms|{native:.1f} ms (native)|{rp}x|-|-")
            for label, t, r in (("fuel metering", fuel, rf), ("epoch interruption", epoch, re_), ("NaN canonicalization", nan, rn)):
                rows.append(f"BENCH|cost of {label} alone: {k}|{t} ms|{plain} ms (plain wasmtime)|{r}x|-|-")
            continue
        m = re.match(r"^compile (\S+) \((\d+) KB\): cold compile ([0-9.]+) ms \| compile-cache load ([0-9.]+) ms", line)
        if m:
            k, kb, cold, warm = m.groups()
            rows.append(f"BENCH|compile-cache load vs cold compile ({k}, {kb} KB)|{warm} ms|{cold} ms (cold compile)|{ratio(float(warm), float(cold))}|-|-")
            continue
        m = re.match(r"^instantiate (\S+)\s+([0-9.]+) µs", line)
        if m:
            rows.append(f"BENCH|instantiation: {m.group(1)} (store + WASI ctx + instance)|{m.group(2)} µs|-|-|-|-")
            continue
        m = re.match(r"^full run of an empty _start: ([0-9.]+) µs", line)
        if m:
            rows.append(f"BENCH|full run of an empty _start|{m.group(1)} µs|-|-|-|-")
    return rows

def parse_swarm(text):
    rows, table = [], {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\(.\)[^|]*?)\s*\|\s*([^|]*?)\s*\|\s*([0-9.]+) s\s*\|\s*([0-9.]+) MiB/s\s*\|", line)
        if m:
            table[m.group(1)] = (m.group(2), float(m.group(3)), float(m.group(4)))
    for line in text.splitlines():
        m = re.match(r"^\(a\) seed upload, swarm: ([0-9.]+)x the blob .*central: ([0-9.]+)x\); wall time swarm/central = ([0-9.]+)", line)
        if m:
            su, cu, wr = map(float, m.groups())
            name = next((k for k in table if k.startswith("(a) swarm")), "(a) swarm").replace("(a) swarm: ", "")
            rows.append(f"BENCH|coordinator upload per blob ({name})|{su:.2f}x blob|{cu:.2f}x blob (central only)|{ratio(su, cu)}|<= 1.2x blob|{'yes' if su <= 1.2 else 'no'}")
            sw = next((v for k, v in table.items() if k.startswith("(a) swarm")), None)
            cw = table.get("(a) central server only")
            if sw and cw:
                rows.append(f"BENCH|distribution wall time, swarm vs central only|{sw[1]:.3f} s|{cw[1]:.3f} s (central only)|{wr:.2f}x|-|-")
        m = re.match(r"^\(b\) verified p2p / raw quinn throughput = ([0-9.]+)", line)
        if m:
            r = float(m.group(1))
            p2p = next((v for k, v in table.items() if k.startswith("(b) verified")), None)
            raw = next((v for k, v in table.items() if k.startswith("(b) raw")), None)
            res = f"{p2p[2]:.0f} MiB/s" if p2p else f"{r:.2f}"
            base = f"{raw[2]:.0f} MiB/s (raw quinn stream)" if raw else "-"
            rows.append(f"BENCH|verified peer transfer vs raw quinn|{res}|{base}|{r:.2f}x|>= 0.9x|{'yes' if r >= 0.9 else 'no'}")
    return rows

def parse_ingest(text):
    rows, raw = [], None
    for line in text.splitlines():
        m = re.match(r"^sqlite raw batch insert\s+\d+ rows\s+=\s+([0-9.]+) rows/s", line)
        if m:
            raw = float(m.group(1))
    for line in text.splitlines():
        m = re.match(r"^(engine \(core\+store\)|engine, PostgreSQL store|loopback QUIC sessions|engine, no store \(diag\.\))\s+(\d+) results in\s+([0-9.]+)s =\s+([0-9.]+) validated results/s", line)
        if m:
            name, n, secs, rate = m.groups()
            rate = float(rate)
            diag = "diag" in name
            goal = 20000 if "PostgreSQL" in name else 50000
            target = "-" if diag else f">= {goal} results/s"
            met = "-" if diag else ("yes" if rate >= goal else "no")
            base = f"{raw:.0f} rows/s (raw SQLite batch insert)" if raw else "-"
            rows.append(f"BENCH|validated-result ingest: {name}|{rate:.0f} results/s|{base}|{ratio(rate, raw) if raw else '-'}|{target}|{met}")
    return rows

# BENCHMARKS.md is the generated part above MARK and the hand-written sections (profiles,
# dated A/B measurements) below it. The script rewrites only the first and keeps the second
# exactly as it is in the file it overwrites.
MARK = "<!-- bench.sh writes everything above this line and keeps everything below it as it is. -->"

def kept_sections(path):
    """The hand-written part of `path` (nothing for a new file). A file without the marker
    is refused: overwriting it would lose whatever was written by hand."""
    try:
        old = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return ""
    if MARK not in old:
        raise SystemExit(f"bench.sh: {path} has no line {MARK!r}; add it above the hand-written "
                         "sections (or write to a new file with --out) so they are kept")
    return old.split(MARK, 1)[1].strip("\n")


parsers = {"sandbox": parse_sandbox, "swarm": parse_swarm, "ingest": parse_ingest}
order = ["sandbox", "swarm", "ingest", "e2e", "netswarm", "scale"]
rows = {}      # what -> list of (result, fields)
seen = []      # first-seen order
runs_of = {}
missing = []
for bench in order:
    files = sorted(glob.glob(f"{logs}/{bench}.*.log"))
    runs_of[bench] = len(files)
    got = 0
    for f in files:
        text = open(f, encoding="utf-8", errors="replace").read()
        lines = [l for l in text.splitlines() if l.startswith("BENCH|")]
        if not lines and bench in parsers:
            lines = parsers[bench](text)
        for l in lines:
            fields = l.split("|")[1:]
            if len(fields) < 6:
                continue
            what = fields[0]
            if what not in rows:
                rows[what] = []
                seen.append((bench, what))
            rows[what].append((num(fields[1]), fields))
            got += 1
    if got == 0:
        missing.append(bench)

def median_row(entries):
    entries = sorted(entries, key=lambda e: (e[0] != e[0], e[0]))
    return entries[(len(entries) - 1) // 2][1], len(entries)

def cpu_model():
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""

smoke = os.environ["BENCH_SMOKE"] == "1"
out = []
out.append("# Peergrid benchmarks")
out.append("")
out.append("Generated by `bash bench.sh`" + (" --smoke (SMOKE SIZES: not representative)" if smoke else "") + "; do not edit by hand. "
           "Each result is the median over the runs of that bench, beside the baseline measured in the same run.")
out.append("")
out.append("| bench | what | result (median) | baseline (same run) | ratio | target | met? |")
out.append("|---|---|---|---|---|---|---|")
misses = []
for bench, what in seen:
    f, n = median_row(rows[what])
    result, base, rat, target, met = f[1], f[2], f[3], f[4], f[5]
    runs = f" (n={n})" if n > 1 else ""
    met_cell = {"yes": "yes", "no": "**no**"}.get(met, met)
    out.append(f"| {bench} | {what} | {result}{runs} | {base} | {rat} | {target} | {met_cell} |")
    if met == "no":
        misses.append(f"{what}: {result}" + (f" ({rat})" if rat != "-" else "") + f" vs target {target}")
out.append("")
out.append("## Notes")
out.append("")
mem_gib = sh("free -g | awk '/Mem:/{print $2}'")
out.append(f"- machine: `nproc` {sh('nproc')}, {cpu_model()}, {mem_gib} GiB RAM; {sh('uname -sr')}")
out.append(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit {sh('git rev-parse --short HEAD') or '?'}"
           f"{' (with uncommitted changes)' if sh('git status --porcelain --untracked-files=no') else ''}; {sh('rustc --version')}")
out.append(f"- medians of {os.environ['BENCH_RUNS']} runs (sandbox, swarm and netswarm take the median inside the bench; ingest and e2e are run "
           f"{os.environ['BENCH_RUNS']} times; scale once); noisy shared 2-core machine: other builds may run at the same time.")
out.append(f"- total bench time: {int(os.environ['BENCH_TOTAL']) // 60} min {int(os.environ['BENCH_TOTAL']) % 60} s; raw logs in `bench-out/`.")
if os.environ.get("BENCH_NOTE"):
    out.append(f"- {os.environ['BENCH_NOTE']}")
out.append("- the scale bench runs the coordinator (`coordinator serve`) as a child process and the simulated workers in the bench "
           "process, on the same 2 cores: client-side handshakes and requests compete with the coordinator for CPU.")
if os.environ.get("BENCH_FAILED"):
    out.append(f"- FAILED runs: {os.environ['BENCH_FAILED']} (see their logs)")
if missing:
    out.append(f"- no rows from: {', '.join(missing)} (bench failed to build or run, or printed nothing parseable)")
out.append("")
out.append("### Targets missed")
out.append("")
if misses:
    for m in misses:
        out.append(f"- {m}")
else:
    out.append("- none")
out.append("")
# netswarm's own table (medians of its interleaved runs) and its per-run lines.
ns_logs = sorted(glob.glob(f"{logs}/netswarm.*.log"))
if ns_logs:
    text = open(ns_logs[-1], encoding="utf-8", errors="replace").read()
    out.append("### Swarm on simulated networks (netswarm)")
    out.append("")
    out.append("`cargo bench --workspace --bench netswarm` (run by `bench.sh` with `PEERGRID_BENCH_RUNS`): real "
               "`coordinator serve` and `worker join` processes in network namespaces (`netsim`), one primes job "
               "over an ~8 MiB module (4 tasks per worker, quorum 2), the swarm and `serve --central-only` interleaved "
               "in one run, medians. Copies: `coordinator_bytes_sent` (status --json) during the job over the module "
               "size; on the wire: what the coordinator's interface sent (QUIC and control traffic included); "
               "distribution time: from the start of `coordinator submit` (job upload included) until every worker's "
               "`blobs/<module blake3 hex>` exists.")
    out.append("")
    table = [l for l in text.splitlines() if l.startswith("|")]
    skipped = [l for l in text.splitlines() if l.startswith("netswarm: skipped")]
    if table:
        out.extend(table)
    elif skipped:
        out.append(f"- {skipped[0]}")
    else:
        out.append("- no table in the log (the bench failed; see bench-out/)")
    per_run = [l for l in text.splitlines() if l.startswith("netswarm: run ") or l.startswith("netswarm: target ")]
    if per_run:
        out.append("")
        out.append("Per run:")
        out.append("")
        out.extend(f"    {l}" for l in per_run)
    out.append("")
kept = kept_sections(os.environ["BENCH_OUT"])
out.append(MARK)
out.append("")
if kept:
    out.append(kept)
    out.append("")
open(os.environ["BENCH_OUT"], "w").write("\n".join(out) + "\n")
print("\n".join(out[:out.index(MARK)]))
PY
echo "== wrote $OUT in $((SECONDS - T0)) s of benchmarking"
[ ${#FAILED[@]} -eq 0 ]
