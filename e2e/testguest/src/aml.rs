//! A small AML reader: walks the DSDT (and SSDTs) once and records the
//! namespace objects the guest needs: devices, `Name` objects, methods (their
//! bodies, for `amleval`), operation regions and fields.
//!
//! It understands the namespace-building part of AML: `Scope`, `Device`,
//! `Name` (integers, strings, buffers, packages), `Method`, `OperationRegion`,
//! `Field` (named, reserved and access entries), `Mutex`, `Event`, `Alias`,
//! `External`, `Processor`/`PowerResource`/`ThermalZone` (skipped),
//! PkgLength in all four sizes and name strings with `\`, `^`, dual and multi
//! name prefixes and the null name. Anything else ends the enclosing scope's
//! walk and is counted as an error (with its offset), so a table that uses more
//! of AML still yields what came before it.

use alloc::vec::Vec;
use core::fmt;

/// Deepest path recorded (`\_SB_.PCI0.S08_.S00_` is 4).
pub const MAX_DEPTH: usize = 8;

/// An absolute namespace path: name segments from the root.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NsPath {
    segs: [[u8; 4]; MAX_DEPTH],
    len: u8,
}

impl NsPath {
    /// The root, `\`.
    pub const ROOT: NsPath = NsPath {
        segs: [[0; 4]; MAX_DEPTH],
        len: 0,
    };

    /// This path with `seg` appended; `None` when too deep.
    pub fn child(&self, seg: [u8; 4]) -> Option<NsPath> {
        let mut p = *self;
        let i = p.len as usize;
        if i >= MAX_DEPTH {
            return None;
        }
        p.segs[i] = seg;
        p.len += 1;
        Some(p)
    }

    /// The enclosing scope (the root's parent is the root).
    pub fn parent(&self) -> NsPath {
        let mut p = *self;
        if p.len > 0 {
            p.len -= 1;
            p.segs[p.len as usize] = [0; 4];
        }
        p
    }
}

impl fmt::Display for NsPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("\\")?;
        for (i, s) in self.segs[..self.len as usize].iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(core::str::from_utf8(s).unwrap_or("????"))?;
        }
        Ok(())
    }
}

/// A name string as written in AML, before it is resolved against a scope.
#[derive(Clone, Copy)]
pub struct NameRef {
    root: bool,
    up: u8,
    segs: [[u8; 4]; MAX_DEPTH],
    n: u8,
}

impl NameRef {
    /// A single segment without prefixes: looked up with the search rules.
    fn searchable(&self) -> bool {
        !self.root && self.up == 0 && self.n == 1
    }

    /// The absolute path this name denotes inside `scope` (no search).
    pub fn resolve(&self, scope: NsPath) -> Option<NsPath> {
        let mut p = if self.root { NsPath::ROOT } else { scope };
        for _ in 0..self.up {
            if p.len == 0 {
                return None;
            }
            p = p.parent();
        }
        for s in &self.segs[..self.n as usize] {
            p = p.child(*s)?;
        }
        Some(p)
    }
}

fn lead_name_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c == b'_'
}

/// Parses a name string at `pos`; returns it and the position after it.
pub fn name_string(b: &[u8], mut pos: usize) -> Option<(NameRef, usize)> {
    let mut r = NameRef {
        root: false,
        up: 0,
        segs: [[0; 4]; MAX_DEPTH],
        n: 0,
    };
    if *b.get(pos)? == b'\\' {
        r.root = true;
        pos += 1;
    } else {
        while *b.get(pos)? == b'^' {
            r.up = r.up.saturating_add(1);
            pos += 1;
        }
    }
    let count = match *b.get(pos)? {
        0x00 => {
            return Some((r, pos + 1));
        }
        0x2e => {
            pos += 1;
            2
        }
        0x2f => {
            pos += 2;
            *b.get(pos - 1)? as usize
        }
        c if lead_name_char(c) => 1,
        _ => return None,
    };
    if count > MAX_DEPTH {
        return None;
    }
    for i in 0..count {
        let s = b.get(pos..pos + 4)?;
        if !lead_name_char(s[0]) {
            return None;
        }
        r.segs[i].copy_from_slice(s);
        pos += 4;
    }
    r.n = count as u8;
    Some((r, pos))
}

/// Decodes a PkgLength at `pos`: returns the encoded length and the position
/// after the encoding. A package ends at `pos + length`.
pub fn pkg_length(b: &[u8], pos: usize) -> Option<(usize, usize)> {
    let lead = *b.get(pos)?;
    let extra = (lead >> 6) as usize;
    if extra == 0 {
        return Some(((lead & 0x3f) as usize, pos + 1));
    }
    let mut len = (lead & 0x0f) as usize;
    for i in 0..extra {
        len |= (*b.get(pos + 1 + i)? as usize) << (4 + 8 * i);
    }
    Some((len, pos + 1 + extra))
}

/// Returns the end of the package whose PkgLength starts at `pos` (clamped to
/// `limit`) and the position after the PkgLength.
fn pkg(b: &[u8], pos: usize, limit: usize) -> Option<(usize, usize)> {
    let (len, after) = pkg_length(b, pos)?;
    let end = pos.checked_add(len)?;
    (end <= limit && end >= after).then_some((end, after))
}

/// Reads an integer constant (`Zero`, `One`, `Ones`, byte/word/dword/qword
/// prefixes) at `pos`.
pub fn int_const(b: &[u8], pos: usize) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<u64> {
        let s = b.get(pos + 1..pos + 1 + n)?;
        Some(s.iter().rev().fold(0u64, |v, x| v << 8 | *x as u64))
    };
    Some(match *b.get(pos)? {
        0x00 => (0, pos + 1),
        0x01 => (1, pos + 1),
        0xff => (u64::MAX, pos + 1),
        0x0a => (le(1)?, pos + 2),
        0x0b => (le(2)?, pos + 3),
        0x0c => (le(4)?, pos + 5),
        0x0e => (le(8)?, pos + 9),
        _ => return None,
    })
}

/// The value of a `Name` object.
#[derive(Clone, Copy)]
pub enum Data {
    Int(u64),
    /// A string's bytes, without the terminating NUL.
    Str(&'static [u8]),
    /// A buffer's bytes (the initializer; its declared size may be larger).
    Buf(&'static [u8]),
    /// A package: its element count and the encoded elements.
    Pkg(u8, &'static [u8]),
}

/// What a namespace path names.
#[derive(Clone, Copy)]
pub enum Object {
    Device,
    Name(Data),
    Method {
        args: u8,
        body: &'static [u8],
    },
    /// An operation region: address space (0 memory, 1 I/O), base, length.
    Region {
        space: u8,
        base: u64,
        len: u64,
    },
    /// A field unit: `bits` bits at bit `offset` of `region`, accessed with
    /// access type `access` (0 any, 1 byte, 2 word, 3 dword, 4 qword).
    Field {
        region: NsPath,
        offset: u32,
        bits: u32,
        access: u8,
    },
    Other,
}

/// One named object.
#[derive(Clone, Copy)]
pub struct Entry {
    pub path: NsPath,
    pub obj: Object,
}

/// The first AML construct the reader did not understand.
#[derive(Clone, Copy)]
pub struct AmlError {
    /// Signature of the table it is in.
    pub table: [u8; 4],
    /// Offset from the start of the table.
    pub offset: usize,
    pub opcode: u8,
}

/// Everything recorded from the definition blocks.
pub struct Namespace {
    pub entries: Vec<Entry>,
    pub errors: u32,
    pub first_error: Option<AmlError>,
}

impl Namespace {
    /// An empty namespace.
    pub fn new() -> Namespace {
        Namespace {
            entries: Vec::new(),
            errors: 0,
            first_error: None,
        }
    }

    /// Adds the objects of a definition block (a whole DSDT or SSDT, header
    /// included).
    pub fn load(&mut self, table: &'static [u8]) {
        if table.len() < 36 {
            return;
        }
        let mut p = Loader {
            b: table,
            pos: 36,
            ns: self,
        };
        p.term_list(table.len(), NsPath::ROOT);
    }

    /// The object at `path`.
    pub fn get(&self, path: &NsPath) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == *path)
    }

    /// Looks `name` up from `scope`: a lone segment is searched for in the
    /// scope and then each enclosing scope (the AML search rules); anything
    /// with a prefix or several segments is resolved directly.
    pub fn lookup(&self, scope: NsPath, name: &NameRef) -> Option<&Entry> {
        if name.searchable() {
            let mut s = scope;
            loop {
                if let Some(e) = s.child(name.segs[0]).and_then(|p| self.get(&p)) {
                    return Some(e);
                }
                if s.len == 0 {
                    return None;
                }
                s = s.parent();
            }
        }
        self.get(&name.resolve(scope)?)
    }

    /// The `Name` object `seg` directly inside `scope`.
    pub fn child_data(&self, scope: &NsPath, seg: &[u8; 4]) -> Option<Data> {
        match self.get(&scope.child(*seg)?)?.obj {
            Object::Name(d) => Some(d),
            _ => None,
        }
    }
}

struct Loader<'n> {
    b: &'static [u8],
    pos: usize,
    ns: &'n mut Namespace,
}

impl Loader<'_> {
    fn error(&mut self, at: usize) {
        self.ns.errors += 1;
        if self.ns.first_error.is_none() {
            let mut table = [0; 4];
            table.copy_from_slice(&self.b[..4]);
            self.ns.first_error = Some(AmlError {
                table,
                offset: at,
                opcode: self.b.get(at).copied().unwrap_or(0),
            });
        }
    }

    fn add(&mut self, path: Option<NsPath>, obj: Object) {
        if let Some(path) = path {
            self.ns.entries.push(Entry { path, obj });
        }
    }

    fn name(&mut self) -> Option<NameRef> {
        let (n, pos) = name_string(self.b, self.pos)?;
        self.pos = pos;
        Some(n)
    }

    fn pkg(&mut self, limit: usize) -> Option<usize> {
        let (end, after) = pkg(self.b, self.pos, limit)?;
        self.pos = after;
        Some(end)
    }

    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }

    fn int(&mut self) -> Option<u64> {
        let (v, pos) = int_const(self.b, self.pos)?;
        self.pos = pos;
        Some(v)
    }

    /// Walks a list of namespace terms up to `end`, inside `scope`. Stops at
    /// the first term it does not understand (counted as an error).
    fn term_list(&mut self, end: usize, scope: NsPath) {
        while self.pos < end {
            let at = self.pos;
            if self.term(end, scope).is_none() {
                self.error(at);
                self.pos = end;
                return;
            }
        }
    }

    fn term(&mut self, end: usize, scope: NsPath) -> Option<()> {
        let op = self.byte()?;
        match op {
            // Scope
            0x10 => {
                let pend = self.pkg(end)?;
                let path = self.name()?.resolve(scope)?;
                self.term_list(pend, path);
                self.pos = pend;
            }
            // Name
            0x08 => {
                let path = self.name()?.resolve(scope);
                let d = self.data(end)?;
                self.add(path, Object::Name(d));
            }
            // Method
            0x14 => {
                let pend = self.pkg(end)?;
                let path = self.name()?.resolve(scope);
                let flags = self.byte()?;
                let body = self.b.get(self.pos..pend)?;
                self.add(
                    path,
                    Object::Method {
                        args: flags & 7,
                        body,
                    },
                );
                self.pos = pend;
            }
            // Alias
            0x06 => {
                self.name()?;
                self.name()?;
            }
            // External: name, object type, argument count
            0x15 => {
                self.name()?;
                self.pos += 2;
            }
            // If, Else, While at the top level: not evaluated here.
            0xa0..=0xa2 => self.pos = self.pkg(end)?,
            // Noop
            0xa3 => {}
            0x5b => self.ext_term(end, scope)?,
            _ => return None,
        }
        (self.pos <= end).then_some(())
    }

    fn ext_term(&mut self, end: usize, scope: NsPath) -> Option<()> {
        match self.byte()? {
            // Mutex: name, sync flags
            0x01 => {
                let path = self.name()?.resolve(scope);
                self.byte()?;
                self.add(path, Object::Other);
            }
            // Event
            0x02 => {
                let path = self.name()?.resolve(scope);
                self.add(path, Object::Other);
            }
            // OperationRegion: name, space, offset, length
            0x80 => {
                let path = self.name()?.resolve(scope);
                let space = self.byte()?;
                let base = self.int()?;
                let len = self.int()?;
                self.add(path, Object::Region { space, base, len });
            }
            // Field: region name, flags, field list
            0x81 => {
                let pend = self.pkg(end)?;
                let region = self.name()?;
                let region = match self.ns.lookup(scope, &region) {
                    Some(e) => e.path,
                    None => region.resolve(scope)?,
                };
                let flags = self.byte()?;
                self.field_list(pend, region, flags & 0x0f, scope)?;
                self.pos = pend;
            }
            // Device
            0x82 => {
                let pend = self.pkg(end)?;
                let path = self.name()?.resolve(scope)?;
                self.add(Some(path), Object::Device);
                self.term_list(pend, path);
                self.pos = pend;
            }
            // Processor, PowerResource, ThermalZone; IndexField, BankField
            0x83..=0x87 => self.pos = self.pkg(end)?,
            _ => return None,
        }
        Some(())
    }

    fn field_list(&mut self, end: usize, region: NsPath, flags: u8, scope: NsPath) -> Option<()> {
        let mut offset = 0u32;
        let mut access = flags;
        while self.pos < end {
            match *self.b.get(self.pos)? {
                // ReservedField
                0x00 => {
                    let (bits, after) = pkg_length(self.b, self.pos + 1)?;
                    offset = offset.checked_add(bits as u32)?;
                    self.pos = after;
                }
                // AccessField: type, attribute
                0x01 => {
                    access = *self.b.get(self.pos + 1)? & 0x0f;
                    self.pos += 3;
                }
                // ExtendedAccessField: type, attribute, length
                0x03 => {
                    access = *self.b.get(self.pos + 1)? & 0x0f;
                    self.pos += 4;
                }
                c if lead_name_char(c) => {
                    let mut seg = [0; 4];
                    seg.copy_from_slice(self.b.get(self.pos..self.pos + 4)?);
                    let (bits, after) = pkg_length(self.b, self.pos + 4)?;
                    let obj = Object::Field {
                        region,
                        offset,
                        bits: bits as u32,
                        access,
                    };
                    self.add(scope.child(seg), obj);
                    offset = offset.checked_add(bits as u32)?;
                    self.pos = after;
                }
                // ConnectField and anything else
                _ => return None,
            }
        }
        Some(())
    }

    /// A `Name`'s initial value (a DataRefObject).
    fn data(&mut self, end: usize) -> Option<Data> {
        let at = self.pos;
        match *self.b.get(at)? {
            // String
            0x0d => {
                let rest = self.b.get(at + 1..end)?;
                let n = rest.iter().position(|c| *c == 0)?;
                self.pos = at + 2 + n;
                Some(Data::Str(&rest[..n]))
            }
            // Buffer: size, bytes
            0x11 => {
                self.pos += 1;
                let pend = self.pkg(end)?;
                self.int()?;
                let bytes = self.b.get(self.pos..pend)?;
                self.pos = pend;
                Some(Data::Buf(bytes))
            }
            // Package, VarPackage
            0x12 | 0x13 => {
                self.pos += 1;
                let pend = self.pkg(end)?;
                let n = if self.b[at] == 0x12 {
                    self.byte()?
                } else {
                    self.int()? as u8
                };
                let elems = self.b.get(self.pos..pend)?;
                self.pos = pend;
                Some(Data::Pkg(n, elems))
            }
            // Revision
            0x5b if self.b.get(at + 1) == Some(&0x30) => {
                self.pos += 2;
                Some(Data::Int(2))
            }
            _ => self.int().map(Data::Int),
        }
    }
}

/// Decodes a compressed EISA id (`EisaId("PNP0C0C")` as stored in AML).
pub fn eisa_id(v: u64) -> [u8; 7] {
    let v = (v as u32).swap_bytes();
    let hex = b"0123456789ABCDEF";
    let mut s = [0u8; 7];
    for (i, c) in s[..3].iter_mut().enumerate() {
        *c = 0x40 + ((v >> (26 - 5 * i)) & 0x1f) as u8;
    }
    for (i, c) in s[3..].iter_mut().enumerate() {
        *c = hex[((v >> (12 - 4 * i)) & 0xf) as usize];
    }
    s
}

/// Whether a `_HID` (or `_CID`) value names `id`.
pub fn hid_is(d: Data, id: &[u8]) -> bool {
    match d {
        Data::Int(v) => eisa_id(v)[..] == *id,
        Data::Str(s) => s == id,
        _ => false,
    }
}
