#!/usr/bin/env bash
# Runs the Peergrid fault and adversary suites (issue 10) in release mode and writes FAULTS.md:
# one table of scenario -> outcome figures, each beside its target.
#
#   bash faults.sh            # full sizes (PEERGRID_FAULTS_FULL=1; ~10-20 min on 2 cores, after the build)
#   bash faults.sh --smoke    # the default (small) sizes the ordinary `cargo test` runs
#   options: --out FILE (default FAULTS.md), --debug (no --release: reuses the debug build)
#
# Every suite prints `FAULT|suite|scenario|outcome figures|target|met` lines on stdout:
#   crash     coordinator/tests/faults.rs   kill -9 of workers and of the coordinator (real processes)
#   saboteurs coordinator/tests/saboteurs.rs  dishonest workers in the scheduling core (if present)
#   poison    worker/tests/poison.rs        peers serving corrupt chunks (real QUIC)
#   hostile   tasks/tests/hostile.rs        property tests: every wire decoder and the job file parser
#             coordinator/tests/hostile.rs  garbage frames on every ALPN, refusals and their log lines
#   redteam   coordinator/tests/redteam.rs  hostile clients on the real protocol (claims, capacity, floods, accusations)
#             coordinator/tests/sybil.rs    colluders and Sybil swarms over real QUIC, under serve's default policy
# Raw logs: faults-out/<suite>.log.
set -uo pipefail
cd "$(dirname "$0")"

SMOKE=0
OUT=FAULTS.md
PROFILE=(--release)
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        --debug) PROFILE=() ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "faults.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v python3 >/dev/null || { echo "faults.sh: needs python3 to build the table" >&2; exit 2; }

LOGS=faults-out
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log
if [ "$SMOKE" = 1 ]; then
    unset PEERGRID_FAULTS_FULL
    unset PEERGRID_HA_KILLS
else
    export PEERGRID_FAULTS_FULL=1
    # The standby suite: 9 leader kills (SIGKILL) and a SIGSTOP instead of 2 and 1.
    export PEERGRID_HA_KILLS=10
fi

# (package, test target, log name); a target whose file does not exist yet is skipped.
SUITES=(
    "coordinator faults crash"
    "coordinator saboteurs saboteurs"
    "worker poison poison"
    "tasks hostile hostile-decoders"
    "coordinator hostile hostile-peers"
    "coordinator redteam redteam"
    "coordinator sybil sybil --include-ignored"
    "coordinator standby failover"
)
present() { [ -f "$1/tests/$2.rs" ]; }
# Package selection for a suite: the whole workspace when the test target's name is unique
# (no extra wasmtime build); -p where two packages have a target of that name.
sel() { if [ "$(ls -d */tests/"$1".rs 2>/dev/null | wc -l)" = 1 ]; then echo --workspace; else echo "-p $2"; fi; }

echo "== building (${PROFILE[*]:-debug}): worker binary and the test targets"
# Whole-workspace builds: with -p, cargo resolves the shared dependencies' features for that
# package alone and builds wasmtime once more (see sel below).
cargo build "${PROFILE[@]}" --workspace --bins \
    || { echo "faults.sh: building the binaries failed" >&2; exit 1; }
for s in "${SUITES[@]}"; do
    set -- $s
    if present "$1" "$2"; then
        cargo test "${PROFILE[@]}" --no-run $(sel "$2" "$1") --test "$2" 2>&1 | tail -n 1 \
            || echo "faults.sh: $1 --test $2 does not build; its rows will be missing" >&2
    fi
done

FAILED=()
SKIPPED=()
CMDS=()
T0=$SECONDS
for s in "${SUITES[@]}"; do
    set -- $s
    if ! present "$1" "$2"; then
        echo "== $1 --test $2: no $1/tests/$2.rs yet, skipped"
        SKIPPED+=("$1/tests/$2.rs")
        continue
    fi
    # A fourth word (e.g. --include-ignored: scenarios whose target is missed still print
    # their row) goes to the test binary.
    cmd="cargo test ${PROFILE[*]} $(sel "$2" "$1") --test $2 -- --nocapture --test-threads=1 ${4:-}"
    CMDS+=("$cmd")
    echo "== $cmd"
    start=$SECONDS
    if $cmd >"$LOGS/$3.log" 2>&1; then
        echo "   passed in $((SECONDS - start)) s"
    else
        echo "   FAILED after $((SECONDS - start)) s (see $LOGS/$3.log)"
        FAILED+=("$1 --test $2")
    fi
    # libtest may print its "test name ... " progress on the same line, before the FAULT.
    grep -o 'FAULT|.*' "$LOGS/$3.log" | cut -d'|' -f2,3,6 | sed 's/^/   | /'
done
TOTAL=$((SECONDS - T0))

export F_LOGS="$LOGS" F_OUT="$OUT" F_SMOKE="$SMOKE" F_TOTAL="$TOTAL" F_FAILED="${FAILED[*]:-}" F_SKIPPED="${SKIPPED[*]:-}"
F_CMDS="$(printf '%s\n' "${CMDS[@]}")"
export F_CMDS
python3 - <<'PY' || { echo "faults.sh: building the table failed" >&2; exit 1; }
import datetime, glob, os, subprocess

logs = os.environ["F_LOGS"]
order = ["crash", "saboteurs", "poison", "hostile-decoders", "hostile-peers", "redteam", "sybil"]

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""

def cpu_model():
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                return l.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"

def cell(s):
    return s.replace("|", "/").strip()

rows, missing = [], []
for name in order:
    path = f"{logs}/{name}.log"
    if not os.path.exists(path):
        continue
    got = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        at = line.find("FAULT|")  # libtest's "test name ... " may come first on the line
        if at < 0:
            continue
        line = line[at:]
        f = line.split("|")[1:]
        if len(f) < 5:
            continue
        # A scenario text may itself contain '|': everything between suite and the last three
        # fields is the scenario.
        suite, scenario, outcome, target, met = f[0], "|".join(f[1:-3]), f[-3], f[-2], f[-1]
        rows.append((suite, scenario, outcome, target, met))
        got += 1
    if got == 0:
        missing.append(name)

smoke = os.environ["F_SMOKE"] == "1"
out = ["# Peergrid fault and adversary suites", ""]
out.append("Generated by `bash faults.sh`" + (" --smoke (DEFAULT TEST SIZES)" if smoke else " (full sizes, `PEERGRID_FAULTS_FULL=1`)")
           + "; do not edit by hand. One row per scenario: what was done, what came out, the target, whether it was met.")
out.append("")
out.append("| suite | scenario | outcome | target | met |")
out.append("|---|---|---|---|---|")
misses = []
for suite, scenario, outcome, target, met in rows:
    met_cell = {"yes": "yes", "no": "**no**"}.get(met.strip(), met)
    out.append(f"| {cell(suite)} | {cell(scenario)} | {cell(outcome)} | {cell(target)} | {met_cell} |")
    if met.strip() == "no":
        misses.append(f"{suite}: {scenario}")
out.append("")
out.append("## Run")
out.append("")
mem = sh("free -g | awk '/Mem:/{print $2}'")
out.append(f"- machine: `nproc` {sh('nproc')}, {cpu_model()}, {mem} GiB RAM; {sh('uname -sr')}")
dirty = " (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no") else ""
out.append(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit {sh('git rev-parse --short HEAD') or '?'}{dirty}; {sh('rustc --version')}")
out.append("- commands (each with " + ("default sizes" if smoke else "`PEERGRID_FAULTS_FULL=1`") + "):")
for c in os.environ.get("F_CMDS", "").splitlines():
    if c.strip():
        out.append(f"  - `{c}`")
t = int(os.environ["F_TOTAL"])
out.append(f"- total: {t // 60} min {t % 60} s; raw logs in `{logs}/`; shared 2-core machine, other builds may run at the same time.")
if os.environ.get("F_FAILED"):
    out.append(f"- FAILED test targets: {os.environ['F_FAILED']} (see their logs)")
if os.environ.get("F_SKIPPED"):
    out.append(f"- not present yet, skipped: {os.environ['F_SKIPPED']}")
if missing:
    out.append(f"- no FAULT lines from: {', '.join(missing)} (failed to build, or printed nothing)")
out.append("")
out.append("### Targets missed")
out.append("")
out.extend(f"- {m}" for m in misses) if misses else out.append("- none")
out.append("")
open(os.environ["F_OUT"], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
echo "== wrote $OUT after $((SECONDS - T0)) s of tests"
[ ${#FAILED[@]} -eq 0 ]
