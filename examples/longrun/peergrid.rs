//! The Peergrid checkpoint API for Rust guests (std only; builds with rustc 1.63 for
//! `wasm32-wasi`). Copy this file next to your task and add `mod peergrid;`.
//!
//! ```ignore
//! let mut state = match peergrid::restore() {
//!     Some(bytes) => decode(&bytes),   // resumed: continue where the last checkpoint was
//!     None => State::new(),            // a fresh start
//! };
//! while !state.done() {
//!     state.step();
//!     if state.step % 100 == 0 {
//!         let _ = peergrid::checkpoint(&encode(&state));
//!         peergrid::progress(state.fraction());
//!     }
//! }
//! ```
//!
//! The output must not depend on whether the run was resumed: checkpoint everything that
//! determines what is printed later (and print only after the last restore point, or keep
//! what was printed in the state). Built for another target (a native test build), the
//! calls do nothing and `restore` returns `None`. See docs/guest-abi.md.
#![allow(dead_code)]

#[cfg(target_arch = "wasm32")]
mod sys {
    #[link(wasm_import_module = "peergrid")]
    extern "C" {
        pub fn checkpoint(ptr: *const u8, len: i32) -> i32;
        pub fn restore(ptr: *mut u8, cap: i32) -> i32;
        pub fn progress(fraction: f64);
    }
}

/// Hand the host `state` as the task's newest checkpoint. `Err(code)`: it was refused
/// (-1: larger than the host's bound, 64 MiB; -2: invalid length); the task goes on.
pub fn checkpoint(state: &[u8]) -> Result<(), i32> {
    if state.len() > i32::MAX as usize {
        return Err(-1);
    }
    #[cfg(target_arch = "wasm32")]
    {
        let r = unsafe { sys::checkpoint(state.as_ptr(), state.len() as i32) };
        if r < 0 {
            return Err(r);
        }
    }
    Ok(())
}

/// The newest checkpoint of this task, if the run resumes one (`None` on a fresh start; an
/// empty state also reads as `None`).
pub fn restore() -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let r = unsafe { sys::restore(buf.as_mut_ptr(), buf.len() as i32) };
            if r == 0 {
                return None;
            }
            if r > 0 {
                buf.truncate(r as usize);
                return Some(buf);
            }
            // -(needed length): make room and ask again.
            buf = vec![0; (-(r as i64)) as usize];
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    None
}

/// Tell the host how far the task is, from 0.0 to 1.0 (shown to the scientist; a task that
/// reports progress keeps its replica past the deadline, within bounds).
pub fn progress(fraction: f64) {
    #[cfg(target_arch = "wasm32")]
    unsafe {
        sys::progress(fraction)
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = fraction;
}
