//! The tracing subscriber of tests and benchmarks: filtered by `RUST_LOG`, installed once per
//! process (later calls do nothing).

use tracing_subscriber::EnvFilter;

/// For tests: output through the test harness's capture (shown for failing tests).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// For benchmarks and tools: output on stderr, keeping stdout for results.
pub fn init_tracing_stderr() {
    let _ = tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
}
