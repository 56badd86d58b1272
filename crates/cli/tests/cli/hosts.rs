//! Helpers the network-namespace tests share: running commands, bounded
//! waits, and processes killed on drop.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `program`, which must succeed.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A Python any uid can run (root's PATH may point into `/root`).
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Kills the process on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ok` every 100 ms; panics naming `what` after `limit` (a bound
/// against hanging, not a timing assertion).
pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Waits for the child, killing it after `limit`.
pub fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs to completion (killed after `limit`) and returns the output.
pub fn finish(mut cmd: Command, limit: Duration) -> Output {
    use std::io::Read as _;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Killed(cmd.spawn().unwrap());
    // Read while it runs, so a full pipe never blocks it.
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read(Box::new(child.0.stdout.take().unwrap()));
    let err = read(Box::new(child.0.stderr.take().unwrap()));
    let status = wait(&mut child.0, limit);
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Held by the tests that start a whole virtual network of hosts (a control
/// plane and several `meshwork run`): one at a time, so that on a 2-core
/// machine they do not starve each other and the rest of the suite.
pub fn one_network_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static NETWORKS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it leaves nothing to protect.
    NETWORKS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` (stdout piped, stderr inherited) and returns once it printed
/// its first line, which must be `ready`.
pub fn spawn_ready(mut cmd: Command) -> Killed {
    use std::io::BufRead as _;
    let mut child = Killed(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}
