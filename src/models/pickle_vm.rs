//! A small, non-executing unpickler for PyTorch checkpoints (pickle protocols 0–5, binary subset).
//!
//! It never imports or calls anything: `GLOBAL`/`REDUCE`/`NEWOBJ`/`BUILD` become inert nodes that
//! the checkpoint reader interprets (tensor rebuild calls, `OrderedDict`, omegaconf `DictConfig`,
//! `argparse.Namespace`, enums). Containers live in an arena so that memoised references share the
//! object, which pickle mutates after memoising it (`EMPTY_DICT; BINPUT; ...; SETITEMS`).
use std::collections::HashMap;

/// A pickle stack value: a primitive, or a reference to an arena node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Ref(usize),
}

/// A container or object built by the pickle program.
#[derive(Debug, Clone)]
pub enum Node {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Global {
        module: String,
        name: String,
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
}

/// The result of one pickle program: its arena and the value it returned.
#[derive(Debug, Default)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Option<Value>,
}

/// Runs one pickle program starting at `data[0]`; returns it and the bytes it used (up to STOP).
pub fn unpickle(data: &[u8]) -> Result<(Pickle, usize), PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        out: Pickle::default(),
    };
    vm.run()?;
    Ok((vm.out, vm.pos))
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    out: Pickle,
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

    fn alloc(&mut self, node: Node) -> Value {
        self.out.nodes.push(node);
        Value::Ref(self.out.nodes.len() - 1)
    }

    fn node_mut(&mut self, v: &Value) -> Result<&mut Node, PickleError> {
        match v {
            Value::Ref(i) if *i < self.out.nodes.len() => Ok(&mut self.out.nodes[*i]),
            _ => Err(self.bad("container operation on a non-container")),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
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
        self.stack.push(v);
        Ok(())
    }

    fn push_tuple(&mut self, items: Vec<Value>) {
        let v = self.alloc(Node::Tuple(items));
        self.stack.push(v);
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
                    (module.as_str(), name.as_str()),
                    ("collections", "OrderedDict")
                        | ("collections", "defaultdict")
                        | ("builtins", "dict")
                        | ("__builtin__", "dict")
                );
            }
        }
        false
    }

    fn reduce(&mut self, callable: Value, args: Value) {
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
        let v = self.alloc(node);
        self.stack.push(v);
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
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.le_uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.le_uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let bytes = self.len_prefixed(if op == 0x8a { 1 } else { 4 })?;
                    self.stack.push(long_value(bytes));
                }
                b'I' => {
                    let v = match self.line()? {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().map_err(|_| self.bad("bad INT"))?),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = s.parse().map_err(|_| self.bad("LONG out of range"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let v = self
                        .line()?
                        .trim()
                        .parse()
                        .map_err(|_| self.bad("bad FLOAT"))?;
                    self.stack.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.bad("invalid UTF-8"))?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 text.
                    let b = self.len_prefixed(if op == b'U' { 1 } else { 4 })?;
                    self.stack
                        .push(Value::Str(b.iter().map(|&c| c as char).collect()));
                }
                b'V' => {
                    let s = self.line()?.to_string();
                    self.stack.push(Value::Str(s));
                }
                b'S' => {
                    let s = self.line()?.trim();
                    let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                    self.stack.push(Value::Str(s));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b')' => self.push_tuple(Vec::new()),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_tuple(items);
                }
                b']' => {
                    let v = self.alloc(Node::List(Vec::new()));
                    self.stack.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::List(items));
                    self.stack.push(v);
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
                    let v = self.alloc(Node::Dict(Vec::new()));
                    self.stack.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.bad("odd DICT items"))?;
                    let v = self.alloc(Node::Dict(pairs));
                    self.stack.push(v);
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
                    let v = self.alloc(Node::Set(Vec::new()));
                    self.stack.push(v);
                }
                0x90 => {
                    let vals = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vals)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Node::Set(items));
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let v = self.alloc(Node::Global { module, name });
                    self.stack.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.bad("STACK_GLOBAL needs two strings"));
                    };
                    let v = self.alloc(Node::Global { module, name });
                    self.stack.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args);
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
                    let v = self.alloc(Node::PersistentId(pid));
                    self.stack.push(v);
                }
                b'P' => {
                    let pid = Value::Str(self.line()?.to_string());
                    let v = self.alloc(Node::PersistentId(pid));
                    self.stack.push(v);
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
        return Value::BigInt(bytes.to_vec());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(buf))
}

impl Pickle {
    pub fn node(&self, v: &Value) -> Option<&Node> {
        match v {
            Value::Ref(i) => self.nodes.get(*i),
            _ => None,
        }
    }

    /// `module.name` of a GLOBAL.
    pub fn global_name(&self, v: &Value) -> Option<(&str, &str)> {
        match self.node(v)? {
            Node::Global { module, name } => Some((module, name)),
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
    /// or an object whose state is a dict (`argparse.Namespace`, dataclasses).
    pub fn entries(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match self.node(v)? {
            Node::Dict(d) => Some(d),
            Node::Object {
                state: Some(state), ..
            } => {
                let inner = self.entries(state)?;
                match lookup(inner, "_content") {
                    Some(content) if self.is_dictconfig(v) => self.entries(content),
                    _ => Some(inner),
                }
            }
            Node::Object { items, .. } if !items.is_empty() => Some(items),
            _ => None,
        }
    }

    fn is_dictconfig(&self, v: &Value) -> bool {
        match self.node(v) {
            Some(Node::Object { callable, .. }) => {
                matches!(self.global_name(callable), Some((_, "DictConfig")))
            }
            _ => false,
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

/// The value stored under a string key.
pub fn lookup<'v>(entries: &'v [(Value, Value)], key: &str) -> Option<&'v Value> {
    entries
        .iter()
        .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
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
