//! [`BufferedLinear`]: `act(x·Wᵀ + b)` for a layer whose base trains, with a hand-written backward that
//! writes dW and db into the [`ParamStore`](super::ParamStore)'s buffers (candle's autograd never forms
//! them: no per-step weight-sized allocation, zero-fill or add) and returns only dx, and that only when x
//! depends on a variable.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use lora::fused::{linear_backward, linear_forward, Held, LinearGrads, LinearRef, MatRef};
use lora::Activation;

use super::store::GradBuffer;

/// The fused op; apply it as `x.apply_op3(weight, bias, op)`.
pub struct BufferedLinear {
    act: Activation,
    dw: Arc<GradBuffer>,
    db: Arc<GradBuffer>,
}

impl BufferedLinear {
    /// An op writing the weight gradient to `dw` and the bias gradient to `db`.
    pub fn new(act: Activation, dw: Arc<GradBuffer>, db: Arc<GradBuffer>) -> Self {
        BufferedLinear { act, dw, db }
    }
}

fn mat<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<MatRef<'a>> {
    match (l.dims(), l.stride()) {
        ([r, c], [rs, cs]) => MatRef::new(&s.as_slice::<f32>()?[l.start_offset()..], *r, *c, *rs, *cs),
        (d, _) => candle_core::bail!("BufferedLinear: expected a 2-D tensor, got {d:?}"),
    }
}

impl CustomOp3 for BufferedLinear {
    fn name(&self) -> &'static str {
        "buffered-linear"
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
        let (x, w) = (mat(s1, l1)?, mat(s2, l2)?);
        if !l3.is_contiguous() || l3.dims() != [w.rows()] {
            candle_core::bail!("BufferedLinear: bias of shape {:?} for {} outputs", l3.dims(), w.rows())
        }
        let b = &s3.as_slice::<f32>()?[l3.start_offset()..l3.start_offset() + w.rows()];
        let mut y = vec![0f32; x.rows() * w.rows()];
        linear_forward(x, &LinearRef { weight: w, bias: Some(b), adapter: None }, self.act, &mut y)?;
        Ok((CpuStorage::F32(y), Shape::from((x.rows(), w.rows()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (hx, hw, hb, hy, hg) = (Held::new(x), Held::new(w), Held::new(b), Held::new(res), Held::new(&grad));
        let (xm, wm) = (hx.mat()?, hw.mat()?);
        let p = LinearRef { weight: wm, bias: Some(hb.slice()?), adapter: None };
        let mut dx = x.track_op().then(|| vec![0f32; xm.rows() * xm.cols()]);
        let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
        self.dw.write(|dw, acc_w| {
            self.db.write(|db, acc_b| {
                // Both buffers are written in the same step, so they agree on overwrite vs add.
                let grads =
                    LinearGrads { dx: dx.as_deref_mut(), dw: Some(dw), db: Some(db), accumulate: acc_w && acc_b, ..Default::default() };
                linear_backward(xm, &p, self.act, y, hg.mat()?, grads)
            })
        })?;
        let dx = dx.map(|v| Tensor::from_vec(v, (xm.rows(), xm.cols()), &candle_core::Device::Cpu)).transpose()?;
        Ok((dx, None, None))
    }
}
