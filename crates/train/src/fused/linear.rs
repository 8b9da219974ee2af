//! [`BufferedLinear`]: `act(x·Wᵀ + b)` for a layer whose base trains, with a hand-written backward that
//! writes dW and db into the [`ParamStore`](super::ParamStore)'s buffers (candle's autograd never forms
//! them: no per-step weight-sized allocation, zero-fill or add) and returns only dx, and that only when x
//! depends on a variable. When the store is armed for the step ([`ParamStore::arm`](super::ParamStore::arm)),
//! the backward instead applies Adam to W itself, block by block as dW is formed, so dW never reaches
//! memory.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use lora::bridge::{cpu_mat as mat, cpu_slice, Held};
use lora::Activation;
use lora_kernels::{linear_backward, linear_forward, output_grad, LinearGrads, LinearRef, MatRef, WeightRef};

use super::adam::WeightAdamOp;
use super::k;
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
        let b = cpu_slice(s3, l3)?;
        let mut y = vec![0f32; x.rows() * w.rows()];
        k(linear_forward(x, &LinearRef { weight: WeightRef::F32(w), bias: Some(b), adapter: None }, self.act, &mut y))?;
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
        let (hx, hy, hg) = (Held::new(x), Held::new(res), Held::new(&grad));
        let xm = hx.mat()?;
        let mut dx = x.track_op().then(|| vec![0f32; xm.rows() * xm.cols()]);
        let y = if self.act == Activation::Relu { Some(hy.slice()?) } else { None };
        let gp = k(output_grad(self.act, y, hg.mat()?))?; // (n, out), ReLU-masked
        let gm = k(MatRef::row_major(&gp, xm.rows(), grad.dim(1)?))?;
        // Armed by the store for this step: the layer applies Adam to W itself, after dx (which needs W as
        // it was); else dW goes to its buffer like db.
        let update = self.dw.take_update()?;
        {
            let (hw, hb) = (Held::new(w), Held::new(b));
            let p = LinearRef { weight: WeightRef::F32(hw.mat()?), bias: Some(hb.slice()?), adapter: None };
            self.db.write(|db, acc_b| match update {
                Some(_) => {
                    let grads = LinearGrads { dx: dx.as_deref_mut(), db: Some(db), accumulate: acc_b, ..Default::default() };
                    k(linear_backward(xm, &p, Activation::Identity, None, gm, grads))
                }
                None => self.dw.write(|dw, acc_w| {
                    // Both buffers are written in the same step, so they agree on overwrite vs add.
                    let accumulate = acc_w && acc_b;
                    let grads = LinearGrads { dx: dx.as_deref_mut(), dw: Some(dw), db: Some(db), accumulate, ..Default::default() };
                    k(linear_backward(xm, &p, Activation::Identity, None, gm, grads))
                }),
            })?;
        } // W's read lock ends here.
        if let Some(update) = update {
            let mut moments = update.moments.lock().map_err(|_| candle_core::Error::Msg("Adam moments lock poisoned".into()))?;
            w.inplace_op1(&WeightAdamOp { g: gm, x: xm, moments: Mutex::new(&mut *moments), step: update.step })?;
        }
        let dx = dx.map(|v| Tensor::from_vec(v, (xm.rows(), xm.cols()), &candle_core::Device::Cpu)).transpose()?;
        Ok((dx, None, None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rand_t(shape: &[usize], seed: u64) -> Tensor {
        let mut g = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn buffered_linear_writes_the_gradients_candle_autograd_computes() {
        let (n, inp, out) = (8, 31, 13);
        let x = Var::from_tensor(&rand_t(&[n, inp], 1)).unwrap();
        let w = Var::from_tensor(&rand_t(&[out, inp], 2)).unwrap();
        let b = Var::from_tensor(&rand_t(&[out], 3)).unwrap();
        let c = rand_t(&[n, out], 4);
        let (dw, db) = (Arc::new(GradBuffer::new(out * inp)), Arc::new(GradBuffer::new(out)));
        let op = BufferedLinear::new(Activation::Relu, dw.clone(), db.clone());
        let y = x.as_tensor().apply_op3(w.as_tensor(), b.as_tensor(), op).unwrap();
        let g = (y.sqr().unwrap() * &c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(w.as_tensor()).is_none() && g.get(b.as_tensor()).is_none(), "weight gradients must bypass candle's store");
        let reference = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap().relu().unwrap();
        let gr = (reference.sqr().unwrap() * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pairs = [
            ("y", flat(&y), flat(&reference)),
            ("dx", flat(g.get(x.as_tensor()).unwrap()), flat(gr.get(x.as_tensor()).unwrap())),
            ("dW", dw.values().unwrap(), flat(gr.get(w.as_tensor()).unwrap())),
            ("db", db.values().unwrap(), flat(gr.get(b.as_tensor()).unwrap())),
        ];
        for (what, ours, theirs) in pairs {
            // Reordered f32 sums of ≤ 31 terms of size ≲ 10: 1e-5 relative to the largest value.
            let scale = 1.0 + theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, t) in ours.iter().zip(&theirs) {
                assert!((a - t).abs() <= 1e-5 * scale, "{what}: {a} vs {t}");
            }
        }
    }
}
