//! Decoding and folding alone, without NATS: the CPU side of replay, for profiling.
//!
//! `cargo run --release -p slipway-core --example fold_bench -- 20000` folds 20,000 copies of
//! a simulated no-op run (the benchmark's pipeline); under
//! `valgrind --tool=callgrind target/release/examples/fold_bench 2000` it gives instruction
//! counts that do not depend on the machine's load (docs/performance.md).

use slipway_core::bus::binding;
use slipway_domain::{fold, fold_into, sim::Sim};
fn main() {
    let spec = slipway_domain::spec::NOOP_PIPELINE;
    let mut sim = Sim::new(spec);
    sim.run_to_end();
    let enc: Vec<_> = sim
        .log
        .iter()
        .map(|e| binding::encode(e.to_cloudevent()))
        .collect();
    let n: usize = std::env::args()
        .nth(1)
        .map_or(2000, |a| a.parse().expect("a number of runs"));
    let mut runs = std::collections::HashMap::new();
    let t = std::time::Instant::now();
    for c in 0..n {
        for (h, p) in &enc {
            let e = slipway_core::bus::decode(Some(h), p).expect("the run's own events decode");
            let key = (c, e.subject.clone().expect("run events name their run"));
            match runs.get_mut(&key) {
                Some(r) => fold_into(r, &e),
                None => {
                    if let Some(r) = fold(None, &e) {
                        runs.insert(key, r);
                    }
                }
            }
        }
    }
    let ev = n * enc.len();
    println!(
        "{ev} events ({} runs) decoded and folded: {:.0} events/s",
        runs.len(),
        ev as f64 / t.elapsed().as_secs_f64()
    );
}
