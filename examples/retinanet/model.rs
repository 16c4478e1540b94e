//! A small RetinaNet in candle-nn: compact conv backbone (GroupNorm + ReLU), a feature pyramid
//! over strides 8/16/32, and classification / box subnets shared across levels.
#![allow(dead_code)]

use candle_core::{Module, Result, Tensor};
use candle_nn::{GroupNorm, Init, VarBuilder};

/// Shape of the network.
#[derive(Clone, Copy, Debug)]
pub struct ModelConfig {
    /// Number of foreground classes C (the classifier has A·C sigmoid outputs per location).
    pub num_classes: usize,
    /// Anchors per location A.
    pub num_anchors: usize,
    /// Channels of the stem (stride 2 and 4).
    pub stem: usize,
    /// Backbone channels at strides 8, 16, 32.
    pub widths: [usize; 3],
    /// FPN and head channels.
    pub fpn: usize,
    /// 3×3 conv + GN + ReLU layers in each subnet before its predictor (the paper uses 4).
    pub head_convs: usize,
    /// Prior probability of the classifier's bias init, π (the paper: 0.01).
    pub prior: f64,
}

/// GroupNorm groups for `ch` channels: 8 where possible, else the largest divisor ≤ 8.
fn groups(ch: usize) -> usize {
    (1..=8).rev().find(|&g| ch.is_multiple_of(g)).unwrap_or(1)
}

/// A convolution with `k ∈ {1, 3}` (padding `k / 2`) and stride 1 or 2, computed as im2col
/// (shifted views of the padded input) and one batched matmul. Same maths and weight layout
/// `[O, I, k, k]` as `candle_nn::Conv2d`, but its backward is matmuls too: candle's CPU conv
/// backward runs a direct `conv_transpose2d`, which made training several times slower.
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    k: usize,
    stride: usize,
}

impl Conv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: Option<f64>,
        std: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = match std {
            Some(stdev) => Init::Randn { mean: 0.0, stdev },
            None => candle_nn::init::DEFAULT_KAIMING_NORMAL,
        };
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
        let bias = match bias {
            Some(b) => Some(vb.get_with_hints(cout, "bias", Init::Const(b))?),
            None => None,
        };
        Ok(Self {
            weight,
            bias,
            k,
            stride,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let cout = self.weight.dim(0)?;
        let s = self.stride;
        let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let cols = if self.k == 1 {
            let x = if s == 1 {
                x.clone()
            } else {
                subsample(x, 0, 0, ho, wo, s)?
            };
            x.reshape((b, cin, ho * wo))?
        } else {
            let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
            let mut taps = Vec::with_capacity(9);
            for ky in 0..3 {
                for kx in 0..3 {
                    taps.push(subsample(&xp, ky, kx, ho, wo, s)?);
                }
            }
            // [B, I, 9, ho, wo] -> [B, I·9, ho·wo]: row i·9 + ky·3 + kx, the weight's layout
            Tensor::stack(&taps, 2)?.reshape((b, cin * 9, ho * wo))?
        };
        let wmat = self.weight.reshape((cout, cin * self.k * self.k))?;
        let y = wmat.broadcast_matmul(&cols)?.reshape((b, cout, ho, wo))?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, cout, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `x[:, :, oy + s·i, ox + s·j]` for `i < ho`, `j < wo` (stride 1 or 2; even sizes for 2).
fn subsample(x: &Tensor, oy: usize, ox: usize, ho: usize, wo: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return x.narrow(2, oy, ho)?.narrow(3, ox, wo);
    }
    let (b, c, _, _) = x.dims4()?;
    x.narrow(2, oy, s * ho)?
        .narrow(3, ox, s * wo)?
        .reshape((b, c, ho, s, wo, s))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, ho, wo))
}

/// conv 3×3 (no bias) → GroupNorm → ReLU.
struct ConvGn {
    conv: Conv,
    gn: GroupNorm,
}

impl ConvGn {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(cin, cout, 3, stride, None, None, vb.pp("conv"))?,
            gn: candle_nn::group_norm(groups(cout), cout, 1e-5, vb.pp("gn"))?,
        })
    }
}

impl Module for ConvGn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.gn.forward(&self.conv.forward(x)?)?.relu()
    }
}

/// A subnet: `head_convs` ConvGn layers and a 3×3 predictor with `out` channels per location.
struct Subnet {
    layers: Vec<ConvGn>,
    pred: Conv,
}

impl Subnet {
    fn new(cfg: &ModelConfig, out: usize, bias: f64, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.head_convs)
            .map(|i| ConvGn::new(cfg.fpn, cfg.fpn, 1, vb.pp(format!("conv{i}"))))
            .collect::<Result<Vec<_>>>()?;
        // predictor: N(0, 0.01) weights as in the paper, bias given
        let pred = Conv::new(cfg.fpn, out, 3, 1, Some(bias), Some(0.01), vb.pp("pred"))?;
        Ok(Self { layers, pred })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        self.pred.forward(&h)
    }
}

/// The detector.
pub struct RetinaNet {
    pub cfg: ModelConfig,
    stem: Vec<ConvGn>,
    c3: Vec<ConvGn>,
    c4: Vec<ConvGn>,
    c5: Vec<ConvGn>,
    lateral: Vec<Conv>,
    smooth: Vec<Conv>,
    cls: Subnet,
    reg: Subnet,
}

fn seq(layers: &[ConvGn], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for l in layers {
        h = l.forward(&h)?;
    }
    Ok(h)
}

impl RetinaNet {
    pub fn new(cfg: ModelConfig, vb: VarBuilder) -> Result<Self> {
        let [w3, w4, w5] = cfg.widths;
        let s = cfg.stem;
        let stem = vec![
            ConvGn::new(3, s, 2, vb.pp("stem0"))?,     // /2
            ConvGn::new(s, 2 * s, 2, vb.pp("stem1"))?, // /4
        ];
        let c3 = vec![
            ConvGn::new(2 * s, w3, 2, vb.pp("c3a"))?, // /8
            ConvGn::new(w3, w3, 1, vb.pp("c3b"))?,
        ];
        let c4 = vec![
            ConvGn::new(w3, w4, 2, vb.pp("c4a"))?, // /16
            ConvGn::new(w4, w4, 1, vb.pp("c4b"))?,
        ];
        let c5 = vec![ConvGn::new(w4, w5, 2, vb.pp("c5a"))?]; // /32
        let mut lateral = Vec::new();
        let mut smooth = Vec::new();
        for (i, &w) in cfg.widths.iter().enumerate() {
            let f = cfg.fpn;
            lateral.push(Conv::new(
                w,
                f,
                1,
                1,
                Some(0.0),
                None,
                vb.pp(format!("lat{i}")),
            )?);
            smooth.push(Conv::new(
                f,
                f,
                3,
                1,
                Some(0.0),
                None,
                vb.pp(format!("fpn{i}")),
            )?);
        }
        let a = cfg.num_anchors;
        let bias = -((1.0 - cfg.prior) / cfg.prior).ln(); // σ(bias) = π at init
        let cls = Subnet::new(&cfg, a * cfg.num_classes, bias, vb.pp("cls"))?;
        let reg = Subnet::new(&cfg, a * 4, 0.0, vb.pp("box"))?;
        Ok(Self {
            cfg,
            stem,
            c3,
            c4,
            c5,
            lateral,
            smooth,
            cls,
            reg,
        })
    }

    /// Pyramid features P3, P4, P5 (strides 8, 16, 32).
    pub fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let h = seq(&self.stem, x)?;
        let c3 = seq(&self.c3, &h)?;
        let c4 = seq(&self.c4, &c3)?;
        let c5 = seq(&self.c5, &c4)?;
        let l5 = self.lateral[2].forward(&c5)?;
        let (_, _, h4, w4) = c4.dims4()?;
        let l4 = (self.lateral[1].forward(&c4)? + l5.upsample_nearest2d(h4, w4)?)?;
        let (_, _, h3, w3) = c3.dims4()?;
        let l3 = (self.lateral[0].forward(&c3)? + l4.upsample_nearest2d(h3, w3)?)?;
        Ok(vec![
            self.smooth[0].forward(&l3)?,
            self.smooth[1].forward(&l4)?,
            self.smooth[2].forward(&l5)?,
        ])
    }

    /// `(class logits [B, N, C], box deltas [B, N, 4])` with N anchors in
    /// `AnchorGenerator` order (level, y, x, anchor).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let feats = self.features(x)?;
        let mut cls = Vec::new();
        let mut reg = Vec::new();
        for f in &feats {
            cls.push(flatten(&self.cls.forward(f)?, self.cfg.num_classes)?);
            reg.push(flatten(&self.reg.forward(f)?, 4)?);
        }
        Ok((Tensor::cat(&cls, 1)?, Tensor::cat(&reg, 1)?))
    }
}

/// `[B, A·K, H, W]` → `[B, H·W·A, K]`.
fn flatten(t: &Tensor, k: usize) -> Result<Tensor> {
    let (b, _, h, w) = t.dims4()?;
    t.permute((0, 2, 3, 1))?
        .reshape((b, h * w * (t.dim(1)? / k), k))?
        .contiguous()
}

/// Deterministic initialisation from `seed` (candle's CPU generator cannot be seeded): every
/// conv weight `[O, I, k, k]` gets He-normal values (std √(2 / I·k²)), the subnet predictors
/// N(0, 0.01) as in the paper; GroupNorm weights / biases and conv biases keep their constant
/// init. Variables are visited in name order, so the result depends on the seed only.
pub fn init_weights(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let mut rng = crate::data::Rng::new(seed ^ 0xC0FF_EE00);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if var.rank() != 4 || !name.ends_with("weight") {
            continue;
        }
        let (_, i, kh, kw) = var.dims4()?;
        let std = if name.contains("pred") {
            0.01
        } else {
            (2.0 / (i * kh * kw) as f32).sqrt()
        };
        let vals: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                // Box-Muller
                let u1 = rng.f32().max(1e-7);
                let u2 = rng.f32();
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        let t = Tensor::from_vec(vals, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
