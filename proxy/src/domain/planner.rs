//! The range planner: which tier rows answer `[from, to)` with the fewest
//! rows read.
//!
//! Whole days inside the range come from day rows, whole hours from hour
//! rows, and the ragged edges from minute rows. The pieces are disjoint and
//! cover exactly the minutes of the range, so their sum equals the sum of
//! the minute rows (tiers are written in one transaction and never
//! disagree). Pure logic; the SQL for the pieces lives in `db`.

use crate::domain::tier::Tier;

/// The times a range may name: what RFC 3339 can write, 0000-01-01T00:00:00Z
/// to 9999-12-31T23:59:59Z. Within these, flooring and ceiling to a day
/// cannot overflow an `i64` (near `i64::MIN` they would).
pub const MIN_TIME: i64 = -62_167_219_200;
pub const MAX_TIME: i64 = 253_402_300_799;

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86400;

/// One piece of a plan: rows of `tier` with `start <= bucket < end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Piece {
    pub tier: Tier,
    pub start: i64,
    pub end: i64,
}

/// Floors `t` to a multiple of `step` (also for negative times).
pub fn floor(t: i64, step: i64) -> i64 {
    t - t.rem_euclid(step)
}

fn ceil(t: i64, step: i64) -> i64 {
    let f = floor(t, step);
    if f == t { t } else { f + step }
}

/// The minute range a request means: both ends floored to the minute
/// (SPEC: "ranges are half-open and floored to the bucket size").
/// Requests are checked against [`MIN_TIME`]..=[`MAX_TIME`] when parsed;
/// clamping here keeps the planner total for any caller.
pub fn minute_range(from: i64, to: i64) -> (i64, i64) {
    let clamp = |t: i64| floor(t.clamp(MIN_TIME, MAX_TIME), MINUTE);
    (clamp(from), clamp(to))
}

/// Plans `[from, to)` in minutes (both minute-aligned and within
/// [`MIN_TIME`]..=[`MAX_TIME`], as [`minute_range`] returns them).
pub fn plan(from: i64, to: i64) -> Vec<Piece> {
    debug_assert!(
        (MIN_TIME..=MAX_TIME).contains(&from) && (MIN_TIME..=MAX_TIME).contains(&to),
        "plan({from}, {to}) outside the supported times"
    );
    let mut pieces = Vec::new();
    if from >= to {
        return pieces;
    }
    let (day_start, day_end) = (ceil(from, DAY), floor(to, DAY));
    if day_start < day_end {
        plan_hours(from, day_start, &mut pieces);
        pieces.push(Piece {
            tier: Tier::Day,
            start: day_start,
            end: day_end,
        });
        plan_hours(day_end, to, &mut pieces);
    } else {
        plan_hours(from, to, &mut pieces);
    }
    pieces
}

fn plan_hours(from: i64, to: i64, pieces: &mut Vec<Piece>) {
    let (hour_start, hour_end) = (ceil(from, HOUR), floor(to, HOUR));
    if hour_start < hour_end {
        push_minutes(from, hour_start, pieces);
        pieces.push(Piece {
            tier: Tier::Hour,
            start: hour_start,
            end: hour_end,
        });
        push_minutes(hour_end, to, pieces);
    } else {
        push_minutes(from, to, pieces);
    }
}

fn push_minutes(from: i64, to: i64, pieces: &mut Vec<Piece>) {
    if from < to {
        pieces.push(Piece {
            tier: Tier::Minute,
            start: from,
            end: to,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expands a plan into the minutes it covers.
    fn covered(pieces: &[Piece]) -> Vec<i64> {
        let mut minutes: Vec<i64> = pieces
            .iter()
            .flat_map(|p| (p.start..p.end).step_by(60))
            .collect();
        minutes.sort_unstable();
        minutes
    }

    #[test]
    fn uses_days_hours_and_minute_edges() {
        let d = 1_704_067_200; // 2024-01-01T00:00Z
        let p = plan(d - 2 * HOUR - 5 * MINUTE, d + DAY + HOUR + 7 * MINUTE);
        let tiers: Vec<(Tier, i64, i64)> = p.iter().map(|p| (p.tier, p.start, p.end)).collect();
        assert_eq!(
            tiers,
            [
                (Tier::Minute, d - 2 * HOUR - 5 * MINUTE, d - 2 * HOUR),
                (Tier::Hour, d - 2 * HOUR, d),
                (Tier::Day, d, d + DAY),
                (Tier::Hour, d + DAY, d + DAY + HOUR),
                (Tier::Minute, d + DAY + HOUR, d + DAY + HOUR + 7 * MINUTE),
            ]
        );
    }

    #[test]
    fn small_ranges_are_minutes_only_and_empty_ranges_are_empty() {
        let d = 1_704_067_200;
        assert_eq!(
            plan(d + 60, d + 600),
            [Piece {
                tier: Tier::Minute,
                start: d + 60,
                end: d + 600
            }]
        );
        assert!(plan(d, d).is_empty());
        assert!(plan(d + 60, d).is_empty());
    }

    #[test]
    fn pieces_cover_every_minute_exactly_once() {
        let mut rng = fastrand::Rng::with_seed(7);
        let base = 1_704_067_200 - 3 * DAY;
        for _ in 0..2000 {
            let a = base + rng.i64(0..6 * DAY) / 60 * 60;
            let b = a + rng.i64(0..4 * DAY) / 60 * 60;
            let want: Vec<i64> = (a..b).step_by(60).collect();
            assert_eq!(covered(&plan(a, b)), want, "[{a}, {b})");
        }
    }

    /// Found by `cargo fuzz run read_params`: a range starting near
    /// `i64::MIN` overflowed while flooring to the day.
    #[test]
    fn extreme_ranges_are_clamped_and_still_covered_exactly() {
        let (from, to) = minute_range(-9_223_372_036_854_764_451, 0);
        assert_eq!(from, MIN_TIME);
        let p = plan(from, to);
        assert_eq!(p.first().map(|p| p.start), Some(MIN_TIME));
        assert_eq!(p.last().map(|p| p.end), Some(0));
        let (from, to) = minute_range(i64::MIN, i64::MAX);
        let p = plan(from, to);
        assert_eq!((p[0].start, p[p.len() - 1].end), (from, to));
        assert!(p.windows(2).all(|w| w[0].end == w[1].start), "{p:?}");
        assert_eq!(to, MAX_TIME - 59);
    }

    #[test]
    fn floor_handles_negative_times() {
        assert_eq!(floor(-1, 60), -60);
        assert_eq!(floor(59, 60), 0);
        assert_eq!(minute_range(61, 179), (60, 120));
    }
}
