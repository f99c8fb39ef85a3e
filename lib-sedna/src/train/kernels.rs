//! CPU kernels the candle backend adds as candle custom ops, because candle's own backward
//! passes for them are slow on the CPU (`conv_transpose2d` is a dot product per output
//! pixel; max pooling's gradient takes five full-size tensor operations):
//! - [`Conv2d`]: a convolution as patches (im2col) times the kernel, one matrix product by
//!   candle's GEMM in each direction, as a single autograd node;
//! - [`MaxPool`]: max pooling with non-overlapping windows whose gradient goes to the
//!   first maximum of each window (PyTorch's choice), in one pass.
//!
//! All are safe Rust over contiguous f32 buffers, parallel over the batch with rayon.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, bail};
use rayon::prelude::*;

/// Geometry of a 2-D convolution's patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patches {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel: [usize; 2],
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    /// top, left, bottom, right
    pub(crate) pads: [usize; 4],
}

impl Patches {
    pub(crate) fn out_height(&self) -> usize {
        (self.height + self.pads[0] + self.pads[2])
            .saturating_sub(self.dilation * (self.kernel[0] - 1) + 1)
            / self.stride
            + 1
    }
    pub(crate) fn out_width(&self) -> usize {
        (self.width + self.pads[1] + self.pads[3])
            .saturating_sub(self.dilation * (self.kernel[1] - 1) + 1)
            / self.stride
            + 1
    }
    /// Values per patch (a row of the patch matrix).
    pub(crate) fn patch_len(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Visits the row of kernel tap `tap` (`(c·KH + ky)·KW + kx`) in one sample's patch
    /// matrix (one column per output position) as runs: `f(dst, src, len)` says that `len`
    /// consecutive outputs starting at column `dst` read the sample's input from offset `src`
    /// on, `stride` apart. Padding positions are not visited (they stay zero).
    fn tap_runs(&self, tap: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = (self.out_height(), self.out_width());
        let [kh, kw] = self.kernel;
        let (c, ky, kx) = (tap / (kh * kw), (tap / kw) % kh, tap % kw);
        let (s, d) = (self.stride as isize, self.dilation as isize);
        let (top, left) = (self.pads[0] as isize, self.pads[1] as isize);
        let (h, w) = (self.height as isize, self.width as isize);
        // Output columns whose input column is inside: 0 <= ox·s + kx·d − left < w.
        let offset = kx as isize * d - left;
        let lo = if offset >= 0 {
            0
        } else {
            (-offset + s - 1) / s
        };
        let hi = if w - 1 - offset < 0 {
            0
        } else {
            ((w - 1 - offset) / s + 1).min(ow as isize)
        };
        if lo >= hi {
            return;
        }
        for oy in 0..oh {
            let iy = oy as isize * s + ky as isize * d - top;
            if iy < 0 || iy >= h {
                continue;
            }
            let src = ((c as isize * h + iy) * w + lo * s + offset) as usize;
            f(oy * ow + lo as usize, src, (hi - lo) as usize);
        }
    }
}

fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// `[N, C, H, W]` → `[C·KH·KW, N·OH·OW]`: one row per kernel tap, one column per output
/// position of every sample (so a convolution of the whole batch is one matrix product).
fn im2col(p: &Patches, x: &[f32], n: usize) -> Vec<f32> {
    let image = p.channels * p.height * p.width;
    let l = p.out_height() * p.out_width();
    let stride = p.stride;
    let mut out = vec![0f32; p.patch_len() * n * l];
    out.par_chunks_mut(n * l)
        .enumerate()
        .for_each(|(tap, row)| {
            for (sample, dst) in row.chunks_exact_mut(l).enumerate() {
                let src = &x[sample * image..(sample + 1) * image];
                p.tap_runs(tap, |d, s, len| {
                    if stride == 1 {
                        dst[d..d + len].copy_from_slice(&src[s..s + len]);
                    } else {
                        for (i, v) in dst[d..d + len].iter_mut().enumerate() {
                            *v = src[s + i * stride];
                        }
                    }
                })
            }
        });
    out
}

/// The adjoint of [`im2col`]: patches back to `[N, C, H, W]`, overlapping ones summed.
fn col2im(p: &Patches, cols: &[f32], n: usize) -> Vec<f32> {
    let image = p.channels * p.height * p.width;
    let l = p.out_height() * p.out_width();
    let stride = p.stride;
    let mut out = vec![0f32; n * image];
    out.par_chunks_mut(image)
        .enumerate()
        .for_each(|(sample, dst)| {
            for tap in 0..p.patch_len() {
                let src = &cols[(tap * n + sample) * l..(tap * n + sample + 1) * l];
                p.tap_runs(tap, |c, x, len| {
                    if stride == 1 {
                        for (a, b) in dst[x..x + len].iter_mut().zip(&src[c..c + len]) {
                            *a += b;
                        }
                    } else {
                        for (i, v) in src[c..c + len].iter().enumerate() {
                            dst[x + i * stride] += v;
                        }
                    }
                })
            }
        });
    out
}

/// `[A, B, L]` ↔ `[B, A, L]`: swaps the two outer axes of blocks of `l` values.
fn swap_outer(values: &[f32], a: usize, b: usize, l: usize) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = (0..b)
        .into_par_iter()
        .map(|j| {
            let mut block = Vec::with_capacity(a * l);
            for i in 0..a {
                block.extend_from_slice(&values[(i * b + j) * l..(i * b + j + 1) * l]);
            }
            block
        })
        .collect();
    blocks.concat()
}

/// Runs `f` on a tensor's values without copying them out (the tensor is made contiguous
/// first if it is not).
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(contiguous_f32(cpu, layout, "read")?)),
        _ => bail!("the candle backend computes on the CPU"),
    }
}

fn cpu_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
}

/// A 2-D convolution with bias, one group: (`x` `[N, C, H, W]`, `w` `[O, C, KH, KW]`, `b`
/// `[O]`) → `[N, O, OH, OW]`, as kernel × patches of the whole batch (im2col and one GEMM). One autograd
/// node: the patch matrix never enters candle's graph (it is kept for the backward pass),
/// and the input's gradient is skipped when the input needs none (the data).
pub(crate) struct Conv2d {
    patches: Patches,
    /// The forward pass's patches, `[K, N·L]`, reused by the backward pass.
    cols: std::sync::Mutex<Option<Tensor>>,
}

impl Conv2d {
    pub(crate) fn new(patches: Patches) -> Self {
        Conv2d {
            patches,
            cols: std::sync::Mutex::new(None),
        }
    }

    fn check(&self, x: &Layout, w: &Layout, b: &Layout) -> candle_core::Result<(usize, usize)> {
        let p = &self.patches;
        let (xd, wd) = (x.dims(), w.dims());
        if xd.len() != 4 || xd[1..] != [p.channels, p.height, p.width] {
            bail!("convolution input {xd:?} does not match {p:?}");
        }
        if wd.len() != 4 || wd[1..] != [p.channels, p.kernel[0], p.kernel[1]] {
            bail!(
                "convolution kernel {wd:?} does not match the input's {} channels",
                p.channels
            );
        }
        if b.dims() != [wd[0]] {
            bail!(
                "convolution bias {:?} does not match {} output channels",
                b.dims(),
                wd[0]
            );
        }
        Ok((xd[0], wd[0]))
    }

    fn cols(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let cached = self.cols.lock().ok().and_then(|mut c| c.take());
        match cached {
            Some(cols) => Ok(cols),
            None => {
                let p = &self.patches;
                let n = x.dim(0)?;
                let cols = with_values(x, |xs| im2col(p, xs, n))?;
                cpu_tensor(cols, (p.patch_len(), n * p.out_height() * p.out_width()))
            }
        }
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "sedna-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, o) = self.check(l1, l2, l3)?;
        let p = &self.patches;
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let bias = contiguous_f32(s3, l3, self.name())?;
        let (l, k) = (p.out_height() * p.out_width(), p.patch_len());
        let cols = cpu_tensor(im2col(p, x, n), (k, n * l))?;
        let kernel = cpu_tensor(w.to_vec(), (o, k))?;
        // [O, N·L] → [N, O, L], the bias added.
        let mut out = with_values(&kernel.matmul(&cols)?, |y| swap_outer(y, o, n, l))?;
        out.par_chunks_mut(l).enumerate().for_each(|(row, values)| {
            let b = bias[row % o];
            values.iter_mut().for_each(|v| *v += b);
        });
        if let Ok(mut cache) = self.cols.lock() {
            *cache = Some(cols);
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, o, p.out_height(), p.out_width())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = &self.patches;
        let (n, o) = (x.dim(0)?, w.dim(0)?);
        let (l, k) = (p.out_height() * p.out_width(), p.patch_len());
        // The output gradient as [O, N·L].
        let g = cpu_tensor(with_values(grad, |g| swap_outer(g, n, o, l))?, (o, n * l))?;
        let grad_b = b.track_op().then(|| g.sum(1)).transpose()?;
        let grad_w = if w.track_op() {
            let cols = self.cols(x)?; // [K, N·L]
            Some(g.matmul(&cols.t()?)?.reshape(w.dims())?)
        } else {
            None
        };
        let grad_x = if x.track_op() {
            let kernel = w.contiguous()?.reshape((o, k))?;
            let gcols = kernel.t()?.matmul(&g)?; // [K, N·L]
            Some(cpu_tensor(
                with_values(&gcols, |c| col2im(p, c, n))?,
                x.dims(),
            )?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// Max pooling of `[N, C, H, W]` with `kernel`-sized windows that do not overlap (stride =
/// kernel, no padding; rows and columns that do not fill a window are dropped). With `relu`,
/// a ReLU is applied first — computed as `relu(max(x))`, which is the same and touches a
/// quarter of the values. The forward pass keeps each window's winner for the backward pass.
pub(crate) struct MaxPool {
    kernel: [usize; 2],
    relu: bool,
    /// Per output, the index of its input within the plane (`u32::MAX`: a ReLU cut it).
    winners: std::sync::Mutex<Option<Vec<u32>>>,
}

/// A winner index meaning "no input gets the gradient".
const CUT: u32 = u32::MAX;

impl MaxPool {
    pub(crate) fn new(kernel: [usize; 2], relu: bool) -> Self {
        MaxPool {
            kernel,
            relu,
            winners: std::sync::Mutex::new(None),
        }
    }

    fn geometry(&self, dims: &[usize]) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
        let [n, c, h, w] = dims else {
            bail!("max pooling needs [N, C, H, W], got {dims:?}");
        };
        let [kh, kw] = self.kernel;
        if kh == 0 || kw == 0 || *h < kh || *w < kw || h * w >= CUT as usize {
            bail!("max pooling window {:?} does not fit {dims:?}", self.kernel);
        }
        Ok((*n * *c, *h, *w, *h / kh, *w / kw))
    }

    /// Pools one plane: the outputs and the index of each output's input (the first maximum of
    /// its window; NaN wins, so it propagates).
    fn pool_plane(
        &self,
        plane: &[f32],
        w: usize,
        oh: usize,
        ow: usize,
        out: &mut [f32],
        winners: &mut [u32],
    ) {
        let [kh, kw] = self.kernel;
        for oy in 0..oh {
            let out_row = &mut out[oy * ow..(oy + 1) * ow];
            let win_row = &mut winners[oy * ow..(oy + 1) * ow];
            // Each window's first value, then the others (selects, not branches: pooled values
            // compare unpredictably).
            let first = oy * kh * w;
            for (ox, (o, i)) in out_row.iter_mut().zip(win_row.iter_mut()).enumerate() {
                *o = plane[first + ox * kw];
                *i = (first + ox * kw) as u32;
            }
            for ky in 0..kh {
                let y = oy * kh + ky;
                let row = &plane[y * w..y * w + ow * kw];
                for (ox, (window, (o, i))) in row
                    .chunks_exact(kw)
                    .zip(out_row.iter_mut().zip(win_row.iter_mut()))
                    .enumerate()
                {
                    for (kx, &v) in window.iter().enumerate().skip(usize::from(ky == 0)) {
                        let better = v > *o || (v.is_nan() && !o.is_nan());
                        let at = (y * w + ox * kw + kx) as u32;
                        *o = if better { v } else { *o };
                        *i = if better { at } else { *i };
                    }
                }
            }
            if self.relu {
                for (o, i) in out_row.iter_mut().zip(win_row.iter_mut()) {
                    let cut = *o <= 0.0;
                    *o = if cut { 0.0 } else { *o };
                    *i = if cut { CUT } else { *i };
                }
            }
        }
    }

    fn forward(&self, x: &[f32], dims: &[usize]) -> candle_core::Result<(Vec<f32>, Vec<u32>)> {
        let (planes, h, w, oh, ow) = self.geometry(dims)?;
        let mut out = vec![0f32; planes * oh * ow];
        let mut winners = vec![0u32; planes * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(winners.par_chunks_mut(oh * ow))
            .zip(x.par_chunks(h * w))
            .for_each(|((o, i), plane)| self.pool_plane(plane, w, oh, ow, o, i));
        Ok((out, winners))
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "sedna-maxpool"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.dims().to_vec();
        let (out, winners) = self.forward(x, &dims)?;
        if let Ok(mut cache) = self.winners.lock() {
            *cache = Some(winners);
        }
        let (_, _, _, oh, ow) = self.geometry(&dims)?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((dims[0], dims[1], oh, ow)),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims().to_vec();
        let (planes, h, w, oh, ow) = self.geometry(&dims)?;
        let winners = match self.winners.lock().ok().and_then(|mut c| c.take()) {
            Some(w) => w,
            None => with_values(arg, |x| self.forward(x, &dims))??.1,
        };
        let out = with_values(grad, |g| {
            let mut out = vec![0f32; planes * h * w];
            out.par_chunks_mut(h * w)
                .zip(winners.par_chunks(oh * ow).zip(g.par_chunks(oh * ow)))
                .for_each(|(dst, (win, g))| {
                    for (&i, &g) in win.iter().zip(g) {
                        if i != CUT {
                            dst[i as usize] = g;
                        }
                    }
                });
            out
        })?;
        Ok(Some(cpu_tensor(out, dims)?))
    }
}

/// A 2-D convolution (one group) with optional bias: `x` `[N, C, H, W]`, `w` `[O, C, KH, KW]`
/// → `[N, O, OH, OW]`, differentiable in all three.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    dilation: usize,
    pads: [usize; 4],
) -> candle_core::Result<Tensor> {
    let (_, c, height, width) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    if stride == 0 || dilation == 0 {
        bail!("stride and dilation must be at least 1");
    }
    let patches = Patches {
        channels: c,
        height,
        width,
        kernel: [kh, kw],
        stride,
        dilation,
        pads,
    };
    let b = match b {
        Some(b) => b.flatten_all()?,
        None => Tensor::zeros(o, candle_core::DType::F32, x.device())?,
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d::new(patches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn convolution_and_its_gradients_match_candles_own() {
        for (pads, stride, dilation) in [
            ([2, 2, 2, 2], 1, 1),
            ([0, 0, 0, 0], 2, 1),
            ([1, 1, 1, 1], 1, 2),
        ] {
            let x = Var::from_tensor(&random(&[3, 4, 9, 9], 1)).unwrap();
            let w = Var::from_tensor(&random(&[5, 4, 3, 3], 2)).unwrap();
            let b = Var::from_tensor(&random(&[5], 5)).unwrap();
            let ours = conv2d(&x, &w, Some(&b), stride, dilation, pads).unwrap();
            let theirs = x
                .conv2d(&w, pads[0], stride, dilation, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(close(&ours, &theirs) < 1e-5);
            // Gradients of the same scalar (a weighted sum) through both.
            let weights = random(ours.dims(), 3);
            let g1 = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(close(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
            assert!(close(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-4);
            assert!(close(g1.get(&b).unwrap(), g2.get(&b).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn max_pooling_sends_the_gradient_to_the_first_maximum() {
        let x = Var::from_tensor(
            &Tensor::new(
                &[[[[1f32, 3.0, 2.0], [3.0, 0.0, 5.0], [9.0, 9.0, 9.0]]]],
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
        let y = x.apply_op1(MaxPool::new([2, 2], false)).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [3.0]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);

        let x = random(&[2, 3, 8, 8], 4);
        let ours = x.apply_op1(MaxPool::new([2, 2], false)).unwrap();
        let theirs = x.max_pool2d_with_stride((2, 2), (2, 2)).unwrap();
        assert!(close(&ours, &theirs) == 0.0);

        // With the ReLU folded in: the same values and gradients as relu, then pool.
        let x = Var::from_tensor(&random(&[2, 3, 8, 8], 5)).unwrap();
        let fused = x.apply_op1(MaxPool::new([2, 2], true)).unwrap();
        let plain = x
            .relu()
            .unwrap()
            .apply_op1(MaxPool::new([2, 2], false))
            .unwrap();
        assert!(close(&fused, &plain) == 0.0);
        let weights = random(fused.dims(), 6);
        let g1 = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (plain * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(close(g1.get(&x).unwrap(), g2.get(&x).unwrap()) == 0.0);
    }
}
