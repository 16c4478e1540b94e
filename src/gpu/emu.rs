//! The emulated backend (feature `cuda-emu`): the kernels of `kernels/*.cu`, compiled for the
//! host by `build.rs` with the emulation of `kernels/emu/`, launched on CPU memory. CPU tensors
//! go through the CUDA launch code of every op while it is [`active`] (the default; the tests
//! compare with the CPU kernels through [`crate::cuda_emu::with_cpu_kernels`]).
//!
//! Every op's plan runs twice, the threads of each block (and the blocks) in ascending, then
//! in descending order between barriers, and the two results must be bitwise equal: a missing
//! `__syncthreads` or a shared-memory race shows up as an `Err`. `CANDLE_DETLOSS_EMU_ORDER`
//! = `asc` or `desc` runs one order only.

use super::{DevElem, Gpu, KernelParams, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

/// A module's kernel lookup (`DL_MODULE` in kernels/emu/cuda_emu.h).
pub(crate) type Find = unsafe extern "C" fn(name: *const c_char) -> *const c_void;
/// The name of a module's i-th kernel, null past the last.
pub(crate) type List = unsafe extern "C" fn(i: usize) -> *const c_char;

/// The C side of the emulation.
pub(crate) mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    /// `dl_emu::Field` / `dl_emu::Layout` of kernels/emu/cuda_emu.h.
    #[repr(C)]
    pub(crate) struct Field {
        pub name: *const c_char,
        pub offset: usize,
        pub size: usize,
    }
    #[repr(C)]
    pub(crate) struct Layout {
        pub name: *const c_char,
        pub size: usize,
        pub nfields: usize,
        pub fields: *const Field,
    }

    extern "C" {
        pub(crate) fn dl_emu_find_common(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_focal(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_quality(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_softmax(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_ghm(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_regression(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_iou(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_ap_loss(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_find_dfl(name: *const c_char) -> *const c_void;
        pub(crate) fn dl_emu_kernel_common(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_focal(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_quality(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_softmax(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_ghm(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_regression(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_iou(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_ap_loss(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_dfl(i: usize) -> *const c_char;
        pub(crate) fn dl_emu_kernel_layout(kernel: *const c_void) -> *const Layout;
        pub(crate) fn dl_emu_launch(
            kernel: *const c_void,
            grid: *const u32,
            block: *const u32,
            shmem: usize,
            params: *const c_void,
            descending: c_int,
        ) -> c_int;
    }
}

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(true) };
}

/// Whether CPU tensors currently go through the emulated CUDA kernels.
pub(crate) fn active() -> bool {
    ACTIVE.with(|a| a.get())
}

/// Runs `f` with the CPU kernels (emulation off) on this thread.
pub(crate) fn with_cpu_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ACTIVE.with(|a| a.replace(false)));
    f()
}

/// A kernel handle of the C registry (a static `dl_emu::Kernel`).
#[derive(Clone, Copy)]
struct Handle(*const c_void);
// SAFETY: the handle points to an immutable static of the C side, valid for the whole program.
unsafe impl Send for Handle {}

/// Kernels looked up and layout-checked so far, by (module, name).
static KERNELS: Mutex<Option<HashMap<(&'static str, String), Handle>>> = Mutex::new(None);

/// Finds kernel `name` of `module` and checks that the C parameter struct it takes has the
/// layout of `P`.
fn kernel<P: KernelParams>(module: &Module, name: &str) -> Result<Handle> {
    let key = (module.name, name.to_string());
    if let Some(h) = KERNELS
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).copied()))
    {
        return Ok(h);
    }
    let cname =
        CString::new(name).map_err(|_| candle_core::Error::Msg("bad kernel name".into()))?;
    // SAFETY: `find` is a module lookup of the C side taking a NUL-terminated name.
    let h = unsafe { (module.emu.0)(cname.as_ptr()) };
    if h.is_null() {
        bail!("cuda-emu: no kernel {name} in module {}", module.name)
    }
    // SAFETY: `h` is a kernel of the registry; its layout is a static of the C side.
    let layout = unsafe { &*ffi::dl_emu_kernel_layout(h) };
    check_layout::<P>(name, layout)?;
    if let Ok(mut m) = KERNELS.lock() {
        m.get_or_insert_with(HashMap::new).insert(key, Handle(h));
    }
    record_coverage(name);
    Ok(Handle(h))
}

/// With `CANDLE_DETLOSS_EMU_COVERAGE=FILE`, appends `kernel<TAB>program` for each kernel the
/// process launches (once) to FILE, so that a run of the test suite can be checked against
/// [`kernel_names`] (and a reader can see which test binary ran which kernel).
fn record_coverage(name: &str) {
    if let Some(path) = std::env::var_os("CANDLE_DETLOSS_EMU_COVERAGE") {
        use std::io::Write;
        let exe = std::env::current_exe().ok();
        let prog = exe
            .as_ref()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = file {
            // One short line per write: appends of concurrent test processes do not interleave.
            let _ = f.write_all(format!("{name}\t{prog}\n").as_bytes());
        }
    }
}

/// The names of every kernel of every module.
pub(crate) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for m in super::MODULES {
        for i in 0.. {
            // SAFETY: the module's list function returns a static NUL-terminated name or null.
            let p = unsafe { (m.emu.1)(i) };
            if p.is_null() {
                break;
            }
            // SAFETY: non-null: a static NUL-terminated string of the C side.
            names.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
        }
    }
    names.sort();
    names
}

/// The C struct a kernel takes must be `P`: same name, size, and field names and offsets.
fn check_layout<P: KernelParams>(kernel: &str, l: &ffi::Layout) -> Result<()> {
    // SAFETY: the C layout's strings and field array are statics of the C side, NUL-terminated
    // and `nfields` long.
    let (cname, cfields) = unsafe {
        (
            CStr::from_ptr(l.name).to_string_lossy().into_owned(),
            std::slice::from_raw_parts(l.fields, l.nfields)
                .iter()
                .map(|f| {
                    (
                        CStr::from_ptr(f.name).to_string_lossy().into_owned(),
                        f.offset,
                        f.size,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let rust: Vec<(String, usize, usize)> = P::fields()
        .into_iter()
        .map(|(n, o, s)| (n.to_string(), o, s))
        .collect();
    if cname != P::NAME || l.size != std::mem::size_of::<P>() || cfields != rust {
        bail!(
            "cuda-emu: kernel {kernel} takes {cname} ({} bytes: {cfields:?}) but the launch passes {} ({} bytes: {rust:?})",
            l.size,
            P::NAME,
            std::mem::size_of::<P>()
        )
    }
    Ok(())
}

/// The emulated backend, running the threads of each block in one order.
pub(crate) struct Emu {
    descending: bool,
}

/// Host memory of 64-bit words, exactly `len` long (so AddressSanitizer sees an overflow).
pub(crate) struct HostWords(Vec<u64>);

impl Gpu for Emu {
    type Storage = CpuStorage;
    type Words = HostWords;
    type Out<T: DevElem> = Vec<T>;

    fn dtype(&self, s: &CpuStorage) -> DType {
        s.dtype()
    }

    fn input<T: DevElem>(&self, loss: &str, s: &CpuStorage, l: &Layout) -> Result<u64> {
        Ok(crate::op::cpu_slice::<T>(loss, s, l)?.as_ptr() as u64)
    }

    fn tensor<T: DevElem>(&self, loss: &str, t: &Tensor) -> Result<u64> {
        let (st, l) = t.storage_and_layout();
        match &*st {
            // The address stays valid after the guard: the op holds the tensor.
            Storage::Cpu(s) => self.input::<T>(loss, s, l),
            _ => bail!("{loss}: a parameter tensor is not on the CPU"),
        }
    }

    fn words(&self, len: usize) -> Result<HostWords> {
        Ok(HostWords(vec![0; len]))
    }

    fn upload(&self, v: &[u64]) -> Result<HostWords> {
        Ok(HostWords(v.to_vec()))
    }

    fn download(&self, w: &HostWords) -> Result<Vec<u64>> {
        Ok(w.0.clone())
    }

    fn words_addr(&self, w: &HostWords) -> u64 {
        addr(&w.0)
    }

    fn output<T: DevElem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::from_f64(f64::NAN); len])
    }

    fn zeros<T: DevElem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::from_f64(0.0); len])
    }

    fn out_addr<T: DevElem>(&self, o: &Vec<T>) -> u64 {
        addr(o)
    }

    fn storage<T: DevElem>(&self, o: Vec<T>) -> CpuStorage {
        T::to_cpu_storage_owned(o)
    }

    fn storage_from<T: DevElem>(&self, v: Vec<T>) -> Result<CpuStorage> {
        Ok(T::to_cpu_storage_owned(v))
    }

    fn launch<P: KernelParams>(
        &self,
        module: &Module,
        name: &str,
        cfg: Launch,
        p: &P,
    ) -> Result<()> {
        let k = kernel::<P>(module, name)?;
        let grid = [cfg.grid, 1, 1];
        let block = [cfg.block, 1, 1];
        // SAFETY: `k` takes a parameter struct of `P`'s layout (checked above); the addresses
        // in `p` point to live host buffers the caller holds until this call returns (the
        // emulation runs the kernel to completion inside it).
        let rc = unsafe {
            ffi::dl_emu_launch(
                k.0,
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shmem as usize,
                (p as *const P).cast::<c_void>(),
                self.descending as c_int,
            )
        };
        if rc != 0 {
            bail!("cuda-emu: invalid launch of {name} ({cfg:?}): code {rc}")
        }
        Ok(())
    }
}

/// Address of a vector's buffer; 0 for an empty one (a kernel must not touch it).
fn addr<T>(v: &[T]) -> u64 {
    if v.is_empty() {
        0
    } else {
        v.as_ptr() as u64
    }
}

/// Results compared bit for bit by the schedule check.
pub(crate) trait SameBits {
    fn same_bits(&self, other: &Self) -> bool;
}

impl SameBits for (CpuStorage, Shape) {
    fn same_bits(&self, other: &Self) -> bool {
        fn bits(s: &CpuStorage) -> Option<Vec<u64>> {
            Some(match s {
                CpuStorage::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                CpuStorage::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
                CpuStorage::F16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                CpuStorage::BF16(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                CpuStorage::I64(v) => v.iter().map(|x| *x as u64).collect(),
                CpuStorage::U32(v) => v.iter().map(|x| *x as u64).collect(),
                _ => return None,
            })
        }
        self.1 == other.1
            && self.0.dtype() == other.0.dtype()
            && bits(&self.0).is_some()
            && bits(&self.0) == bits(&other.0)
    }
}

impl SameBits for Vec<f64> {
    fn same_bits(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl<A: PartialEq, B: PartialEq, C: PartialEq> SameBits for (A, B, C) {
    fn same_bits(&self, other: &Self) -> bool {
        self == other
    }
}

/// The thread orders one plan runs in (`CANDLE_DETLOSS_EMU_ORDER`: `asc`, `desc`, else both).
fn orders() -> &'static [bool] {
    match std::env::var("CANDLE_DETLOSS_EMU_ORDER").as_deref() {
        Ok("asc") => &[false],
        Ok("desc") => &[true],
        _ => &[false, true],
    }
}

/// Runs the launch plan `f` of op `op` on the emulated backend, in both thread orders, and
/// returns its result if the orders agree bit for bit (errors included).
pub(crate) fn run<R: SameBits>(op: &str, f: impl Fn(&Emu) -> Result<R>) -> Result<R> {
    let mut first: Option<Result<R>> = None;
    for &descending in orders() {
        let r = f(&Emu { descending });
        match &first {
            None => first = Some(r),
            Some(prev) => {
                let same = match (prev, &r) {
                    (Ok(a), Ok(b)) => a.same_bits(b),
                    (Err(a), Err(b)) => a.to_string() == b.to_string(),
                    _ => false,
                };
                if !same {
                    bail!("cuda-emu schedule check: {op} gives different results with the threads of each block run in ascending and in descending order (a race: a missing __syncthreads or a shared-memory conflict)")
                }
            }
        }
    }
    match first {
        Some(r) => r,
        None => bail!("cuda-emu: no thread order to run"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Gpu, Launch, Module};
    use super::Emu;

    extern "C" {
        fn dl_emu_find_emu_selftest(name: *const std::ffi::c_char) -> *const std::ffi::c_void;
        fn dl_emu_kernel_emu_selftest(i: usize) -> *const std::ffi::c_char;
    }

    crate::gpu::params::kernel_params! {
        /// `emu_selftest` (kernels/emu/selftest.cpp).
        struct SelftestParams { out: u64, mode: i32 }
    }

    const SELFTEST: Module = Module {
        name: "candle_detloss_emu_selftest",
        #[cfg(feature = "cuda")]
        ptx: "",
        emu: (dl_emu_find_emu_selftest, dl_emu_kernel_emu_selftest),
    };

    /// Runs the self-test kernel on one block of 64 threads.
    fn launch(mode: i32, descending: bool) -> Vec<u64> {
        let g = Emu { descending };
        let out = g.zeros::<i64>(64).unwrap();
        let p = SelftestParams {
            out: g.out_addr(&out),
            mode,
        };
        let cfg = Launch {
            grid: 1,
            block: 64,
            shmem: 0,
        };
        g.launch(&SELFTEST, "emu_selftest", cfg, &p).unwrap();
        out.iter().map(|v| *v as u64).collect()
    }

    const CHILD: &str = "CANDLE_DETLOSS_EMU_SELFTEST_MODE";

    #[test]
    fn warp_collectives_and_barriers_run_in_both_orders() {
        for descending in [false, true] {
            let out = launch(0, descending);
            // Lane 0 of each warp holds the sum of its warp's thread indices.
            assert_eq!(out[0], (0..32).sum::<u64>());
            assert_eq!(out[32], (32..64).sum::<u64>());
        }
    }

    /// A barrier one thread never reaches, or a collective one lane skips, aborts the process
    /// with a message naming the kernel and the construct (a hang or undefined behaviour on a
    /// GPU). Checked in a child process, which the abort ends.
    #[test]
    fn a_barrier_or_collective_not_reached_by_all_aborts_naming_the_kernel() {
        if let Ok(mode) = std::env::var(CHILD) {
            launch(mode.parse().unwrap(), false);
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let name =
            "gpu::emu::tests::a_barrier_or_collective_not_reached_by_all_aborts_naming_the_kernel";
        for (mode, construct) in [(1, "__syncthreads"), (2, "__shfl_down_sync")] {
            let out = std::process::Command::new(&exe)
                .args(["--exact", name, "--test-threads=1", "--nocapture"])
                .env(CHILD, mode.to_string())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "mode {mode} did not abort: {err}");
            assert!(
                err.contains("kernel emu_selftest") && err.contains(construct),
                "mode {mode}: {err}"
            );
        }
    }
}
