//! The CPU passes: gather the positives, bucket the negatives, write the update.

#[allow(unused_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------
// CPU kernels.
// ---------------------------------------------------------------------------------------------

/// Phase 1 on the CPU: the positive scores, in element order (chunks merged in order).
pub(super) fn cpu_gather<T: Elem>(
    x: &[T],
    tg: &CpuTargets<'_, T>,
    n: usize,
    c: usize,
) -> Result<Vec<f64>> {
    let rpc = rows_per_chunk(c);
    let parts: Vec<Result<Vec<f64>>> = (0..n.div_ceil(rpc))
        .into_par_iter()
        .map(|ci| {
            let mut out = Vec::new();
            for i in ci * rpc..((ci + 1) * rpc).min(n) {
                let xr = &x[i * c..(i + 1) * c];
                tg.roles(
                    NAME,
                    i,
                    c,
                    #[inline(always)]
                    |j, r| {
                        if r == Role::Pos {
                            out.push(xr[j].to_f64());
                        }
                    },
                )?;
            }
            Ok(out)
        })
        .collect();
    let mut pos = Vec::new();
    for part in parts {
        pos.extend(part?);
    }
    Ok(pos)
}

/// Per-bucket accumulators of one rayon task. Count and offset sum of a bucket are packed in
/// one integer, `count·2^96 + Σ offsets` (one 16-byte read-modify-write per score, and the
/// 2P+1 of them fit in the L1 cache): exact while the task holds fewer than 2^31 scores, as
/// then `|Σ offsets| <= count·2^61 < 2^95` ([`BucketAcc::unpack`] splits them again).
pub(super) struct BucketAcc {
    nonfinite: u64,
    bins: Vec<i128>,
    /// Bucket ids of one chunk when the caller records none.
    scratch: Vec<u32>,
    /// The fixed-point offsets of one chunk.
    offsets: Vec<i64>,
}

/// Scores per [`BucketAcc`] at most (counts below 2^31).
const PACKED_MAX: usize = (1 << 31) - 1;
/// Position of the count in a packed bucket.
const CNT_SHIFT: u32 = 96;

/// Summed bucket statistics: the number of non-finite negatives, then per bucket the count and
/// the fixed-point offset sum.
pub(super) type BucketResult = (u64, Vec<u64>, Vec<i128>);

impl BucketAcc {
    fn new(nb: usize, chunk: usize, scratch: bool) -> Self {
        Self {
            nonfinite: 0,
            bins: vec![0; nb],
            scratch: vec![0; if scratch { chunk } else { 0 }],
            offsets: vec![0; chunk],
        }
    }

    /// The counts and sums of the packed buckets. Bucket 0 (below every window, where the
    /// pass also drops the other elements) and the top bucket's sum (above every window, its
    /// offsets never enter `H`) are 0, as the CUDA kernels leave them.
    fn unpack(self) -> BucketResult {
        let top = self.bins.len().saturating_sub(1);
        let (cnt, sum) = self
            .bins
            .iter()
            .enumerate()
            .map(|(b, &p)| {
                // The count is the packed value rounded to a multiple of 2^96.
                let k = p.wrapping_add(1 << (CNT_SHIFT - 1)) >> CNT_SHIFT;
                let s = p.wrapping_sub(k << CNT_SHIFT);
                match b {
                    0 => (0, 0),
                    b if b == top => (k as u64, 0),
                    _ => (k as u64, s),
                }
            })
            .unzip();
        (self.nonfinite, cnt, sum)
    }
}

/// Integer sums: associative and commutative, so any merge order gives the same bits.
fn merge(mut a: BucketResult, b: BucketResult) -> BucketResult {
    a.0 = a.0.wrapping_add(b.0);
    for (x, y) in a.1.iter_mut().zip(&b.1) {
        *x = x.wrapping_add(*y);
    }
    for (x, y) in a.2.iter_mut().zip(&b.2) {
        *x = x.wrapping_add(*y);
    }
    a
}

/// Phase 2 on the CPU: every negative into its bucket. Rayon over fixed chunks; the sums are
/// integers, so the merge order (rayon's) does not change a bit. With `ids` (`n·c` long), the
/// bucket of each negative is also recorded there (0 for the other elements), for an update
/// pass in the same forward, which then needs no second lookup.
pub(super) fn cpu_bucket<T: Elem>(
    plan: &Plan,
    x: &[T],
    tg: &CpuTargets<'_, T>,
    n: usize,
    c: usize,
    mut ids: Option<&mut [u32]>,
) -> Result<BucketResult> {
    let nb = plan.buckets();
    let zero = || (0, vec![0; nb], vec![0; nb]);
    if n == 0 || c == 0 {
        return Ok(zero());
    }
    if ids.as_deref().is_some_and(|d| d.len() != n * c) {
        bail!("{NAME}: internal error, bucket ids of the wrong length")
    }
    let top = nb - 1;
    let rpc = rows_per_chunk(c);
    let chunk = rpc * c;
    if chunk > PACKED_MAX {
        bail!("{NAME}: rows of {c} classes are too long (at most {PACKED_MAX})")
    }
    // Each task folds several chunks into one accumulator of 2P+1 buckets.
    let min_chunks = (nb * 4).div_ceil(chunk).max(1);
    // One chunk of rows in two loops: the buckets of its negatives first (into `ids`: a lookup
    // per score with nothing stored in between, so that many run at once), then their packed
    // sums, with no branch on the data (other elements add into bucket 0, which is discarded).
    let look = plan.lookup();
    let body = |mut acc: BucketAcc, ci: usize, ids: Option<&mut [u32]>| -> Result<BucketAcc> {
        let r0 = ci * rpc;
        let r1 = ((ci + 1) * rpc).min(n);
        let xs = &x[r0 * c..r1 * c];
        let ids = match ids {
            Some(ids) => ids,
            None => &mut acc.scratch[..xs.len()],
        };
        // Every score as a negative, then the other elements back out of the count and into
        // bucket 0 (for labels, one element per row).
        let q = &mut acc.offsets[..xs.len()];
        acc.nonfinite += look.buckets(xs, ids, q);
        for (i, (xr, idr)) in (r0..r1).zip(xs.chunks(c).zip(ids.chunks_mut(c))) {
            tg.non_negatives(
                NAME,
                i,
                c,
                #[inline(always)]
                |j, _| {
                    acc.nonfinite -= !xr[j].to_f64().is_finite() as u64;
                    idr[j] = 0;
                },
            )?;
        }
        // Inside some window the offset enters the linear part of H (`q` is 0 elsewhere).
        for (&b, &q) in ids.iter().zip(q.iter()) {
            let bin = &mut acc.bins[(b as usize).min(top)];
            *bin = bin.wrapping_add((1 << CNT_SHIFT) + q as i128);
        }
        Ok(acc)
    };
    let unpack = |a: Result<BucketAcc>| a.map(BucketAcc::unpack);
    let nchunks = n.div_ceil(rpc);
    // Blocks of fewer than 2^31 scores, so that no accumulator holds more.
    let per_block = PACKED_MAX / chunk;
    let mut total = zero();
    for k0 in (0..nchunks).step_by(per_block) {
        let k1 = (k0 + per_block).min(nchunks);
        let part = match ids.as_deref_mut() {
            Some(ids) => ids[k0 * chunk..(k1 * chunk).min(n * c)]
                .par_chunks_mut(chunk)
                .enumerate()
                .with_min_len(min_chunks)
                .try_fold(
                    || BucketAcc::new(nb, chunk, false),
                    |acc, (k, ch)| body(acc, k0 + k, Some(ch)),
                )
                .map(unpack)
                .try_reduce(zero, |a, b| Ok(merge(a, b)))?,
            None => (k0..k1)
                .into_par_iter()
                .with_min_len(min_chunks)
                .try_fold(
                    || BucketAcc::new(nb, chunk, true),
                    |acc, ci| body(acc, ci, None),
                )
                .map(unpack)
                .try_reduce(zero, |a, b| Ok(merge(a, b)))?,
        };
        total = merge(total, part);
    }
    Ok(total)
}

/// The update of every element of the shard, times `g` (rounded to `T`, then scaled by `g`
/// when it is not 1, as a saved update is). `ids`: the negatives' buckets recorded by the
/// bucket pass (else looked up again).
pub(super) fn cpu_update<T: Elem>(
    gl: &Global,
    x: &[T],
    tg: &CpuTargets<'_, T>,
    g: f64,
    n: usize,
    c: usize,
    ids: Option<&[u32]>,
) -> Result<Vec<T>> {
    let mut out = zeroed_vec::<T>(n * c)?;
    if c == 0 {
        return Ok(out);
    }
    let rpc = rows_per_chunk(c);
    // Rounded through the accumulator type, as the CUDA kernel does.
    let round = |d: f64| T::from_acc(T::A::from_f64(d));
    let res: Vec<Result<()>> = out
        .par_chunks_mut(rpc * c)
        .enumerate()
        .map(|(ci, oc)| {
            let e0 = ci * rpc * c;
            let xs = &x[e0..e0 + oc.len()];
            // Every element as a negative, then the others (for labels, one per row).
            if gl.nan {
                oc.fill(round(f64::NAN));
            } else {
                gl.neg_updates(xs, ids.and_then(|d| d.get(e0..e0 + oc.len())), oc);
            }
            for (r, (orow, xr)) in oc.chunks_mut(c).zip(xs.chunks(c)).enumerate() {
                let i = ci * rpc + r;
                let mut missing = None;
                tg.non_negatives(NAME, i, c, #[inline(always)] |j, role| {
                    let v = xr[j].to_f64();
                    orow[j] = round(match role {
                        Role::Pos if gl.nan => f64::NAN,
                        Role::Pos => match gl.pos_update(v) {
                            Some(d) => d,
                            None => {
                                missing = Some((v, j));
                                return;
                            }
                        },
                        _ => 0.0,
                    });
                })?;
                if let Some((v, j)) = missing {
                    bail!("{NAME}: positive score {v} at [{i}, {j}] is not among the global positives (ApGlobal from other inputs?)")
                }
            }
            Ok(())
        })
        .collect();
    res.into_iter().collect::<Result<Vec<()>>>()?;
    if g != 1.0 {
        cpu::scale_in_place(&mut out, g);
    }
    Ok(out)
}
