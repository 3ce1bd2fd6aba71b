//! WavLM's gated relative position bias (transformers' `WavLMAttention`), for both executors.
//!
//! The first layer's `rel_attn_embed` maps a relative position (key − query) to one of
//! `num_buckets` buckets (exact near the diagonal, log-spaced up to `max_bucket_distance`, the
//! same bucket beyond) and each bucket to one value per head; transformers computes that bias
//! in layer 0 and passes it on. Every layer gates it per query and head with
//! `gate = σ(a)·(σ(b)·c_h − 1) + 2`, where a and b are sums of four outputs each of
//! `gru_rel_pos_linear` applied to the head's slice of the attention input, and `c_h` is
//! `gru_rel_pos_const`. The scores become `q·k/√d + gate[q, h]·bias[h, k − q]`.
//!
//! The bias depends on the query and key only through k − q, so the CPU engine keeps one row
//! of 2T − 1 values per head ([`BiasTable`], O(T)) and never a T×T matrix.
use super::config::Wav2Vec2Config;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// transformers' `WavLMAttention._relative_positions_bucket` for one relative position
/// `rel` = key − query (the log branch in f32, as torch computes it).
pub fn relative_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let dist = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if dist < max_exact {
        return base + dist;
    }
    let scaled = (dist as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (half - max_exact) as f32;
    let large = (max_exact as f32 + scaled) as usize;
    base + large.min(half - 1)
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The first layer's `rel_attn_embed` (`vb` at `encoder.layers.0.attention`), per head.
pub struct RelativePositions {
    /// `[heads, num_buckets]`.
    per_head: Vec<f32>,
    num_buckets: usize,
    max_distance: usize,
    heads: usize,
}

impl RelativePositions {
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let (nb, heads) = (cfg.num_buckets, cfg.num_attention_heads);
        let embed = vb.get((nb, heads), "rel_attn_embed.weight")?;
        Ok(Self {
            per_head: f32_values(&embed.t()?)?,
            num_buckets: nb,
            max_distance: cfg.max_bucket_distance,
            heads,
        })
    }

    /// The bias of every relative position of a `t`-frame utterance.
    pub fn table(&self, t: usize) -> BiasTable {
        let span = 2 * t.max(1) - 1;
        let buckets: Vec<usize> = (0..span)
            .map(|r| {
                relative_bucket(
                    r as i64 - (t as i64 - 1),
                    self.num_buckets,
                    self.max_distance,
                )
            })
            .collect();
        let mut values = vec![0f32; self.heads * span];
        for (row, embed) in values
            .chunks_exact_mut(span)
            .zip(self.per_head.chunks_exact(self.num_buckets))
        {
            for (v, &b) in row.iter_mut().zip(&buckets) {
                *v = embed[b];
            }
        }
        BiasTable { values, t }
    }
}

/// The ungated bias of one utterance: per head, the values for relative positions
/// −(T−1)..=T−1 (`[heads, 2T − 1]`).
pub struct BiasTable {
    values: Vec<f32>,
    t: usize,
}

/// One layer's gate weights (`vb` at `encoder.layers.l.attention`).
pub struct Gate {
    /// `gru_rel_pos_linear.weight` `[8, head_dim]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// `gru_rel_pos_const`, one per head.
    scale: Vec<f32>,
    heads: usize,
}

impl Gate {
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let heads = cfg.num_attention_heads;
        let dh = cfg.hidden_size / heads;
        Ok(Self {
            weight: f32_values(&vb.get((8, dh), "gru_rel_pos_linear.weight")?)?,
            bias: f32_values(&vb.get(8, "gru_rel_pos_linear.bias")?)?,
            scale: f32_values(&vb.get((1, heads, 1, 1), "gru_rel_pos_const")?)?,
            heads,
        })
    }

    /// The gate of every frame and head of the attention input `x` `[T, H]`, as `[T, heads]`.
    fn of(&self, x: &[f32], h: usize) -> Vec<f32> {
        let dh = h / self.heads;
        let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
        let mut gate = Vec::with_capacity(x.len() / dh);
        for slice in x.chunks_exact(dh) {
            let head = gate.len() % self.heads;
            let mut sums = [0f32; 2];
            for (o, w) in self.weight.chunks_exact(dh).enumerate() {
                let dot: f32 = w.iter().zip(slice).map(|(a, b)| a * b).sum();
                sums[o / 4] += dot + self.bias[o];
            }
            let (a, b) = (sigmoid(sums[0]), sigmoid(sums[1]));
            gate.push(a * (b * self.scale[head] - 1.0) + 2.0);
        }
        gate
    }

    /// This layer's bias for the attention input `x` `[T, H]`.
    pub fn bias<'a>(&self, table: &'a BiasTable, x: &[f32], h: usize) -> PositionBias<'a> {
        PositionBias {
            table,
            gate: self.of(x, h),
            heads: self.heads,
        }
    }
}

/// One layer's gated bias for one utterance: `bias[head, q, k] = gate[q, head] ·
/// table[head, k − q]`, added to blocks of attention scores without ever forming T×T.
pub struct PositionBias<'a> {
    table: &'a BiasTable,
    /// `[T, heads]`.
    gate: Vec<f32>,
    heads: usize,
}

impl PositionBias<'_> {
    /// Adds `bias[head, q0 + i, k0 + j]` to `scores[i·cols + j]` for the block's rows
    /// (`scores.len() / cols`) and `cols` keys.
    pub fn add_to_block(&self, head: usize, q0: usize, k0: usize, scores: &mut [f32], cols: usize) {
        let t = self.table.t;
        let span = 2 * t - 1;
        let row_of_head = &self.table.values[head * span..(head + 1) * span];
        for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
            let q = q0 + i;
            let g = self.gate[q * self.heads + head];
            // relative position k − q at index k − q + t − 1
            let start = k0 + t - 1 - q;
            for (s, &b) in row.iter_mut().zip(&row_of_head[start..start + cols]) {
                *s += g * b;
            }
        }
    }
}

// ---------------------------------------------------------------- tensor ops

/// [`RelativePositions`] as a tensor for the tensor-op executor.
pub struct RelativePositionsOps {
    /// `rel_attn_embed.weight` `[num_buckets, heads]`.
    embed: Tensor,
    num_buckets: usize,
    max_distance: usize,
}

impl RelativePositionsOps {
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        Ok(Self {
            embed: vb.get(
                (cfg.num_buckets, cfg.num_attention_heads),
                "rel_attn_embed.weight",
            )?,
            num_buckets: cfg.num_buckets,
            max_distance: cfg.max_bucket_distance,
        })
    }

    /// The ungated bias of queries `q0..q0 + rows` against keys `0..t`: `[1, heads, rows, t]`.
    pub fn block(&self, q0: usize, rows: usize, t: usize, device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = (q0..q0 + rows)
            .flat_map(|q| {
                (0..t).map(move |k| {
                    relative_bucket(k as i64 - q as i64, self.num_buckets, self.max_distance) as u32
                })
            })
            .collect();
        let idx = Tensor::from_vec(idx, rows * t, device)?;
        let heads = self.embed.dim(1)?;
        self.embed
            .index_select(&idx, 0)?
            .reshape((rows, t, heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }
}

/// [`Gate`] as tensors for the tensor-op executor.
pub struct GateOps {
    /// `[head_dim, 8]`.
    weight_t: Tensor,
    bias: Tensor,
    /// `[1, 1, heads, 1]`.
    scale: Tensor,
    heads: usize,
}

impl GateOps {
    pub fn load(vb: &VarBuilder, cfg: &Wav2Vec2Config) -> Result<Self> {
        let heads = cfg.num_attention_heads;
        let dh = cfg.hidden_size / heads;
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        Ok(Self {
            weight_t: f32(vb.get((8, dh), "gru_rel_pos_linear.weight")?)?
                .t()?
                .contiguous()?,
            bias: f32(vb.get(8, "gru_rel_pos_linear.bias")?)?,
            scale: f32(vb.get((1, heads, 1, 1), "gru_rel_pos_const")?)?
                .reshape((1, 1, heads, 1))?,
            heads,
        })
    }

    /// The gate of the attention input `x` `[B, T, H]`, as `[B, heads, T, 1]` in `x`'s dtype
    /// (computed in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let dh = h / self.heads;
        let proj = x
            .to_dtype(DType::F32)?
            .reshape((b * t * self.heads, dh))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?
            .reshape((b, t, self.heads, 2, 4))?
            .sum(4)?;
        let gates = candle_nn::ops::sigmoid(&proj)?;
        let (a, g) = (gates.narrow(3, 0, 1)?, gates.narrow(3, 1, 1)?);
        let gate = (a.mul(&(g.broadcast_mul(&self.scale)? - 1.0)?)? + 2.0)?;
        gate.permute((0, 2, 1, 3))?
            .contiguous()?
            .to_dtype(x.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    /// Values of transformers 4.46.3's `WavLMAttention._relative_positions_bucket`
    /// (num_buckets 320, max_distance 800, and 32 / 40), printed by torch.
    #[test]
    fn buckets_equal_transformers() {
        let cases: [(i64, usize); 10] = [
            (0, 0),
            (-1, 1),
            (1, 161),
            (-79, 79),
            (80, 240),
            (-81, 80),
            (200, 271),
            (-799, 159),
            (5000, 319),
            (-100, 87),
        ];
        for (rel, want) in cases {
            assert_eq!(relative_bucket(rel, 320, 800), want, "rel {rel}");
        }
        let small: [(i64, usize); 6] = [(7, 23), (8, 24), (-8, 8), (20, 28), (-39, 15), (78, 31)];
        for (rel, want) in small {
            assert_eq!(relative_bucket(rel, 32, 40), want, "rel {rel}");
        }
    }
}
