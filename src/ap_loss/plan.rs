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
    /// equal cells; `cells[k]` = number of edges whose cell is `< k`. As the cell of a value is
    /// a monotone function of it, a score in cell `k` has exactly `cells[k]` edges of lower
    /// cells below it, and only the edges of its own cell are left to search: O(1) expected,
    /// O(log P) at worst, and exact whatever the rounding of the cell computation.
    pub(super) cells: Vec<u32>,
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

/// The cell of `v >= lo` among `ncell` cells (monotone in `v`; saturating).
#[inline(always)]
pub(super) fn cell_of(v: f64, lo: f64, scale: f64, ncell: usize) -> usize {
    (((v - lo) * scale) as usize).min(ncell - 1)
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
        let mut plan = Plan {
            delta,
            pos: pos.to_vec(),
            edges: Vec::new(),
            cells: Vec::new(),
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
        // Sixteen cells per edge on average: most cells then hold no edge, and a lookup is one
        // read of the (L2-resident) cell table plus at most a compare or two.
        let ncell = 16 * edges.len();
        plan.cell_scale = ncell as f64 / (hi - lo);
        plan.cells = vec![0u32; ncell + 1];
        for &e in &edges {
            let k = cell_of(e, lo, plan.cell_scale, ncell);
            plan.cells[k + 1] += 1;
        }
        for k in 0..ncell {
            plan.cells[k + 1] += plan.cells[k];
        }
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

    /// The bucket of a finite score: the number of edges `<= v`.
    #[inline(always)]
    pub(super) fn bucket(&self, v: f64) -> usize {
        match self.edges.first() {
            Some(&e0) if v >= e0 => {
                let k = cell_of(v, e0, self.cell_scale, self.cells.len() - 1);
                let (a, b) = (self.cells[k] as usize, self.cells[k + 1] as usize);
                a + self.edges[a..b].partition_point(|e| *e <= v)
            }
            _ => 0,
        }
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
            for v in probes {
                let want = plan.edges.partition_point(|e| *e <= v);
                assert_eq!(plan.bucket(v), want, "v={v} delta={delta}");
            }
        }
    }
}
