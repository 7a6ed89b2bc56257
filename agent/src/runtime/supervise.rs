//! Panics end the agent. A task or thread that panicked would otherwise be gone silently (tokio
//! keeps the runtime going, a std thread just ends) while the agent looks healthy. Exiting
//! instead lets the service manager restart it (`Restart=on-failure`), and that costs no
//! forwarding: the data plane is pinned in the kernel, the state record is saved after every
//! change, and the next agent takes both over (see [`crate::runtime::dataplane`]).

use std::{io, panic, process};

use tracing::error;

/// The exit code after a panic (the one Rust uses for a panicked main thread).
pub const PANIC_EXIT_CODE: i32 = 101;

/// Installs a panic hook that logs the panic through tracing (thread, location, message) after
/// the default report on stderr, then ends the process with [`PANIC_EXIT_CODE`], whichever task
/// or thread panicked.
pub fn install_panic_hook() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = info.location().map(ToString::to_string),
            "panic: {message}; exiting so that the service manager restarts the agent (the \
             data plane keeps running)"
        );
        process::exit(PANIC_EXIT_CODE);
    }));
}

/// The agent's tokio runtime.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use super::*;

    /// What the child process runs: the agent's hook, logging and runtime, and a spawned task
    /// that panics while the main task waits on something else.
    fn child() -> ! {
        tracing_subscriber::fmt()
            .with_writer(io::stderr)
            .with_ansi(false)
            .init();
        install_panic_hook();
        runtime().unwrap().block_on(async {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let v: Vec<u8> = Vec::new();
                let _ = v[usize::from(v.is_empty())];
            });
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        // Reached only when the panic did not end the process.
        process::exit(0);
    }

    #[test]
    fn a_panic_in_a_spawned_task_ends_the_process_with_a_log_line() {
        if std::env::var_os("EDGEPLANE_PANIC_CHILD").is_some() {
            child();
        }
        let started = std::time::Instant::now();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "runtime::supervise::tests::a_panic_in_a_spawned_task_ends_the_process_with_a_log_line",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EDGEPLANE_PANIC_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(PANIC_EXIT_CODE), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("panic: index out of bounds"))
            .unwrap_or_else(|| panic!("no panic log line in:\n{stderr}"));
        assert!(line.contains("supervise.rs"), "{line}");
        // Logged from the worker thread the task ran on.
        assert!(line.contains("thread=\"tokio-"), "{line}");
    }
}
