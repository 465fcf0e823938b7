#!/usr/bin/env bash
# Rebuild every sample's .wasm from its source with Debian's Rust toolchain, and generate the
# seti benchmark input (and the seti job inputs, if missing) with seti-gen.
#
#   examples/build.sh            build all samples
#   examples/build.sh pi seti    build only these
#   SKIP_INPUTS=1 examples/build.sh   do not run seti-gen
#   BUILD_DIR=/tmp/x examples/build.sh  build copies into /tmp/x/<name>/ instead (the tree is
#                                       left alone; used by the reproducibility test)
#
# Each module is compiled from inside its own directory with a relative source path, so no
# absolute path ends up in the binary: the output is byte-for-byte reproducible, and the
# committed .wasm files are what this script produces (examples/tools/tests checks that).
set -euo pipefail

RUSTC=${WASM_RUSTC:-/usr/bin/rustc}
# With wasm SIMD, as docs/guest-abi.md tells task authors: LLVM vectorizes for wasm only with
# it (the sandbox runs SIMD deterministically in both classes), as it does for native x86-64.
FLAGS=(-O --target wasm32-wasi -C strip=symbols -C codegen-units=1 -C debuginfo=0 -C target-feature=+simd128)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
samples=(primes pi mandelbrot seti longrun)
if [ $# -gt 0 ]; then samples=("$@"); fi

if [ ! -x "$RUSTC" ]; then
    echo "build.sh: $RUSTC not found. Install Debian's Rust toolchain with the wasm32-wasi std:" >&2
    echo "    sudo apt-get install rustc libstd-rust-dev-wasm32 lld" >&2
    exit 1
fi
if ! "$RUSTC" --print sysroot >/dev/null 2>&1 || [ ! -d "$("$RUSTC" --print sysroot)/lib/rustlib/wasm32-wasi" ]; then
    echo "build.sh: $RUSTC has no wasm32-wasi standard library. Install it with:" >&2
    echo "    sudo apt-get install rustc libstd-rust-dev-wasm32 lld" >&2
    exit 1
fi

for name in "${samples[@]}"; do
    dir="$here/$name"
    if [ ! -f "$dir/$name.rs" ]; then
        echo "build.sh: no sample named $name (expected $dir/$name.rs)" >&2
        exit 1
    fi
    if [ -n "${BUILD_DIR:-}" ]; then
        mkdir -p "$BUILD_DIR/$name"
        cp "$dir"/*.rs "$BUILD_DIR/$name/"
        dir=$(cd "$BUILD_DIR/$name" && pwd)
    fi
    (cd "$dir" && "$RUSTC" "${FLAGS[@]}" "$name.rs" -o "$name.wasm.tmp" && mv "$name.wasm.tmp" "$name.wasm")
    echo "built $dir/$name.wasm ($(wc -c <"$dir/$name.wasm") bytes)"
done
if [ -n "${BUILD_DIR:-}" ]; then exit 0; fi

if [ "${SKIP_INPUTS:-0}" != 1 ] && [[ " ${samples[*]} " == *" seti "* ]]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "build.sh: cargo not found; skipping the seti inputs (run seti-gen yourself, see README.md)" >&2
        exit 0
    fi
    gen=(cargo run --quiet --manifest-path "$here/tools/Cargo.toml" --bin seti-gen --)
    if [ ! -f "$here/seti/inputs/truth.json" ]; then
        "${gen[@]}" --out "$here/seti/inputs" --count 16 --seed 1 --signals 4 >/dev/null
        echo "generated seti/inputs (16 job inputs + truth.json)"
    fi
    if [ ! -f "$here/seti/bench/0.bin" ]; then
        "${gen[@]}" --out "$here/seti/bench" --count 1 --seed 99 --signals 1 --samples 1048576 >/dev/null
        echo "generated seti/bench/0.bin (benchmark input, 8 MiB)"
    fi
fi
