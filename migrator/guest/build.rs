//! Links the guest image with its linker script (load address 1 MiB, GOT inside the image).
//! Only for the bare-metal target: on the host the binary is an empty shell.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=link.ld");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
        println!(
            "cargo::rustc-link-arg-bins=-T{}",
            dir.join("link.ld").display()
        );
    }
}
