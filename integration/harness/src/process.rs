//! Finding the MariaDB executables and spawning servers that cannot outlive us.
//!
//! A test that is killed abruptly (SIGKILL, a CI timeout, Ctrl-C of
//! `cargo test`) never runs destructors, so `Drop` alone cannot promise "no
//! `mariadbd` left behind". Linux offers `prctl(PR_SET_PDEATHSIG)`: the kernel
//! sends a signal to the child when its parent dies. The catch is that
//! "parent" means the *thread* that forked, and tokio's blocking threads (and
//! test threads) come and go. So every server is forked by one dedicated
//! thread that lives as long as the process; the signal then fires exactly
//! when the process dies. This module is the only place with `unsafe` code.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use crate::HarnessError;

/// Looks for `name` on `PATH`, then in the sbin directories that the `PATH` of
/// a non-root shell often lacks (Debian installs `mariadbd` in `/usr/sbin`).
pub(crate) fn find_binary(name: &'static str) -> Result<PathBuf, HarnessError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallbacks = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    from_path
        .into_iter()
        .chain(fallbacks)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or(HarnessError::BinaryNotFound { binary: name })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A request to the spawner thread: the command and where to send the child.
struct SpawnRequest {
    command: Command,
    reply: tokio::sync::oneshot::Sender<io::Result<Child>>,
}

/// Returns the sender of the process-wide spawner thread, starting it once.
fn spawner() -> Result<&'static mpsc::Sender<SpawnRequest>, HarnessError> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    // Two callers may race here; the loser's thread sees its channel closed
    // (its sender is dropped below) and exits before forking anything.
    std::thread::Builder::new()
        .name("tally-harness-spawner".into())
        .spawn(move || {
            // The static keeps a sender forever, so this loop (and with it the
            // thread that is the parent of every server) ends only with the
            // process.
            for SpawnRequest { mut command, reply } in rx {
                // If the caller gave up (its future was dropped), nobody
                // would ever stop this child: stop it here.
                if let Err(Ok(mut orphan)) = reply.send(command.spawn()) {
                    kill_and_reap(&mut orphan);
                }
            }
        })
        .map_err(|e| HarnessError::io("starting the spawner thread", e))?;
    Ok(SPAWNER.get_or_init(|| tx))
}

/// Spawns `command` from the long-lived spawner thread with a parent-death
/// signal of SIGKILL, so the child dies with this process however it ends.
pub(crate) async fn spawn_tied_to_process(mut command: Command) -> Result<Child, HarnessError> {
    let parent = std::process::id();
    // A process group of its own: Ctrl-C in a terminal signals the whole
    // foreground group, and the servers must outlive the proxy's final flush
    // (tally-dev stops them itself, in order).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let describe = format!("{command:?}");
    // SAFETY: the closure runs in the forked child before exec and only calls
    // the async-signal-safe functions prctl(2) and getppid(2); it allocates
    // nothing (allocating between fork and exec can deadlock).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died between fork and prctl, the signal will never
            // come: refuse to run orphaned.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| HarnessError::io("spawner thread", io::Error::other("it has stopped")))?;
    answer
        .await
        .map_err(|_| HarnessError::io("spawner thread", io::Error::other("it dropped a request")))?
        .map_err(|e| HarnessError::io(format!("spawning {describe}"), e))
}

/// Sends SIGTERM to a child we still own.
///
/// The child is not yet reaped while we hold its `Child`, so its pid cannot
/// have been reused by another process.
pub(crate) fn sigterm(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// SIGKILLs a child and reaps it, so the process is gone when this returns.
pub(crate) fn kill_and_reap(child: &mut Child) {
    // `Child::kill` sends SIGKILL on Unix; it fails only if the child was
    // already reaped, in which case `wait` returns the cached status.
    let _ = child.kill();
    let _ = child.wait();
}

/// How often the harness polls for a condition (process exit, replication).
pub(crate) const POLL: Duration = Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sbin_binaries_and_explains_missing_ones() {
        // `sh` is everywhere; a missing binary gets the install hint.
        assert!(find_binary("sh").is_ok());
        let missing = find_binary("tally-no-such-binary").expect_err("missing");
        assert_eq!(
            missing.to_string(),
            "tally-no-such-binary not found on PATH: install the Debian package \
             `mariadb-server` (apt-get install -y mariadb-server)"
        );
    }
}
