//! The storage tiers of a count: minute, hour and day buckets and the
//! all-time total. The planner splits ranges over them; storage names
//! their tables.

/// The storage tiers; each has its own table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Minute,
    Hour,
    Day,
    Total,
}

impl Tier {
    pub fn table(self) -> &'static str {
        match self {
            Tier::Minute => "counter_minute",
            Tier::Hour => "counter_hour",
            Tier::Day => "counter_day",
            Tier::Total => "counter_total",
        }
    }

    /// Bucket width in seconds (`None` for the all-time total).
    pub fn width(self) -> Option<i64> {
        match self {
            Tier::Minute => Some(60),
            Tier::Hour => Some(3600),
            Tier::Day => Some(86400),
            Tier::Total => None,
        }
    }
}
