//! Link flags for bpf-linker.

fn main() {
    // bpf-linker asks LLVM by default to leave memcpy for a late in-order expansion, and then
    // every memset of a struct or array becomes a call to a byte-at-a-time loop, several per
    // packet. Let LLVM expand both into plain loads and stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
