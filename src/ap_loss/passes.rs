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

/// Per-bucket accumulators of one rayon task.
pub(super) struct BucketAcc {
    pub(super) nonfinite: u64,
    pub(super) bins: Vec<Bin>,
}

/// Count and offset sum of one bucket, side by side (one cache line per update).
#[derive(Clone, Copy, Default)]
pub(super) struct Bin {
    pub(super) sum: i128,
    pub(super) cnt: u64,
}

impl BucketAcc {
    pub(super) fn new(nb: usize) -> Self {
        Self {
            nonfinite: 0,
            bins: vec![Bin::default(); nb],
        }
    }

    /// Integer sums: associative and commutative, so any merge order gives the same bits.
    pub(super) fn merge(mut self, o: BucketAcc) -> Self {
        self.nonfinite = self.nonfinite.wrapping_add(o.nonfinite);
        for (a, b) in self.bins.iter_mut().zip(&o.bins) {
            a.cnt = a.cnt.wrapping_add(b.cnt);
            a.sum = a.sum.wrapping_add(b.sum);
        }
        self
    }
}

pub(super) type BucketResult = (u64, Vec<u64>, Vec<i128>);

/// Phase 2 on the CPU: every negative into its bucket. Rayon over fixed chunks; the sums are
/// integers, so the merge order (rayon's) does not change a bit.
pub(super) fn cpu_bucket<T: Elem>(
    plan: &Plan,
    x: &[T],
    tg: &CpuTargets<'_, T>,
    n: usize,
    c: usize,
    ids: Option<&mut [u32]>,
) -> Result<BucketResult> {
    let nb = plan.buckets();
    let top = nb - 1;
    let rpc = rows_per_chunk(c);
    // Each task folds several chunks into one accumulator of 2P+1 buckets.
    let min_chunks = (nb * 4).div_ceil(rpc * c.max(1)).max(1);
    // One chunk of rows; with `ids`, each negative's bucket is also recorded there (for an
    // update pass in the same forward, which then needs no second lookup).
    let body = |mut acc: BucketAcc, ci: usize, mut ids: Option<&mut [u32]>| -> Result<BucketAcc> {
        for i in ci * rpc..((ci + 1) * rpc).min(n) {
            let xr = &x[i * c..(i + 1) * c];
            let row0 = (i - ci * rpc) * c;
            tg.roles(
                NAME,
                i,
                c,
                #[inline(always)]
                |j, r| {
                    if r != Role::Neg {
                        return;
                    }
                    let v = xr[j].to_f64();
                    if !v.is_finite() {
                        acc.nonfinite += 1;
                        return;
                    }
                    let b = plan.bucket(v);
                    if let Some(slot) = ids.as_deref_mut().and_then(|d| d.get_mut(row0 + j)) {
                        *slot = b as u32;
                    }
                    if b == 0 {
                        return; // below every window: H = 0 for every positive
                    }
                    let bin = &mut acc.bins[b];
                    bin.cnt += 1;
                    if b < top {
                        // Inside some window: its offset enters the linear part of H.
                        bin.sum += plan.quant(v) as i128;
                    }
                },
            )?;
        }
        Ok(acc)
    };
    let merge = |a: BucketAcc, b: BucketAcc| Ok(a.merge(b));
    let acc = match ids {
        Some(ids) if c > 0 => ids
            .par_chunks_mut(rpc * c)
            .enumerate()
            .with_min_len(min_chunks)
            .try_fold(
                || BucketAcc::new(nb),
                |acc, (ci, chunk)| body(acc, ci, Some(chunk)),
            )
            .try_reduce(|| BucketAcc::new(nb), merge)?,
        _ => (0..n.div_ceil(rpc))
            .into_par_iter()
            .with_min_len(min_chunks)
            .try_fold(|| BucketAcc::new(nb), |acc, ci| body(acc, ci, None))
            .try_reduce(|| BucketAcc::new(nb), merge)?,
    };
    let cnt = acc.bins.iter().map(|b| b.cnt).collect();
    let sum = acc.bins.iter().map(|b| b.sum).collect();
    Ok((acc.nonfinite, cnt, sum))
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
    let res: Vec<Result<()>> = out
        .par_chunks_mut(rpc * c)
        .enumerate()
        .map(|(ci, oc)| {
            for (r, orow) in oc.chunks_mut(c).enumerate() {
                let i = ci * rpc + r;
                let xr = &x[i * c..(i + 1) * c];
                let mut missing = None;
                tg.roles(NAME, i, c, #[inline(always)] |j, role| {
                    let v = xr[j].to_f64();
                    let d = match role {
                        Role::Ignored => return,
                        _ if gl.nan => f64::NAN,
                        Role::Neg => match ids.and_then(|d| d.get(i * c + j)) {
                            Some(&b) => gl.neg_update_in(b as usize, v),
                            None => gl.neg_update(v),
                        },
                        Role::Pos => match gl.pos_update(v) {
                            Some(d) => d,
                            None => {
                                missing = Some((v, j));
                                return;
                            }
                        },
                    };
                    // Rounded through the accumulator type, as the CUDA kernel does.
                    orow[j] = T::from_acc(T::A::from_f64(d));
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
