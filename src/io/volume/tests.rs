//! Tests of [`super`].

use super::*;

#[test]
fn memory_writer_checks_order_and_completion() {
    let mut w = MemoryWriter::new(&[2, 3, 2, 2]);
    let slab: Vec<f32> = (0..16).map(|i| i as f32).collect();
    w.write_slab(0, SlabData::F32(&slab)).unwrap();
    assert!(w.write_slab(0, SlabData::F32(&slab)).is_err());
    assert!(Box::new(MemoryWriter::new(&[3, 2, 2])).finish().is_err());
    let slab1: Vec<f32> = (16..24).map(|i| i as f32).collect();
    w.write_slab(2, SlabData::F32(&slab1)).unwrap();
    // channel 0 holds z 0..3 of channel 0: slab values 0..8 then 16..20
    assert_eq!(
        &w.channels[0][..],
        &[0., 1., 2., 3., 4., 5., 6., 7., 16., 17., 18., 19.]
    );
    assert_eq!(&w.channels[1][8..], &[20., 21., 22., 23.]);
    Box::new(w).finish().unwrap();
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    test_dir("vol", name)
}

/// Asserts that no `*.tmp` file is left in `d`, then removes `d`.
fn assert_no_tmp_and_remove(d: &Path) {
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(d).unwrap();
}

/// Writes `vals` (C order, `shape`) through `create_writer` in slabs of varying depth.
fn write_slabs(path: &Path, shape: &[usize], vals: &ArrayData, opts: &WriteOptions) {
    let ty = match vals {
        ArrayData::U8(_) => OutType::U8,
        ArrayData::U16(_) => OutType::U16,
        ArrayData::F32(_) => OutType::F32,
    };
    let mut w = create_writer_with(path, shape, ty, opts).unwrap();
    let (k, d, plane) = kdp(shape);
    let mut z = 0;
    for nz in [2usize, 1, 3, 4].iter().cycle() {
        if z == d {
            break;
        }
        let nz = (*nz).min(d - z);
        let idx: Vec<usize> = (0..k)
            .flat_map(|c| (c * d + z) * plane..(c * d + z + nz) * plane)
            .collect();
        match vals {
            ArrayData::U8(v) => {
                let s: Vec<u8> = idx.iter().map(|&i| v[i]).collect();
                w.write_slab(z, SlabData::U8(&s)).unwrap()
            }
            ArrayData::U16(v) => {
                let s: Vec<u16> = idx.iter().map(|&i| v[i]).collect();
                w.write_slab(z, SlabData::U16(&s)).unwrap()
            }
            ArrayData::F32(v) => {
                let s: Vec<f32> = idx.iter().map(|&i| v[i]).collect();
                w.write_slab(z, SlabData::F32(&s)).unwrap()
            }
        }
        z += nz;
    }
    w.finish().unwrap();
}

#[test]
fn every_format_round_trips_every_dtype_and_rank() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let d = tmpdir("rt");
    let outs = [
        ("a.npy", ZarrVersion::V3),
        ("a.tif", ZarrVersion::V3),
        ("a3.zarr", ZarrVersion::V3),
        ("a2.zarr", ZarrVersion::V2),
    ];
    for shape in [vec![9usize, 10, 11], vec![3, 7, 5, 6]] {
        let n: usize = shape.iter().product();
        let arrays = [
            ArrayData::U8((0..n).map(|_| rng.random()).collect()),
            ArrayData::U16((0..n).map(|_| rng.random()).collect()),
            ArrayData::F32((0..n).map(|_| rng.random_range(-1e3f32..1e3)).collect()),
        ];
        for vals in &arrays {
            for (name, v) in outs {
                let p = d.join(name);
                let opts = WriteOptions {
                    force: true,
                    zarr_version: v,
                    chunk: Some(4),
                };
                write_slabs(&p, &shape, vals, &opts);
                let (s, got, notes) = read_array(&p, &ReadOptions::default()).unwrap();
                let what = format!("{name} {shape:?} {} seed {seed}", vals.dtype());
                assert_eq!(s, shape, "{what}");
                assert!(&got == vals, "{what}: values differ");
                assert!(notes.is_empty(), "{what}");
            }
        }
    }
    assert_no_tmp_and_remove(&d);
}

#[test]
fn unfinished_writers_leave_nothing_and_outputs_are_kept_without_force() {
    let d = tmpdir("unfinished");
    for name in ["u.npy", "u.tif", "u.zarr"] {
        let p = d.join(name);
        let mut w = create_writer(&p, &[4, 3, 3], OutType::U8, false).unwrap();
        w.write_slab(0, SlabData::U8(&[1u8; 18])).unwrap();
        drop(w); // an error in the caller: no finish
        assert!(!p.exists(), "{name}");
        let mut w = create_writer(&p, &[4, 3, 3], OutType::U8, false).unwrap();
        w.write_slab(0, SlabData::U8(&[1u8; 18])).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("after z 2 of 4"), "{name}: {e}");
        assert!(!p.exists(), "{name}");
        // an existing output is kept without force, replaced with it
        let old = ArrayData::U8(vec![9; 36]);
        write_slabs(&p, &[4, 3, 3], &old, &WriteOptions::default());
        let e = create_writer(&p, &[4, 3, 3], OutType::U8, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--force"), "{name}: {e}");
        assert_eq!(read_array(&p, &ReadOptions::default()).unwrap().1, old);
        let new = ArrayData::U8(vec![5; 36]);
        let force = WriteOptions {
            force: true,
            ..Default::default()
        };
        write_slabs(&p, &[4, 3, 3], &new, &force);
        assert_eq!(read_array(&p, &ReadOptions::default()).unwrap().1, new);
    }
    let e = create_writer(&d.join("no/such/dir/x.npy"), &[1, 2, 2], OutType::U8, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let e = create_writer(&d.join("x.png"), &[1, 2, 2], OutType::U8, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown output format"), "{e}");
    assert_no_tmp_and_remove(&d);
}

#[test]
fn npy_inputs_bad_and_converted() {
    let d = tmpdir("npyin");
    let p = d.join("v.npy");
    // float16 and int16 are converted exactly, with a note
    let h: Vec<half::f16> = (0..8)
        .map(|i| half::f16::from_f32(i as f32 * 0.5))
        .collect();
    npy::write(&p, &[2, 2, 2], &h, true).unwrap();
    let (v, notes) = read_volume_noted(&p, &ReadOptions::default()).unwrap();
    assert_eq!(
        v.data(),
        &ArrayData::F32((0..8).map(|i| i as f32 * 0.5).collect())
    );
    assert!(notes[0].contains("float16 converted"), "{notes:?}");
    // float64 is refused, naming the dtype and what is accepted
    npy::write(&p, &[2, 2, 2], &[1.0f64; 8], true).unwrap();
    let e = read_volume(&p, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("float64") && e.contains("uint8, uint16 or float32"),
        "{e}"
    );
    // 2-D
    npy::write(&p, &[3, 4], &[1u8; 12], true).unwrap();
    let e = read_volume(&p, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("3-D") && e.contains("img[None]"), "{e}");
    // NaN / Inf
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![0.5f32; 24];
        x[13] = bad;
        npy::write(&p, &[2, 3, 4], &x, true).unwrap();
        let e = read_volume(&p, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite") && e.contains("(1, 0, 1)"), "{e}");
    }
    // truncated
    npy::write(&p, &[2, 3, 4], &[0.5f32; 24], true).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
    let e = read_volume(&p, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    // unreadable / unknown
    let e = read_volume(&d.join("nope.npy"), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    npy::write(&p, &[2, 3, 4], &[0.5f32; 24], true).unwrap();
    let e = read_volume(&p, &ReadOptions { level: Some(1) })
        .unwrap_err()
        .to_string();
    assert!(e.contains("only in OME-Zarr"), "{e}");
    std::fs::write(d.join("v.raw"), b"x").unwrap();
    let e = read_volume(&d.join("v.raw"), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown volume format"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}
