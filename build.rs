//! Builds the CUDA kernels of `kernels/`:
//!
//! - feature `cuda`: compiles `kernels/*.cu` to PTX with cudaforge (nvcc);
//! - feature `cuda-emu`: compiles the same `kernels/*.cu` as host C++ with the emulation of
//!   `kernels/emu/` (the `cc` crate and the system C++ compiler), linked into the crate. It
//!   needs the CUDA headers of the pinned PyPI wheels (`cuda_fp16.h`, `cuda_bf16.h`,
//!   `crt/host_defines.h`, `nv/target`): `$CUDA_EMU_INCLUDE`, else `$CUDA_HOME/include` (set by
//!   `source scripts/cuda-env.sh`), else the venv that script creates. With
//!   `CANDLE_DETLOSS_EMU_SANITIZE=1` the kernels are built with AddressSanitizer and UBSan
//!   (run the binaries with the ASan runtime preloaded, as `.ci/run` does).
//!
//! Without either feature it does nothing, so a plain `cargo build` needs no CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
    #[cfg(feature = "cuda-emu")]
    emu::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build() {
        println!("cargo:rerun-if-changed=kernels");
        let out_dir =
            std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
        let mut builder = cudaforge::KernelBuilder::new()
            .source_glob("kernels/*.cu")
            .watch(["kernels/common.cuh", "kernels/params.cuh"])
            .out_dir(&out_dir)
            .arg("-O3")
            .arg("-std=c++17")
            .arg("-Ikernels");
        // CUDA_COMPUTE_CAP=90 gives plain sm_90 PTX (JIT-able on newer GPUs); "90a" opts into
        // the arch-specific target. Without it cudaforge asks nvidia-smi.
        if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
            builder = builder.compute_cap_arch(cap.trim());
        }
        let ptx = builder
            .build_ptx()
            .unwrap_or_else(|e| panic!("candle-detloss: compiling kernels/*.cu failed: {e}"));
        ptx.write(out_dir.join("ptx.rs"))
            .unwrap_or_else(|e| panic!("candle-detloss: writing ptx.rs failed: {e}"));
    }
}

#[cfg(feature = "cuda-emu")]
mod emu {
    use std::path::{Path, PathBuf};

    /// The folder holding `cuda_fp16.h` and `nv/target`.
    fn cuda_include() -> PathBuf {
        for var in ["CUDA_EMU_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let mut candidates = Vec::new();
        if let Ok(d) = std::env::var("CUDA_EMU_INCLUDE") {
            candidates.push(PathBuf::from(d));
        }
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Ok(d) = std::env::var(var) {
                candidates.push(Path::new(&d).join("include"));
            }
        }
        if let Ok(home) = std::env::var("HOME") {
            let lib = Path::new(&home).join(".cache/candle-detloss/cuda13-venv/lib");
            if let Ok(entries) = std::fs::read_dir(&lib) {
                for e in entries.flatten() {
                    candidates.push(e.path().join("site-packages/nvidia/cu13/include"));
                }
            }
        }
        for c in &candidates {
            if c.join("cuda_fp16.h").is_file() && c.join("nv/target").is_file() {
                return c.clone();
            }
        }
        panic!(
            "candle-detloss (cuda-emu): the CUDA headers (cuda_fp16.h, nv/target) were not found in {candidates:?}; \
             run `source scripts/cuda-env.sh` (installs the pinned nvidia-cuda-runtime, nvidia-cuda-crt and \
             nvidia-cuda-cccl wheels) or set CUDA_EMU_INCLUDE"
        )
    }

    pub fn build() {
        println!("cargo:rerun-if-changed=kernels");
        println!("cargo:rerun-if-env-changed=CANDLE_DETLOSS_EMU_SANITIZE");
        let include = cuda_include();
        let sanitize = std::env::var("CANDLE_DETLOSS_EMU_SANITIZE").is_ok_and(|v| v == "1");
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .flag("-x")
            .flag("c++")
            .define("DL_CUDA_EMU", "1")
            // The same rounding as the CPU kernels and nvcc's defaults: no contraction to FMA.
            .flag("-ffp-contract=off")
            .flag("-fno-strict-aliasing")
            .include("kernels")
            .include(&include)
            .warnings(false);
        if sanitize {
            b.opt_level(1)
                .debug(true)
                .flag("-fsanitize=address,undefined")
                .flag("-fno-sanitize-recover=all")
                .flag("-fno-omit-frame-pointer");
            // The runtimes, linked into every binary that links the crate. ASan's must come
            // first in the process's library list: run the binaries with
            // LD_PRELOAD=$(gcc -print-file-name=libasan.so) (.ci/run sets it as cargo's runner).
            println!("cargo:rustc-link-lib=dylib=asan");
            println!("cargo:rustc-link-lib=dylib=ubsan");
        } else {
            b.opt_level(2);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
            .expect("kernels/ exists")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        files.sort();
        b.files(&files);
        b.file("kernels/emu/runtime.cpp");
        b.compile("candle_detloss_emu");
    }
}
