//! Links the `sluice` binary with the request path's code together
//! (`link/hot.ld`, feature `hot-text`, on by default; Linux only).
//!
//! A request at a low rate finds its CPU cold: the code it runs is spread
//! over the whole text (4.5 MB with its crates), so its first bytes wait
//! on instruction-cache and TLB misses. The linker script puts the ~150
//! functions a request runs (taken from a callgrind profile by
//! `loadtest/bench/hot-text`, those before the first write first) into one
//! `.text.hot` section before `.text`: about 70 pages (280 KB) instead of
//! pages all over the text. Its patterns name functions without
//! their hashes, so a new toolchain or lockfile keeps most of them; a
//! pattern that matches nothing changes nothing. GNU ld and lld read the
//! script (`INSERT BEFORE .text`); build with `--no-default-features` for
//! a linker that does not.

fn main() {
    println!("cargo:rerun-if-changed=link/hot.ld");
    println!("cargo:rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && std::env::var_os("CARGO_FEATURE_HOT_TEXT").is_some() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=sluice=-Wl,-T,{dir}/link/hot.ld");
    }
}
