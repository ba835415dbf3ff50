//! Tests of [`super`].

use super::*;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/npy")
        .join(name)
}

/// A fresh, empty folder under the system temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-npy-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_text(r: Result<Npy>) -> String {
    match r {
        Ok(a) => panic!("expected an error, got {a:?}"),
        Err(e) => e.to_string(),
    }
}

fn samples() -> Vec<Npy> {
    let s = vec![2, 3];
    vec![
        Npy::new(
            s.clone(),
            NpyData::F32(vec![-1.5, 0.0, 1e-30, 3.25, f32::MAX, -0.0]),
        ),
        Npy::new(
            s.clone(),
            NpyData::F64(vec![-1.5, 0.1, 1e300, 3.25, 7.0, -2.0]),
        ),
        Npy::new(
            s.clone(),
            NpyData::F16(
                [-1.5f32, 0.0, 1.0, 3.25, 65504.0, -2.0]
                    .map(f16::from_f32)
                    .to_vec(),
            ),
        ),
        Npy::new(s.clone(), NpyData::U8(vec![0, 1, 2, 127, 128, 255])),
        Npy::new(
            s.clone(),
            NpyData::U16(vec![0, 1, 300, 32768, 65000, 65535]),
        ),
        Npy::new(
            s.clone(),
            NpyData::U32(vec![0, 1, 70000, 1 << 31, 4_000_000_000, 9]),
        ),
        Npy::new(s.clone(), NpyData::I16(vec![-32768, -1, 0, 1, 300, 32767])),
        Npy::new(
            s.clone(),
            NpyData::I32(vec![i32::MIN, -1, 0, 1, 70000, i32::MAX]),
        ),
        Npy::new(
            s.clone(),
            NpyData::I64(vec![i64::MIN, -1, 0, 1, 1 << 40, i64::MAX]),
        ),
        Npy::new(
            s,
            NpyData::Bool(vec![true, false, false, true, true, false]),
        ),
        Npy::new(vec![], NpyData::F32(vec![2.5])),
        Npy::new(vec![4], NpyData::U8(vec![1, 2, 3, 4])),
        Npy::new(vec![0, 3], NpyData::U16(vec![])),
        Npy::new(vec![2, 1, 3, 1], NpyData::I32(vec![1, 2, 3, 4, 5, 6])),
    ]
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn round_trip_every_dtype_in_memory_and_on_disk() {
    let dir = temp_dir("roundtrip");
    for (i, a) in samples().into_iter().enumerate() {
        let bytes = a.to_bytes();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!(
            (10 + header_len) % 64,
            0,
            "header of {:?} not aligned",
            a.dtype()
        );
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        assert_eq!(Npy::from_bytes(&bytes).unwrap(), a);

        let path = dir.join(format!("a{i}.npy"));
        a.write(&path, false).unwrap();
        assert_eq!(read(&path).unwrap(), a);
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generic_write_f32_u8_u16_i64() {
    let dir = temp_dir("generic");
    let p = dir.join("f.npy");
    write(&p, &[3, 2], &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5], false).unwrap();
    let a = read(&p).unwrap();
    assert_eq!(a.shape, vec![3, 2]);
    assert_eq!(a.as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);

    let p = dir.join("u8.npy");
    write(&p, &[2, 2], &[0u8, 9, 200, 255], false).unwrap();
    assert_eq!(read(&p).unwrap().data, NpyData::U8(vec![0, 9, 200, 255]));

    let p = dir.join("u16.npy");
    write(&p, &[1, 1, 3], &[0u16, 1000, 65535], false).unwrap();
    let a = read(&p).unwrap();
    assert_eq!(a.shape, vec![1, 1, 3]);
    assert_eq!(a.to_f32(), vec![0.0, 1000.0, 65535.0]);

    let p = dir.join("i64.npy");
    write(&p, &[2], &[-5i64, 1 << 50], false).unwrap();
    assert_eq!(read(&p).unwrap().data, NpyData::I64(vec![-5, 1 << 50]));

    let e = write(&dir.join("bad.npy"), &[2, 2], &[1.0f32; 3], false).unwrap_err();
    assert!(e.to_string().contains("needs 4 elements"), "{e}");
    assert!(!dir.join("bad.npy").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = temp_dir("force");
    let p = dir.join("x.npy");
    write(&p, &[2], &[1u8, 2], false).unwrap();
    let e = write(&p, &[2], &[3u8, 4], false).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(read(&p).unwrap().data, NpyData::U8(vec![1, 2]));
    write(&p, &[2], &[3u8, 4], true).unwrap();
    assert_eq!(read(&p).unwrap().data, NpyData::U8(vec![3, 4]));

    let e = write(&dir.join("missing/x.npy"), &[1], &[1u8], false).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites a version-1.0 file as version `major`.0 (u32 header length).
fn as_version(v1: &[u8], major: u8) -> Vec<u8> {
    let header_len = u16::from_le_bytes([v1[8], v1[9]]) as usize;
    let dict = std::str::from_utf8(&v1[10..10 + header_len])
        .unwrap()
        .trim_end();
    let mut header = dict.as_bytes().to_vec();
    while !(12 + header.len() + 1).is_multiple_of(64) {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[major, 0]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&v1[10 + header_len..]);
    out
}

#[test]
fn header_versions_1_2_3() {
    for a in samples() {
        let v1 = a.to_bytes();
        assert_eq!(v1[6..8], [1, 0]);
        for major in [2, 3] {
            assert_eq!(Npy::from_bytes(&as_version(&v1, major)).unwrap(), a);
        }
    }
    // A header too long for 1.0's u16 length is written as 2.0.
    let shape = vec![1usize; 25_000];
    let a = Npy::new(shape, NpyData::F32(vec![4.5])).unwrap();
    let bytes = a.to_bytes();
    assert_eq!(bytes[6..8], [2, 0]);
    let header_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    assert!(header_len > 65535);
    assert_eq!((12 + header_len) % 64, 0);
    assert_eq!(Npy::from_bytes(&bytes).unwrap(), a);
}

#[test]
fn reads_files_written_by_numpy() {
    let i6 = 0..6i64;
    let f = |name: &str| read(&fixture(name)).unwrap();
    let a = f("f4_2x3.npy");
    assert_eq!(a.shape, vec![2, 3]);
    let want: Vec<f32> = i6.clone().map(|i| i as f32 * 0.5 - 1.0).collect();
    assert_eq!(a.data, NpyData::F32(want.clone()));
    assert_eq!(f("f4_2x3_v2.npy"), a);
    assert_eq!(f("f4_2x3_v3.npy"), a);
    let want64: Vec<f64> = i6.clone().map(|i| i as f64 * 0.25 - 0.5).collect();
    assert_eq!(f("f8_2x3.npy").data, NpyData::F64(want64));
    assert_eq!(f("f2_2x3.npy").to_f32(), want);
    assert_eq!(f("f2_2x3.npy").dtype(), DType::F16);
    let m = |k: i64, off: i64| i6.clone().map(move |i| i * k + off);
    assert_eq!(
        f("u1_2x3.npy").data,
        NpyData::U8(m(50, 0).map(|v| v as u8).collect())
    );
    assert_eq!(
        f("u2_2x3.npy").data,
        NpyData::U16(m(13000, 0).map(|v| v as u16).collect())
    );
    assert_eq!(
        f("i2_2x3.npy").data,
        NpyData::I16(m(1000, -2500).map(|v| v as i16).collect())
    );
    assert_eq!(
        f("i4_2x3.npy").data,
        NpyData::I32(m(100000, -250000).map(|v| v as i32).collect())
    );
    assert_eq!(
        f("u4_2x3.npy").data,
        NpyData::U32(m(800000000, 0).map(|v| v as u32).collect())
    );
    assert_eq!(
        f("i8_2x3.npy").data,
        NpyData::I64(m(3000000000, -7500000000).collect())
    );
    assert_eq!(
        f("b1_2x3.npy").data,
        NpyData::Bool(i6.clone().map(|i| i % 2 == 0).collect())
    );
    let s = f("f4_scalar.npy");
    assert_eq!((s.shape.as_slice(), s.to_f32()), (&[][..], vec![3.5]));
    let e = f("f4_empty_0x3.npy");
    assert_eq!((e.shape.clone(), e.len()), (vec![0, 3], 0));
    let c = f("u1_2x3x4.npy");
    assert_eq!(c.shape, vec![2, 3, 4]);
    assert_eq!(c.data, NpyData::U8((0..24).collect()));

    // What volfuse writes, numpy's header aside, is byte-identical in the data part.
    let ours = Npy::new(vec![2, 3], NpyData::F32(want)).unwrap().to_bytes();
    let theirs = std::fs::read(fixture("f4_2x3.npy")).unwrap();
    assert_eq!(ours[ours.len() - 24..], theirs[theirs.len() - 24..]);
    assert_eq!(ours.len() % 64, 24);
}

#[test]
fn reads_the_vit_fixture_arrays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit_gelu");
    let x = read(&dir.join("input_48x32.npy")).unwrap();
    assert_eq!(
        (x.shape.as_slice(), x.dtype()),
        (&[1, 3, 48, 32][..], DType::F32)
    );
    let y = read(&dir.join("output_32x32.npy")).unwrap();
    assert_eq!(y.shape, vec![2, 9, 64]);
    assert!(y.to_f32().iter().all(|v| v.is_finite()));
}

#[test]
fn rejects_numpy_files_it_cannot_read() {
    let e = err_text(read(&fixture("bad_fortran_2x3.npy")));
    assert!(
        e.contains("Fortran") && e.contains("numpy.ascontiguousarray"),
        "{e}"
    );
    assert!(
        e.contains("bad_fortran_2x3.npy"),
        "error names the file: {e}"
    );
    let e = err_text(read(&fixture("bad_bigendian_f4_2x3.npy")));
    assert!(e.contains("big-endian") && e.contains("'>f4'"), "{e}");
    let e = err_text(read(&fixture("bad_complex_2.npy")));
    assert!(e.contains("unsupported dtype '<c8' (complex)"), "{e}");
    assert!(e.contains("astype"), "{e}");
}

#[test]
fn rejects_damaged_or_foreign_bytes() {
    let good = Npy::new(vec![2, 3], NpyData::F32(vec![1.0; 6]))
        .unwrap()
        .to_bytes();
    let e = |b: &[u8]| err_text(Npy::from_bytes(b));

    let mut wrong = good.clone();
    wrong[1] = b'X';
    assert!(e(&wrong).contains("not a NumPy .npy file"));
    assert!(e(b"").contains("not a NumPy .npy file"));
    assert!(e(b"PK\x03\x04rest-of-zip").contains(".npz archive"));

    let t = e(&good[..good.len() - 1]);
    assert!(
        t.contains("truncated") && t.contains("24 bytes") && t.contains("23"),
        "{t}"
    );
    assert!(e(&good[..9]).contains("truncated"));
    assert!(e(&good[..40]).contains("ends inside the header"));

    let mut v4 = good.clone();
    v4[6] = 4;
    assert!(e(&v4).contains("unsupported .npy format version 4.0"));

    let with = |dict: &str| {
        let mut h = dict.as_bytes().to_vec();
        h.push(b'\n');
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&[0u8; 64]);
        out
    };
    let ok = "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }";
    assert_eq!(
        Npy::from_bytes(&with(ok)).unwrap().data,
        NpyData::I32(vec![0; 3])
    );
    let t = e(&with(
        "{'descr': '<i4', 'fortran_order': False, 'shape': (3,",
    ));
    assert!(t.contains("malformed"), "{t}");
    let t = e(&with("{'descr': '<i4', 'shape': (3,)}"));
    assert!(t.contains("fortran_order"), "{t}");
    let t = e(&with(
        "{'descr': '<i4', 'fortran_order': False, 'shape': (-3,)}",
    ));
    assert!(t.contains("malformed"), "{t}");
    let t = e(&with(
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}",
    ));
    assert!(t.contains("structured"), "{t}");
    let t = e(&with(
        "{'descr': '|O', 'fortran_order': False, 'shape': (1,)}",
    ));
    assert!(t.contains("unsupported dtype '|O'"), "{t}");
    let t = e(&with(
        "{'descr': '>u2', 'fortran_order': False, 'shape': (1,)}",
    ));
    assert!(t.contains("big-endian"), "{t}");
    // Single-byte types have no byte order, whatever the prefix says.
    let b = with("{'descr': '>u1', 'fortran_order': False, 'shape': (2,)}");
    assert_eq!(Npy::from_bytes(&b).unwrap().data, NpyData::U8(vec![0, 0]));
    let t = e(&with(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999999999)}",
        ));
    assert!(t.contains("too large"), "{t}");
    let t = e(&with(
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2)}",
    ));
    assert!(t.contains("Fortran"), "{t}");

    let missing = std::env::temp_dir().join("volfuse-npy-does-not-exist.npy");
    assert!(err_text(read(&missing)).contains("file not found"));
}

#[test]
fn new_checks_the_element_count() {
    let e = Npy::new(vec![2, 2], NpyData::U8(vec![1, 2, 3])).unwrap_err();
    assert!(e.to_string().contains("needs 4 elements but 3"), "{e}");
}
