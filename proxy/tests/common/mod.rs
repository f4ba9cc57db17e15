//! What the tests that run the `tally-proxy` binary as a process share.

use std::net::TcpListener;

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tally-proxy");

/// Kills (SIGKILL) and reaps the child when dropped, so a failing test
/// leaves no proxy running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends SIGTERM to the child (a graceful stop).
pub fn sigterm(child: &KillOnDrop) {
    let pid = child.0.id() as i32;
    // SAFETY: kill(2) on the pid of our own, still unreaped child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Waits (off the async workers) until the child exits.
pub async fn exit_status(mut child: KillOnDrop) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .expect("join")
        .expect("wait")
}
