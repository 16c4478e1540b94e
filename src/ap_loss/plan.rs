//! The fixed-point plan: the sorted positives, the bucket edges and the fixed-point scale
//! (shared by all shards).

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// Plan: the sorted positives, the bucket edges and the fixed-point scale (shared by all shards).
// ---------------------------------------------------------------------------------------------

/// Everything derived from the (global) sorted positives alone.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) delta: f64,
    /// All positive scores, ascending.
    pub(super) pos: Vec<f64>,
    /// The 2P window edges `p - δ`, `p + δ`, ascending. Bucket `b` (0..=2P) holds the scores
    /// `x` with exactly `b` edges `<= x`: bucket 0 lies below every window, bucket 2P above.
    /// Empty when there is no positive or a positive is not finite.
    pub(super) edges: Vec<f64>,
    /// Search accelerator: the range `[edges[0], edges[last]]` cut into `cells.len() - 1`
    /// equal cells; `cells[k] >> 2` = number of edges whose cell is `< k`, `cells[k] & 3` the
    /// number of edges in cell `k` (3: three or more). As the cell of a value is a monotone
    /// function of it, a score in cell `k` has exactly `cells[k] >> 2` edges of lower cells
    /// below it, and only the edges of its own cell are left to search: O(1) expected,
    /// O(log P) at worst, and exact whatever the rounding of the cell computation.
    pub(super) cells: Vec<u32>,
    /// `edges` followed by two `+∞`: the two edges from `cells[k] >> 2` on can always be read.
    pub(super) search: Vec<f64>,
    /// `number of cells / (edges[last] - edges[0])`.
    pub(super) cell_scale: f64,
    /// Centre of the fixed-point offsets, `(min p + max p)/2`.
    pub(super) center: f64,
    /// `2^F`, chosen so that `|x - center|·2^F <= 2^61` for every score inside the windows.
    pub(super) scale: f64,
    /// `2^-F`.
    pub(super) inv_scale: f64,
    /// A positive (or an edge `p ± δ`) is NaN or infinite: the whole result is NaN.
    pub(super) nonfinite: bool,
}

/// The cell of `v` among the `last + 1` cells from `lo` on, `scale` cells per unit: monotone
/// in `v`, clamped to `0..=last` (NaN into the last cell).
#[inline(always)]
pub(super) fn cell_of(v: f64, lo: f64, scale: f64, last: f64) -> usize {
    let t = (v - lo) * scale;
    let t = if t < last { t } else { last };
    let t = if t > 0.0 { t } else { 0.0 };
    // SAFETY: `t` is in `[0, last]`, not NaN, and `last` (a cell index) fits in an i64.
    unsafe { t.to_int_unchecked::<i64>() as usize }
}

/// The bucket search of a [`Plan`], in locals for the hot loops (see [`Plan::cells`]).
#[derive(Clone, Copy)]
pub(super) struct Lookup<'a> {
    /// The first edge (NaN without edges: then every score is in bucket 0).
    lo: f64,
    scale: f64,
    /// Index of the last cell.
    last: f64,
    cells: &'a [u32],
    search: &'a [f64],
    /// The top bucket (above every window), `edges.len()`.
    top: usize,
    plan: &'a Plan,
}

impl Lookup<'_> {
    /// `ids[e]` = the bucket of `xs[e]`, 0 for a score that is not finite, and `q[e]` its
    /// fixed-point offset ([`Plan::quant`]) when inside some window (`0 < ids[e] < top`), else
    /// 0; returns the number of scores that are not finite. AVX-512 (eight at once, the same
    /// integer results) where the CPU has it ([`cpu::simd`]).
    #[inline(always)]
    pub(super) fn buckets<T: Elem>(&self, xs: &[T], ids: &mut [u32], q: &mut [i64]) -> u64 {
        // (Without edges every bucket is 0; the gathers need a cell table of 32-bit indices.)
        #[cfg(target_arch = "x86_64")]
        if cpu::simd() == cpu::Simd::Avx512 && (2..=i32::MAX as usize).contains(&self.cells.len()) {
            // SAFETY: `simd` found AVX-512F on this CPU.
            return unsafe { self.buckets_avx512(xs, ids, q) };
        }
        self.buckets_scalar(xs, ids, q)
    }

    #[inline(always)]
    fn buckets_scalar<T: Elem>(&self, xs: &[T], ids: &mut [u32], q: &mut [i64]) -> u64 {
        let mut nonfinite = 0;
        for ((id, q), x) in ids.iter_mut().zip(q).zip(xs) {
            let v = x.to_f64();
            nonfinite += !v.is_finite() as u64;
            let b = if v.is_finite() { self.bucket(v) } else { 0 };
            *id = b as u32;
            *q = if 0 < b && b < self.top {
                self.plan.quant(v)
            } else {
                0
            };
        }
        nonfinite
    }

    /// [`Lookup::buckets`] eight scores at a time: the cell, its entry in the cell table, the
    /// two edges from the cell's first on (gathers) and their compares as in [`Lookup::bucket`]; a lane
    /// whose cell holds more than two edges is looked up again alone.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn buckets_avx512<T: Elem>(&self, xs: &[T], ids: &mut [u32], q: &mut [i64]) -> u64 {
        use std::arch::x86_64::*;
        let n = xs.len().min(ids.len()).min(q.len());
        let (center, fixed) = (
            _mm512_set1_pd(self.plan.center),
            _mm512_set1_pd(self.plan.scale),
        );
        let top = _mm512_set1_epi64(self.top as i64);
        let (two32, inv32) = (
            _mm512_set1_pd(4294967296.0),
            _mm512_set1_pd(1.0 / 4294967296.0),
        );
        let (two31, half) = (_mm512_set1_epi64(1 << 31), _mm512_set1_pd(2147483648.0));
        let (lo, scale) = (_mm512_set1_pd(self.lo), _mm512_set1_pd(self.scale));
        let (last, zero) = (_mm512_set1_pd(self.last), _mm512_setzero_pd());
        let inf = _mm512_set1_pd(f64::INFINITY);
        let abs = _mm512_set1_epi64(i64::MAX);
        let (one, three) = (_mm512_set1_epi64(1), _mm256_set1_epi32(3));
        let mut nonfinite = 0u64;
        let mut e = 0;
        while e + 8 <= n {
            let mut buf = [0f64; 8];
            for (b, x) in buf.iter_mut().zip(&xs[e..e + 8]) {
                *b = x.to_f64();
            }
            // SAFETY: `buf` holds 8 f64.
            let v = unsafe { _mm512_loadu_pd(buf.as_ptr()) };
            let av = _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(v), abs));
            let fin = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(av, inf);
            let take = fin & _mm512_cmp_pd_mask::<_CMP_GE_OQ>(v, lo);
            nonfinite += u64::from((!fin).count_ones());
            // `cell_of`: the same IEEE operations (vminpd / vmaxpd pick the second operand
            // on NaN, as its selects do), truncated.
            let t = _mm512_mul_pd(_mm512_sub_pd(v, lo), scale);
            let k = _mm512_cvttpd_epi32(_mm512_max_pd(_mm512_min_pd(t, last), zero));
            // SAFETY: every lane's `k` is in `0..=last` (NaN included), so it indexes `cells`
            // (`last + 2` long, at least 2, below 2^31); `a = cells[k] >> 2 <= edges.len()`,
            // so `a` and `a + 1` index `search` (`edges.len() + 2` long).
            let (w, a, e0, e1) = unsafe {
                let w = _mm256_i32gather_epi32::<4>(self.cells.as_ptr().cast(), k);
                let a = _mm256_srli_epi32::<2>(w);
                let s = self.search.as_ptr();
                let e0 = _mm512_i32gather_pd::<8>(a, s.cast());
                let e1 = _mm512_i32gather_pd::<8>(a, s.add(1).cast());
                (w, a, e0, e1)
            };
            let r = _mm512_cvtepu32_epi64(a);
            let r = _mm512_mask_add_epi64(r, _mm512_cmp_pd_mask::<_CMP_LE_OQ>(e0, v), r, one);
            let r = _mm512_mask_add_epi64(r, _mm512_cmp_pd_mask::<_CMP_LE_OQ>(e1, v), r, one);
            let r = _mm512_maskz_mov_epi64(take, r);
            // `quant`: `round((v - center)·2^F)` ties to even, below 2^62 in magnitude inside
            // the windows; to i64 without AVX-512DQ through its exact split `hi·2^32 + lo`.
            let y = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_pd(_mm512_sub_pd(v, center), fixed),
            );
            let hi = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
                _mm512_mul_pd(y, inv32),
            );
            let lo = _mm512_sub_pd(_mm512_sub_pd(y, _mm512_mul_pd(hi, two32)), half);
            let qv = _mm512_add_epi64(
                _mm512_slli_epi64::<32>(_mm512_cvtepi32_epi64(_mm512_cvttpd_epi32(hi))),
                _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvttpd_epi32(lo)), two31),
            );
            let inside = _mm512_cmpgt_epi64_mask(r, _mm512_setzero_si512())
                & _mm512_cmplt_epi64_mask(r, top);
            // SAFETY: `q[e..e + 8]` holds 8 i64 (unaligned store).
            unsafe {
                _mm512_storeu_si512(
                    q[e..e + 8].as_mut_ptr().cast(),
                    _mm512_maskz_mov_epi64(inside, qv),
                )
            };
            let r = _mm512_cvtepi64_epi32(r);
            let many = _mm256_cmpeq_epi32(_mm256_and_si256(w, three), three);
            let slow = _mm256_movemask_ps(_mm256_castsi256_ps(many)) as u8 & take;
            let out = &mut ids[e..e + 8];
            // SAFETY: `out` holds 8 u32 (32 bytes; unaligned store).
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), r) };
            if slow != 0 {
                let qo = &mut q[e..e + 8];
                for (l, ((o, qo), v)) in out.iter_mut().zip(qo).zip(buf).enumerate() {
                    if slow >> l & 1 == 1 {
                        let b = self.bucket(v);
                        *o = b as u32;
                        *qo = if 0 < b && b < self.top {
                            self.plan.quant(v)
                        } else {
                            0
                        };
                    }
                }
            }
            e += 8;
        }
        nonfinite + self.buckets_scalar(&xs[e..n], &mut ids[e..n], &mut q[e..n])
    }

    /// The bucket of a finite score: the number of edges `<= v`.
    #[inline(always)]
    pub(super) fn bucket(&self, v: f64) -> usize {
        // Below the first edge, or no edge at all (`lo` NaN): bucket 0.
        if v.partial_cmp(&self.lo).is_none_or(|o| o.is_lt()) {
            return 0;
        }
        let k = cell_of(v, self.lo, self.scale, self.last);
        let (w, next) = match self.cells.get(k..k + 2) {
            Some(&[w, next]) => (w as usize, next as usize),
            _ => return 0, // not reached: `k < cells.len() - 1`
        };
        let a = w >> 2;
        match self.search.get(a..a + 2) {
            // At most two edges in the cell (the common case): two compares, no branch. The
            // edges after the cell's lie in later cells, so above `v`.
            Some(&[e0, e1]) if w & 3 < 3 => a + (e0 <= v) as usize + (e1 <= v) as usize,
            _ => a + self.search[a..next >> 2].partition_point(|e| *e <= v),
        }
    }
}

/// `y` rounded to an integer, ties to even (`f64::round_ties_even` without the libm call of
/// targets lacking SSE4.1): below 2^52 adding and removing 2^52 rounds in the FPU's default
/// mode; from 2^52 on every f64 is an integer.
#[inline(always)]
pub(super) fn round_even(y: f64) -> f64 {
    const TWO52: f64 = 4_503_599_627_370_496.0;
    if y.abs() < TWO52 {
        let s = TWO52.copysign(y);
        ((y + s) - s).copysign(y) // -0.5 rounds to -0, as round_ties_even
    } else {
        y
    }
}

/// `2^e` for `e` in the normal exponent range.
pub(super) fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Plan {
    pub(super) fn new(delta: f64, pos: &[f64]) -> Result<Self> {
        if let Some(k) = pos.windows(2).position(|w| w[1] < w[0]) {
            bail!(
                "{NAME}: all_positives must be sorted ascending (f64::total_cmp), but {} > {} at index {k}",
                pos[k],
                pos[k + 1]
            )
        }
        if pos.len() >= 1 << 29 {
            bail!("{NAME}: at most 2^29 - 1 positives, got {}", pos.len())
        }
        let mut plan = Plan {
            delta,
            pos: pos.to_vec(),
            edges: Vec::new(),
            cells: Vec::new(),
            search: Vec::new(),
            cell_scale: 0.0,
            center: 0.0,
            scale: 1.0,
            inv_scale: 1.0,
            nonfinite: pos.iter().any(|p| !p.is_finite()),
        };
        if pos.is_empty() || plan.nonfinite {
            return Ok(plan);
        }
        let mut edges: Vec<f64> = pos.iter().flat_map(|p| [p - delta, p + delta]).collect();
        edges.sort_unstable_by(f64::total_cmp);
        let (lo, hi) = (edges[0], edges[edges.len() - 1]);
        let center = pos[0] / 2.0 + pos[pos.len() - 1] / 2.0;
        let t = (lo - center).abs().max((hi - center).abs());
        if !(lo.is_finite() && hi.is_finite() && t.is_finite() && t > 0.0) {
            plan.nonfinite = true;
            return Ok(plan);
        }
        // t <= 2^e, so |x - center|·2^F <= 2^61 (log2 may be off by one ulp: 2^61 leaves room
        // below the i64 limit of 2^63).
        let e = t.log2().ceil() as i32;
        let f = (61 - e).clamp(-1000, 1000);
        // Four cells per edge on average: the cell table and the edges (24 bytes per edge)
        // stay in the L1 cache, and few cells hold more than two edges.
        let ncell = 4 * edges.len();
        plan.cell_scale = ncell as f64 / (hi - lo);
        let mut count = vec![0u32; ncell + 1];
        for &e in &edges {
            count[cell_of(e, lo, plan.cell_scale, (ncell - 1) as f64)] += 1;
        }
        let mut below = 0u32;
        plan.cells = count
            .iter()
            .map(|&k| {
                let w = below << 2 | k.min(3);
                below += k;
                w
            })
            .collect();
        plan.search = edges.iter().copied().chain([f64::INFINITY; 2]).collect();
        plan.edges = edges;
        plan.center = center;
        plan.scale = pow2(f);
        plan.inv_scale = pow2(-f);
        Ok(plan)
    }

    /// Number of buckets, 2P+1 (1 without positives).
    pub(super) fn buckets(&self) -> usize {
        self.edges.len() + 1
    }

    /// The bucket search, to hoist out of a loop.
    #[inline(always)]
    pub(super) fn lookup(&self) -> Lookup<'_> {
        Lookup {
            lo: self.edges.first().copied().unwrap_or(f64::NAN),
            scale: self.cell_scale,
            last: self.cells.len().saturating_sub(2) as f64,
            cells: &self.cells,
            search: &self.search,
            top: self.edges.len(),
            plan: self,
        }
    }

    /// The bucket of a finite score: the number of edges `<= v`.
    #[inline(always)]
    pub(super) fn bucket(&self, v: f64) -> usize {
        self.lookup().bucket(v)
    }

    /// The fixed-point offset `round((v - center)·2^F)` (ties to even, as CUDA's
    /// `__double2ll_rn`; the scaling by a power of two is exact).
    #[inline(always)]
    pub(super) fn quant(&self, v: f64) -> i64 {
        round_even((v - self.center) * self.scale) as i64
    }

    pub(super) fn same_as(&self, o: &Plan) -> bool {
        self.delta.to_bits() == o.delta.to_bits()
            && self.pos.len() == o.pos.len()
            && self
                .pos
                .iter()
                .zip(&o.pos)
                .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
    }
}

#[cfg(test)]
mod tests {
    use super::{round_even, Plan};

    #[test]
    fn round_even_equals_round_ties_even() {
        let mut v = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999999999999994,
            1e300,
            -0.0,
        ];
        let two52 = 4_503_599_627_370_496.0f64;
        for k in -3..=3 {
            for base in [two52, two52 / 2.0, two52 * 2.0] {
                v.push(base + k as f64 * 0.5);
                v.push(-(base + k as f64 * 0.5));
            }
        }
        let mut s = 0x1234_5678u64;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            v.push(m * 2f64.powi((s % 130) as i32));
            v.push(((s % 2001) as f64 - 1000.0) * 0.5);
        }
        for y in v {
            assert_eq!(
                round_even(y).to_bits(),
                y.round_ties_even().to_bits(),
                "{y}"
            );
        }
    }

    #[test]
    fn bucket_accelerator_equals_binary_search() {
        // Clustered positives, an outlier, exact ties and scores on the edges themselves.
        let mut pos = vec![0.0, 0.0, 0.1, 0.1, 0.1000001, 0.3, 0.3, 57.0, -3.25];
        pos.extend((0..50).map(|i| 1.0 + i as f64 * 1e-9));
        pos.sort_by(f64::total_cmp);
        for delta in [1.0, 0.25, 1e-7] {
            let plan = Plan::new(delta, &pos).unwrap();
            assert_eq!(plan.buckets(), 2 * pos.len() + 1);
            let mut probes: Vec<f64> = plan.edges.clone();
            probes.extend(plan.edges.iter().map(|e| e.next_up()));
            probes.extend(plan.edges.iter().map(|e| e.next_down()));
            probes.extend((0..4000).map(|i| -5.0 + i as f64 * 0.016));
            probes.extend([f64::MAX, -f64::MAX, 1e-300]);
            for &v in &probes {
                let want = plan.edges.partition_point(|e| *e <= v);
                assert_eq!(plan.bucket(v), want, "v={v} delta={delta}");
            }
            // The batched lookup (AVX-512 where the CPU has it, odd length for the scalar
            // tail), with non-finite scores and the offsets.
            probes.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.05]);
            let (mut ids, mut q) = (vec![7u32; probes.len()], vec![7i64; probes.len()]);
            let nonfinite = plan.lookup().buckets(&probes, &mut ids, &mut q);
            assert_eq!(nonfinite, 3);
            let top = plan.edges.len();
            for (e, &v) in probes.iter().enumerate() {
                let want = match v.is_finite() {
                    true => plan.edges.partition_point(|e| *e <= v),
                    false => 0,
                };
                let want_q = if 0 < want && want < top {
                    plan.quant(v)
                } else {
                    0
                };
                assert_eq!(
                    (ids[e] as usize, q[e]),
                    (want, want_q),
                    "v={v} delta={delta}"
                );
            }
        }
    }
}
