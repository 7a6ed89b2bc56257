//! A real nginx (Debian's `nginx-light`, installed by `cargo xtask setup`) in a namespace that
//! lets a request through to an upstream only with a given bearer token and answers 401
//! otherwise: the gate operators put in front of a Prometheus, which cannot require a token
//! itself.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use edgeplane_testbed::netns::Netns;

/// Stopped (and its directory removed) on drop.
pub struct AuthProxy {
    child: Child,
    dir: PathBuf,
}

impl AuthProxy {
    /// Listens on `listen` in `ns` and passes requests with `Authorization: Bearer <token>`
    /// to `upstream`; returns once it accepts connections.
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        upstream: SocketAddr,
        token: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let dir = dir.join("nginx");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        // The master stays in the foreground as the test's child; its one worker runs as
        // root to write the temporary files in the test's directory.
        let conf = format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {listen};\n    location / {{\n\
             if ($http_authorization != \"Bearer {token}\") {{ return 401; }}\n\
             proxy_pass http://{upstream};\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = ns
            .command("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (Debian package nginx-light; `cargo xtask setup`)")?;
        let mut proxy = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                anyhow::bail!("nginx exited ({status}):\n{}", proxy.log());
            }
            let up = {
                let _in = ns.enter()?;
                TcpStream::connect(listen).is_ok()
            };
            if up {
                return Ok(proxy);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nginx not listening in 10 s:\n{}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// How many requests it answered with `status`, from its access log.
    pub fn answered(&self, status: u16) -> usize {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let status = format!("\" {status} ");
        log.lines().filter(|l| l.contains(&status)).count()
    }
}

impl Drop for AuthProxy {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker and removes its pid file.
        let _ = edgeplane_testbed::terminate(&mut self.child, Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
