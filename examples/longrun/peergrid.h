/* The Peergrid checkpoint API for C guests (wasm32-wasi; docs/guest-abi.md).
 *
 *   int32_t n = peergrid_restore(&state, sizeof state);
 *   if (n != sizeof state) init(&state);          // 0: fresh start
 *   for (; state.step < STEPS; state.step++) {
 *       work(&state);
 *       if (state.step % 100 == 0) {
 *           peergrid_checkpoint(&state, sizeof state);
 *           peergrid_progress((double)state.step / STEPS);
 *       }
 *   }
 *
 * peergrid_checkpoint: 0 ok; -1 larger than the host's bound (64 MiB); -2 invalid length.
 * peergrid_restore: the state's length after copying it to buf; 0 when there is none;
 *   -(length) when cap is too small (nothing copied); -2 invalid capacity.
 * peergrid_progress: 0.0 .. 1.0 (clamped; NaN ignored).
 * A pointer outside the module's memory traps, like any WASI call.
 */
#ifndef PEERGRID_H
#define PEERGRID_H

#include <stdint.h>

#define PEERGRID_IMPORT(name) __attribute__((import_module("peergrid"), import_name(name)))

PEERGRID_IMPORT("checkpoint") int32_t peergrid_checkpoint(const void *state, int32_t len);
PEERGRID_IMPORT("restore") int32_t peergrid_restore(void *buf, int32_t cap);
PEERGRID_IMPORT("progress") void peergrid_progress(double fraction);

#endif
