;; tiny: the smallest useful task, for benchmarks of everything around the guest.
;; A WASI preview 1 command that writes its argv[1] to stdout (no newline) and exits 0.
;; Built on the fly from this text by the benchmarks (`wat` crate); `wat2wasm tiny.wat`
;; or `wasm-tools parse tiny.wat -o tiny.wasm` gives the binary.
;;
;; Memory layout (one 64 KiB page): 0 argc, 4 argv_buf_size, 8 iovec {ptr, len},
;; 16..1024 argv pointers (at most 200 args), 1024 nwritten, 4096.. argv strings.
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $p i32)
    (local $len i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    ;; nothing to echo, or more than fits: write nothing
    (if (i32.lt_u (i32.load (i32.const 0)) (i32.const 2)) (then (return)))
    (if (i32.gt_u (i32.load (i32.const 0)) (i32.const 200)) (then (return)))
    (if (i32.gt_u (i32.load (i32.const 4)) (i32.const 61000)) (then (return)))
    (drop (call $args_get (i32.const 16) (i32.const 4096)))
    ;; p = argv[1]; len = strlen(p)
    (local.set $p (i32.load (i32.const 20)))
    (block $end
      (loop $next
        (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 8) (local.get $p))
    (i32.store (i32.const 12) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 1024)))))
