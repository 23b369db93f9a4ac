//! The GGUF container (versions 2 and 3): a header, typed metadata, tensor descriptors and the
//! aligned tensor data, memory-mapped and read in place.
//!
//! Every length and count read from the file is checked against the bytes left before anything
//! is allocated for it, every tensor's extent against the file's size, and every shape's
//! product against overflow, so a truncated or corrupt file is an error naming what is wrong,
//! never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ember_kernels::GgmlType;

use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal GGUF but unused by any model; one level of nesting is allowed.
const MAX_NESTING: usize = 2;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// An integer of any width and sign, if it is one and non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer or float, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }
}

/// One tensor's descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// GGUF order: `dims[0]` is the innermost (row length), as in ggml's `ne`.
    pub dims: Vec<usize>,
    /// `Err(id)` for a type id ggml does not define.
    pub ty: std::result::Result<GgmlType, u32>,
    /// From the start of the data section.
    pub offset: usize,
    /// Bytes of data, when the type is one Ember supports (else 0).
    pub bytes: usize,
}

impl TensorInfo {
    /// The shape in candle's (row-major, outermost first) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A tensor's type, shape and bytes, borrowed from the mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub ty: GgmlType,
    /// GGUF order (innermost first).
    pub dims: &'a [usize],
    pub data: &'a [u8],
}

/// A memory-mapped GGUF file, its metadata and tensor descriptors parsed.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> ModelError {
    ModelError::Gguf(format!("{}: {what}", path.display()))
}

/// A cursor over the file's bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(corrupt(
                self.path,
                format!(
                    "truncated: {what} needs {n} bytes at offset {}, the file has {} left",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let b = self.take(N, what)?;
        let mut out = [0; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length that must fit in memory: at most what `per_item` bytes each leave.
    fn count(&mut self, per_item: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| {
            n.checked_mul(per_item.max(1))
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            corrupt(
                self.path,
                format!(
                    "{what} is {n}, more than the {} bytes left in the file can hold",
                    self.remaining()
                ),
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| corrupt(self.path, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(corrupt(self.path, format!("{key}: bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(corrupt(self.path, format!("{key}: arrays nested too deep")));
                }
                let item_ty = self.u32(key)?;
                let len = self.count(min_value_bytes(item_ty), key)?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(corrupt(
                    self.path,
                    format!("{key}: unknown metadata value type {other}"),
                ))
            }
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` takes (for bounding array lengths).
fn min_value_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on nobody
        // truncating or rewriting it while the process runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path.to_path_buf(), map)
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<Self> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path: &path,
        };
        if r.take(4, "the magic number")? != MAGIC {
            return Err(corrupt(&path, "not a GGUF file (no GGUF magic number)"));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(
                &path,
                format!("GGUF version {version} (Ember reads versions 2 and 3)"),
            ));
        }
        // A tensor descriptor takes at least 8 + 4 + 4 + 8 bytes, a key/value 8 + 4 + 1.
        let num_tensors = r.count(24, "the tensor count")?;
        let num_kv = r.count(13, "the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..num_kv {
            let key = r.string("a metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(corrupt(
                    &path,
                    format!("metadata key {key:?} appears twice"),
                ));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| corrupt(&path, "general.alignment is not a power of two"))?,
        };
        let mut tensors = BTreeMap::new();
        for _ in 0..num_tensors {
            let name = r.string("a tensor name")?;
            let info = Self::tensor_info(&mut r, &name, alignment)?;
            if tensors.insert(name.clone(), info).is_some() {
                return Err(corrupt(&path, format!("tensor {name:?} appears twice")));
            }
        }
        let data_start = (r.pos as u64).next_multiple_of(alignment);
        let len = map.len() as u64;
        for (name, t) in &tensors {
            let end = data_start + t.offset as u64 + t.bytes as u64;
            if end > len {
                return Err(corrupt(
                    &path,
                    format!(
                        "truncated: tensor {name:?} ends at byte {end}, the file has {len} bytes"
                    ),
                ));
            }
        }
        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            // Every tensor end checked against the file length, so this fits in usize.
            data_start: data_start as usize,
            map,
        })
    }

    fn tensor_info(r: &mut Reader, name: &str, alignment: u64) -> Result<TensorInfo> {
        let path = r.path;
        let n_dims = r.u32(name)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(corrupt(
                path,
                format!("tensor {name:?} has {n_dims} dimensions"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        let mut elements: usize = 1;
        for _ in 0..n_dims {
            let d = r.u64(name)?;
            let d = usize::try_from(d)
                .ok()
                .filter(|&d| d > 0)
                .ok_or_else(|| corrupt(path, format!("tensor {name:?} has a dimension of {d}")))?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| corrupt(path, format!("tensor {name:?}: shape overflows")))?;
            dims.push(d);
        }
        let id = r.u32(name)?;
        let ty = GgmlType::from_id(id).ok_or(id);
        let offset = r.u64(name)?;
        if offset % alignment != 0 {
            return Err(corrupt(
                path,
                format!("tensor {name:?}: offset {offset} is not aligned to {alignment}"),
            ));
        }
        let bytes = match ty {
            Ok(t) if t.is_supported() => {
                let rows = elements / dims[0];
                t.row_bytes(dims[0])
                    .and_then(|row| row.checked_mul(rows))
                    .ok_or_else(|| {
                        corrupt(
                            path,
                            format!(
                                "tensor {name:?}: rows of {} are not whole {t} blocks of {}",
                                dims[0],
                                t.block_len()
                            ),
                        )
                    })?
            }
            _ => 0,
        };
        let offset = usize::try_from(offset)
            .map_err(|_| corrupt(path, format!("tensor {name:?}: offset {offset}")))?;
        Ok(TensorInfo {
            dims,
            ty,
            offset,
            bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The tensor `name`, or an error naming it (missing, or of a type Ember does not run).
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.tensors.get(name).ok_or_else(|| {
            ModelError::Gguf(format!("{}: no tensor {name:?}", self.path.display()))
        })?;
        let ty = match info.ty {
            Ok(t) if t.is_supported() => t,
            Ok(t) => {
                return Err(ModelError::Unsupported(format!(
                    "{}: tensor {name:?} has type {t}; Ember runs f32, f16, bf16, q8_0, q4_0, \
                     q5_0, q4_K, q5_K and q6_K",
                    self.path.display()
                )))
            }
            Err(id) => {
                return Err(ModelError::Unsupported(format!(
                    "{}: tensor {name:?} has unknown ggml type id {id}",
                    self.path.display()
                )))
            }
        };
        let start = self.data_start + info.offset;
        Ok(TensorView {
            ty,
            dims: &info.dims,
            // In bounds: checked against the file length when parsed.
            data: &self.map[start..start + info.bytes],
        })
    }
}
