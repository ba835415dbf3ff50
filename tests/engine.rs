//! The embedding API (`volfuse::Engine` / `Model`): the device path against the host path,
//! device inputs to a graph, thread safety, and the errors a caller gets for bad buffers.

mod common;

use common::{fixture, gpu};
use std::sync::Arc;
use volfuse::graph::{CpuExecutor, GpuExecutor, Graph, GraphInput};
use volfuse::ops::elementwise::{Binary, Unary};
use volfuse::{DeviceVolume, Engine, Error, Model, Segmentation, Volume, VolumeData, VoxelType};
use wgpu::util::DeviceExt;

fn engine() -> Engine {
    Engine::from_context(gpu())
}

fn tiny(engine: &Engine) -> Model {
    engine.load_model(fixture("bundle_tiny_ctx")).unwrap()
}

fn raw_and_context() -> (Volume, Volume) {
    (
        Volume::read(&fixture("e2e_tiny_ctx/raw.npy")).unwrap(),
        Volume::read(&fixture("e2e_tiny_ctx/context.npy")).unwrap(),
    )
}

/// Fresh pseudo-random u16 voxels (a different volume on every run of the test).
fn random_u16(shape: [usize; 3]) -> Vec<u16> {
    let mut s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    (0..shape.iter().product::<usize>())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 5000) as u16
        })
        .collect()
}

fn buffer(bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu()
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test volume"),
            contents: bytes,
            usage,
        })
}

fn assert_same(a: &Segmentation, b: &Segmentation, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    assert_eq!(a.labels, b.labels, "{what}: labels differ");
    assert_eq!(a.logits, b.logits, "{what}: logits differ");
    assert_eq!(
        a.probabilities, b.probabilities,
        "{what}: probabilities differ"
    );
}

#[test]
fn device_path_equals_host_path_for_u16_at_an_offset() {
    let model = tiny(&engine())
        .with_output_usage(wgpu::BufferUsages::VERTEX)
        .unwrap();
    let shape = [13, 11, 17]; // odd voxel count: the u16 data ends mid-word
    let raw = random_u16(shape);
    let ctx = random_u16(shape);
    // raw at byte 8, context right after it at the next word boundary.
    let raw_bytes: &[u8] = bytemuck::cast_slice(&raw);
    let ctx_offset = (8 + raw_bytes.len()).div_ceil(4) * 4;
    let mut bytes = vec![0xAAu8; ctx_offset];
    bytes[8..8 + raw_bytes.len()].copy_from_slice(raw_bytes);
    bytes.extend_from_slice(bytemuck::cast_slice(&ctx));
    bytes.resize(bytes.len().div_ceil(4) * 4, 0);
    let buf = buffer(&bytes, wgpu::BufferUsages::COPY_SRC);
    let dev = model
        .segment_buffer(
            &DeviceVolume {
                buffer: &buf,
                offset: 8,
                shape,
                voxel: VoxelType::U16,
            },
            Some(&DeviceVolume {
                buffer: &buf,
                offset: ctx_offset as u64,
                shape,
                voxel: VoxelType::U16,
            }),
        )
        .unwrap();
    let [k, d, h, w] = dev.shape;
    assert_eq!(dev.labels.size(), (d * h * w * 4) as u64);
    assert_eq!(dev.probabilities.size(), (k * d * h * w * 4) as u64);
    assert!(dev.labels.usage().contains(
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::VERTEX
    ));
    let host = model
        .segment(
            &Volume::new(shape, VolumeData::U16(raw)).unwrap(),
            Some(&Volume::new(shape, VolumeData::U16(ctx)).unwrap()),
        )
        .unwrap();
    assert_same(&dev.to_host().unwrap(), &host, "u16 device vs host");
    // Not a constant answer: the random volume gives more than one class somewhere, or
    // at least labels that follow the logits.
    let labels = dev.read_labels().unwrap();
    let logits = dev.read_logits().unwrap();
    let n = d * h * w;
    for (i, l) in labels.iter().enumerate() {
        let best = (0..k)
            .max_by(|&a, &b| logits[a * n + i].total_cmp(&logits[b * n + i]))
            .unwrap();
        assert_eq!(*l as usize, best, "voxel {i}: label is not the argmax");
    }
}

#[test]
fn device_path_equals_host_path_for_f32_without_context() {
    let model = tiny(&engine());
    let (raw, _) = raw_and_context();
    let VolumeData::U8(v) = raw.data() else {
        panic!("the fixture is uint8")
    };
    let f: Vec<f32> = v.iter().map(|x| *x as f32 * 0.37 - 11.0).collect();
    let buf = buffer(bytemuck::cast_slice(&f), wgpu::BufferUsages::COPY_SRC);
    let dev = model
        .segment_buffer(&DeviceVolume::new(&buf, raw.shape(), VoxelType::F32), None)
        .unwrap();
    assert!(
        dev.notes.iter().any(|n| n.contains("degraded")),
        "{:?}",
        dev.notes
    );
    let host = model
        .segment(&Volume::new(raw.shape(), VolumeData::F32(f)).unwrap(), None)
        .unwrap();
    assert_same(&dev.to_host().unwrap(), &host, "f32 device vs host");
}

#[test]
fn bad_device_volumes_are_clear_errors() {
    let model = tiny(&engine());
    let shape = [4, 4, 5];
    let data = vec![7u8; 80];
    let no_copy = buffer(&data, wgpu::BufferUsages::STORAGE);
    let e = model
        .segment_buffer(&DeviceVolume::new(&no_copy, shape, VoxelType::U8), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("COPY_SRC") && e.contains("fix"), "{e}");

    let ok = buffer(&data, wgpu::BufferUsages::COPY_SRC);
    let e = model
        .segment_buffer(&DeviceVolume::new(&ok, shape, VoxelType::U16), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("buffer holds 80"), "{e}");
    let e = model
        .segment_buffer(
            &DeviceVolume {
                buffer: &ok,
                offset: 2,
                shape: [1, 1, 4],
                voxel: VoxelType::U8,
            },
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 4"), "{e}");
    let e = model
        .segment_buffer(&DeviceVolume::new(&ok, [4, 0, 5], VoxelType::U8), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("≥ 1"), "{e}");

    let mut f = vec![1.0f32; 20];
    f[13] = f32::NAN;
    let nan = buffer(bytemuck::cast_slice(&f), wgpu::BufferUsages::COPY_SRC);
    let e = model
        .segment_buffer(&DeviceVolume::new(&nan, [1, 4, 5], VoxelType::F32), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite") && e.contains("(0, 2, 3)"), "{e}");

    // A destroyed buffer is refused before any work, not a panic.
    let gone = buffer(&data, wgpu::BufferUsages::COPY_SRC);
    gone.destroy();
    match model.segment_buffer(&DeviceVolume::new(&gone, shape, VoxelType::U8), None) {
        Err(Error::Invalid(m)) => assert!(m.contains("engine's device"), "{m}"),
        other => panic!("expected Error::Invalid for a destroyed buffer, got {other:?}"),
    }

    // The context must have the raw volume's shape.
    let e = model
        .segment_buffer(
            &DeviceVolume::new(&ok, shape, VoxelType::U8),
            Some(&DeviceVolume::new(&ok, [5, 4, 4], VoxelType::U8)),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
}

#[test]
fn cpu_engine_and_output_usage_errors() {
    let model = Engine::cpu()
        .load_model(fixture("bundle_tiny_ctx"))
        .unwrap();
    let buf = buffer(&[0u8; 64], wgpu::BufferUsages::COPY_SRC);
    match model.segment_buffer(&DeviceVolume::new(&buf, [4, 4, 4], VoxelType::U8), None) {
        Err(Error::Invalid(m)) => assert!(m.contains("GPU engine"), "{m}"),
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    let e = model
        .with_output_usage(wgpu::BufferUsages::MAP_READ)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mapping"), "{e}");
    let e = Engine::cpu()
        .load_model(fixture("e2e_tiny_ctx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("volfuse.json"), "{e}");
    assert!(tiny(&Engine::cpu()).with_batch(0).is_err());
}

#[test]
fn graph_inputs_from_device_buffers() {
    let ctx = gpu();
    let mut g = Graph::new();
    let x = g.input("x", &[3, 37]);
    let y = g.input("y", &[3, 37]);
    let r = g.op(Unary::Relu, &[x]).unwrap();
    let z = g.op(Binary::add(), &[r, y]).unwrap();
    g.output(z);
    let plan = g.plan(true);
    let xs: Vec<f32> = (0..111).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
    let ys: Vec<f32> = (0..111)
        .map(|i| ((i * 104729) % 31) as f32 * 0.25)
        .collect();
    let want = CpuExecutor::run(&g, &plan, &[&xs, &ys]).unwrap().remove(0);
    let exe = GpuExecutor::new(&ctx, &g, &plan, &mut Default::default()).unwrap();
    let xb = ctx.upload(&xs, &[3, 37]).unwrap();
    ctx.fill(exe.output_buffer(0).unwrap(), f32::NAN);
    exe.submit_inputs(
        &ctx,
        &g,
        &[GraphInput::Device(&xb.buffer), GraphInput::Host(&ys)],
    )
    .unwrap();
    let got = ctx.read_buffer(exe.output_buffer(0).unwrap(), 111).unwrap();
    assert_eq!(got, want);
    assert_eq!(exe.output_len(0), Some(111));
    // A buffer that is too small, and the wrong number of inputs, are errors.
    let small = ctx.upload(&[1.0; 4], &[4]).unwrap();
    let small = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: small.buffer.usage(),
        mapped_at_creation: false,
    });
    let e = exe
        .submit_inputs(
            &ctx,
            &g,
            &[GraphInput::Device(&small), GraphInput::Host(&ys)],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("'x' needs 444 bytes"), "{e}");
    assert!(exe
        .submit_inputs(&ctx, &g, &[GraphInput::Host(&ys)])
        .is_err());
}

#[test]
fn models_are_shared_across_threads() {
    // Two models on one engine (shared pipelines and scratch textures), one of them shared
    // by several threads; every result must equal the sequential one bit for bit.
    let engine = engine();
    let a = Arc::new(tiny(&engine));
    let b = Arc::new(tiny(&engine));
    let (raw, ctx) = raw_and_context();
    let (raw, ctx) = (Arc::new(raw), Arc::new(ctx));
    let with_ctx = a.segment(&raw, Some(&ctx)).unwrap();
    let without = a.segment(&raw, None).unwrap();
    assert_ne!(with_ctx.logits, without.logits, "the context must matter");
    let (with_ctx, without) = (Arc::new(with_ctx), Arc::new(without));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let model = if t % 2 == 0 { a.clone() } else { b.clone() };
            let (raw, ctx, with_ctx, without) =
                (raw.clone(), ctx.clone(), with_ctx.clone(), without.clone());
            std::thread::spawn(move || {
                let use_ctx = t < 2;
                let got = model.segment(&raw, use_ctx.then_some(&*ctx)).unwrap();
                let want = if use_ctx { &with_ctx } else { &without };
                assert_same(&got, want, &format!("thread {t}"));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn engine_and_model_are_send_and_sync() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Engine>();
    send_sync::<Model>();
    send_sync::<Arc<Model>>();
    send_sync::<volfuse::DeviceSegmentation>();
    send_sync::<Error>();
}

#[test]
fn a_buffer_of_another_device_is_an_error() {
    // Two devices of one wgpu instance, as an application with several windows may have.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let device = || {
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .unwrap()
    };
    let (d1, q1) = device();
    let (d2, _q2) = device();
    let engine = Engine::from_device(d1, q1, adapter.get_info());
    let model = tiny(&engine);
    let foreign = d2.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("the other device's volume"),
        contents: &[9u8; 64],
        usage: wgpu::BufferUsages::COPY_SRC,
    });
    match model.segment_buffer(&DeviceVolume::new(&foreign, [4, 4, 4], VoxelType::U8), None) {
        Err(Error::Invalid(m)) => assert!(m.contains("engine's device"), "{m}"),
        other => panic!("expected Error::Invalid for a foreign buffer, got {other:?}"),
    }
}
