//! Builds the eBPF programs (nightly, bpfel-unknown-none, bpf-linker) and leaves the object in
//! OUT_DIR for `include_bytes!`, so `cargo build` alone yields an agent with its programs inside.
//! The object's DWARF is dropped there: bpf-linker needs it to emit BTF, aya needs only the BTF.
//! Also generates Rust from the .proto files in proto/ (the registry record, etcd's API).

use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    compile_protos(&manifest_dir.join("proto"))?;
    let programs = manifest_dir.join("../ebpf-programs/programs");
    let toolchain_file = manifest_dir.join("../ebpf-programs/rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../ebpf-programs/common").display()
    );

    let channel = pinned_channel(&toolchain_file)?;
    ensure_bpf_linker_on_path()?;
    aya_build::build_ebpf(
        [Package {
            name: "edgeplane-ebpf",
            root_dir: programs.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        Toolchain::Custom(&channel),
    )
    .context("building the eBPF programs failed; `cargo xtask setup` installs what they need")?;
    strip_dwarf(&PathBuf::from(env::var("OUT_DIR")?).join("edgeplane"))
}

/// Removes the DWARF sections (and their relocations) from the eBPF object: about 80% of its
/// bytes, embedded in the agent and read by aya at every start, and of no use to the kernel.
/// `.BTF` and `.BTF.ext` (types, CO-RE relocations, line info for verifier logs) stay.
fn strip_dwarf(path: &std::path::Path) -> anyhow::Result<()> {
    use object::build::elf::{Builder, SectionData};
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut elf = Builder::read(data.as_slice()).context("parsing the eBPF object")?;
    let is_dwarf = |name: &[u8]| name.starts_with(b".debug_");
    // Collected first: the table's iterators skip what is marked deleted.
    let dwarf: Vec<_> = elf
        .sections
        .iter()
        .filter(|s| is_dwarf(&s.name))
        .map(|s| s.id())
        .collect();
    for section in elf.sections.iter_mut() {
        // The DWARF sections and their relocations (`.rel.debug_*`).
        section.delete = dwarf.contains(&section.id())
            || section.sh_info_section.is_some_and(|t| dwarf.contains(&t));
    }
    elf.delete_orphans();
    // LLVM keeps section names in .strtab with the symbols' names; the writer wants its own.
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = SectionData::SectionString;
    }
    let mut out = Vec::new();
    elf.write(&mut out)
        .context("writing the stripped eBPF object")?;
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn pinned_channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    value
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .with_context(|| format!("{}: no toolchain.channel", path.display()))
}

/// `cargo xtask setup` installs bpf-linker into `$CARGO_HOME/bin`, which may not be on PATH
/// (for example under sudo or in CI): add it for the nested cargo.
fn ensure_bpf_linker_on_path() -> anyhow::Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        return Ok(());
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(bin) = cargo_home
        .map(|h| h.join("bin"))
        .filter(|b| b.join("bpf-linker").is_file())
    else {
        bail!("bpf-linker not found on PATH or in $CARGO_HOME/bin: run `cargo xtask setup` first");
    };
    dirs.insert(0, bin);
    // SAFETY: build scripts are single-threaded here; the nested cargo inherits this PATH.
    unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
    Ok(())
}

/// protox parses the .proto files in Rust, so building needs no system `protoc`.
fn compile_protos(root: &std::path::Path) -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed={}", root.display());
    let files = ["edgeplane/registry.proto", "etcd/rpc.proto"];
    let descriptors = protox::compile(files, [root]).context("parsing proto/")?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        // `edgeplane registry get` prints records as JSON with the proto's field names.
        .type_attribute(".edgeplane", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)
        .context("generating Rust from proto/")
}
