//! Under `cuda-emu`: every CUDA kernel of `kernels/` was launched by a run of the test suite.
//! `.ci/run` runs the emulated suite with `CANDLE_DETLOSS_EMU_COVERAGE=FILE`, then this test
//! (ignored otherwise: it needs the file of that run).
#![cfg(feature = "cuda-emu")]

#[test]
#[ignore = "run after the emulated suite, with CANDLE_DETLOSS_EMU_COVERAGE set"]
fn every_kernel_ran_in_the_emulated_suite() {
    let path = std::env::var("CANDLE_DETLOSS_EMU_COVERAGE")
        .expect("CANDLE_DETLOSS_EMU_COVERAGE names the coverage file of the suite's run");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // `kernel<TAB>program` lines.
    let ran: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.split('\t').next()).collect();
    let all = candle_detloss::cuda_emu::kernel_names();
    // At least: focal 3·3·4 + 2 + 4 (target gradients), softmax 9·2·4, GHM-C 4·3·4, smooth /
    // balanced L1 3·2·4, IoU family 3·4·4, AP-Loss 4·4·4, finalize 4 = 302; DFL 4·4, quality /
    // varifocal 4·3·4 = 366; cross-entropy with probability targets 2·2·4 = 382.
    assert!(all.len() >= 382, "only {} kernels registered", all.len());
    let missing: Vec<&String> = all.iter().filter(|k| !ran.contains(k.as_str())).collect();
    println!("{} of {} kernels ran", all.len() - missing.len(), all.len());
    assert!(
        missing.is_empty(),
        "{} kernels never ran: {missing:?}",
        missing.len()
    );
}
