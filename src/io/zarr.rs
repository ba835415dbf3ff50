//! OME-Zarr (v2 = OME-NGFF 0.4, v3 = OME-NGFF 0.5) and plain Zarr arrays, through `zarrs`.
//!
//! - Reading ([`read`]): a `.zarr` folder holding an OME-Zarr multiscale group (the array at
//!   `multiscales[0].datasets[level].path`) or a plain zarr array. Codecs: uncompressed,
//!   gzip, zlib, zstd, crc32c and sharding; blosc (zarr-python v2's default) is not built in,
//!   and such arrays are refused with a message saying so.
//! - Writing ([`create_writer`]): a multiscale group with one level, `0`, chunked 64³
//!   (`(1, 64, 64, 64)` for `(K, D, H, W)`) and zstd-compressed. Slabs are gathered until a
//!   row of chunks along z is complete, which is then written whole (chunk-aligned, no
//!   read-modify-write): the writer holds at most one chunk row. Everything goes into a
//!   temporary folder beside the target, renamed into place by `finish`.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use zarrs::array::{Array, ArrayBuilder};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::{Group, GroupBuilder};
use zarrs::metadata::v2::{ArrayMetadataV2, GroupMetadataV2, MetadataV2};
use zarrs::metadata::{ChunkKeySeparator, FillValueMetadata};

use crate::error::{Error, Result};
use crate::io::cleanup::TempPath;
use crate::io::volume::{
    before_slab, check_finish, check_slab, kdp, unsupported_dtype, ArrayData, OutType, SlabBuf,
    SlabData, SlabWriter, WriteOptions, ZarrVersion,
};

fn zerr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, format!("zarr: {e}"))
}

fn read_json(path: &Path, file: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(path, format!("cannot read {}: {e}", file.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::io(path, format!("{} is not valid JSON: {e}", file.display())))
}

/// The path of the array to read inside the store at `path`.
fn array_path(path: &Path, level: usize) -> Result<String> {
    let attrs = if path.join("zarr.json").is_file() {
        let meta = read_json(path, &path.join("zarr.json"))?;
        if meta["node_type"] == "array" {
            return plain_array(path, level);
        }
        meta.get("attributes").cloned().unwrap_or(Value::Null)
    } else if path.join(".zarray").is_file() {
        return plain_array(path, level);
    } else if path.join(".zgroup").is_file() {
        let f = path.join(".zattrs");
        if f.is_file() {
            read_json(path, &f)?
        } else {
            Value::Null
        }
    } else if !path.exists() {
        return Err(Error::io(path, "not found"));
    } else {
        return Err(Error::io(
            path,
            "is not a zarr store: it has no zarr.json (v3) nor .zarray/.zgroup (v2)",
        ));
    };
    // OME-NGFF 0.5 nests under "ome"; 0.4 has "multiscales" at the top.
    let ms = attrs
        .get("ome")
        .and_then(|o| o.get("multiscales"))
        .or_else(|| attrs.get("multiscales"))
        .and_then(|m| m.get(0))
        .ok_or_else(|| {
            Error::io(
                path,
                "is a zarr group without OME-Zarr 'multiscales' metadata.\n  fix: give the \
                 path of the array inside it (e.g. volume.zarr/0)",
            )
        })?;
    let datasets = ms
        .get("datasets")
        .and_then(|d| d.as_array())
        .ok_or_else(|| Error::io(path, "OME-Zarr multiscales[0] has no 'datasets' list"))?;
    let ds = datasets.get(level).ok_or_else(|| {
        Error::io(
            path,
            format!(
                "has {} multiscale level(s) (0..{}); level {level} does not exist",
                datasets.len(),
                datasets.len().saturating_sub(1)
            ),
        )
    })?;
    let p = ds.get("path").and_then(|p| p.as_str()).ok_or_else(|| {
        Error::io(
            path,
            format!("multiscales[0].datasets[{level}] has no 'path'"),
        )
    })?;
    Ok(format!("/{}", p.trim_matches('/')))
}

fn plain_array(path: &Path, level: usize) -> Result<String> {
    if level != 0 {
        return Err(Error::io(
            path,
            format!("is a single zarr array, not a multiscale group; level {level} does not exist"),
        ));
    }
    Ok("/".into())
}

/// Reads the array at multiscale `level` (or the plain array): its shape and elements.
pub fn read(path: &Path, level: usize) -> Result<(Vec<usize>, ArrayData, Vec<String>)> {
    use zarrs::array::data_type::{
        Float16DataType, Float32DataType, Int16DataType, Int8DataType, UInt16DataType,
        UInt8DataType,
    };
    let apath = array_path(path, level)?;
    let store = Arc::new(FilesystemStore::new(path).map_err(|e| zerr(path, e))?);
    let array = Array::open(store, &apath).map_err(|e| {
        let m = e.to_string();
        if m.contains("blosc") {
            Error::io(
                path,
                format!(
                    "zarr: {m}.\n  fix: volfuse is built without blosc; re-encode the array \
                     with zstd or gzip (e.g. zarr-python / ome-zarr-py with compressor Zstd)"
                ),
            )
        } else {
            zerr(path, format!("cannot open the array at '{apath}': {m}"))
        }
    })?;
    let shape: Vec<usize> = array.shape().iter().map(|&s| s as usize).collect();
    let dt = array.data_type().clone();
    let subset = array.subset_all();
    let get = |e: zarrs::array::ArrayError| zerr(path, format!("cannot read the array data: {e}"));
    let mut notes = Vec::new();
    let mut conv = |name: &str| {
        notes.push(format!(
            "{}: {name} converted to float32 (exact)",
            path.display()
        ));
    };
    // The whole array as a `Vec<$t>`.
    macro_rules! read {
        ($t:ty) => {
            array
                .retrieve_array_subset::<Vec<$t>>(&subset)
                .map_err(get)?
        };
    }
    let data = if dt.is::<UInt8DataType>() {
        ArrayData::U8(read!(u8))
    } else if dt.is::<UInt16DataType>() {
        ArrayData::U16(read!(u16))
    } else if dt.is::<Float32DataType>() {
        ArrayData::F32(read!(f32))
    } else if dt.is::<Int8DataType>() {
        conv("int8");
        ArrayData::F32(read!(i8).into_iter().map(f32::from).collect())
    } else if dt.is::<Int16DataType>() {
        conv("int16");
        ArrayData::F32(read!(i16).into_iter().map(f32::from).collect())
    } else if dt.is::<Float16DataType>() {
        conv("float16");
        ArrayData::F32(read!(half::f16).into_iter().map(|x| x.to_f32()).collect())
    } else {
        return Err(unsupported_dtype(path, &dt.to_string()));
    };
    Ok((shape, data, notes))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

struct ZarrWriter {
    array: Array<FilesystemStore>,
    tmp: TempPath,
    target: PathBuf,
    shape: Vec<usize>,
    force: bool,
    next_z: usize,
    /// Chunk edge along z.
    cz: usize,
    /// The chunk row being gathered: `(K, rows, H, W)` from z `row_z0`.
    buf: SlabBuf,
    row_z0: usize,
    row_filled: usize,
}

/// Creates a streaming OME-Zarr writer (see the module docs).
pub fn create_writer(
    path: &Path,
    shape: &[usize],
    ty: OutType,
    opts: &WriteOptions,
) -> Result<Box<dyn SlabWriter>> {
    let (k, d, plane) = kdp(shape);
    let edge = opts.chunk.unwrap_or(64).max(1);
    let spatial = &shape[shape.len() - 3..];
    let mut chunks: Vec<u64> = spatial.iter().map(|&s| s.min(edge) as u64).collect();
    let mut axes = vec![
        json!({"name": "z", "type": "space"}),
        json!({"name": "y", "type": "space"}),
        json!({"name": "x", "type": "space"}),
    ];
    if shape.len() == 4 {
        chunks.insert(0, 1);
        axes.insert(0, json!({"name": "c", "type": "channel"}));
    }
    let shape_u64: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut ms = json!({
        "name": name,
        "axes": axes,
        "datasets": [{
            "path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": vec![1.0; shape.len()]}]
        }],
    });

    let tmp = TempPath::beside(path)?;
    std::fs::create_dir(tmp.path())
        .map_err(|e| Error::io(path, format!("could not create the output folder: {e}")))?;
    let store = Arc::new(FilesystemStore::new(tmp.path()).map_err(|e| zerr(path, e))?);
    let e = |e: &dyn std::fmt::Display| zerr(path, format!("could not write the metadata: {e}"));
    let array = match opts.zarr_version {
        ZarrVersion::V3 => {
            let (dt, fill) = match ty {
                OutType::U8 => (
                    zarrs::array::data_type::uint8(),
                    FillValueMetadata::from(0u8),
                ),
                OutType::U16 => (
                    zarrs::array::data_type::uint16(),
                    FillValueMetadata::from(0u16),
                ),
                OutType::F32 => (
                    zarrs::array::data_type::float32(),
                    FillValueMetadata::from(0f32),
                ),
            };
            let dims: Vec<&str> = if shape.len() == 4 {
                vec!["c", "z", "y", "x"]
            } else {
                vec!["z", "y", "x"]
            };
            let array = ArrayBuilder::new(shape_u64, chunks, dt, fill)
                .bytes_to_bytes_codecs(vec![Arc::new(zarrs::array::codec::ZstdCodec::new(
                    3, false,
                ))])
                .dimension_names(Some(dims))
                .build(store.clone(), "/0")
                .map_err(|x| e(&x))?;
            array.store_metadata().map_err(|x| e(&x))?;
            let attrs = json!({"ome": {"version": "0.5", "multiscales": [ms]}});
            GroupBuilder::new()
                .attributes(attrs.as_object().cloned().unwrap_or_default())
                .build(store.clone(), "/")
                .map_err(|x| e(&x))?
                .store_metadata()
                .map_err(|x| e(&x))?;
            array
        }
        ZarrVersion::V2 => {
            let (dtype, fill) = match ty {
                OutType::U8 => ("|u1", FillValueMetadata::from(0u8)),
                OutType::U16 => ("<u2", FillValueMetadata::from(0u16)),
                OutType::F32 => ("<f4", FillValueMetadata::from(0f32)),
            };
            let chunks: Vec<NonZeroU64> = chunks
                .iter()
                .map(|&c| NonZeroU64::new(c.max(1)).unwrap_or(NonZeroU64::MIN))
                .collect();
            let compressor: MetadataV2 =
                serde_json::from_value(json!({"id": "zstd", "level": 3})).map_err(|x| e(&x))?;
            let meta = ArrayMetadataV2::new(
                shape_u64,
                chunks,
                dtype.into(),
                fill,
                Some(compressor),
                None,
            )
            .with_dimension_separator(ChunkKeySeparator::Slash);
            let array =
                Array::new_with_metadata(store.clone(), "/0", meta.into()).map_err(|x| e(&x))?;
            array.store_metadata().map_err(|x| e(&x))?;
            ms["version"] = json!("0.4");
            let attrs = json!({"multiscales": [ms]});
            let gmeta = GroupMetadataV2::new()
                .with_attributes(attrs.as_object().cloned().unwrap_or_default());
            Group::new_with_metadata(store.clone(), "/", gmeta.into())
                .map_err(|x| e(&x))?
                .store_metadata()
                .map_err(|x| e(&x))?;
            array
        }
    };
    let cz = spatial[0].min(edge);
    Ok(Box::new(ZarrWriter {
        array,
        tmp,
        target: path.to_path_buf(),
        shape: shape.to_vec(),
        force: opts.force,
        next_z: 0,
        cz,
        buf: SlabBuf::zeros(ty, k * cz.min(d) * plane),
        row_z0: 0,
        row_filled: 0,
    }))
}

impl ZarrWriter {
    /// Rows (z-planes) of the chunk row that starts at `row_z0`.
    fn rows(&self) -> usize {
        let (_, d, _) = kdp(&self.shape);
        self.cz.min(d - self.row_z0)
    }

    fn flush_row(&mut self) -> Result<()> {
        let (k, _, plane) = kdp(&self.shape);
        let rows = self.rows();
        let n = k * rows * plane;
        let z = self.row_z0 as u64..(self.row_z0 + rows) as u64;
        let (h, w) = (
            self.shape[self.shape.len() - 2] as u64,
            self.shape[self.shape.len() - 1] as u64,
        );
        let mut ranges = vec![z, 0..h, 0..w];
        if self.shape.len() == 4 {
            ranges.insert(0, 0..k as u64);
        }
        let subset = zarrs::array::ArraySubset::new_with_ranges(&ranges);
        let r = match &self.buf {
            SlabBuf::U8(v) => self.array.store_array_subset(&subset, &v[..n]),
            SlabBuf::U16(v) => self.array.store_array_subset(&subset, &v[..n]),
            SlabBuf::F32(v) => self.array.store_array_subset(&subset, &v[..n]),
        };
        r.map_err(|e| zerr(&self.target, format!("could not write chunks: {e}")))?;
        self.row_z0 += rows;
        self.row_filled = 0;
        Ok(())
    }
}

impl SlabWriter for ZarrWriter {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        let nz = check_slab(&self.shape, self.next_z, z0, slab.len())?;
        let _gate = before_slab()?;
        let (k, _, plane) = kdp(&self.shape);
        for z in 0..nz {
            let rows = self.rows();
            let dz = self.row_filled;
            for c in 0..k {
                let src = (c * nz + z) * plane;
                self.buf
                    .copy_from((c * rows + dz) * plane, slab, src..src + plane);
            }
            self.row_filled += 1;
            if self.row_filled == rows {
                self.flush_row()?;
            }
        }
        self.next_z += nz;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        check_finish(&self.target, &self.shape, self.next_z, self.force)?;
        let ZarrWriter {
            array, tmp, target, ..
        } = *self;
        drop(array);
        tmp.commit(&target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::volume::{create_writer_with, read_array, read_volume, ReadOptions};

    fn dir(name: &str) -> PathBuf {
        crate::io::volume::test_dir("zarr", name)
    }

    fn write_u16(path: &Path, shape: &[usize], vals: &[u16], v: ZarrVersion, chunk: usize) {
        let opts = WriteOptions {
            zarr_version: v,
            chunk: Some(chunk),
            ..Default::default()
        };
        let mut w = create_writer_with(path, shape, OutType::U16, &opts).unwrap();
        let plane: usize = shape[shape.len() - 2..].iter().product();
        let d = shape[shape.len() - 3];
        let k = if shape.len() == 4 { shape[0] } else { 1 };
        // odd slab sizes that straddle chunk rows
        let mut z = 0;
        for nz in [1usize, 3, 2, 5, 7].iter().cycle() {
            if z == d {
                break;
            }
            let nz = (*nz).min(d - z);
            let mut slab = Vec::new();
            for c in 0..k {
                let s = (c * d + z) * plane;
                slab.extend_from_slice(&vals[s..s + nz * plane]);
            }
            w.write_slab(z, SlabData::U16(&slab)).unwrap();
            z += nz;
        }
        w.finish().unwrap();
    }

    #[test]
    fn ome_metadata_has_the_right_shape_for_v2_and_v3() {
        let d = dir("meta");
        let shape = [2usize, 5, 6, 7];
        let vals: Vec<u16> = (0..2 * 5 * 6 * 7).map(|i| i as u16 * 3).collect();
        let p3 = d.join("a3.zarr");
        write_u16(&p3, &shape, &vals, ZarrVersion::V3, 4);
        let g = read_json(&p3, &p3.join("zarr.json")).unwrap();
        let ms = &g["attributes"]["ome"]["multiscales"][0];
        assert_eq!(g["attributes"]["ome"]["version"], "0.5");
        assert_eq!(ms["datasets"][0]["path"], "0");
        assert_eq!(ms["axes"][0]["type"], "channel");
        let a = read_json(&p3, &p3.join("0/zarr.json")).unwrap();
        assert_eq!(a["shape"], json!([2, 5, 6, 7]));
        assert_eq!(
            a["chunk_grid"]["configuration"]["chunk_shape"],
            json!([1, 4, 4, 4])
        );

        let p2 = d.join("a2.zarr");
        write_u16(&p2, &shape, &vals, ZarrVersion::V2, 4);
        let z = read_json(&p2, &p2.join(".zattrs")).unwrap();
        assert_eq!(z["multiscales"][0]["version"], "0.4");
        let a = read_json(&p2, &p2.join("0/.zarray")).unwrap();
        assert_eq!(a["chunks"], json!([1, 4, 4, 4]));
        assert_eq!(a["dimension_separator"], "/");
        assert!(p2.join("0/1/1/1/1").is_file(), "v2 chunk keys use '/'");
        assert!(p3.join("0/c/1/1/1/1").is_file(), "v3 default chunk keys");
        for p in [&p2, &p3] {
            let (s, data, _) = read_array(p, &ReadOptions::default()).unwrap();
            assert_eq!(s, shape.to_vec());
            assert_eq!(data, ArrayData::U16(vals.clone()));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn multiscale_levels_are_selected_by_path() {
        // a two-level OME-Zarr (v2 and v3) built from two single-level outputs
        let d = dir("levels");
        for v in [ZarrVersion::V2, ZarrVersion::V3] {
            let full: Vec<u16> = (0..8 * 8 * 8).map(|i| (i % 251) as u16).collect();
            let half: Vec<u16> = (0..4 * 4 * 4).map(|i| 1000 + i as u16).collect();
            let root = d.join(format!("ms_{v:?}.zarr"));
            let lo = d.join(format!("lo_{v:?}.zarr"));
            write_u16(&root, &[8, 8, 8], &full, v, 4);
            write_u16(&lo, &[4, 4, 4], &half, v, 4);
            std::fs::rename(lo.join("0"), root.join("s1")).unwrap();
            let meta = if v == ZarrVersion::V3 {
                "zarr.json"
            } else {
                ".zattrs"
            };
            let mut g = read_json(&root, &root.join(meta)).unwrap();
            let ms = if v == ZarrVersion::V3 {
                &mut g["attributes"]["ome"]["multiscales"][0]
            } else {
                &mut g["multiscales"][0]
            };
            ms["datasets"].as_array_mut().unwrap().push(json!({
                "path": "s1",
                "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0, 2.0]}]
            }));
            std::fs::write(root.join(meta), serde_json::to_string(&g).unwrap()).unwrap();

            let v0 = read_volume(&root, &ReadOptions::default()).unwrap();
            assert_eq!(v0.shape(), [8, 8, 8]);
            assert_eq!(v0.data(), &ArrayData::U16(full.clone()));
            let v1 = read_volume(&root, &ReadOptions { level: Some(1) }).unwrap();
            assert_eq!(v1.shape(), [4, 4, 4]);
            assert_eq!(v1.data(), &ArrayData::U16(half.clone()));
            let e = read_volume(&root, &ReadOptions { level: Some(2) })
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("2 multiscale level") && e.contains("level 2"),
                "{e}"
            );
            // the array folder itself reads as a plain zarr array
            let plain = read_volume(&root.join("s1"), &ReadOptions::default()).unwrap();
            assert_eq!(plain.data(), &ArrayData::U16(half));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unsupported_zarr_dtype_is_named() {
        let d = dir("dtype");
        let p = d.join("i32.zarr");
        let store = Arc::new(FilesystemStore::new(&p).unwrap());
        let array = ArrayBuilder::new(
            vec![2u64, 3, 4],
            vec![2u64, 3, 4],
            zarrs::array::data_type::int32(),
            FillValueMetadata::from(0i32),
        )
        .build(store, "/")
        .unwrap();
        array.store_metadata().unwrap();
        array
            .store_array_subset(&array.subset_all(), &vec![7i32; 24][..])
            .unwrap();
        let e = read_volume(&p, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("int32") && e.contains("uint8, uint16 or float32"),
            "{e}"
        );
        let e = read_volume(&d.join("missing.zarr"), &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
