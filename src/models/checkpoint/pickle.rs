//! A small, non-executing unpickler for PyTorch checkpoints (pickle protocols 0–5, binary subset).
//!
//! It never imports or calls anything: `GLOBAL`/`REDUCE`/`NEWOBJ`/`BUILD` become inert nodes that
//! the checkpoint reader interprets (tensor rebuild calls, `OrderedDict`, omegaconf `DictConfig`,
//! `argparse.Namespace`, enums). Containers live in an arena so that memoised references share the
//! object, which pickle mutates after memoising it (`EMPTY_DICT; BINPUT; ...; SETITEMS`).
//!
//! The program is untrusted, so the VM's work is bounded: strings and bytes are shared, not
//! copied, by `DUP` and memo `GET` (O(1) each); the values, arena nodes and nesting it builds are
//! capped; and the object graph, which may legally contain cycles, is only walked through
//! [`Pickle::entries`], whose answers are resolved once, with cycle detection, when the program
//! ends.
use std::collections::HashMap;
use std::sync::Arc;

/// Values (stack pushes and memo entries) one program may create: far more than any checkpoint's
/// pickle holds (a large model's has ~10^5), far less than would exhaust memory (~200 MB).
pub const MAX_VALUES: usize = 1 << 23;
/// Containers and objects one program may create (each ~100 bytes): ~200 MB at most.
pub const MAX_NODES: usize = 1 << 21;
/// How deep object states may nest (an omegaconf config nests a handful of levels).
pub const MAX_NESTING: usize = 256;

/// A pickle stack value: a primitive, or a reference to an arena node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: little-endian two's complement bytes.
    BigInt(Arc<[u8]>),
    Float(f64),
    /// Shared so that `DUP` and memo `GET` copy a pointer, never the text.
    Str(Arc<str>),
    /// Shared so that `DUP` and memo `GET` copy a pointer, never the bytes.
    Bytes(Arc<[u8]>),
    Ref(usize),
}

impl Value {
    /// A short description for error messages: long strings and bytes are cut, not printed.
    pub fn brief(&self) -> String {
        const KEEP: usize = 40;
        match self {
            Value::Str(s) if s.chars().count() > KEEP => {
                let head: String = s.chars().take(KEEP).collect();
                format!("{head:?}... ({} bytes)", s.len())
            }
            Value::Bytes(b) => format!("<{} bytes>", b.len()),
            Value::BigInt(b) => format!("<{}-byte integer>", b.len()),
            other => format!("{other:?}"),
        }
    }
}

/// A container or object built by the pickle program.
#[derive(Debug, Clone)]
pub enum Node {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// Names are shared, like `Value::Str`: STACK_GLOBAL of DUPed strings copies nothing.
    Global {
        module: Arc<str>,
        name: Arc<str>,
    },
    /// `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), plus BUILD's state and
    /// any items the program added to it.
    Object {
        callable: Value,
        args: Value,
        state: Option<Value>,
        items: Vec<(Value, Value)>,
    },
    PersistentId(Value),
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle data ends early (at byte {0})")]
    Truncated(usize),
    #[error("unsupported pickle opcode 0x{op:02x} at byte {pos}")]
    UnsupportedOpcode { op: u8, pos: usize },
    #[error("malformed pickle at byte {pos}: {reason}")]
    Malformed { pos: usize, reason: String },
    #[error("pickle exceeds a safety limit at byte {pos}: {what} (a corrupt or hostile file)")]
    TooLarge { pos: usize, what: String },
    #[error("pickle object #{node}: {reason} (a corrupt or hostile file)")]
    Graph { node: usize, reason: String },
}

/// The result of one pickle program: its arena and the value it returned.
#[derive(Debug, Default)]
pub struct Pickle {
    nodes: Vec<Node>,
    pub root: Option<Value>,
    /// For each node, the node whose pairs [`Pickle::entries`] returns, resolved once when the
    /// program ends so that no query ever walks the (possibly cyclic) graph.
    entries_of: Vec<Option<usize>>,
    /// Raw bytes that followed an object's BUILD in the input (joblib's arrays), by node:
    /// claimed by the [`InlineData`] hook of [`unpickle_with_inline_data`].
    inline: HashMap<usize, std::ops::Range<usize>>,
}

/// Asked after every BUILD with the program so far, the built object and the input after the
/// BUILD opcode: `Some(range)` claims `rest[range]` as the object's raw data (the program
/// resumes at `range.end`), `None` leaves the input alone. joblib writes each numpy array's
/// bytes right after its `NumpyArrayWrapper`'s BUILD; only the caller knows how many there are.
pub type InlineData<'h> =
    dyn FnMut(&Pickle, &Value, &[u8]) -> Result<Option<std::ops::Range<usize>>, String> + 'h;

/// Runs one pickle program starting at `data[0]`; returns it and the bytes it used (up to STOP).
///
/// Never panics and never loops: every opcode consumes input and does bounded work, and the
/// values, nodes and nesting it may build are capped ([`MAX_VALUES`], [`MAX_NODES`],
/// [`MAX_NESTING`]); a program past a cap, or whose object states refer back to themselves,
/// is an error.
pub fn unpickle(data: &[u8]) -> Result<(Pickle, usize), PickleError> {
    unpickle_with_inline_data(data, &mut |_, _, _| Ok(None))
}

/// [`unpickle`], pausing after each BUILD to let `inline` claim raw bytes that follow it
/// (see [`InlineData`]); the claimed ranges are then [`Pickle::inline_data`].
pub fn unpickle_with_inline_data(
    data: &[u8],
    inline: &mut InlineData<'_>,
) -> Result<(Pickle, usize), PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        out: Pickle::default(),
        created: 0,
        inline,
    };
    vm.run()?;
    let mut out = vm.out;
    out.entries_of = resolve_entries(&out.nodes)?;
    Ok((out, vm.pos))
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    out: Pickle,
    /// Values pushed or memoised so far, against [`MAX_VALUES`].
    created: usize,
    inline: &'a mut InlineData<'a>,
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le_uint(&mut self, n: usize) -> Result<u64, PickleError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn len_prefixed(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let len = self.le_uint(n)?;
        let len = usize::try_from(len).map_err(|_| PickleError::Truncated(self.pos))?;
        self.take(len)
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.bad("non-UTF-8 text line"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn bad(&self, reason: &str) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            reason: reason.to_string(),
        }
    }

    /// Every value the program creates passes through here or `memo_put`: the one place to cap.
    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        self.count_value()?;
        self.stack.push(v);
        Ok(())
    }

    fn count_value(&mut self) -> Result<(), PickleError> {
        self.created += 1;
        if self.created > MAX_VALUES {
            return Err(PickleError::TooLarge {
                pos: self.pos,
                what: format!("more than {MAX_VALUES} values"),
            });
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack.pop().ok_or_else(|| self.bad("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            reason: "stack underflow".into(),
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self.marks.pop().ok_or_else(|| self.bad("no MARK"))?;
        if m > self.stack.len() {
            return Err(self.bad("MARK above stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn alloc(&mut self, node: Node) -> Result<Value, PickleError> {
        if self.out.nodes.len() >= MAX_NODES {
            return Err(PickleError::TooLarge {
                pos: self.pos,
                what: format!("more than {MAX_NODES} containers and objects"),
            });
        }
        self.out.nodes.push(node);
        Ok(Value::Ref(self.out.nodes.len() - 1))
    }

    fn node_mut(&mut self, v: &Value) -> Result<&mut Node, PickleError> {
        match v {
            Value::Ref(i) if *i < self.out.nodes.len() => Ok(&mut self.out.nodes[*i]),
            _ => Err(self.bad("container operation on a non-container")),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        self.count_value()?;
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.bad(&format!("memo key {key} missing")))?;
        self.push(v)?;
        Ok(())
    }

    /// After BUILD: raw bytes the [`InlineData`] hook says belong to `target` are skipped
    /// and remembered.
    fn claim_inline(&mut self, target: &Value) -> Result<(), PickleError> {
        let rest = &self.data[self.pos..];
        let claimed = (self.inline)(&self.out, target, rest).map_err(|reason| self.bad(&reason))?;
        let (Some(range), Value::Ref(node)) = (claimed, target) else {
            return Ok(());
        };
        if range.start > range.end || range.end > rest.len() {
            return Err(PickleError::Truncated(self.data.len()));
        }
        let start = self.pos + range.start;
        self.out.inline.insert(*node, start..self.pos + range.end);
        self.pos += range.end;
        Ok(())
    }

    fn push_tuple(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let v = self.alloc(Node::Tuple(items))?;
        self.push(v)
    }

    fn add_items(&mut self, target: &Value, pairs: Vec<(Value, Value)>) -> Result<(), PickleError> {
        match self.node_mut(target)? {
            Node::Dict(d) => d.extend(pairs),
            Node::Object { items, .. } => items.extend(pairs),
            _ => return Err(self.bad("SETITEM on a non-dict")),
        }
        Ok(())
    }

    fn append_items(&mut self, target: &Value, vals: Vec<Value>) -> Result<(), PickleError> {
        match self.node_mut(target)? {
            Node::List(l) | Node::Set(l) => l.extend(vals),
            Node::Object { items, .. } => items.extend(vals.into_iter().map(|v| (Value::None, v))),
            _ => return Err(self.bad("APPEND on a non-list")),
        }
        Ok(())
    }

    fn is_dict_class(&self, v: &Value) -> bool {
        if let Value::Ref(i) = v {
            if let Some(Node::Global { module, name }) = self.out.nodes.get(*i) {
                return matches!(
                    (&**module, &**name),
                    ("collections", "OrderedDict")
                        | ("collections", "defaultdict")
                        | ("builtins", "dict")
                        | ("__builtin__", "dict")
                );
            }
        }
        false
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<(), PickleError> {
        // Dict-like classes become real dicts so that SETITEMS and lookups treat them as dicts.
        let node = if self.is_dict_class(&callable) {
            Node::Dict(Vec::new())
        } else {
            Node::Object {
                callable,
                args,
                state: None,
                items: Vec::new(),
            }
        };
        let v = self.alloc(node)?;
        self.push(v)
    }

    fn run(&mut self) -> Result<(), PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME: framing is only a buffering hint
                }
                b'.' => {
                    self.out.root = Some(self.pop()?);
                    return Ok(());
                }
                b'(' => {
                    self.count_value()?;
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.le_uint(4)? as u32 as i32;
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.le_uint(2)?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a | 0x8b => {
                    let bytes = self.len_prefixed(if op == 0x8a { 1 } else { 4 })?;
                    self.push(long_value(bytes))?;
                }
                b'I' => {
                    let v = match self.line()? {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().map_err(|_| self.bad("bad INT"))?),
                    };
                    self.push(v)?;
                }
                b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = s.parse().map_err(|_| self.bad("LONG out of range"))?;
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?;
                }
                b'F' => {
                    let v = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| self.bad("bad FLOAT"))?;
                    self.push(Value::Float(v))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.bad("invalid UTF-8"))?;
                    self.push(Value::Str(s.into()))?;
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 text.
                    let b = self.len_prefixed(if op == b'U' { 1 } else { 4 })?;
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(Value::Str(s.into()))?;
                }
                b'V' => {
                    let s = self.line()?;
                    self.push(Value::Str(s.into()))?;
                }
                b'S' => {
                    let s = self.line()?.trim();
                    let s = s.trim_matches(|c| c == '\'' || c == '"');
                    self.push(Value::Str(s.into()))?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(n)?;
                    self.push(Value::Bytes(b.into()))?;
                }
                b')' => self.push_tuple(Vec::new())?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_tuple(items)?;
                }
                b']' => {
                    let v = self.alloc(Node::List(Vec::new()))?;
                    self.push(v)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::List(items))?;
                    self.push(v)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vec![v])?;
                }
                b'e' => {
                    let vals = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vals)?;
                }
                b'}' => {
                    let v = self.alloc(Node::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.bad("odd DICT items"))?;
                    let v = self.alloc(Node::Dict(pairs))?;
                    self.push(v)?;
                }
                b's' => {
                    let val = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?.clone();
                    self.add_items(&target, vec![(key, val)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.bad("odd SETITEMS items"))?;
                    let target = self.top()?.clone();
                    self.add_items(&target, pairs)?;
                }
                0x8f => {
                    let v = self.alloc(Node::Set(Vec::new()))?;
                    self.push(v)?;
                }
                0x90 => {
                    let vals = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vals)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::Set(items))?;
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?.into();
                    let name = self.line()?.into();
                    let v = self.alloc(Node::Global { module, name })?;
                    self.push(v)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.bad("STACK_GLOBAL needs two strings"));
                    };
                    let v = self.alloc(Node::Global { module, name })?;
                    self.push(v)?;
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    match self.node_mut(&target)? {
                        Node::Object { state: s, .. } => *s = Some(state),
                        // An OrderedDict's BUILD carries attributes such as `_metadata`.
                        Node::Dict(_) => {}
                        _ => return Err(self.bad("BUILD on a non-object")),
                    }
                    self.claim_inline(&target)?;
                }
                b'p' => {
                    let key = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| self.bad("bad PUT"))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.u8()? as u64;
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.le_uint(4)?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                b'g' => {
                    let key = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| self.bad("bad GET"))?;
                    self.memo_get(key)?;
                }
                b'h' => {
                    let key = self.u8()? as u64;
                    self.memo_get(key)?;
                }
                b'j' => {
                    let key = self.le_uint(4)?;
                    self.memo_get(key)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.alloc(Node::PersistentId(pid))?;
                    self.push(v)?;
                }
                b'P' => {
                    let pid = Value::Str(self.line()?.into());
                    let v = self.alloc(Node::PersistentId(pid))?;
                    self.push(v)?;
                }
                _ => return Err(PickleError::UnsupportedOpcode { op, pos: at }),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

/// LONG1/LONG4 payload (little-endian two's complement) as an i64 when it fits.
fn long_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        return Value::BigInt(bytes.into());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

impl Pickle {
    /// The arena: every container and object the program built.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(*i),
            _ => None,
        }
    }

    /// The input bytes the [`InlineData`] hook claimed for object `v` (a range of the data
    /// given to [`unpickle_with_inline_data`]).
    pub fn inline_data(&self, v: &Value) -> Option<std::ops::Range<usize>> {
        match v {
            Value::Ref(i) => self.inline.get(i).cloned(),
            _ => None,
        }
    }

    /// The pairs of a plain dict, readable while the program runs (before [`Pickle::entries`]
    /// is resolved).
    pub fn dict_items(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.node(v)? {
            Node::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// `module.name` of a GLOBAL.
    pub fn global_name(&self, v: &Value) -> Option<(&str, &str)> {
        match self.node(v)? {
            Node::Global { module, name } => Some((&**module, &**name)),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn seq(&self, v: &Value) -> Option<&[Value]> {
        match self.node(v)? {
            Node::Tuple(t) | Node::List(t) | Node::Set(t) => Some(t),
            _ => None,
        }
    }

    /// Key/value pairs of a dict-like value: a dict, an omegaconf `DictConfig` (its `_content`),
    /// or an object whose state is a dict (`argparse.Namespace`, dataclasses). Resolved when the
    /// program ended ([`resolve_entries`]), so this is O(1) and never walks a cycle.
    pub fn entries(&self, v: &Value) -> Option<&[(Value, Value)]> {
        let Value::Ref(i) = v else { return None };
        let at = (*self.entries_of.get(*i)?)?;
        match self.nodes.get(at)? {
            Node::Dict(d) => Some(d),
            Node::Object { items, .. } => Some(items),
            _ => None,
        }
    }

    /// Looks `key` up in a dict-like value (see [`Pickle::entries`]) and unwraps config nodes.
    pub fn get(&self, v: &Value, key: &str) -> Option<&Value> {
        let found = lookup(self.entries(v)?, key)?;
        Some(self.unwrap_node(found))
    }

    /// omegaconf value nodes hold their value in `_val`; an Enum member pickles as
    /// `EnumClass(value)`; a `ListConfig` keeps its items in `_content`.
    pub fn unwrap_node<'s>(&'s self, v: &'s Value) -> &'s Value {
        let mut cur = v;
        for _ in 0..8 {
            let Some(Node::Object {
                callable,
                args,
                state,
                ..
            }) = self.node(cur)
            else {
                break;
            };
            if let Some(state) = state {
                let Some(st) = self.entries(state) else { break };
                if let Some(val) = lookup(st, "_val") {
                    cur = val;
                    continue;
                }
                if matches!(self.global_name(callable), Some((_, "ListConfig"))) {
                    if let Some(content) = lookup(st, "_content") {
                        cur = content;
                        continue;
                    }
                }
                break;
            }
            match self.seq(args) {
                Some([single]) if !matches!(single, Value::Ref(_)) => cur = single,
                _ => break,
            }
        }
        cur
    }
}

/// For each node, the node whose pairs `Pickle::entries` returns, following object states
/// (and a `DictConfig`'s `_content`) the way `torch.load` would rebuild them:
/// a dict is itself; an object with a state is its state's (a `DictConfig`: its `_content`'s);
/// an object without one is itself when SETITEMS gave it items. Each node is resolved once
/// (memoised), so the pass is linear; a state that leads back to its own object, or nests
/// deeper than [`MAX_NESTING`], is an error rather than endless recursion.
fn resolve_entries(nodes: &[Node]) -> Result<Vec<Option<usize>>, PickleError> {
    let mut r = Resolver {
        nodes,
        done: vec![None; nodes.len()],
        busy: vec![false; nodes.len()],
        content: HashMap::new(),
    };
    for i in 0..nodes.len() {
        r.resolve(i, 0)?;
    }
    Ok(r.done.into_iter().map(|d| d.flatten()).collect())
}

struct Resolver<'n> {
    nodes: &'n [Node],
    /// `Some(answer)` once node i is resolved.
    done: Vec<Option<Option<usize>>>,
    /// Node i is being resolved (further up this chain): meeting it again is a cycle.
    busy: Vec<bool>,
    /// `_content` of a resolved dict, looked up once per dict however many configs share it.
    content: HashMap<usize, Option<Value>>,
}

impl Resolver<'_> {
    fn resolve(&mut self, i: usize, depth: usize) -> Result<Option<usize>, PickleError> {
        if let Some(Some(done)) = self.done.get(i) {
            return Ok(*done);
        }
        let graph = |reason: String| PickleError::Graph { node: i, reason };
        if depth > MAX_NESTING {
            return Err(graph(format!(
                "object states nest more than {MAX_NESTING} levels deep"
            )));
        }
        if self.busy[i] {
            return Err(graph("its state refers back to itself (a cycle)".into()));
        }
        self.busy[i] = true;
        let answer = match &self.nodes[i] {
            Node::Dict(_) => Some(i),
            Node::Object {
                state: Some(state),
                callable,
                ..
            } => match state {
                Value::Ref(s) if *s < self.nodes.len() => match self.resolve(*s, depth + 1)? {
                    Some(inner) if self.is_dictconfig(callable) => match self.content_of(inner) {
                        Some(Value::Ref(c)) if c < self.nodes.len() => {
                            self.resolve(c, depth + 1)?
                        }
                        Some(_) => None,
                        None => Some(inner),
                    },
                    other => other,
                },
                _ => None,
            },
            Node::Object { items, .. } if !items.is_empty() => Some(i),
            _ => None,
        };
        self.busy[i] = false;
        self.done[i] = Some(answer);
        Ok(answer)
    }

    fn is_dictconfig(&self, callable: &Value) -> bool {
        match callable {
            Value::Ref(g) => matches!(
                self.nodes.get(*g),
                Some(Node::Global { name, .. }) if &**name == "DictConfig"
            ),
            _ => false,
        }
    }

    fn content_of(&mut self, at: usize) -> Option<Value> {
        if let Some(c) = self.content.get(&at) {
            return c.clone();
        }
        let pairs: &[(Value, Value)] = match &self.nodes[at] {
            Node::Dict(d) => d,
            Node::Object { items, .. } => items,
            _ => &[],
        };
        let c = lookup(pairs, "_content").cloned();
        self.content.insert(at, c.clone());
        c
    }
}

/// The value stored under a string key.
pub fn lookup<'v>(entries: &'v [(Value, Value)], key: &str) -> Option<&'v Value> {
    entries
        .iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_2_dict_with_memo_and_long() {
        // pickle.dumps({'a': [1, 2**40], 'b': 'x'}, protocol=2)
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01\x8a\x06\x00\x00\x00\x00\x00\x01eX\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00xq\x04u.";
        let (p, used) = unpickle(data).unwrap();
        assert_eq!(used, data.len());
        let root = p.root.clone().unwrap();
        let a = p.get(&root, "a").unwrap();
        assert_eq!(p.seq(a).unwrap(), &[Value::Int(1), Value::Int(1 << 40)]);
        assert_eq!(p.get(&root, "b"), Some(&Value::Str("x".into())));
    }

    #[test]
    fn protocol_4_frame_short_unicode_memoize() {
        // pickle.dumps({'k': (1.5, None, True)}, protocol=4)
        let data: &[u8] = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01k\x94G?\xf8\x00\x00\x00\x00\x00\x00N\x88\x87\x94s.";
        let (p, _) = unpickle(data).unwrap();
        let root = p.root.clone().unwrap();
        let k = p.get(&root, "k").unwrap();
        assert_eq!(
            p.seq(k).unwrap(),
            &[Value::Float(1.5), Value::None, Value::Bool(true)]
        );
    }

    #[test]
    fn truncated_and_unknown_opcodes_are_errors() {
        assert!(matches!(
            unpickle(b"\x80\x02}q"),
            Err(PickleError::Truncated(_))
        ));
        assert!(matches!(
            unpickle(b"\x80\x02\xff."),
            Err(PickleError::UnsupportedOpcode { op: 0xff, .. })
        ));
    }
}
