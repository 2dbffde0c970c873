//! icmp-guard's fuzz targets (libFuzzer through cargo-fuzz, on the stable toolchain with
//! `--sanitizer none`). `cargo xtask fuzz` runs them all for a bounded time; see `fuzz/README.md`.

pub mod mutate;
pub mod targets;

/// Defines the libFuzzer entry points of one target: the target body from [`targets`] and the
/// structure-aware mutator of [`mutate`] for inputs of `shape`.
#[macro_export]
macro_rules! fuzz_target_with_shape {
    ($body:path, $shape:expr) => {
        libfuzzer_sys::fuzz_target!(|data: &[u8]| $body(data));
        libfuzzer_sys::fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
            $crate::mutate::mutate(data, size, max_size, seed, $shape, |d, s, m| {
                libfuzzer_sys::fuzzer_mutate(d, s, m)
            })
        });
    };
}
