//! volfuse on an application's own wgpu device, without copies of the outputs through the
//! host.
//!
//! The program creates its own instance, adapter, device and queue (as a viewer would),
//! uploads a uint8 volume and its context volume to buffers, runs the bundle through
//! volfuse on that device, binds the label buffer volfuse returns in a compute shader of
//! its own (a per-class voxel count), and reads the labels back to check them against the
//! host path and against the Python reference.
//!
//! ```sh
//! cargo run --example own_device                      # the tiny test bundle and volume
//! cargo run --example own_device -- MODEL RAW.npy CONTEXT.npy   # your own (uint8 .npy)
//! ```
//!
//! `cargo test` runs it too (`[[example]] test = true` in Cargo.toml).

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use volfuse::{DeviceVolume, Engine, Volume, VolumeData, VoxelType};
use wgpu::util::DeviceExt;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The application's device as a typical wgpu program creates it: Vulkan, Metal or DX12,
/// WebGPU's default limits and no optional features (volfuse picks kernels that work
/// without subgroups or f16; larger limits only allow larger batches and tiles).
fn app_device() -> Result<(wgpu::Device, wgpu::Queue, wgpu::AdapterInfo)> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .context("no Vulkan/Metal/DX12 adapter (on Linux: apt-get install mesa-vulkan-drivers)")?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("application"),
        required_features: wgpu::Features::empty(),
        required_limits: wgpu::Limits::default(),
        ..Default::default()
    }))?;
    Ok((device, queue, adapter.get_info()))
}

/// A uint8 volume uploaded as the application would: tightly packed, padded to whole
/// 4-byte words.
fn upload(device: &wgpu::Device, v: &Volume) -> Result<wgpu::Buffer> {
    let VolumeData::U8(voxels) = v.data() else {
        bail!("this example uploads uint8 volumes, got {}", v.dtype());
    };
    let mut bytes = voxels.clone();
    bytes.resize(bytes.len().div_ceil(4) * 4, 0);
    Ok(
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("application volume"),
            contents: &bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        }),
    )
}

const HISTOGRAM: &str = r#"
@group(0) @binding(0) var<storage, read> labels: array<u32>;
@group(0) @binding(1) var<storage, read_write> counts: array<atomic<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&labels)) { atomicAdd(&counts[labels[id.x]], 1u); }
}
"#;

/// The application's own kernel reading volfuse's label buffer: voxels per class.
fn count_classes(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    labels: &wgpu::Buffer,
    k: usize,
) -> Result<Vec<u32>> {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("histogram"),
        source: wgpu::ShaderSource::Wgsl(HISTOGRAM.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("histogram"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let counts = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("counts"),
        contents: bytemuck::cast_slice(&vec![0u32; k]),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("counts readback"),
        size: (k * 4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("histogram"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: labels.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: counts.as_entire_binding(),
            },
        ],
    });
    let n = (labels.size() / 4) as u32;
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(n.div_ceil(64), 1, 1);
    }
    enc.copy_buffer_to_buffer(&counts, 0, &readback, 0, (k * 4) as u64);
    queue.submit([enc.finish()]);
    let slice = readback.slice(..);
    slice.map_async(wgpu::MapMode::Read, |_| {});
    device.poll(wgpu::PollType::wait_indefinitely())?;
    let view = slice.get_mapped_range()?;
    Ok(bytemuck::cast_slice(&view).to_vec())
}

/// Runs the example; returns the labels read back from the device.
fn run(model_dir: &Path, raw: &Path, context: &Path) -> Result<Vec<u32>> {
    let (device, queue, info) = app_device()?;
    println!("application device: {} ({:?})", info.name, info.backend);
    // volfuse shares the device and queue (wgpu handles are reference-counted clones).
    let engine = Engine::from_device(device.clone(), queue.clone(), info);
    let model = engine.load_model(model_dir)?;

    let raw = Volume::read(raw)?;
    let context = Volume::read(context)?;
    let raw_buf = upload(&device, &raw)?;
    let ctx_buf = upload(&device, &context)?;
    let t0 = std::time::Instant::now();
    let seg = model.segment_buffer(
        &DeviceVolume::new(&raw_buf, raw.shape(), VoxelType::U8),
        Some(&DeviceVolume::new(&ctx_buf, context.shape(), VoxelType::U8)),
    )?;
    for n in &seg.notes {
        println!("note: {n}");
    }
    let [k, d, h, w] = seg.shape;
    println!(
        "segment_buffer returned after {:.2} s (UNet submitted, not waited for)",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "labels: ({d}, {h}, {w}) u32 buffer of {} bytes, usage {:?}",
        seg.labels.size(),
        seg.labels.usage()
    );

    // The application binds volfuse's output directly: no host round trip.
    let counts = count_classes(&device, &queue, &seg.labels, k)?;
    println!("voxels per class (application's own kernel): {counts:?}");

    // Read back and check against the host path on the same device.
    let labels = seg.read_labels()?;
    let probabilities = seg.read_probabilities()?;
    let t0 = std::time::Instant::now();
    let host = model.segment(&raw, Some(&context))?;
    println!(
        "host path (same model, graphs already built): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    ensure!(
        labels
            .iter()
            .zip(&host.labels)
            .all(|(a, b)| *a == *b as u32),
        "device-path labels differ from the host path"
    );
    let max_diff = probabilities
        .iter()
        .zip(&host.probabilities)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    ensure!(
        max_diff <= 1e-6,
        "device-path probabilities differ from the host path by {max_diff}"
    );
    let mut want = vec![0u32; k];
    for l in &labels {
        want[*l as usize] += 1;
    }
    ensure!(
        counts == want,
        "the application's kernel counted {counts:?}, the labels hold {want:?}"
    );
    println!("device path == host path (labels identical, probabilities within {max_diff:.1e})");
    Ok(labels)
}

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    match args.as_slice() {
        [] => {
            run(
                &fixture("bundle_tiny_ctx"),
                &fixture("e2e_tiny_ctx/raw.npy"),
                &fixture("e2e_tiny_ctx/context.npy"),
            )?;
        }
        [model, raw, context] => {
            run(model, raw, context)?;
        }
        _ => bail!("usage: own_device [MODEL RAW.npy CONTEXT.npy]"),
    }
    Ok(())
}

#[test]
fn own_device_matches_the_host_path_and_the_reference() {
    let labels = run(
        &fixture("bundle_tiny_ctx"),
        &fixture("e2e_tiny_ctx/raw.npy"),
        &fixture("e2e_tiny_ctx/context.npy"),
    )
    .unwrap();
    // And the Python reference's labels (tools/make_e2e_fixtures.py).
    let want = volfuse::io::npy::read(&fixture("e2e_tiny_ctx/labels.npy"))
        .unwrap()
        .to_f32();
    assert_eq!(labels.len(), want.len());
    let agree = labels
        .iter()
        .zip(&want)
        .filter(|(a, b)| **a as f32 == **b)
        .count();
    assert!(
        agree as f64 >= 0.999 * want.len() as f64,
        "labels agree with the reference on only {agree} of {} voxels",
        want.len()
    );
}
