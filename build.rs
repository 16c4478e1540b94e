//! Compiles `kernels/*.cu` to PTX with cudaforge when the `cuda` feature is on; does nothing
//! otherwise, so a plain `cargo build` needs no CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build() {
        println!("cargo:rerun-if-changed=kernels");
        let out_dir =
            std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
        let mut builder = cudaforge::KernelBuilder::new()
            .source_glob("kernels/*.cu")
            .watch(["kernels/common.cuh"])
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
