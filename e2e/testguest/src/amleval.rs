//! Evaluates the small part of AML that a Generic Event Device's `_EVT`
//! method uses (QEMU's and Godwit's, and Cloud Hypervisor's shape too):
//! integers only; `Store`, `And`, `Or`, `Xor`, `Not`, `Add`, `Subtract`,
//! `Increment`, `Decrement`, shifts, `LEqual`/`LGreater`/`LLess`/`LNot`/`LAnd`/`LOr`, `If`/`Else`,
//! `While` (bounded), `Return`, `Break`, `Noop`, `Notify`, `Local0-7`,
//! `Arg0-6`, integer constants, `Name` integers, reads and writes of fields in
//! SystemMemory operation regions, calls of other methods, and `Acquire`,
//! `Release`, `Sleep`, `Stall` (accepted, without effect: one CPU runs AML).
//! Anything else stops the evaluation with [`Unsupported`].

use crate::aml::{int_const, name_string, pkg_length, Data, Namespace, NsPath, Object};

/// The construct evaluation stopped at.
#[derive(Clone, Copy, Debug)]
pub struct Unsupported {
    pub opcode: u8,
}

/// A `Notify(target, value)` the method executed.
#[derive(Clone, Copy)]
pub struct Notification {
    pub target: NsPath,
    pub value: u64,
}

/// Most notifications kept from one evaluation.
pub const MAX_NOTIFY: usize = 4;
const MAX_CALL_DEPTH: u32 = 8;
const MAX_LOOPS: u32 = 1000;

/// The state of one evaluation.
pub struct Eval<'n> {
    ns: &'n Namespace,
    pub notified: [Option<Notification>; MAX_NOTIFY],
    depth: u32,
}

struct Frame {
    code: &'static [u8],
    scope: NsPath,
    locals: [u64; 8],
    args: [u64; 7],
}

enum Flow {
    Next,
    Return(u64),
    Break,
}

type R<T> = Result<T, Unsupported>;

fn bad(code: &[u8], pos: usize) -> Unsupported {
    Unsupported {
        opcode: code.get(pos).copied().unwrap_or(0),
    }
}

/// Where a value is stored.
enum Target {
    None,
    Local(usize),
    Arg(usize),
    Field(NsPath),
    /// A name that is not a field (stores to it are dropped).
    Ignored,
}

impl<'n> Eval<'n> {
    /// A fresh evaluation over `ns`.
    pub fn new(ns: &'n Namespace) -> Eval<'n> {
        Eval {
            ns,
            notified: [None; MAX_NOTIFY],
            depth: 0,
        }
    }

    /// Runs the method at `path` with integer arguments; returns its result
    /// (0 when it returns nothing).
    pub fn call(&mut self, path: &NsPath, args: &[u64]) -> R<u64> {
        let Some(Object::Method { body, .. }) = self.ns.get(path).map(|e| e.obj) else {
            return Err(Unsupported { opcode: 0 });
        };
        if self.depth >= MAX_CALL_DEPTH {
            return Err(Unsupported { opcode: 0x14 });
        }
        let mut f = Frame {
            code: body,
            scope: *path,
            locals: [0; 8],
            args: [0; 7],
        };
        for (a, v) in f.args.iter_mut().zip(args) {
            *a = *v;
        }
        self.depth += 1;
        let r = self.list(&mut f, 0, body.len());
        self.depth -= 1;
        match r? {
            Flow::Return(v) => Ok(v),
            _ => Ok(0),
        }
    }

    fn list(&mut self, f: &mut Frame, mut pos: usize, end: usize) -> R<Flow> {
        while pos < end {
            let (flow, next) = self.statement(f, pos, end)?;
            pos = next;
            match flow {
                Flow::Next => {}
                other => return Ok(other),
            }
        }
        Ok(Flow::Next)
    }

    fn pkg_end(code: &[u8], pos: usize, end: usize) -> R<(usize, usize)> {
        let (len, after) = pkg_length(code, pos).ok_or(bad(code, pos))?;
        let pend = pos + len;
        if pend > end || pend < after {
            return Err(bad(code, pos));
        }
        Ok((pend, after))
    }

    fn statement(&mut self, f: &mut Frame, pos: usize, end: usize) -> R<(Flow, usize)> {
        let code = f.code;
        match code[pos] {
            // If (predicate) {...} [Else {...}]
            0xa0 => {
                let (pend, after) = Self::pkg_end(code, pos + 1, end)?;
                let (cond, body) = self.term(f, after)?;
                let has_else = code.get(pend) == Some(&0xa1);
                let (else_end, else_body) = if has_else {
                    Self::pkg_end(code, pend + 1, end)?
                } else {
                    (pend, pend)
                };
                let flow = if cond != 0 {
                    self.list(f, body, pend)?
                } else {
                    self.list(f, else_body, else_end)?
                };
                Ok((flow, else_end))
            }
            // A stray Else: its If was false or already handled.
            0xa1 => Ok((Flow::Next, Self::pkg_end(code, pos + 1, end)?.0)),
            // While (predicate) {...}
            0xa2 => {
                let (pend, after) = Self::pkg_end(code, pos + 1, end)?;
                for _ in 0..MAX_LOOPS {
                    let (cond, body) = self.term(f, after)?;
                    if cond == 0 {
                        return Ok((Flow::Next, pend));
                    }
                    match self.list(f, body, pend)? {
                        Flow::Break => return Ok((Flow::Next, pend)),
                        Flow::Return(v) => return Ok((Flow::Return(v), pend)),
                        Flow::Next => {}
                    }
                }
                Err(bad(code, pos))
            }
            // Noop
            0xa3 => Ok((Flow::Next, pos + 1)),
            // Return
            0xa4 => {
                let (v, next) = self.term(f, pos + 1)?;
                Ok((Flow::Return(v), next))
            }
            // Break
            0xa5 => Ok((Flow::Break, pos + 1)),
            // Notify (target, value)
            0x86 => {
                let (n, after) = name_string(code, pos + 1).ok_or(bad(code, pos))?;
                let target = self
                    .ns
                    .lookup(f.scope, &n)
                    .map(|e| e.path)
                    .ok_or(bad(code, pos))?;
                let (value, next) = self.term(f, after)?;
                if let Some(slot) = self.notified.iter_mut().find(|s| s.is_none()) {
                    *slot = Some(Notification { target, value });
                }
                Ok((Flow::Next, next))
            }
            0x5b => match code.get(pos + 1) {
                // Acquire (mutex, timeout)
                Some(0x23) => {
                    let (_, next) = self.target(f, pos + 2)?;
                    Ok((Flow::Next, next + 2))
                }
                // Release (mutex)
                Some(0x27) => Ok((Flow::Next, self.target(f, pos + 2)?.1)),
                // Stall, Sleep
                Some(0x21) | Some(0x22) => Ok((Flow::Next, self.term(f, pos + 2)?.1)),
                _ => Err(bad(code, pos)),
            },
            // Any expression (Store, And, a method call, ...) as a statement.
            _ => Ok((Flow::Next, self.term(f, pos)?.1)),
        }
    }

    /// Evaluates the term at `pos` to an integer; returns it and the position
    /// after the term.
    fn term(&mut self, f: &mut Frame, pos: usize) -> R<(u64, usize)> {
        let code = f.code;
        let op = *code.get(pos).ok_or(bad(code, pos))?;
        if let Some((v, next)) = int_const(code, pos) {
            return Ok((v, next));
        }
        match op {
            0x60..=0x67 => Ok((f.locals[(op - 0x60) as usize], pos + 1)),
            0x68..=0x6e => Ok((f.args[(op - 0x68) as usize], pos + 1)),
            // Store (value, target)
            0x70 => {
                let (v, after) = self.term(f, pos + 1)?;
                let (t, next) = self.target(f, after)?;
                self.store(f, t, v)?;
                Ok((v, next))
            }
            // Binary operators with a target.
            0x72 | 0x74 | 0x79 | 0x7a | 0x7b | 0x7d | 0x7f => {
                let (a, p1) = self.term(f, pos + 1)?;
                let (b, p2) = self.term(f, p1)?;
                let v = match op {
                    0x72 => a.wrapping_add(b),
                    0x74 => a.wrapping_sub(b),
                    0x79 => a.checked_shl(b as u32).unwrap_or(0),
                    0x7a => a.checked_shr(b as u32).unwrap_or(0),
                    0x7b => a & b,
                    0x7d => a | b,
                    _ => a ^ b,
                };
                let (t, next) = self.target(f, p2)?;
                self.store(f, t, v)?;
                Ok((v, next))
            }
            // Increment, Decrement (target)
            0x75 | 0x76 => {
                let (t, next) = self.target(f, pos + 1)?;
                let old = self.load(f, &t)?;
                let v = if op == 0x75 {
                    old.wrapping_add(1)
                } else {
                    old.wrapping_sub(1)
                };
                self.store(f, t, v)?;
                Ok((v, next))
            }
            // Not (value, target)
            0x80 => {
                let (a, p1) = self.term(f, pos + 1)?;
                let (t, next) = self.target(f, p1)?;
                self.store(f, t, !a)?;
                Ok((!a, next))
            }
            // LAnd, LOr, LEqual, LGreater, LLess
            0x90 | 0x91 | 0x93..=0x95 => {
                let (a, p1) = self.term(f, pos + 1)?;
                let (b, next) = self.term(f, p1)?;
                let r = match op {
                    0x90 => a != 0 && b != 0,
                    0x91 => a != 0 || b != 0,
                    0x93 => a == b,
                    0x94 => a > b,
                    _ => a < b,
                };
                Ok((if r { u64::MAX } else { 0 }, next))
            }
            // LNot
            0x92 => {
                let (a, next) = self.term(f, pos + 1)?;
                Ok((if a == 0 { u64::MAX } else { 0 }, next))
            }
            _ => self.named(f, pos),
        }
    }

    /// A name in an expression: a field read, a `Name` integer, or a call.
    fn named(&mut self, f: &mut Frame, pos: usize) -> R<(u64, usize)> {
        let code = f.code;
        let (n, mut next) = name_string(code, pos).ok_or(bad(code, pos))?;
        let e = *self.ns.lookup(f.scope, &n).ok_or(bad(code, pos))?;
        match e.obj {
            Object::Name(Data::Int(v)) => Ok((v, next)),
            Object::Field { .. } => Ok((self.field(&e.path, None)?, next)),
            Object::Method { args, .. } => {
                let mut vals = [0u64; 7];
                for v in vals.iter_mut().take(args as usize) {
                    let (a, p) = self.term(f, next)?;
                    *v = a;
                    next = p;
                }
                Ok((self.call(&e.path, &vals[..args as usize])?, next))
            }
            _ => Err(bad(code, pos)),
        }
    }

    fn target(&mut self, f: &mut Frame, pos: usize) -> R<(Target, usize)> {
        let code = f.code;
        match *code.get(pos).ok_or(bad(code, pos))? {
            0x00 => Ok((Target::None, pos + 1)),
            op @ 0x60..=0x67 => Ok((Target::Local((op - 0x60) as usize), pos + 1)),
            op @ 0x68..=0x6e => Ok((Target::Arg((op - 0x68) as usize), pos + 1)),
            _ => {
                let (n, next) = name_string(code, pos).ok_or(bad(code, pos))?;
                let t = match self.ns.lookup(f.scope, &n) {
                    Some(e) if matches!(e.obj, Object::Field { .. }) => Target::Field(e.path),
                    _ => Target::Ignored,
                };
                Ok((t, next))
            }
        }
    }

    fn load(&mut self, f: &Frame, t: &Target) -> R<u64> {
        Ok(match t {
            Target::Local(i) => f.locals[*i],
            Target::Arg(i) => f.args[*i],
            Target::Field(p) => self.field(p, None)?,
            Target::None | Target::Ignored => 0,
        })
    }

    fn store(&mut self, f: &mut Frame, t: Target, v: u64) -> R<()> {
        match t {
            Target::Local(i) => f.locals[i] = v,
            Target::Arg(i) => f.args[i] = v,
            Target::Field(p) => {
                self.field(&p, Some(v))?;
            }
            Target::None | Target::Ignored => {}
        }
        Ok(())
    }

    /// Reads (`write` = None) or writes a field unit in a SystemMemory region
    /// that fits in one access of its access width.
    fn field(&mut self, path: &NsPath, write: Option<u64>) -> R<u64> {
        let unsupported = Err(Unsupported { opcode: 0x81 });
        let Some(Object::Field {
            region,
            offset,
            bits,
            access,
        }) = self.ns.get(path).map(|e| e.obj)
        else {
            return unsupported;
        };
        let Some(Object::Region {
            space: 0,
            base,
            len,
        }) = self.ns.get(&region).map(|e| e.obj)
        else {
            return unsupported;
        };
        let width: u32 = match access {
            1 => 8,
            2 => 16,
            3 => 32,
            4 => 64,
            _ => (bits.next_power_of_two()).clamp(8, 64),
        };
        let unit = (offset / width) * width;
        let shift = offset - unit;
        if bits == 0 || shift + bits > width || (unit + width) as u64 > len * 8 {
            return unsupported;
        }
        let addr = base + (unit / 8) as u64;
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        match write {
            None => Ok((mmio::read(addr, width) >> shift) & mask),
            Some(v) => {
                let old = if bits == width {
                    0
                } else {
                    mmio::read(addr, width)
                };
                let new = (old & !(mask << shift)) | ((v & mask) << shift);
                mmio::write(addr, width, new);
                Ok(v)
            }
        }
    }
}

/// Volatile accesses of the widths AML fields use.
pub mod mmio {
    /// Reads `width` bits at `addr`.
    pub fn read(addr: u64, width: u32) -> u64 {
        // SAFETY: `addr` lies in an operation region the firmware tables
        // describe as SystemMemory, identity mapped (below 4 GiB).
        unsafe {
            match width {
                8 => core::ptr::read_volatile(addr as *const u8) as u64,
                16 => core::ptr::read_volatile(addr as *const u16) as u64,
                32 => core::ptr::read_volatile(addr as *const u32) as u64,
                _ => core::ptr::read_volatile(addr as *const u64),
            }
        }
    }

    /// Writes `width` bits of `v` at `addr`.
    pub fn write(addr: u64, width: u32, v: u64) {
        // SAFETY: as in `read`.
        unsafe {
            match width {
                8 => core::ptr::write_volatile(addr as *mut u8, v as u8),
                16 => core::ptr::write_volatile(addr as *mut u16, v as u16),
                32 => core::ptr::write_volatile(addr as *mut u32, v as u32),
                _ => core::ptr::write_volatile(addr as *mut u64, v),
            }
        }
    }
}
