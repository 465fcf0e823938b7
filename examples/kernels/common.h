/* PolyBench/C-style kernels (plain C, no intrinsics): the same source is built for
 * wasm32-wasi with `clang -O2 -msimd128` and natively with `clang -O2` (see run.sh). Each
 * prints the bit pattern of a checksum, so the two builds can be compared exactly. */
#include <stdio.h>
#include <string.h>

static void print_checksum(const char *name, const double *a, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) s += a[i] * (double)((i % 7) + 1);
    unsigned long long bits;
    memcpy(&bits, &s, sizeof bits);
    printf("%s %016llx\n", name, bits);
}
