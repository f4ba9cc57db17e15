//! Counts in memory and on the wire.
//!
//! A stored count is a signed 64-bit integer (a BIGINT row, an int64 in the
//! API). Sums of deltas are taken in [`Sum`], twice as wide, so that no
//! number of increments wraps silently before it is checked; a sum is
//! narrowed back to 64 bits only where it is answered or stored, and a sum
//! that does not fit is an error there, never a wrapped or clamped value.

use crate::error::ApiError;

/// A sum of deltas (or of a stored count and deltas). 2^127 is ~10^29
/// deltas of the largest size accepted, more than any process can merge.
pub type Sum = i128;

/// The count of `key` to answer, `stored + pending`, or
/// [`ApiError::CountOutOfRange`] when it does not fit 64 bits (pending
/// deltas that would take a stored count past the range are quarantined
/// when they are flushed, so this is a passing state).
pub fn answerable(key: &[u8], stored: i64, pending: Sum) -> Result<i64, ApiError> {
    let sum = Sum::from(stored) + pending;
    i64::try_from(sum).map_err(|_| {
        ApiError::CountOutOfRange(format!(
            "the count of {:?} with its pending deltas is {sum}, outside the 64-bit range; \
             the deltas that do not fit are quarantined when flushed (docs/operations.md)",
            String::from_utf8_lossy(key)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_answered_only_when_they_fit_64_bits() {
        assert_eq!(answerable(b"a", i64::MAX - 2, 2).ok(), Some(i64::MAX));
        assert_eq!(answerable(b"a", i64::MAX, -5).ok(), Some(i64::MAX - 5));
        assert_eq!(
            answerable(b"a", i64::MIN, Sum::from(i64::MAX) * 2).ok(),
            Some(i64::MAX - 1)
        );
        let e = answerable(b"a", i64::MAX, 1).expect_err("one past the maximum");
        assert_eq!(e.code(), "count_out_of_range");
        assert!(e.to_string().contains("9223372036854775808"), "{e}");
        assert!(answerable(b"a", i64::MIN, -1).is_err());
    }
}
