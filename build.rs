// SPDX-License-Identifier: MIT OR Apache-2.0
//! Sets `qed_io_uring` where the io_uring engine is built: Linux on the architectures whose
//! system bindings the `io-uring` crate ships (the same list as its dependency line in
//! Cargo.toml). Elsewhere (i686, the BSDs, macOS) the thread pool does all the I/O.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(qed_io_uring)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let archs = ["x86_64", "aarch64", "riscv64", "loongarch64", "powerpc64"];
    if os == "linux" && archs.contains(&arch.as_str()) {
        println!("cargo::rustc-cfg=qed_io_uring");
    }
}
