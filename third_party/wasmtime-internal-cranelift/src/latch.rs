//! Peergrid patch: after Cranelift's mid-end, uses of a loop counter's old value that come
//! after its increment are rewritten in terms of the incremented value, so that the old
//! value dies at the increment and the register allocator needs no copy on the back edge.
//!
//! Cranelift's mid-end rewrites `x + K1 == K2` as `x == K2 - K1` (and folds `(x + K1) + K2`
//! into `x + (K1 + K2)`). On a loop latch such as
//!
//! ```text
//! y = iadd x, 8            ;; the counter, passed back to the loop header
//! c = icmp ne y, 0x2bc0    ;; what the wasm (and LLVM's native loop) compares
//! brif c, header(y), exit
//! ```
//!
//! that makes the compare read `x` after `y` is computed (`icmp ne x, 0x2bb8`), so both are
//! live at the branch; on x86-64 the back edge then becomes `lea` into another register,
//! the compare, a register move and a taken jump, where native code has `add`, compare and
//! branch back. The same happens to the fuel counter when the exit block computes
//! `x + (K1 + 1)` from the old value. The mid-end's cost model counts the shared `iadd` as
//! an extra instruction, so it prefers the form that keeps both values live.
//!
//! For each block whose terminator passes `y = iadd x, K1` (defined in that block) to a
//! successor, this pass rewrites
//! - the terminator's condition `icmp eq|ne x, K2` (used only there) into
//!   `icmp eq|ne y, K2 + K1`, placed just before the terminator;
//! - every `iadd x, K3` in a successor `S` that only this terminator reaches (and in the
//!   blocks `S` dominates) into `iadd p, K3 - K1`, where `p` is a new parameter of `S` to
//!   which the terminator passes `y`.
//!
//! Both are exact in two's-complement arithmetic (wrapping addition is a bijection; equality
//! is preserved by adding the same constant), for every integer type, so no result changes.
//! The pass only reads constants (`iconst`) and moves no instruction with side effects.

use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::dominator_tree::DominatorTree;
use cranelift_codegen::flowgraph::ControlFlowGraph;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    immediates::Imm64, Block, Function, Inst, InstBuilder, InstructionData, Opcode, Type, Value,
    ValueDef,
};
use cranelift_entity::SecondaryMap;
use std::collections::HashMap;

/// How much work a pass may do on one function: a few steps per instruction. The passes
/// only improve code, so when a (hostile) function's shape would make them superlinear they
/// stop where the budget runs out and the code stays correct.
struct Budget(u64);

impl Budget {
    fn for_function(func: &Function) -> Self {
        Budget(16 * func.dfg.num_insts() as u64 + 4096)
    }

    /// Spends `n` steps; false once the budget is spent.
    fn spend(&mut self, n: u64) -> bool {
        if self.0 < n {
            self.0 = 0;
            false
        } else {
            self.0 -= n;
            true
        }
    }
}

/// The value of `v` if an `iconst` defines it.
fn iconst(func: &Function, v: Value) -> Option<u64> {
    let ValueDef::Result(inst, 0) = func.dfg.value_def(v) else {
        return None;
    };
    match func.dfg.insts[inst] {
        InstructionData::UnaryImm {
            opcode: Opcode::Iconst,
            imm,
        } => Some(imm.bits() as u64),
        _ => None,
    }
}

/// `(x, k)` if `inst` is `iadd x, k` (either operand order) with `k` an `iconst`, on an
/// integer type of at most 64 bits.
fn add_const(func: &Function, inst: Inst) -> Option<(Value, u64)> {
    let InstructionData::Binary {
        opcode: Opcode::Iadd,
        args,
    } = func.dfg.insts[inst]
    else {
        return None;
    };
    let ty = func.dfg.value_type(func.dfg.first_result(inst));
    if !ty.is_int() || ty.bits() > 64 {
        return None;
    }
    if let Some(k) = iconst(func, args[1]) {
        Some((args[0], k))
    } else {
        iconst(func, args[0]).map(|k| (args[1], k))
    }
}

/// `v` as `ty`'s `iconst` immediate: zero-extended from the type's width.
fn imm(ty: Type, v: u64) -> Imm64 {
    let bits = ty.bits();
    let v = if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    };
    Imm64::new(v as i64)
}

/// Rewrites as described in the module's documentation. `domtree` must be `func`'s (the
/// pass changes no control flow, so it stays valid). Returns how many uses were rewritten.
pub fn shorten_counter_live_ranges(func: &mut Function, domtree: &DominatorTree) -> usize {
    let mut budget = Budget::for_function(func);
    let cfg = ControlFlowGraph::with_function(func);
    // How often each value is used, and every `iadd x, K` by its `x`.
    let mut uses: SecondaryMap<Value, u32> = SecondaryMap::with_capacity(func.dfg.num_values());
    let mut adds_of: HashMap<Value, Vec<Inst>> = HashMap::new();
    let mut latches: Vec<(Block, Inst)> = Vec::new();
    for block in func.layout.blocks() {
        for inst in func.layout.block_insts(block) {
            for v in func.dfg.inst_values(inst) {
                uses[v] += 1;
            }
            if let Some((x, _)) = add_const(func, inst) {
                adds_of.entry(x).or_default().push(inst);
            }
        }
        if let Some(term) = func.layout.last_inst(block) {
            if func.dfg.insts[term].opcode().is_branch() {
                latches.push((block, term));
            }
        }
    }

    let mut rewritten = 0;
    let mut incs: Vec<(Value, Value, u64)> = Vec::new();
    for (block, term) in latches {
        // The increments `y = iadd x, K1` defined in this block and passed on by its branch.
        incs.clear();
        let dests = func.dfg.insts[term]
            .branch_destination(&func.dfg.jump_tables, &func.dfg.exception_tables)
            .to_vec();
        // The successors, read once: appending an argument below may move a block call's
        // value list, and a copied `BlockCall` would then read a stale one.
        let succs: Vec<Block> = dests
            .iter()
            .map(|d| d.block(&func.dfg.value_lists))
            .collect();
        for dest in dests {
            for arg in dest.args(&func.dfg.value_lists) {
                let Some(y) = arg.as_value() else { continue };
                let ValueDef::Result(def, 0) = func.dfg.value_def(y) else {
                    continue;
                };
                if func.layout.inst_block(def) != Some(block) {
                    continue;
                }
                if !budget.spend(incs.len() as u64 + 1) {
                    return rewritten;
                }
                if let Some((x, k)) = add_const(func, def) {
                    if x != y && !incs.iter().any(|&(_, yy, _)| yy == y) {
                        incs.push((x, y, k));
                    }
                }
            }
        }
        if incs.is_empty() {
            continue;
        }

        // The branch's condition `icmp eq|ne x, K2`, used only by the branch.
        if let InstructionData::Brif { arg: cond, .. } = func.dfg.insts[term] {
            if let ValueDef::Result(cmp, 0) = func.dfg.value_def(cond) {
                if uses[cond] == 1 && func.layout.inst_block(cmp) == Some(block) {
                    if let InstructionData::IntCompare {
                        opcode: Opcode::Icmp,
                        cond: cc @ (IntCC::Equal | IntCC::NotEqual),
                        args: [a, b],
                    } = func.dfg.insts[cmp]
                    {
                        let operand = match (iconst(func, a), iconst(func, b)) {
                            (None, Some(k2)) => Some((a, k2)),
                            (Some(k2), None) => Some((b, k2)),
                            _ => None,
                        };
                        let inc = operand.and_then(|(x, k2)| {
                            incs.iter()
                                .find(|&&(xx, _, _)| xx == x)
                                .map(|&(_, y, k1)| (y, k2.wrapping_add(k1)))
                        });
                        if let Some((y, k)) = inc {
                            let ty = func.dfg.value_type(y);
                            let mut pos = FuncCursor::new(func).at_inst(term);
                            let kv = pos.ins().iconst(ty, imm(ty, k));
                            let new_cond = pos.ins().icmp(cc, y, kv);
                            if let InstructionData::Brif { arg, .. } = &mut func.dfg.insts[term] {
                                *arg = new_cond;
                            }
                            func.layout.remove_inst(cmp);
                            rewritten += 1;
                        }
                    }
                }
            }
        }

        // `iadd x, K3` in a successor `S` reached only from this branch (and in the blocks
        // `S` dominates): `iadd p, K3 - K1`, where `p` is a new parameter of `S` that the
        // branch passes `y` to. Not `iadd y, ...` directly: lowering looks through `y`'s
        // definition into an address mode (`lea K3(x)`), which would keep `x` live across the
        // branch again; a block parameter it cannot look through.
        if !matches!(func.dfg.insts[term].opcode(), Opcode::Brif | Opcode::Jump) {
            continue;
        }
        for (di, &succ) in succs.iter().enumerate() {
            let only_pred = cfg.pred_iter(succ).count() == 1
                && succs.iter().filter(|&&s| s == succ).count() == 1;
            if !only_pred {
                continue;
            }
            for &(x, y, k1) in &incs {
                let Some(adds) = adds_of.get(&x) else {
                    continue;
                };
                if !budget.spend(adds.len() as u64) {
                    return rewritten;
                }
                let targets: Vec<(Inst, u64)> = adds
                    .iter()
                    .filter_map(|&add| {
                        let at = func.layout.inst_block(add)?;
                        // Still `iadd x, K3`: an earlier rewrite may have changed it.
                        let (xx, k3) = add_const(func, add)?;
                        (xx == x && domtree.block_dominates(succ, at)).then_some((add, k3))
                    })
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                let ty = func.dfg.value_type(y);
                let p = func.dfg.append_block_param(succ, ty);
                // `Function` derefs to its stencil: one borrow of the graph, then its fields.
                let dfg = &mut func.dfg;
                dfg.insts[term]
                    .branch_destination_mut(&mut dfg.jump_tables, &mut dfg.exception_tables)[di]
                    .append_argument(y, &mut dfg.value_lists);
                for (add, k3) in targets {
                    let mut pos = FuncCursor::new(func).at_inst(add);
                    let kv = pos.ins().iconst(ty, imm(ty, k3.wrapping_sub(k1)));
                    func.replace(add).iadd(p, kv);
                    rewritten += 1;
                }
            }
        }
    }
    rewritten
}

/// Commutative operations whose x86-64 lowering (SSE, without AVX: the sandbox's baseline)
/// ties the result to the first operand's register.
fn commutative(op: Opcode) -> bool {
    matches!(
        op,
        Opcode::Fadd
            | Opcode::Fmul
            | Opcode::Iadd
            | Opcode::Imul
            | Opcode::Band
            | Opcode::Bor
            | Opcode::Bxor
    )
}

/// Whether `v` is `p`, or a commutative operation with an operand that is (up to `depth`
/// operations deep, visiting at most what `budget` allows).
fn carries(func: &Function, v: Value, p: Value, depth: u32, budget: &mut Budget) -> bool {
    if v == p {
        return true;
    }
    if depth == 0 || !budget.spend(1) {
        return false;
    }
    let ValueDef::Result(inst, 0) = func.dfg.value_def(v) else {
        return false;
    };
    match func.dfg.insts[inst] {
        InstructionData::Binary { opcode, args } if commutative(opcode) => {
            carries(func, args[0], p, depth - 1, budget)
                || carries(func, args[1], p, depth - 1, budget)
        }
        _ => false,
    }
}

/// How deep a chain of operations from a loop's parameter to what its back edge passes is
/// followed (an unrolled reduction is one operation per unrolled step).
const CHAIN_DEPTH: u32 = 16;

/// Operations looked at to decide whether one operand carries the loop's value.
const QUERY_STEPS: u64 = 64;

/// Peergrid patch: puts the loop-carried operand first in commutative operations on the way
/// from a loop header's parameter to the value its back edge passes in that parameter's
/// place (a reduction's accumulator, `acc = x + acc`, as LLVM's wasm usually orders it).
///
/// x86-64's two-operand instructions (`addsd`, `mulpd`, `add`, ...) overwrite their first
/// operand, so Cranelift's lowering ties the result to the first operand's register. With
/// the product first, the new accumulator lands in the product's register, not the
/// parameter's, and regalloc2 copies it back on every back edge (a `movdqa` and a taken
/// jump in 2mm's dot product). With the accumulator first, the chain stays in one register.
///
/// Exact for the integer operations. For `fadd`/`fmul`, IEEE 754 makes `a + b` and `b + a`
/// equal except for which NaN's payload an operation on two NaNs returns; the `native`
/// class does not canonicalize NaNs, so that payload can change, but identically on every
/// worker with these settings (`latch-carried=first` names the pass), and wasm leaves it
/// unspecified. The `portable` class canonicalizes every NaN result. Returns how many
/// operations were swapped.
pub fn carried_operands_first(func: &mut Function, domtree: &DominatorTree) -> usize {
    let mut budget = Budget::for_function(func);
    let mut swapped = 0;
    let blocks: Vec<Block> = func.layout.blocks().collect();
    for block in blocks {
        let Some(term) = func.layout.last_inst(block) else {
            continue;
        };
        if !matches!(func.dfg.insts[term].opcode(), Opcode::Brif | Opcode::Jump) {
            continue;
        }
        let dests = func.dfg.insts[term]
            .branch_destination(&func.dfg.jump_tables, &func.dfg.exception_tables)
            .to_vec();
        for dest in dests {
            let header = dest.block(&func.dfg.value_lists);
            // A back edge: the header dominates the block that branches to it.
            if !domtree.block_dominates(header, block) {
                continue;
            }
            let passed: Vec<Option<Value>> = dest
                .args(&func.dfg.value_lists)
                .map(|a| a.as_value())
                .collect();
            for (i, arg) in passed.into_iter().enumerate() {
                let (Some(mut v), Some(&p)) = (arg, func.dfg.block_params(header).get(i)) else {
                    continue;
                };
                for _ in 0..CHAIN_DEPTH {
                    let ValueDef::Result(inst, 0) = func.dfg.value_def(v) else {
                        break;
                    };
                    let InstructionData::Binary { opcode, args } = func.dfg.insts[inst] else {
                        break;
                    };
                    if !commutative(opcode) {
                        break;
                    }
                    // At most `QUERY_STEPS` operations looked at per operand.
                    let mut query = Budget(QUERY_STEPS);
                    let first = carries(func, args[0], p, CHAIN_DEPTH, &mut query);
                    let mut query = Budget(QUERY_STEPS);
                    let second = carries(func, args[1], p, CHAIN_DEPTH, &mut query);
                    if !budget.spend(2 * QUERY_STEPS) {
                        return swapped;
                    }
                    v = match (first, second) {
                        (true, false) => args[0],
                        (false, true) => {
                            if let InstructionData::Binary { args, .. } = &mut func.dfg.insts[inst]
                            {
                                args.swap(0, 1);
                            }
                            swapped += 1;
                            args[1]
                        }
                        _ => break,
                    };
                }
            }
        }
    }
    swapped
}
