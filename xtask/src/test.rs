//! `cargo xtask test`: the whole test suite on this machine, from a fresh clone.

use crate::{
    build::Arch,
    fuzz, package, setup,
    toolchain::{self, require_root, run_checked, step},
    vm,
};

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this (passed to `cargo test` and to the VM tests).
    filter: Option<String>,
    /// Skip the tests in qemu on Debian's kernels (`cargo xtask vm-test`), for quick local runs.
    #[arg(long)]
    no_vm: bool,
    /// Also run the arm64 subset (cross-built, in qemu-system-aarch64) after the amd64 VM
    /// tests. Not by default: the cross build and the emulated arm64 guests add 20 to 35
    /// minutes, which would take CI's whole run past its 90 minutes.
    #[arg(long)]
    arm64: bool,
    /// Seconds each fuzz target runs after the host tests (`cargo xtask fuzz`); 0 skips them.
    #[arg(long, default_value_t = 60)]
    fuzz_seconds: u64,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("the tests create network namespaces and load eBPF programs")?;
    setup::run(&setup::Options::default())?;
    let root = toolchain::workspace_root();
    step("building the agent and the tests (release)");
    run_checked(
        crate::toolchain::cargo()
            .current_dir(&root)
            .args(vm::release_build_args()),
    )?;
    step("unit, eBPF program and end-to-end tests");
    let mut test = crate::toolchain::cargo();
    test.current_dir(&root)
        .args(["test", "--release", "--no-fail-fast"])
        .env("EDGEPLANE_BIN", root.join("target/release/edgeplane"));
    if let Some(f) = &opts.filter {
        test.arg(f);
    }
    run_checked(&mut test)?;
    if opts
        .filter
        .as_ref()
        .is_none_or(|f| "package".contains(f.as_str()))
    {
        step("the Debian package: install, check, purge");
        package::install_test::run(&package::package(Arch::host())?)?;
    }
    // With a filter, the fuzz targets whose name contains it.
    let targets: Vec<&str> = fuzz::TARGETS
        .iter()
        .map(|t| t.0)
        .filter(|t| opts.filter.as_ref().is_none_or(|f| t.contains(f.as_str())))
        .collect();
    if opts.fuzz_seconds == 0 || targets.is_empty() {
        step("fuzz targets skipped");
    } else {
        step(format_args!(
            "a short pass of the fuzz targets ({} s each)",
            opts.fuzz_seconds
        ));
        fuzz::run_after_setup(&targets, opts.fuzz_seconds)?;
    }
    if opts.no_vm {
        step("VM tests skipped (--no-vm)");
        return Ok(());
    }
    step("the kernel tests in qemu on each supported kernel");
    vm::run_after_setup(&vm::Options::all(opts.filter.clone()))?;
    if !opts.arm64 || opts.filter.is_some() {
        step("arm64 VM tests not asked for (`--arm64`, or `cargo xtask vm-test --arch arm64`)");
        return Ok(());
    }
    step(format_args!(
        "the arm64 subset ({}) on each kernel, cross-built, in qemu-system-aarch64; the rest is \
         `cargo xtask vm-test --arch arm64`",
        ARM64_SUBSET.join(", ")
    ));
    let tests = ARM64_SUBSET.iter().map(|t| (*t).to_owned()).collect();
    vm::run_after_setup(&vm::Options::only(tests, Vec::new()).on(Arch::Arm64))
}

/// What of the VM tests runs on arm64 in `cargo xtask test --arm64`: emulating another
/// architecture is tens of times slower (udp_forward_e2e alone takes 10 minutes there), and
/// the cross build of the agent and the tests costs as much as the host's build. The tunnel's
/// tests start the arm64 agent with its eBPF programs on both arm64 kernels and pass CAN frames
/// through the emulated CAN cards.
const ARM64_SUBSET: &[&str] = &["can_tunnel"];
