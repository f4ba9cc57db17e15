//! The service manager's notification protocol (`sd_notify(3)`), without
//! libsystemd: when `NOTIFY_SOCKET` names a unix datagram socket (a path,
//! or `@name` in the abstract namespace), each state change is one
//! datagram of newline-separated `KEY=value` assignments (`READY=1`,
//! `STOPPING=1`, `STATUS=…`, `WATCHDOG=1`). Without `NOTIFY_SOCKET` there
//! is no [`Notifier`] and nothing is sent.
//!
//! A leaf: it knows no other module. `server` decides when to send what
//! (READY=1 once `/readyz` would answer 200, STOPPING=1 when the stop
//! begins) and runs the watchdog; a failed send is logged, never fatal.

use std::fmt;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go: one unbound, non-blocking datagram socket and
/// the manager's address.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for log lines.
    name: String,
    watchdog: Option<Duration>,
}

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum AddressError {
    Empty,
    /// Neither an absolute path nor `@name` (systemd's `vsock:` addresses
    /// included: not supported).
    Unsupported,
    /// Longer than a `sockaddr_un` holds.
    TooLong,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressError::Empty => "empty",
            AddressError::Unsupported => "neither an absolute path nor an @abstract name",
            AddressError::TooLong => "too long for a unix socket address",
        })
    }
}

/// The socket address `NOTIFY_SOCKET` names: `/path`, or `@name` for
/// `name` in Linux's abstract namespace (a leading NUL byte).
pub fn parse_address(value: &str) -> Result<SocketAddr, AddressError> {
    if value.is_empty() {
        return Err(AddressError::Empty);
    }
    if let Some(name) = value.strip_prefix('@') {
        return abstract_address(name.as_bytes());
    }
    if !value.starts_with('/') {
        return Err(AddressError::Unsupported);
    }
    SocketAddr::from_pathname(value).map_err(|_| AddressError::TooLong)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> Result<SocketAddr, AddressError> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).map_err(|_| AddressError::TooLong)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> Result<SocketAddr, AddressError> {
    Err(AddressError::Unsupported)
}

/// One notification: `KEY=value` lines, each ended by a newline. A value
/// is one line: newlines in it become spaces.
pub fn message(fields: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (key, value) in fields {
        out.push_str(key);
        out.push('=');
        out.extend(value.chars().map(|c| if c == '\n' { ' ' } else { c }));
        out.push('\n');
    }
    out
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set
/// (and above 0) and `WATCHDOG_PID`, if set, is this process.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for; `None` when it is unset or
    /// unusable (logged).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let Some(name) = name.to_str() else {
            tracing::warn!("NOTIFY_SOCKET is not UTF-8; not notifying the service manager");
            return None;
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        match Notifier::new(name, watchdog) {
            Ok(n) => {
                tracing::info!(socket = %name, watchdog = ?watchdog, "notifying the service manager (sd_notify)");
                Some(n)
            }
            Err(e) => {
                tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET unusable; not notifying the service manager");
                None
            }
        }
    }

    /// A notifier sending to `address` (`NOTIFY_SOCKET`'s syntax).
    pub fn new(address: &str, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let addr = parse_address(address)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must not stall an async worker: the
        // datagram is dropped (and logged) instead.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket,
            addr,
            name: address.to_owned(),
            watchdog,
        })
    }

    /// How often the watchdog wants `WATCHDOG=1`, when it is enabled.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification; a failure is logged, never returned.
    pub fn send(&self, fields: &[(&str, &str)]) {
        let msg = message(fields);
        if let Err(e) = self.socket.send_to_addr(msg.as_bytes(), &self.addr) {
            tracing::warn!(socket = %self.name, error = %e, message = %msg.trim_end().replace('\n', " "), "cannot notify the service manager");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let path = parse_address("/run/systemd/notify").expect("path");
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let abs = parse_address("@tally/notify").expect("abstract");
            assert_eq!(abs.as_abstract_name(), Some(&b"tally/notify"[..]));
            assert!(abs.as_pathname().is_none());
            // `@` alone is the empty abstract name, as sd_notify reads it.
            let empty = parse_address("@").expect("empty abstract");
            assert_eq!(empty.as_abstract_name(), Some(&b""[..]));
        }
        assert_eq!(parse_address("").unwrap_err(), AddressError::Empty);
        for unsupported in ["run/notify", "vsock:2:1234", "./notify"] {
            assert_eq!(
                parse_address(unsupported).unwrap_err(),
                AddressError::Unsupported,
                "{unsupported}"
            );
        }
        let long = format!("/{}", "x".repeat(200));
        assert_eq!(parse_address(&long).unwrap_err(), AddressError::TooLong);
        let long = format!("@{}", "x".repeat(200));
        assert_eq!(parse_address(&long).unwrap_err(), AddressError::TooLong);
    }

    #[test]
    fn messages_are_one_assignment_per_line() {
        assert_eq!(
            message(&[("READY", "1"), ("STATUS", "ready: topology version 3")]),
            "READY=1\nSTATUS=ready: topology version 3\n"
        );
        assert_eq!(message(&[("STATUS", "two\nlines")]), "STATUS=two lines\n");
        assert_eq!(message(&[]), "");
    }

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_for_this_process_only() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("30000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(
            watchdog_interval(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }

    /// A datagram reaches a socket bound in the abstract namespace, and a
    /// manager that went away is logged, not an error.
    #[cfg(target_os = "linux")]
    #[test]
    fn sends_a_datagram_to_an_abstract_socket() {
        let name = format!(
            "@tally-notify-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        );
        let receiver = UnixDatagram::bind_addr(&parse_address(&name).expect("addr")).expect("bind");
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::new(&name, None).expect("notifier");
        n.send(&[("READY", "1"), ("STATUS", "ready")]);
        let mut buf = [0u8; 256];
        let len = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ready\n");
        drop(receiver);
        n.send(&[("STOPPING", "1")]);
    }
}
