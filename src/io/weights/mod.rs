//! Model weights from safetensors files, upcast to f32.
//!
//! [`Weights::load`] takes a `.safetensors` file, or a folder holding either
//! `model.safetensors.index.json` (a sharded checkpoint) or `model.safetensors`.
//! F32, F16 and BF16 tensors are converted to f32 while they are read, tensor by tensor, so
//! only one tensor's raw bytes are ever held beside the f32 copies. Tensors of other dtypes
//! (e.g. BatchNorm's I64 `num_batches_tracked`) are recorded by name and shape but not loaded.
//!
//! Key aliasing: the HF DINOv3 files store `layer.N.…` while transformers ≥ 5 names the
//! modules `model.layer.N.…`. [`Weights::resolve`] finds a tensor under either name (it
//! tries every alias prefix, `model.` by default, added to and stripped from the name).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use crate::error::{Error, Result};

/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint inside a folder.
pub const SINGLE_FILE: &str = "model.safetensors";

/// safetensors headers larger than this are refused (the safetensors crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The dtype it was stored with (F32, F16 or BF16).
    pub stored: Dtype,
}

/// A name → tensor store (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Tensors whose dtype is not a float type: name → (dtype, shape).
    other: HashMap<String, (Dtype, Vec<usize>)>,
    alias_prefixes: Vec<String>,
    /// Where the tensors came from, for messages.
    source: String,
}

impl Weights {
    /// An empty store (fill it with [`Weights::insert`]).
    pub fn new() -> Weights {
        Weights {
            alias_prefixes: vec!["model.".to_string()],
            source: "<in memory>".to_string(),
            ..Default::default()
        }
    }

    /// Loads a `.safetensors` file, or a folder with `model.safetensors.index.json` or
    /// `model.safetensors`.
    pub fn load(path: &Path) -> Result<Weights> {
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            let single = path.join(SINGLE_FILE);
            if index.is_file() {
                Self::load_sharded(&index)
            } else if single.is_file() {
                Self::load_file(&single)
            } else {
                Err(Error::io(
                    path,
                    format!(
                        "holds neither {INDEX_FILE} nor {SINGLE_FILE}; point to the folder of \
                         an HF checkpoint or to a .safetensors file"
                    ),
                ))
            }
        } else if path.file_name().is_some_and(|n| n == INDEX_FILE) {
            Self::load_sharded(path)
        } else {
            Self::load_file(path)
        }
    }

    /// Loads one `.safetensors` file.
    pub fn load_file(path: &Path) -> Result<Weights> {
        let mut w = Weights::new();
        w.source = path.display().to_string();
        w.read_file(path, None)?;
        Ok(w)
    }

    /// Loads a sharded checkpoint from its `model.safetensors.index.json`.
    pub fn load_sharded(index: &Path) -> Result<Weights> {
        let text = std::fs::read_to_string(index).map_err(|e| open_error(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::io(index, format!("is not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::io(
                    index,
                    "has no \"weight_map\" object; it is not a safetensors index",
                )
            })?;
        // shard file -> tensor names the index puts there
        let mut shards: Vec<(String, Vec<String>)> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::io(index, format!("weight_map[\"{name}\"] is not a file name"))
            })?;
            match shards.iter_mut().find(|(f, _)| f == file) {
                Some((_, names)) => names.push(name.clone()),
                None => shards.push((file.to_string(), vec![name.clone()])),
            }
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut w = Weights::new();
        w.source = index.display().to_string();
        for (file, names) in &shards {
            let shard = dir.join(file);
            if !shard.is_file() {
                return Err(Error::io(
                    &shard,
                    format!(
                        "shard listed in {} is missing; download all the shards",
                        index.display()
                    ),
                ));
            }
            w.read_file(&shard, Some(index))?;
            let absent: Vec<&str> = names
                .iter()
                .filter(|n| !w.tensors.contains_key(*n) && !w.other.contains_key(*n))
                .map(|n| n.as_str())
                .collect();
            if !absent.is_empty() {
                return Err(Error::io(
                    &shard,
                    format!(
                        "does not contain {} tensor(s) the index puts there: {}; the index and \
                         the shards do not belong together",
                        absent.len(),
                        preview(&absent, 5)
                    ),
                ));
            }
        }
        Ok(w)
    }

    /// Reads one file's tensors into the store, converting them to f32 one at a time.
    fn read_file(&mut self, path: &Path, index: Option<&Path>) -> Result<()> {
        let mut f = File::open(path).map_err(|e| open_error(path, e))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io(path, format!("cannot read file metadata: {e}")))?
            .len();
        let damaged = |what: String| {
            Error::io(
                path,
                format!(
                    "is not a valid safetensors file: {what}.\n  fix: download or export the \
                     weights again"
                ),
            )
        };
        let mut n_buf = [0u8; 8];
        read_exact(&mut f, &mut n_buf, path, "header length")?;
        let n = u64::from_le_bytes(n_buf);
        if n > MAX_HEADER || n > len.saturating_sub(8) {
            return Err(damaged(format!(
                "the header claims {n} bytes but the file has {len}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        read_exact(&mut f, &mut header, path, "header")?;
        let header = std::str::from_utf8(&header)
            .map_err(|_| damaged("the header is not UTF-8".to_string()))?;
        let meta: Metadata = serde_json::from_str(header)
            .map_err(|e| damaged(format!("the header does not parse: {e}")))?;
        let data_len = meta.data_len() as u64;
        let have = len - 8 - n;
        if have < data_len {
            return Err(Error::io(
                path,
                format!(
                    "is truncated: the header describes {data_len} bytes of tensor data but only \
                     {have} follow; the download or copy was cut short, fetch it again"
                ),
            ));
        }
        if have > data_len {
            return Err(damaged(format!(
                "{} unexpected bytes follow the tensor data",
                have - data_len
            )));
        }

        let mut scratch16: Vec<u16> = Vec::new();
        for name in meta.offset_keys() {
            let Some(info) = meta.info(&name) else {
                continue;
            };
            if self.tensors.contains_key(&name) || self.other.contains_key(&name) {
                let also = index.map_or(String::new(), |i| format!(" (index {})", i.display()));
                return Err(Error::io(
                    path,
                    format!("tensor '{name}' is stored twice in this checkpoint{also}"),
                ));
            }
            // Metadata validation guarantees the sizes and offsets are consistent.
            let numel: usize = info.shape.iter().product();
            let nbytes = info.data_offsets.1 - info.data_offsets.0;
            let data = match info.dtype {
                Dtype::F32 => {
                    let mut v = vec![0f32; numel];
                    read_exact(&mut f, bytemuck::cast_slice_mut(&mut v), path, &name)?;
                    if cfg!(target_endian = "big") {
                        for x in &mut v {
                            *x = f32::from_bits(u32::from_le(x.to_bits()));
                        }
                    }
                    Some(v)
                }
                Dtype::F16 | Dtype::BF16 => {
                    scratch16.clear();
                    scratch16.resize(numel, 0);
                    read_exact(
                        &mut f,
                        bytemuck::cast_slice_mut(&mut scratch16),
                        path,
                        &name,
                    )?;
                    if cfg!(target_endian = "big") {
                        for x in &mut scratch16 {
                            *x = u16::from_le(*x);
                        }
                    }
                    let mut v = vec![0f32; numel];
                    if info.dtype == Dtype::F16 {
                        let h: &[f16] = bytemuck::cast_slice(&scratch16);
                        h.convert_to_f32_slice(&mut v);
                    } else {
                        let h: &[bf16] = bytemuck::cast_slice(&scratch16);
                        h.convert_to_f32_slice(&mut v);
                    }
                    Some(v)
                }
                _ => {
                    let copied =
                        std::io::copy(&mut (&mut f).take(nbytes as u64), &mut std::io::sink())
                            .map_err(|e| Error::io(path, format!("read error in '{name}': {e}")))?;
                    if copied != nbytes as u64 {
                        return Err(Error::io(path, format!("is truncated inside '{name}'")));
                    }
                    None
                }
            };
            match data {
                Some(data) => {
                    self.tensors.insert(
                        name,
                        Tensor {
                            shape: info.shape.clone(),
                            data,
                            stored: info.dtype,
                        },
                    );
                }
                None => {
                    self.other.insert(name, (info.dtype, info.shape.clone()));
                }
            }
        }
        Ok(())
    }

    /// Adds (or replaces) a tensor.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<()> {
        let name = name.into();
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Invalid(format!(
                "tensor '{name}': shape {shape:?} needs {numel} values but {} were given",
                data.len()
            )));
        }
        self.other.remove(&name);
        self.tensors.insert(
            name,
            Tensor {
                shape,
                data,
                stored: Dtype::F32,
            },
        );
        Ok(())
    }

    /// Also look names up with `prefix` added or removed (`model.` is there from the start).
    pub fn with_alias_prefix(mut self, prefix: impl Into<String>) -> Weights {
        let p = prefix.into();
        if !p.is_empty() && !self.alias_prefixes.contains(&p) {
            self.alias_prefixes.push(p);
        }
        self
    }

    /// Renames every tensor `prefix…` to `…` (e.g. strip `module.` or `backbone.`).
    /// Returns how many were renamed; fails if a renamed key would replace another one.
    pub fn strip_prefix(&mut self, prefix: &str) -> Result<usize> {
        let mut clashes = Vec::new();
        let keys: Vec<String> = self
            .tensors
            .keys()
            .chain(self.other.keys())
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for k in &keys {
            let short = &k[prefix.len()..];
            if self.tensors.contains_key(short) || self.other.contains_key(short) {
                clashes.push(format!("'{k}' → '{short}'"));
            }
        }
        if !clashes.is_empty() {
            return Err(Error::Weights(format!(
                "  {}: removing the prefix '{prefix}' would give names that already exist: {}",
                self.source,
                preview(&clashes, 5)
            )));
        }
        for k in &keys {
            let short = k[prefix.len()..].to_string();
            if let Some(t) = self.tensors.remove(k) {
                self.tensors.insert(short, t);
            } else if let Some(o) = self.other.remove(k) {
                self.other.insert(short, o);
            }
        }
        Ok(keys.len())
    }

    /// The stored key that `name` refers to: `name` itself, else `name` with an alias
    /// prefix added, else `name` with one removed.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        let has = |k: &str| self.tensors.contains_key(k) || self.other.contains_key(k);
        let stored = |k: &str| {
            self.tensors
                .get_key_value(k)
                .map(|(k, _)| k.as_str())
                .or_else(|| self.other.get_key_value(k).map(|(k, _)| k.as_str()))
        };
        if has(name) {
            return stored(name);
        }
        for p in &self.alias_prefixes {
            let longer = format!("{p}{name}");
            if has(&longer) {
                return stored(&longer);
            }
            if let Some(shorter) = name.strip_prefix(p.as_str()) {
                if has(shorter) {
                    return stored(shorter);
                }
            }
        }
        None
    }

    /// The tensor called `name` (aliases allowed, see [`Weights::resolve`]).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        match self.resolve(name) {
            Some(k) => match self.tensors.get(k) {
                Some(t) => Ok(t),
                None => Err(self.not_float(k)),
            },
            None => Err(Error::Weights(format!(
                "  {}: tensor '{name}' is missing{}",
                self.source,
                self.hint(&[name])
            ))),
        }
    }

    /// The data of tensor `name`, checking that its shape is `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::Weights(format!(
                "  {}: '{name}' expected shape {shape:?}, found {:?}",
                self.source, t.shape
            )));
        }
        Ok(&t.data)
    }

    /// Moves tensor `name` out of the store (no copy).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.get(name)?;
        let key = self.resolve(name).map(str::to_string).unwrap_or_default();
        self.tensors
            .remove(&key)
            .ok_or_else(|| Error::Weights(format!("  tensor '{name}' is missing")))
    }

    /// Checks that every (name, shape) is present as a float tensor of that shape, and
    /// reports every problem at once.
    pub fn require(&self, expected: &[(&str, &[usize])]) -> Result<()> {
        let mut problems = Vec::new();
        let mut missing = Vec::new();
        for &(name, shape) in expected {
            match self.resolve(name) {
                None => {
                    problems.push(format!("  missing      {name}  expected {shape:?}"));
                    missing.push(name);
                }
                Some(k) => match self.tensors.get(k) {
                    Some(t) if t.shape == shape => {}
                    Some(t) => problems.push(format!(
                        "  wrong shape  {name}  expected {shape:?}, found {:?}",
                        t.shape
                    )),
                    None => {
                        let (dtype, found) = &self.other[k];
                        problems.push(format!(
                            "  wrong dtype  {name}  expected a float tensor {shape:?}, found {dtype:?} {found:?}"
                        ));
                    }
                },
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Weights(format!(
            "  {} ({} tensors): {} problem(s)\n{}{}",
            self.source,
            self.len(),
            problems.len(),
            problems.join("\n"),
            self.hint(&missing)
        )))
    }

    /// Names of all tensors (float and other), sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .tensors
            .keys()
            .chain(self.other.keys())
            .map(|k| k.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of tensors (float and other).
    pub fn len(&self) -> usize {
        self.tensors.len() + self.other.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` (or an alias of it) is present.
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Total f32 values held.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }

    fn not_float(&self, key: &str) -> Error {
        let (dtype, shape) = &self.other[key];
        Error::Weights(format!(
            "  {}: tensor '{key}' {shape:?} has dtype {dtype:?}; only F32, F16 and BF16 \
             tensors are loaded",
            self.source
        ))
    }

    /// Helps with missing names: a stored key ending like a missing one hints at a prefix.
    fn hint(&self, missing: &[&str]) -> String {
        if missing.is_empty() {
            return String::new();
        }
        for name in missing {
            let suffix = format!(".{name}");
            if let Some(k) = self.names().into_iter().find(|k| k.ends_with(&suffix)) {
                let prefix = &k[..k.len() - name.len()];
                return format!(
                    "\n  hint: '{name}' is stored as '{k}': strip the prefix '{prefix}' \
                     (Weights::strip_prefix) or add it as an alias (Weights::with_alias_prefix)"
                );
            }
        }
        let names = self.names();
        format!(
            "\n  the file holds {} tensors, e.g. {}",
            names.len(),
            preview(&names, 6)
        )
    }
}

fn preview<S: AsRef<str>>(items: &[S], max: usize) -> String {
    let mut s: Vec<String> = items
        .iter()
        .take(max)
        .map(|x| format!("'{}'", x.as_ref()))
        .collect();
    if items.len() > max {
        s.push(format!("… ({} more)", items.len() - max));
    }
    s.join(", ")
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::io(path, "file not found")
    } else {
        Error::io(path, format!("cannot open: {e}"))
    }
}

fn read_exact(f: &mut File, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    f.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::io(
                path,
                format!("is truncated inside {what}; fetch or export the file again"),
            )
        } else {
            Error::io(path, format!("read error in {what}: {e}"))
        }
    })
}

#[cfg(test)]
mod tests;
