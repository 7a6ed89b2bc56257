//! Installs a package on this machine, checks what it installed, purges it and checks that
//! nothing of it is left. `cargo xtask test` runs it with the host architecture's package.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail, ensure};

use super::deb::{CONFFILE, PACKAGE_BINARY, UNIT_PATH};
use crate::toolchain::{output, require_root, run_checked, step};

/// What the package (maintainer scripts included) leaves on the system besides its files.
const CREATED: &[&str] = &[
    "/var/lib/edgeplane",
    "/etc/edgeplane",
    "/usr/share/doc/edgeplane",
    "/etc/systemd/system/multi-user.target.wants/edgeplane.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/edgeplane.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/edgeplane.service",
];

pub fn run(deb: &Path) -> anyhow::Result<()> {
    require_root("installing and purging the edgeplane package")?;
    step(format_args!("install test of {}", deb.display()));
    ensure!(
        !installed()?,
        "the edgeplane package is installed on this machine: the install test needs a machine \
         without it (`dpkg --purge edgeplane`)"
    );
    for account in ["passwd", "group"] {
        ensure!(
            !exists(account)?,
            "an `edgeplane` {account} entry exists already: the install test checks that the \
             package creates and removes it; remove it first"
        );
    }
    run_checked(
        Command::new("dpkg")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("--install")
            .arg(deb),
    )?;
    let checked = installed_checks();
    // Purged whatever the checks found, so a failure leaves the machine as it was.
    let listing = output(Command::new("dpkg").args(["--listfiles", "edgeplane"]));
    let purged = run_checked(Command::new("dpkg").args(["--purge", "edgeplane"]));
    let checks = checked?;
    purged?;
    let listing = listing?;
    let mut left: Vec<String> = listing
        .lines()
        .map(str::to_owned)
        .filter(|p| is_ours(p))
        .chain(CREATED.iter().map(|p| p.to_string()))
        .filter(|p| Path::new(p).symlink_metadata().is_ok())
        .collect();
    for account in ["passwd", "group"] {
        if exists(account)? {
            left.push(format!("the `edgeplane` {account} entry"));
        }
    }
    if installed()? {
        left.push("the package's dpkg record".into());
    }
    ensure!(left.is_empty(), "purge left behind: {}", left.join(", "));
    for line in checks {
        println!("  ok  {line}");
    }
    println!(
        "  ok  purge left nothing ({} paths, user, group, enable links)",
        listing.lines().count()
    );
    Ok(())
}

/// Checks the installed package; returns what was checked, one line each.
fn installed_checks() -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let version = output(Command::new(PACKAGE_BINARY).arg("--version"))?;
    let expected = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "edgeplane"]))?;
    ensure!(
        version.trim() == format!("edgeplane {expected}"),
        "`edgeplane --version` printed {version:?}, the package is {expected}"
    );
    done.push(format!("{PACKAGE_BINARY} --version: {}", version.trim()));

    let check = output(Command::new(PACKAGE_BINARY).args(["check-config", CONFFILE]))?;
    done.push(format!("check-config {CONFFILE}: {}", check.trim()));

    let conffiles =
        output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "edgeplane"]))?;
    ensure!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is not a conffile: {conffiles:?}"
    );
    done.push(format!("{CONFFILE} is a conffile"));

    let verify = Command::new("systemd-analyze")
        .args(["verify", UNIT_PATH])
        .output()
        .context("systemd-analyze (apt-get install systemd)")?;
    let stderr = String::from_utf8_lossy(&verify.stderr);
    // verify exits 0 on directives it ignores but names them: any output is a finding.
    ensure!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {UNIT_PATH}: {stderr}"
    );
    done.push(format!("systemd-analyze verify {UNIT_PATH}: clean"));

    let user = output(Command::new("getent").args(["passwd", "edgeplane"]))?;
    ensure!(
        user.contains(":/var/lib/edgeplane:") && user.trim_end().ends_with("/nologin"),
        "user entry {user:?}"
    );
    let uid: u32 = user.split(':').nth(2).context("passwd entry")?.parse()?;
    let state = std::fs::metadata("/var/lib/edgeplane").context("/var/lib/edgeplane")?;
    ensure!(
        std::os::unix::fs::MetadataExt::uid(&state) == uid,
        "/var/lib/edgeplane is not owned by the edgeplane user"
    );
    done.push(format!(
        "system user edgeplane (uid {uid}) owns /var/lib/edgeplane"
    ));

    let link = "/etc/systemd/system/multi-user.target.wants/edgeplane.service";
    let target =
        std::fs::read_link(link).with_context(|| format!("the unit is not enabled: no {link}"))?;
    ensure!(
        target == Path::new(UNIT_PATH),
        "{link} points at {}",
        target.display()
    );
    done.push("the unit is enabled (multi-user.target.wants), not started".into());
    Ok(done)
}

/// A path the package owns alone (not a shared directory like /usr/bin).
fn is_ours(path: &str) -> bool {
    path.contains("edgeplane")
}

fn installed() -> anyhow::Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "edgeplane"])
        .output()
        .context("dpkg-query")?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() != "not-installed")
}

fn exists(database: &str) -> anyhow::Result<bool> {
    let status = Command::new("getent")
        .args([database, "edgeplane"])
        .status()
        .context("getent")?;
    match status.code() {
        Some(0) => Ok(true),
        Some(2) => Ok(false),
        _ => bail!("getent {database} edgeplane: {status}"),
    }
}
