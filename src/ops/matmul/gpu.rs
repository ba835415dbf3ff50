//! The GPU side of [`super::Matmul`]: the generic kernel, the texture path for x·Wᵀ
//! (lavapipe's fast path), f16 activations and the epilogue pass.

use super::*;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    // element strides: A row/col/batch, B row/col/batch (of op(A), op(B))
    a_rs: u32,
    a_cs: u32,
    a_bs: u32,
    b_rs: u32,
    b_cs: u32,
    b_bs: u32,
    has_bias: u32,
    tiles_n: u32,
}

pub(super) fn gpu_matmul(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let (a_rs, a_cs) = if m.trans_a { (1, d.m) } else { (d.k, 1) };
    let (b_rs, b_cs) = if m.trans_b { (1, d.k) } else { (d.n, 1) };
    let bias = if m.bias { inputs[2] } else { inputs[1] };
    let (tm, tn) = (4usize, 4usize);
    let tiles_n = d.n.div_ceil(tn);
    let p = Params {
        m: d.m as u32,
        n: d.n as u32,
        k: d.k as u32,
        batch: d.batch as u32,
        a_rs: a_rs as u32,
        a_cs: a_cs as u32,
        a_bs: (d.m * d.k) as u32,
        b_rs: b_rs as u32,
        b_cs: b_cs as u32,
        b_bs: if d.b_batched { (d.k * d.n) as u32 } else { 0 },
        has_bias: m.bias as u32,
        tiles_n: tiles_n as u32,
    };
    let tiles = (d.m.div_ceil(tm) * tiles_n) as u64;
    Ok(vec![ctx.dispatch(KernelArgs {
        shader: MATMUL.portable(),
        entry: "matmul",
        constants: &[("ACT", m.act.code()), ("W16", m.w_f16 as u8 as f64)],
        buffers: &[inputs[0], inputs[1], bias, out],
        params: bytemuck::bytes_of(&p),
        workgroups: {
            let [x, y, _] = ctx.grid(tiles.div_ceil(64))?;
            [x, y, d.batch as u32]
        },
    })?])
}

/// Whether the texture path with `cols` columns per block runs `m`'s epilogue in
/// registers: RoPE needs 16-column blocks whose two groups of 8 are the two halves of the
/// same rotation pairs (hd/2 % 8 == 0); both need the identity activation (the epilogue
/// acts on the biased product).
pub(super) fn fuses_on_texture_path(m: &Matmul, d: Dims, cols: usize) -> bool {
    match m.epi {
        Epilogue::None => true,
        Epilogue::Rope { heads, .. } => {
            cols == 16 && m.act == Activation::Identity && (d.n / heads / 2).is_multiple_of(8)
        }
        // (the residual streams through a texture of 4-column texels)
        Epilogue::Residual => m.act == Activation::Identity && d.n.is_multiple_of(4),
    }
}

/// The in-place pass that applies `epi` to a finished product in `out` (None for
/// [`Epilogue::None`]); `extra` are the epilogue's inputs.
pub(super) fn epilogue_pass(
    ctx: &GpuContext,
    epi: Epilogue,
    d: Dims,
    extra: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Option<Dispatch>> {
    let len = (d.batch * d.m * d.n) as u64;
    let (entry, total, t, prefix, half) = match epi {
        Epilogue::None => return Ok(None),
        Epilogue::Rope { heads, prefix } => ("rope_inplace", len / 2, d.m, prefix, d.n / heads / 2),
        Epilogue::Residual => ("residual_inplace", len, 1, 0, 1),
    };
    let params = [
        total as u32,
        d.n as u32,
        t as u32,
        prefix as u32,
        half as u32,
        0,
        0,
        0,
    ];
    Ok(Some(ctx.dispatch(KernelArgs {
        shader: MATMUL.portable(),
        entry,
        constants: &[],
        buffers: &[out, extra[0], extra[1]],
        params: bytemuck::cast_slice(&params),
        workgroups: ctx.grid(total.div_ceil(64))?,
    })?))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct TexParams {
    m: u32,
    n: u32,
    k4: u32,
    c0: u32,
    w_base: u32,
    has_bias: u32,
    w_base2: u32,
    /// First column of the second group of 8 (16-column blocks).
    c2: u32,
    /// RoPE: tokens per image, prefix tokens, texels per table row, texel of column c0.
    t: u32,
    prefix: u32,
    q4: u32,
    rj: u32,
}

/// Bytes of the uniform window holding a block of W (the WGSL array size).
pub(super) const WINDOW: u64 = 65536;

/// Columns per dispatch on the texture path, or None when it does not apply: it needs
/// x·Wᵀ with a shared W, K % 4 == 0, subgroups of at least 8 lanes, 64 KiB uniform
/// bindings, and a group of columns × K that fits a window. 16 columns are two groups of 8,
/// each in its own window (K ≤ 2048); 4 columns fit one window up to K = 4096.
pub(super) fn texture_path_cols(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    w: &wgpu::Buffer,
) -> Option<usize> {
    let c = &ctx.caps;
    let ok = !m.trans_a
        && m.trans_b
        && !d.b_batched
        && d.k.is_multiple_of(if m.w_f16 { 8 } else { 4 })
        && d.k > 0
        && d.m > 0
        && d.n > 0
        && c.subgroups
        && c.min_subgroup_size >= 8
        && c.max_uniform_binding >= WINDOW
        && w.size() >= WINDOW
        && w.size()
            .is_multiple_of((c.uniform_offset_alignment as u64).max(16))
        && (d.batch * d.m * d.k / 4) as u64
            <= GpuContext::TEXTURE_WIDTH as u64 * c.max_texture_2d as u64;
    if !ok {
        return None;
    }
    // W from a texture: 16-column blocks whatever K (no window to fit).
    if reads_w_as_texture(ctx, m, d) {
        return Some(16);
    }
    [(16usize, 8usize), (4, 4)]
        .into_iter()
        .map(|(cols, group)| (cols, group * d.k * esize(m)))
        .find(|(_, group)| {
            // A group must fit its window even when the window's start is aligned down.
            let block = *group as u64;
            let align = (c.uniform_offset_alignment as u64).max(16);
            block
                + if block.is_multiple_of(align) {
                    0
                } else {
                    align
                }
                <= WINDOW
        })
        .map(|(cols, _)| cols)
}

/// Rows of X per invocation on the texture path with `cols` columns per block: 4
/// (`matmul_tex16r4*`: four rows × the 16-column block, a quarter of the weight loads and
/// broadcasts per FLOP of one row) for 16-column blocks with an f32 output, unless `m`
/// asks for [`MatmulKernel::TexOneRow`]; else 1.
pub(super) fn tex_rows_per_invocation(m: &Matmul, cols: usize) -> usize {
    if cols == 16 && !m.out_f16 && m.kernel != MatmulKernel::TexOneRow {
        4
    } else {
        1
    }
}

/// Whether the texture path reads X as a read-only storage texture (`MATMUL.storage_x()`,
/// same entry points): on CPU adapters ([`GpuContext::storage_x`]; lavapipe: +18–28 %
/// GFLOP per CPU-second, docs/lavapipe.md) for f32 X and an f32 output, unless `m` asks for
/// a sampled X ([`MatmulKernel::TexSampled`], [`MatmulKernel::TexOneRow`]).
pub(super) fn reads_x_as_storage(ctx: &GpuContext, m: &Matmul) -> bool {
    ctx.storage_x()
        && !m.x_f16
        && !m.out_f16
        && matches!(
            m.kernel,
            MatmulKernel::Auto | MatmulKernel::TexWindows | MatmulKernel::TexPairs
        )
}

/// Whether the four-row kernels read W from a texture (`matmul_tex48r4w*`, or
/// `matmul_tex32r4w*` with [`MatmulKernel::TexPairs`]) instead of
/// uniform windows bound one 16-column block per dispatch: wherever X is read as a storage
/// texture (CPU adapters) and W is f32, unless `m` asks for the window kernels
/// ([`MatmulKernel::TexWindows`]), and only if W fits one texture and the blocks and row
/// groups fit one dispatch. Every block is then in one dispatch (lavapipe forks and joins
/// its thread pool per dispatch: ViT-S's qkv projection was 72 of them), an invocation
/// takes three blocks (4 rows × 48 columns, each X fetch feeding three times the columns),
/// and no window bounds K: K > 2048 (ViT-L's MLP down projection) gets the four-row kernel
/// instead of 4-column blocks. docs/lavapipe.md (sessions 9, 10) has the measurements.
pub(super) fn reads_w_as_texture(ctx: &GpuContext, m: &Matmul, d: Dims) -> bool {
    let c = &ctx.caps;
    let max_groups = c.max_workgroups_per_dim as usize;
    // (RoPE's blocks pair half-heads, hd / 16 per head: as many as 16-column blocks)
    let blocks = d.n.div_ceil(16);
    reads_x_as_storage(ctx, m)
        && matches!(m.kernel, MatmulKernel::Auto | MatmulKernel::TexPairs)
        && !m.w_f16
        && c.max_storage_textures_per_stage >= 2
        && (d.n * d.k / 4) as u64 <= GpuContext::TEXTURE_WIDTH as u64 * c.max_texture_2d as u64
        && blocks <= max_groups
        && (d.batch * d.m).div_ceil(4 * W_GROUP) <= max_groups
}

/// Invocations per workgroup of the four-row kernels (one subgroup on lavapipe).
const W_GROUP: usize = 8;

/// Bytes per element of B on the device.
pub(super) fn esize(m: &Matmul) -> usize {
    if m.w_f16 {
        2
    } else {
        4
    }
}

/// A matmul with f16 activations: the texture path only (a tuned `Generic` choice is
/// ignored; `TexOneRow` is honoured for f32 outputs), every epilogue fused; f16 outputs
/// need 16-column blocks and an even N (and always run one row per invocation).
pub(super) fn gpu_matmul_f16_act(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let cols = texture_path_cols(ctx, m, d, inputs[1]);
    let ok = match cols {
        Some(cols) => {
            fuses_on_texture_path(m, d, cols)
                && (!m.out_f16
                    || (cols == 16 && d.n.is_multiple_of(2) && m.epi != Epilogue::Residual))
                && (!m.x_f16 || d.k.is_multiple_of(4))
        }
        None => false,
    };
    match cols {
        Some(cols) if ok => gpu_matmul_tex(ctx, m, d, cols, inputs, out),
        _ => Err(Error::Gpu(format!(
            "f16 activations need the texture matmul (subgroups of ≥ 8 lanes, 64 KiB \
             uniform bindings, x·Wᵀ with K % 4 == 0 and an even N, 8 columns × K in one \
             64 KiB window for an f16 output); this matmul {m:?} {d:?} cannot: use \
             --precision f16 or f32"
        ))),
    }
}

pub(super) fn gpu_matmul_tex(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    cols: usize,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let rows = d.batch * d.m;
    let texels = (rows * d.k / 4) as u64;
    let texture = if m.x_f16 {
        ctx.scratch_texture_f16(0, texels)?
    } else {
        ctx.scratch_texture(0, texels)?
    };
    let view = texture.create_view(&Default::default());
    let rows_per = tex_rows_per_invocation(m, cols);
    let storage_x = reads_x_as_storage(ctx, m);
    let entry: &'static str = match (cols, m.w_f16, m.epi) {
        _ if m.out_f16 && matches!(m.epi, Epilogue::Rope { .. }) => "matmul_tex16_rope_o16",
        _ if m.out_f16 => "matmul_tex16_o16",
        (16, false, Epilogue::None) if rows_per == 4 => "matmul_tex16r4",
        (16, false, Epilogue::Rope { .. }) if rows_per == 4 => "matmul_tex16r4_rope",
        (16, false, Epilogue::Residual) if rows_per == 4 => "matmul_tex16r4_res",
        (16, true, Epilogue::None) if rows_per == 4 => "matmul_tex16r4h",
        (16, true, Epilogue::Rope { .. }) if rows_per == 4 => "matmul_tex16r4h_rope",
        (16, true, Epilogue::Residual) if rows_per == 4 => "matmul_tex16r4h_res",
        (16, false, Epilogue::None) => "matmul_tex16",
        (16, false, Epilogue::Rope { .. }) => "matmul_tex16_rope",
        (16, false, Epilogue::Residual) => "matmul_tex16_res",
        (_, false, Epilogue::None) => "matmul_tex4",
        (_, false, _) => "matmul_tex4_res",
        (16, true, Epilogue::None) => "matmul_tex16h",
        (16, true, Epilogue::Rope { .. }) => "matmul_tex16h_rope",
        (16, true, Epilogue::Residual) => "matmul_tex16h_res",
        (_, true, Epilogue::None) => "matmul_tex4h",
        (_, true, _) => "matmul_tex4h_res",
    };
    if matches!(m.epi, Epilogue::Rope { .. }) && cols != 16 {
        return Err(Error::Gpu(format!(
            "{entry}: RoPE fuses only into 16-column blocks"
        )));
    }
    // Column blocks: (c0, c2) = the first columns of the two groups of 8 (16-column
    // blocks), or (c0, c0) for 4-column blocks. RoPE pairs group 1 = columns h·hd + j0 …
    // + 7 with group 2 = the same + hd/2, so every lane holds both halves of each pair.
    // (The W-texture kernels derive the same blocks from their workgroup's y index.)
    let half = match m.epi {
        Epilogue::Rope { heads, .. } => d.n / heads / 2,
        _ => 0,
    };
    let blocks: Vec<(usize, usize)> = match m.epi {
        Epilogue::Rope { heads, .. } => (0..heads)
            .flat_map(|h| {
                (0..half / 8).map(move |jb| (h * 2 * half + jb * 8, h * 2 * half + jb * 8 + half))
            })
            .collect(),
        _ if cols == 16 => (0..d.n.div_ceil(16))
            .map(|b| (b * 16, (b * 16 + 8).min(d.n - 1)))
            .collect(),
        _ => (0..d.n.div_ceil(cols))
            .map(|b| (b * cols, b * cols))
            .collect(),
    };
    let w_tex = cols == 16 && rows_per == 4 && reads_w_as_texture(ctx, m, d);
    if w_tex && blocks.len() != d.n.div_ceil(16) {
        return Err(Error::Gpu(format!(
            "{entry}: {} column blocks, expected {}",
            blocks.len(),
            d.n.div_ceil(16)
        )));
    }
    // vec4 stores need N % 4 == 0 (every four-row RoPE and residual form has it). Blocks
    // per invocation of the W-texture kernels: three (`matmul_tex48r4w*`, vec4 stores),
    // else two.
    let vec4_out = d.n.is_multiple_of(4);
    let per = if m.kernel == MatmulKernel::TexPairs || !vec4_out {
        2
    } else {
        3
    };
    let entry = match entry {
        "matmul_tex16r4" if w_tex && per == 3 => "matmul_tex48r4w",
        "matmul_tex16r4_rope" if w_tex && per == 3 => "matmul_tex48r4w_rope",
        "matmul_tex16r4_res" if w_tex && per == 3 => "matmul_tex48r4w_res",
        "matmul_tex16r4" if w_tex => "matmul_tex32r4w",
        "matmul_tex16r4_rope" if w_tex => "matmul_tex32r4w_rope",
        "matmul_tex16r4_res" if w_tex => "matmul_tex32r4w_res",
        // The plain window kernels store vec4s too where N % 4 == 0 (the RoPE and
        // residual forms always do).
        "matmul_tex16r4" if vec4_out => "matmul_tex16r4q",
        "matmul_tex16r4h" if vec4_out => "matmul_tex16r4qh",
        e => e,
    };
    let uniform = |binding, size: u64| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: std::num::NonZeroU64::new(size),
        },
        count: None,
    };
    let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let texture_entry = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: false },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let params_size = std::mem::size_of::<TexParams>() as u64;
    let storage_texture = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::StorageTexture {
            access: wgpu::StorageTextureAccess::ReadOnly,
            format: wgpu::TextureFormat::Rgba32Float,
            view_dimension: wgpu::TextureViewDimension::D2,
        },
        count: None,
    };
    // X and the epilogues' tables (RoPE's cos/sin, the residual) are read-only storage
    // textures in the storage-X form of the family, sampled textures otherwise.
    let operand_entry = |binding| {
        if storage_x {
            storage_texture(binding)
        } else {
            texture_entry(binding)
        }
    };
    let x_entry = operand_entry(2);
    let mut layout = vec![
        uniform(0, params_size),
        x_entry,
        storage(3, true),
        storage(4, false),
    ];
    if w_tex {
        layout.push(storage_texture(8));
    } else {
        layout.extend([uniform(1, WINDOW), uniform(5, WINDOW)]);
    }
    match m.epi {
        Epilogue::None => {}
        Epilogue::Rope { .. } => layout.extend([operand_entry(6), operand_entry(7)]),
        Epilogue::Residual => layout.extend([operand_entry(6), storage(7, true)]),
    }
    let (pipeline, bgl) = if m.out_f16 {
        let w16 = ("W16", m.w_f16 as u8 as f64);
        ctx.pipeline_with_layout_consts(&MATMUL_F16, entry, &[("ACT", m.act.code()), w16], &layout)?
    } else {
        let shader = if storage_x {
            MATMUL.storage_x()
        } else {
            &MATMUL
        };
        ctx.pipeline_with_layout_consts(shader, entry, &[("ACT", m.act.code())], &layout)?
    };
    // RoPE: the cos and sin tables (P, hd/2) stream through scratch textures of their own
    // (slots 3 and 4; attention uses 0–2), filled by the first dispatch's copies; the
    // residual likewise (slot 5).
    let nb = 2 + m.bias as usize;
    let tables = match m.epi {
        Epilogue::Rope { prefix, .. } => {
            let texels = ((d.m - prefix) * half / 4) as u64;
            let mut t = Vec::new();
            for (slot, buf) in [(3, inputs[nb]), (4, inputs[nb + 1])] {
                t.push(ctx.staged_f32(slot, buf, texels)?);
            }
            t
        }
        // The residual (rows, N) streams through scratch texture slot 5.
        Epilogue::Residual => {
            vec![ctx.staged_f32(5, inputs[nb], (rows * d.n / 4) as u64)?]
        }
        Epilogue::None => Vec::new(),
    };
    // One parameter block per column block, at the device's uniform offset alignment.
    let align = params_size.next_multiple_of((ctx.caps.uniform_offset_alignment as u64).max(16));
    let w_bytes = inputs[1].size();
    let align_w = (ctx.caps.uniform_offset_alignment as u64).max(16);
    // (one parameter block for the W-texture kernels: their blocks come from workgroup y)
    let param_blocks = if w_tex { 1 } else { blocks.len() };
    let mut param_bytes = vec![0u8; param_blocks * align as usize];
    let mut offsets = Vec::with_capacity(param_blocks);
    let (t, prefix) = match m.epi {
        Epilogue::Rope { prefix, .. } => (d.m, prefix),
        _ => (1, 0),
    };
    for (b, &(c0, c2)) in blocks.iter().take(param_blocks).enumerate() {
        let col_byte = (c0 * d.k * esize(m)) as u64;
        // The window starts at column c0, or earlier for the last blocks so it stays
        // inside the buffer (every buffer is at least one window large).
        let start = col_byte.min(w_bytes - WINDOW) / align_w * align_w;
        // The second group of 8 columns (16-column blocks) has a window of its own.
        let col_byte2 = (c2 * d.k * esize(m)) as u64;
        let start2 = col_byte2.min(w_bytes - WINDOW) / align_w * align_w;
        let p = TexParams {
            m: rows as u32,
            n: d.n as u32,
            k4: (d.k / 4) as u32,
            c0: c0 as u32,
            w_base: ((col_byte - start) / 16) as u32,
            has_bias: m.bias as u32,
            w_base2: ((col_byte2 - start2) / 16) as u32,
            // (the unclamped start of the second group; the shader clamps its columns)
            c2: if matches!(m.epi, Epilogue::Rope { .. }) {
                c2 as u32
            } else {
                (c0 + 8) as u32
            },
            t: t as u32,
            prefix: prefix as u32,
            q4: (half / 4) as u32,
            rj: if half > 0 {
                ((c0 % (2 * half)) / 4) as u32
            } else {
                0
            },
        };
        let at = b * align as usize;
        param_bytes[at..at + params_size as usize].copy_from_slice(bytemuck::bytes_of(&p));
        offsets.push(if w_tex {
            vec![at as u32]
        } else {
            vec![at as u32, start as u32, start2 as u32]
        });
    }
    let params = ctx.uniform(&param_bytes);
    let bias = if m.bias { inputs[2] } else { inputs[1] };
    let window = |buffer| {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: std::num::NonZeroU64::new(WINDOW),
        })
    };
    // W for the W-texture kernels: the weight buffer copied into scratch texture slot 6
    // before the dispatch (N·K/4 texels; 2.4 MB for ViT-S's MLP, against a matmul of
    // 10⁹ FLOPs — no weight is kept twice between runs).
    let w_texture = if w_tex {
        Some(ctx.staged_f32(6, inputs[1], (d.n * d.k / 4) as u64)?)
    } else {
        None
    };
    let mut entries = vec![
        wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params,
                offset: 0,
                size: std::num::NonZeroU64::new(params_size),
            }),
        },
        wgpu::BindGroupEntry {
            binding: 2,
            resource: wgpu::BindingResource::TextureView(&view),
        },
        wgpu::BindGroupEntry {
            binding: 3,
            resource: bias.as_entire_binding(),
        },
        wgpu::BindGroupEntry {
            binding: 4,
            resource: out.as_entire_binding(),
        },
    ];
    match &w_texture {
        Some((view, _)) => entries.push(wgpu::BindGroupEntry {
            binding: 8,
            resource: wgpu::BindingResource::TextureView(view),
        }),
        None => entries.extend([
            wgpu::BindGroupEntry {
                binding: 1,
                resource: window(inputs[1]),
            },
            wgpu::BindGroupEntry {
                binding: 5,
                resource: window(inputs[1]),
            },
        ]),
    }
    match m.epi {
        Epilogue::None => {}
        Epilogue::Rope { .. } => {
            for (i, (v, _)) in tables.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: 6 + i as u32,
                    resource: wgpu::BindingResource::TextureView(v),
                });
            }
        }
        Epilogue::Residual => {
            entries.push(wgpu::BindGroupEntry {
                binding: 6,
                resource: wgpu::BindingResource::TextureView(&tables[0].0),
            });
            entries.push(wgpu::BindGroupEntry {
                binding: 7,
                resource: inputs[nb + 1].as_entire_binding(),
            });
        }
    }
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(entry),
        layout: &bgl,
        entries: &entries,
    });
    let copy = std::sync::Arc::new(crate::gpu::TextureCopy {
        buffer: inputs[0].clone(),
        texture,
        width: GpuContext::TEXTURE_WIDTH,
        texel_bytes: if m.x_f16 { 8 } else { 16 },
        texels,
        buffer_offset: 0,
        dst_texel: 0,
    });
    let mut first_copies = vec![copy];
    first_copies.extend(tables.iter().map(|(_, c)| c.clone()));
    if let Some((_, copy)) = w_texture {
        first_copies.push(copy);
        // Every column block in one dispatch: x = groups of W_GROUP × 4 rows, y = `per`
        // 16-column blocks (the last past the last block when their count is no multiple).
        let groups = rows.div_ceil(4 * W_GROUP) as u32;
        return Ok(vec![Dispatch {
            name: entry,
            before: Vec::new(),
            after: Vec::new(),
            pipeline,
            bind_group,
            workgroups: [groups, blocks.len().div_ceil(per) as u32, 1],
            offsets: offsets.swap_remove(0),
            copies: first_copies,
        }]);
    }
    // (the four-row kernels have workgroups of 8 invocations, the others of 64)
    let wg_size = if rows_per == 4 { W_GROUP } else { 64 };
    let workgroups = ctx.grid(rows.div_ceil(rows_per).div_ceil(wg_size) as u64)?;
    Ok(offsets
        .into_iter()
        .enumerate()
        .map(|(i, offsets)| Dispatch {
            name: entry,
            before: Vec::new(),
            after: Vec::new(),
            pipeline: pipeline.clone(),
            bind_group: bind_group.clone(),
            workgroups,
            offsets,
            copies: if i == 0 {
                first_copies.clone()
            } else {
                Vec::new()
            },
        })
        .collect())
}
