//! `ferry-gateway` binary.
fn main() {}
