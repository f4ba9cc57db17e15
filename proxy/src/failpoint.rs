//! Failpoints: named places where a test makes the proxy panic on purpose,
//! to prove that the supervision around them recovers (a panicked flusher
//! restarts with its batch intact).
//!
//! Compiled in only with the `failpoints` feature, which the integration
//! tests enable through a dev-dependency; a proxy built for use (`cargo
//! install`, `cargo dev`) has [`hit`] as an empty function. A failpoint is
//! armed for one *scope* prefix (a test's own `writer_id` prefix), so tests
//! sharing a process do not trip each other's, and fires once.

#[cfg(feature = "failpoints")]
static ARMED: parking_lot::Mutex<Vec<(String, String)>> = parking_lot::Mutex::new(Vec::new());

/// Arms `point` to panic once, at the first hit whose scope starts with
/// `scope_prefix`.
#[cfg(feature = "failpoints")]
pub fn arm(point: &str, scope_prefix: &str) {
    ARMED
        .lock()
        .push((point.to_owned(), scope_prefix.to_owned()));
}

/// Panics if `point` is armed for `scope` (disarming it first).
#[inline]
pub fn hit(point: &str, scope: &str) {
    #[cfg(feature = "failpoints")]
    {
        let fired = {
            let mut armed = ARMED.lock();
            let at = armed
                .iter()
                .position(|(p, prefix)| p == point && scope.starts_with(prefix.as_str()));
            at.map(|i| armed.remove(i))
        };
        if fired.is_some() {
            panic!("failpoint {point} hit (scope {scope})");
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = (point, scope);
}
