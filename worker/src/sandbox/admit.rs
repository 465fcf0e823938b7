//! What modules the sandbox agrees to compile: deterministic limits on a module's size and
//! shape, checked by a cheap section scan *before* anything is compiled, so every worker
//! refuses the same modules (`invalid_module`, with a reason naming the limit).
//!
//! These are the main guard on compile time and compiler memory. The wall-clock compile
//! budget ([`COMPILE_WALL_BUDGET`](super::COMPILE_WALL_BUDGET)) is only a last-resort
//! safety net behind them.

/// Largest module accepted, in bytes.
pub const MAX_MODULE_BYTES: usize = 64 << 20;
/// Most functions a module may define (its function section).
pub const MAX_FUNCTIONS: u32 = 100_000;
/// Most imports a module may declare.
pub const MAX_IMPORTS: u32 = 1_000;
/// Most exports a module may declare.
pub const MAX_EXPORTS: u32 = 10_000;
/// Largest single function body, in bytes (compile time can grow faster than linearly in
/// one function's size).
pub const MAX_FUNCTION_BYTES: u32 = 1 << 20;

/// `Err(reason)` if `module` breaks one of the limits above. A module too malformed to scan
/// is let through: the compiler rejects it with its own message.
pub fn check(module: &[u8]) -> Result<(), String> {
    if module.len() > MAX_MODULE_BYTES {
        return Err(format!(
            "the module is {} bytes; the limit is {} bytes (MAX_MODULE_BYTES, {} MiB)",
            module.len(),
            MAX_MODULE_BYTES,
            MAX_MODULE_BYTES >> 20
        ));
    }
    // Only core modules version 1; anything else is the compiler's to refuse.
    if module.len() < 8 || module[..8] != *b"\0asm\x01\0\0\0" {
        return Ok(());
    }
    let mut r = Reader {
        bytes: module,
        pos: 8,
    };
    while r.pos < module.len() {
        let Some((id, size)) = r.byte().zip(r.leb()) else {
            return Ok(());
        };
        let start = r.pos;
        let Some(end) = start
            .checked_add(size as usize)
            .filter(|&e| e <= module.len())
        else {
            return Ok(());
        };
        let over = |what: &str, n: u32, limit: u32, name: &str| {
            (n > limit).then(|| format!("the module has {n} {what}; the limit is {limit} ({name})"))
        };
        let problem = match id {
            2 => r
                .leb()
                .and_then(|n| over("imports", n, MAX_IMPORTS, "MAX_IMPORTS")),
            3 => r
                .leb()
                .and_then(|n| over("functions", n, MAX_FUNCTIONS, "MAX_FUNCTIONS")),
            7 => r
                .leb()
                .and_then(|n| over("exports", n, MAX_EXPORTS, "MAX_EXPORTS")),
            10 => code_section(&mut r, end),
            _ => None,
        };
        if let Some(p) = problem {
            return Err(p);
        }
        r.pos = end;
    }
    Ok(())
}

/// The code section: function count and every body's size.
fn code_section(r: &mut Reader<'_>, end: usize) -> Option<String> {
    let n = r.leb()?;
    if n > MAX_FUNCTIONS {
        return Some(format!(
            "the module has {n} function bodies; the limit is {MAX_FUNCTIONS} (MAX_FUNCTIONS)"
        ));
    }
    for i in 0..n {
        let size = r.leb()?;
        if size > MAX_FUNCTION_BYTES {
            return Some(format!(
                "function body {i} is {size} bytes; the limit is {MAX_FUNCTION_BYTES} bytes (MAX_FUNCTION_BYTES)"
            ));
        }
        r.pos = r.pos.checked_add(size as usize).filter(|&p| p <= end)?;
    }
    None
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// An unsigned LEB128 u32.
    fn leb(&mut self) -> Option<u32> {
        let mut v: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(v).ok();
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_come_from_section_headers_and_malformed_input_is_let_through() {
        // type section (1 type), function section with 3 functions.
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]);
        m.extend_from_slice(&[3, 4, 3, 0, 0, 0]);
        assert_eq!(check(&m), Ok(()));
        let mut big = b"\0asm\x01\0\0\0".to_vec();
        // function section claiming 100_001 functions (LEB 0xa1 0x8d 0x06).
        big.extend_from_slice(&[3, 3, 0xa1, 0x8d, 0x06]);
        assert!(check(&big).unwrap_err().contains("MAX_FUNCTIONS"));
        assert_eq!(check(b"\0asm\x01\0\0\0\x03\xff"), Ok(()));
        assert_eq!(check(b"garbage"), Ok(()));
    }
}
