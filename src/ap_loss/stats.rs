//! The sharded phases' results: the bucket statistics [`ApStats`] (phase 2: merge and wire
//! format) and [`ApGlobal`] (phase 3: precisions, loss and update coefficients).

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// Phase 2 result and its merge / wire format.
// ---------------------------------------------------------------------------------------------

/// Per-bucket statistics of the negatives of one or more shards (phase 2 of the pooled API):
/// for each of the 2P+1 buckets cut by the windows `[s_i - δ, s_i + δ]` of the positives, the
/// number of negatives and the sum of their offsets in exact fixed point, plus the number of
/// non-finite scores. O(P) in size; sums of shards are exact.
#[derive(Debug, Clone)]
pub struct ApStats {
    pub(super) plan: Arc<Plan>,
    pub(super) nonfinite: u64,
    pub(super) cnt: Vec<u64>,
    pub(super) sum: Vec<i128>,
}

/// Low bits of the split fixed-point sums in the wire format.
pub(super) const LO_BITS: u32 = 31;

impl ApStats {
    /// Adds another shard's statistics (computed against the same positives and `delta`).
    pub fn add(&mut self, other: &ApStats) -> Result<()> {
        if !(Arc::ptr_eq(&self.plan, &other.plan) || self.plan.same_as(&other.plan)) {
            bail!("{NAME}: cannot add statistics computed against different positives or delta")
        }
        self.nonfinite = self.nonfinite.wrapping_add(other.nonfinite);
        for (a, b) in self.cnt.iter_mut().zip(&other.cnt) {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a = a.wrapping_add(*b);
        }
        Ok(())
    }

    /// Number of positives the statistics were computed against.
    pub fn num_positives(&self) -> usize {
        self.plan.pos.len()
    }

    /// The statistics as `3·(2P+1) + 1` words (`[non-finite, counts, sums high, sums low]`)
    /// whose element-wise wrapping sum over shards is the wire form of the summed statistics:
    /// all-reduce them as `u64` with a sum, then [`ApStats::set_words`]. Exact for fewer than
    /// 2^32 scores in total.
    pub fn to_words(&self) -> Vec<u64> {
        let nb = self.cnt.len();
        let mut w = Vec::with_capacity(3 * nb + 1);
        w.push(self.nonfinite);
        w.extend_from_slice(&self.cnt);
        // s = hi·2^31 + lo with 0 <= lo < 2^31: summing the parts separately cannot carry.
        w.extend(self.sum.iter().map(|s| (s >> LO_BITS) as i64 as u64));
        w.extend(self.sum.iter().map(|s| (s & ((1 << LO_BITS) - 1)) as u64));
        w
    }

    /// Replaces the statistics by `words` (the all-reduced [`ApStats::to_words`] of every
    /// shard). Errors when the length does not match this statistics' positives.
    pub fn set_words(&mut self, words: &[u64]) -> Result<()> {
        let nb = self.cnt.len();
        if words.len() != 3 * nb + 1 {
            bail!(
                "{NAME}: expected {} statistics words for {} positives, got {}",
                3 * nb + 1,
                self.plan.pos.len(),
                words.len()
            )
        }
        self.nonfinite = words[0];
        self.cnt.copy_from_slice(&words[1..1 + nb]);
        for (b, s) in self.sum.iter_mut().enumerate() {
            let hi = words[1 + nb + b] as i64 as i128;
            *s = hi
                .wrapping_shl(LO_BITS)
                .wrapping_add(words[1 + 2 * nb + b] as i128);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 3: precisions, loss and update coefficients.
// ---------------------------------------------------------------------------------------------

/// The pooled result of a batch (phase 3): the loss, the precision of every positive and the
/// O(P) coefficients each shard needs to compute its part of the update. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApGlobal(pub(super) Arc<Global>);

#[derive(Debug)]
pub(super) struct Global {
    pub(super) plan: Arc<Plan>,
    pub(super) interpolate: bool,
    pub(super) loss: f64,
    /// The whole result is NaN (a non-finite score).
    pub(super) nan: bool,
    /// Precision of each positive, in the order of `plan.pos`.
    pub(super) prec: Vec<f64>,
    /// Update of each positive, `-(1 - prec)/P`.
    pub(super) pos_upd: Vec<f64>,
    /// Update of a negative `x` in bucket `b`: `alpha[b] + beta[b]·(x - center)` (the CUDA
    /// update kernel reads them separately; the CPU uses `coef`).
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
    pub(super) alpha: Vec<f64>,
    #[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
    pub(super) beta: Vec<f64>,
    /// `[alpha[b], beta[b]]` side by side for the CPU update pass.
    pub(super) coef: Vec<[f64; 2]>,
}

impl ApGlobal {
    /// The pooled loss `1 - AP` (0 without positives, NaN for a non-finite score).
    pub fn loss(&self) -> f64 {
        self.0.loss
    }

    /// Number of positives of the pooled batch.
    pub fn num_positives(&self) -> usize {
        self.0.plan.pos.len()
    }

    /// The pooled positive scores, ascending.
    pub fn positives(&self) -> &[f64] {
        &self.0.plan.pos
    }

    /// The (interpolated) precision of each positive, in the order of [`ApGlobal::positives`].
    pub fn precisions(&self) -> &[f64] {
        &self.0.prec
    }
}

pub(super) fn finish_impl(stats: &ApStats, interpolate: bool) -> Global {
    let plan = stats.plan.clone();
    let p = plan.pos.len();
    let nb = plan.buckets();
    let nan = plan.nonfinite || stats.nonfinite > 0;
    if p == 0 || nan {
        let v = if nan { f64::NAN } else { 0.0 };
        return Global {
            plan,
            interpolate,
            loss: v,
            nan,
            prec: vec![v; p],
            pos_upd: vec![v; p],
            alpha: vec![v; nb],
            beta: vec![v; nb],
            coef: vec![[v; 2]; nb],
        };
    }
    let (delta, pos, edges) = (plan.delta, &plan.pos, &plan.edges);
    let two_delta = 2.0 * delta;
    let pf = p as f64;
    // Prefix sums over buckets (negatives) and over the sorted positives, exact integers.
    let mut ccnt = vec![0u64; nb + 1];
    let mut csum = vec![0i128; nb + 1];
    for b in 0..nb {
        ccnt[b + 1] = ccnt[b].wrapping_add(stats.cnt[b]);
        csum[b + 1] = csum[b].wrapping_add(stats.sum[b]);
    }
    let q: Vec<i64> = pos.iter().map(|v| plan.quant(*v)).collect();
    let mut qp = vec![0i128; p + 1];
    for k in 0..p {
        qp[k + 1] = qp[k] + q[k] as i128;
    }
    // Σ over `n` scores with offset sum `s` inside the window of a positive with offset `qi`
    // of H = (x - s_i)/(2δ) + 0.5: the offsets' difference is exact, rounded once.
    let lin = |s: i128, n: u64, qi: i64| -> f64 {
        let d = s.wrapping_sub((n as i128).wrapping_mul(qi as i128));
        d as f64 * plan.inv_scale / two_delta + 0.5 * n as f64
    };
    let mut lo_b = vec![0usize; p]; // L_i: first bucket with x >= s_i - δ
    let mut up_b = vec![0usize; p]; // U_i: first bucket with x >= s_i + δ (H = 1 from there)
    let mut prec = vec![0.0; p];
    let mut w = vec![0.0; p]; // f_i / ((a_i + b_i)·P)
    let mut running = 0.0f64;
    for i in 0..p {
        let (lo, up) = (pos[i] - delta, pos[i] + delta);
        let li = edges.partition_point(|e| *e <= lo);
        let ui = edges.partition_point(|e| *e <= up);
        lo_b[i] = li;
        up_b[i] = ui;
        // b_i: negatives above the window count 1, those inside H.
        // (wrapping: statistics set from arbitrary words must not panic)
        let b_i = ccnt[nb].wrapping_sub(ccnt[ui]) as f64
            + lin(
                csum[ui].wrapping_sub(csum[li]),
                ccnt[ui].wrapping_sub(ccnt[li]),
                q[i],
            );
        // a_i = 0.5 + Σ_{k∈P} H(s_k - s_i): the k = i term is H(0) = 0.5, so this is
        // 1 + Σ_{k≠i}; tied positives get H = 0.5 each, exactly (equal offsets).
        let kl = pos.partition_point(|v| *v < lo);
        let ku = pos.partition_point(|v| *v < up);
        let a_i = 0.5 + (p - ku) as f64 + lin(qp[ku] - qp[kl], (ku - kl) as u64, q[i]);
        let cur = a_i / (a_i + b_i);
        // Running max in ascending score order, `<=` as the official code: cur = 1 always
        // takes the max (f = 1), so 1 - cur is only divided by when cur < running <= 1.
        let (pr, f) = if !interpolate {
            (cur, 1.0)
        } else if running <= cur {
            running = cur;
            (cur, 1.0)
        } else {
            (running, (1.0 - running) / (1.0 - cur))
        };
        prec[i] = pr;
        w[i] = f / (a_i + b_i) / pf;
    }
    let loss = 1.0 - cpu::ordered_sum(&prec) / pf;
    let pos_upd = prec.iter().map(|pr| -(1.0 - pr) / pf).collect();
    // Update of a negative in bucket b: positives with U_i <= b (a prefix, as U is
    // non-decreasing) give w_i; those with L_i <= b < U_i give w_i·((x - s_i)/(2δ) + 0.5).
    let mut wp = vec![0.0; p + 1];
    let mut ws = vec![0.0; p + 1];
    for i in 0..p {
        wp[i + 1] = wp[i] + w[i];
        ws[i + 1] = ws[i] + w[i] * (pos[i] - plan.center);
    }
    let (mut alpha, mut beta) = (vec![0.0; nb], vec![0.0; nb]);
    let (mut u, mut l) = (0usize, 0usize);
    for b in 0..nb {
        while u < p && up_b[u] <= b {
            u += 1;
        }
        while l < p && lo_b[l] <= b {
            l += 1;
        }
        let dw = wp[l] - wp[u];
        alpha[b] = wp[u] + 0.5 * dw - (ws[l] - ws[u]) / two_delta;
        beta[b] = dw / two_delta;
    }
    let coef = alpha.iter().zip(&beta).map(|(a, b)| [*a, *b]).collect();
    Global {
        plan,
        interpolate,
        loss,
        nan,
        prec,
        pos_upd,
        alpha,
        beta,
        coef,
    }
}

impl Global {
    /// The update of a negative score `v` (finite, as `nan` is false).
    #[inline(always)]
    pub(super) fn neg_update(&self, v: f64) -> f64 {
        self.neg_update_in(self.plan.bucket(v), v)
    }

    /// The update of a negative score `v` in bucket `b`.
    #[inline(always)]
    pub(super) fn neg_update_in(&self, b: usize, v: f64) -> f64 {
        let b = b.min(self.coef.len() - 1);
        let [a, s] = self.coef[b];
        // Bucket 0 is 0 whatever its coefficients (a select, not a branch).
        let d = a + s * (v - self.plan.center);
        if b == 0 {
            0.0
        } else {
            d
        }
    }

    /// `out[e]` = the update of `xs[e]` as a negative, rounded through the accumulator type,
    /// its bucket taken from `ids` (else looked up); AVX-512 (eight at once, the same
    /// operations) where the CPU has it. `nan` must be false.
    pub(super) fn neg_updates<T: Elem>(&self, xs: &[T], ids: Option<&[u32]>, out: &mut [T]) {
        let round = |d: f64| T::from_acc(T::A::from_f64(d));
        let Some(ids) = ids else {
            for (o, x) in out.iter_mut().zip(xs) {
                *o = round(self.neg_update(x.to_f64()));
            }
            return;
        };
        let mut e = 0;
        #[cfg(target_arch = "x86_64")]
        if cpu::simd() == cpu::Simd::Avx512 {
            // SAFETY: `simd` found AVX-512F on this CPU.
            e = unsafe { self.neg_updates_avx512(xs, ids, out) };
        }
        for ((o, x), &b) in out[e..].iter_mut().zip(&xs[e..]).zip(&ids[e..]) {
            *o = round(self.neg_update_in(b as usize, x.to_f64()));
        }
    }

    /// [`Global::neg_updates`] eight at a time while eight are left; returns how many it did.
    /// `neg_update_in` on each lane: the bucket clamped to the last, `alpha + beta·(x -
    /// center)` (a multiply then an add, never fused) from gathered coefficients, 0 in
    /// bucket 0.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn neg_updates_avx512<T: Elem>(&self, xs: &[T], ids: &[u32], out: &mut [T]) -> usize {
        use std::arch::x86_64::*;
        let n = xs.len().min(ids.len()).min(out.len());
        let top = _mm256_set1_epi32((self.coef.len() - 1) as i32);
        let center = _mm512_set1_pd(self.plan.center);
        let coef = self.coef.as_ptr().cast::<f64>();
        let mut e = 0;
        while e + 8 <= n {
            let mut buf = [0f64; 8];
            for (b, x) in buf.iter_mut().zip(&xs[e..e + 8]) {
                *b = x.to_f64();
            }
            // SAFETY: `buf` holds 8 f64, `ids[e..e + 8]` 8 u32 (unaligned loads).
            let (v, b) = unsafe {
                (
                    _mm512_loadu_pd(buf.as_ptr()),
                    _mm256_loadu_si256(ids[e..e + 8].as_ptr().cast()),
                )
            };
            let b = _mm256_min_epu32(b, top);
            let k = _mm256_slli_epi32::<1>(b);
            // SAFETY: `b <= coef.len() - 1 < 2^30`, so `2b` and `2b + 1` index the
            // `2·coef.len()` f64 of `coef`.
            let (a, s) = unsafe {
                (
                    _mm512_i32gather_pd::<8>(k, coef),
                    _mm512_i32gather_pd::<8>(k, coef.add(1)),
                )
            };
            let d = _mm512_add_pd(a, _mm512_mul_pd(s, _mm512_sub_pd(v, center)));
            let nz = _mm512_cmpneq_epi64_mask(_mm512_cvtepu32_epi64(b), _mm512_setzero_si512());
            let d = _mm512_maskz_mov_pd(nz, d);
            // SAFETY: `buf` holds 8 f64.
            unsafe { _mm512_storeu_pd(buf.as_mut_ptr(), d) };
            for (o, d) in out[e..e + 8].iter_mut().zip(buf) {
                *o = T::from_acc(T::A::from_f64(d));
            }
            e += 8;
        }
        e
    }

    /// The update of a positive score `v`, or `None` when `v` is not among the positives.
    #[inline(always)]
    pub(super) fn pos_update(&self, v: f64) -> Option<f64> {
        let pos = &self.plan.pos;
        let k = pos.partition_point(|p| *p < v);
        (k < pos.len() && pos[k] == v).then(|| self.pos_upd[k])
    }
}
