//! A scikit-learn k-means model read without executing it: fairseq's `km.bin`
//! (`joblib.dump` of a `MiniBatchKMeans`, from `learn_kmeans.py`) or a plain `pickle.dump` of
//! a `MiniBatchKMeans`/`KMeans` (protocol 3 or newer), giving `cluster_centers_` as `[K, D]`
//! float32.
//!
//! joblib (`joblib/numpy_pickle.py`) pickles each numpy array as a `NumpyArrayWrapper` object
//! whose state holds `shape`, `order`, `dtype` and `numpy_array_alignment_bytes`, and writes
//! the array's bytes into the file right after that object's BUILD, outside the pickle: one
//! byte giving a padding length and that many padding bytes (when the alignment is set), then
//! `prod(shape) · itemsize` bytes in `order`. The unpickler pauses after each such BUILD
//! ([`unpickle_with_inline_data`]) and skips them. numpy's own pickling is
//! `_reconstruct(ndarray, (0,), b'b')` with the BUILD state `(version, shape, dtype,
//! is_fortran, bytes)`, or at protocol 5 `_frombuffer(bytes, dtype, shape, order)`.
use crate::models::checkpoint::parsers::{unpickle_with_inline_data, Node, Pickle, Value};

/// Most centroids a units store can name (ids are int16).
pub const MAX_CLUSTERS: u64 = i16::MAX as u64 + 1;

/// `cluster_centers_` of the pickled model in `bytes`: values `[K, D]` row-major, K, D. The
/// error is the reason, for the caller to prefix with the file.
pub fn read_cluster_centers(bytes: &[u8]) -> Result<(Vec<f32>, usize, usize), String> {
    let mut hook = |p: &Pickle, target: &Value, rest: &[u8]| joblib_array_bytes(p, target, rest);
    let (p, _) = unpickle_with_inline_data(bytes, &mut hook).map_err(|e| e.to_string())?;
    let root = p.root.as_ref().ok_or("the pickle has no result")?;
    let class = match p.node(root) {
        Some(Node::Object { callable, .. }) => p
            .global_name(callable)
            .map(|(m, n)| format!("{m}.{n}"))
            .unwrap_or_else(|| "an object".into()),
        _ => {
            return Err(format!(
                "the pickle holds {}, not a k-means model",
                root.brief()
            ))
        }
    };
    let centers = p.get(root, "cluster_centers_").ok_or_else(|| {
        format!("{class} has no cluster_centers_ (not a fitted scikit-learn k-means model)")
    })?;
    let array = array_of(&p, bytes, centers).map_err(|e| format!("cluster_centers_: {e}"))?;
    array.to_centers()
}

/// A numpy array as the pickle describes it, its bytes borrowed from the input.
struct Array<'b> {
    shape: Vec<u64>,
    fortran: bool,
    dtype: Dtype,
    data: &'b [u8],
}

#[derive(Debug, Clone, Copy)]
struct Dtype {
    kind: char,
    itemsize: usize,
    big_endian: bool,
}

/// The hook: after the BUILD of a joblib `NumpyArrayWrapper`, the array bytes that follow.
fn joblib_array_bytes(
    p: &Pickle,
    target: &Value,
    rest: &[u8],
) -> Result<Option<std::ops::Range<usize>>, String> {
    let Some(Node::Object {
        callable,
        state: Some(state),
        ..
    }) = p.node(target)
    else {
        return Ok(None);
    };
    if !matches!(p.global_name(callable), Some((_, "NumpyArrayWrapper"))) {
        return Ok(None);
    }
    let st = p
        .dict_items(state)
        .ok_or("a NumpyArrayWrapper whose state is not a dict")?;
    let field = |k: &str| crate::models::checkpoint::parsers::lookup(st, k);
    let (shape, dtype) = match (field("shape"), field("dtype")) {
        (Some(s), Some(d)) => (shape_of(p, s)?, dtype_of(p, d)?),
        _ => return Err("a NumpyArrayWrapper without shape or dtype".into()),
    };
    let padded = matches!(field("numpy_array_alignment_bytes"), Some(Value::Int(_)));
    let start = if padded {
        let pad = *rest
            .first()
            .ok_or("the file ends before a joblib array's padding")?;
        1 + pad as usize
    } else {
        0
    };
    let len = byte_len(&shape, dtype)?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= rest.len())
        .ok_or_else(|| {
            format!(
                "a joblib array of shape {shape:?} needs {len} bytes, the file has {} left (truncated?)",
                rest.len().saturating_sub(start)
            )
        })?;
    Ok(Some(start..end))
}

fn byte_len(shape: &[u64], dtype: Dtype) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(dtype.itemsize as u64, |n, &s| n.checked_mul(s))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("an array of shape {shape:?} is too large to exist"))
}

fn shape_of(p: &Pickle, v: &Value) -> Result<Vec<u64>, String> {
    let items = p.seq(v).ok_or("an array shape that is not a tuple")?;
    if items.len() > 32 {
        return Err(format!("an array of {} dimensions", items.len()));
    }
    items
        .iter()
        .map(|d| match d {
            Value::Int(n) if *n >= 0 => Ok(*n as u64),
            other => Err(format!("an array dimension of {}", other.brief())),
        })
        .collect()
}

/// `numpy.dtype("f8", False, True)` with its BUILD state `(3, "<", ..., elsize, ...)`.
fn dtype_of(p: &Pickle, v: &Value) -> Result<Dtype, String> {
    let Some(Node::Object {
        callable,
        args,
        state,
        ..
    }) = p.node(v)
    else {
        return Err(format!("a dtype of {}", v.brief()));
    };
    if !matches!(p.global_name(callable), Some((_, "dtype"))) {
        return Err("a dtype that is not numpy.dtype".into());
    }
    let Some(Value::Str(code)) = p.seq(args).and_then(|a| a.first()) else {
        return Err("a numpy.dtype without a type code".into());
    };
    let state = state.as_ref().and_then(|s| p.seq(s)).unwrap_or(&[]);
    let big_endian = matches!(state.get(1), Some(Value::Str(o)) if &**o == ">");
    let mut chars = code.chars();
    let kind = chars.next().ok_or("an empty dtype code")?;
    let digits: String = chars.collect();
    let elsize = match state.get(5) {
        Some(Value::Int(n)) if *n > 0 => Some(*n as usize),
        _ => None,
    };
    let itemsize = match (kind, digits.parse::<usize>()) {
        ('O', _) => {
            return Err("an array of Python objects (dtype object), which is not read".into())
        }
        (_, _) if elsize.is_some() => elsize.unwrap_or(0),
        ('U', Ok(n)) => n.checked_mul(4).ok_or("an absurd dtype size")?,
        (_, Ok(n)) if n > 0 => n,
        _ => return Err(format!("a dtype {code:?} of unknown size")),
    };
    if itemsize > 1 << 20 {
        return Err(format!("a dtype {code:?} of {itemsize} bytes per item"));
    }
    Ok(Dtype {
        kind,
        itemsize,
        big_endian,
    })
}

/// The array `v` stands for: a joblib wrapper with its inline bytes, or numpy's own pickling.
fn array_of<'b>(p: &'b Pickle, input: &'b [u8], v: &'b Value) -> Result<Array<'b>, String> {
    let Some(Node::Object {
        callable,
        args,
        state,
        ..
    }) = p.node(v)
    else {
        return Err(format!("{} is not a numpy array", v.brief()));
    };
    let name = p.global_name(callable).map(|(_, n)| n).unwrap_or("");
    match name {
        "NumpyArrayWrapper" => {
            let range = p
                .inline_data(v)
                .ok_or("a joblib array whose bytes were not found")?;
            let st = state
                .as_ref()
                .and_then(|s| p.entries(s))
                .ok_or("a NumpyArrayWrapper without state")?;
            let field = |k: &str| crate::models::checkpoint::parsers::lookup(st, k);
            let shape = shape_of(p, field("shape").ok_or("no shape")?)?;
            let dtype = dtype_of(p, field("dtype").ok_or("no dtype")?)?;
            let fortran = matches!(field("order"), Some(Value::Str(o)) if &**o == "F");
            let data = &input[range];
            let len = byte_len(&shape, dtype)?;
            // the padding (if any) comes first; the array is the last `len` bytes
            let data = &data[data.len().saturating_sub(len)..];
            Ok(Array {
                shape,
                fortran,
                dtype,
                data,
            })
        }
        "_reconstruct" => {
            let st = state
                .as_ref()
                .and_then(|s| p.seq(s))
                .ok_or("a numpy array without its state")?;
            let [_, shape, dtype, fortran, raw] = st else {
                return Err(format!("a numpy array state of {} items", st.len()));
            };
            let Value::Bytes(raw) = raw else {
                return Err("a numpy array whose data is not bytes (pickle protocol 2?: save with protocol 3 or newer, or joblib)".into());
            };
            Ok(Array {
                shape: shape_of(p, shape)?,
                fortran: matches!(fortran, Value::Bool(true)),
                dtype: dtype_of(p, dtype)?,
                data: raw,
            })
        }
        "_frombuffer" => {
            let a = p.seq(args).ok_or("_frombuffer without arguments")?;
            let [Value::Bytes(raw), dtype, shape, order] = a else {
                return Err("_frombuffer arguments are not (bytes, dtype, shape, order)".into());
            };
            Ok(Array {
                shape: shape_of(p, shape)?,
                fortran: matches!(order, Value::Str(o) if &**o == "F"),
                dtype: dtype_of(p, dtype)?,
                data: raw,
            })
        }
        other => Err(format!("an object {other:?}, not a numpy array")),
    }
}

impl Array<'_> {
    /// `[K, D]` float32, row-major, from float32 or float64 (either byte order, C or Fortran).
    fn to_centers(&self) -> Result<(Vec<f32>, usize, usize), String> {
        let [k, d] = self.shape[..] else {
            return Err(format!("shape {:?}, not [K, D]", self.shape));
        };
        if !(1..=MAX_CLUSTERS).contains(&k) || d == 0 {
            return Err(format!(
                "{k} centroids of dim {d} (1 to {MAX_CLUSTERS} centroids: ids are stored as int16)"
            ));
        }
        let w = self.dtype.itemsize;
        if self.dtype.kind != 'f' || !(w == 4 || w == 8) {
            return Err(format!(
                "dtype {}{w} (float32 or float64 expected)",
                self.dtype.kind
            ));
        }
        let n = byte_len(&self.shape, self.dtype)?;
        if self.data.len() != n {
            return Err(format!(
                "shape [{k}, {d}] needs {n} bytes, the data has {}",
                self.data.len()
            ));
        }
        let (k, d) = (k as usize, d as usize);
        let value = |i: usize| -> f32 {
            let b = &self.data[i * w..(i + 1) * w];
            match (w, self.dtype.big_endian) {
                (4, false) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                (4, true) => f32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                (_, big) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    (if big {
                        f64::from_be_bytes(a)
                    } else {
                        f64::from_le_bytes(a)
                    }) as f32
                }
            }
        };
        let mut out = vec![0f32; k * d];
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                *o = value(if self.fortran { j * k + i } else { i * d + j });
            }
        }
        Ok((out, k, d))
    }
}
