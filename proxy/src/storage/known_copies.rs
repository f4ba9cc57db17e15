//! Copy markers this proxy has seen during a reshard: a routing hint for
//! reads of moved keys (which server to ask first), never the decision.

use parking_lot::Mutex;

use crate::storage::reshard_sql::{self as sql, Span};

/// Copy markers this proxy has seen, for the running reshard: chunks a
/// target master (and so, soon after, its replicas) holds whole. Only a
/// routing hint (which server to ask first, whether the source is needed
/// at all); every answer is decided by the markers its own statement read.
#[derive(Default)]
pub struct KnownCopies(Mutex<Known>);

#[derive(Default)]
struct Known {
    reshard_id: String,
    /// Sorted by start; chunks of one reshard never overlap.
    spans: Vec<Span>,
}

impl Known {
    fn learn(&mut self, reshard_id: &str, spans: &[Span]) {
        if self.reshard_id != reshard_id {
            self.reshard_id = reshard_id.to_owned();
            self.spans.clear();
        }
        for s in spans {
            match self.spans.binary_search_by_key(&s.start, |k| k.start) {
                Ok(i) => self.spans[i] = *s,
                Err(i) => self.spans.insert(i, *s),
            }
        }
    }

    fn covers(&self, reshard_id: &str, pos: u64) -> bool {
        self.reshard_id == reshard_id && sql::covered(&self.spans, pos)
    }
}

impl KnownCopies {
    pub(crate) fn learn(&self, reshard_id: &str, spans: &[Span]) {
        if !spans.is_empty() {
            self.0.lock().learn(reshard_id, spans);
        }
    }

    pub(crate) fn covers(&self, reshard_id: &str, positions: &[u64]) -> Vec<bool> {
        let known = self.0.lock();
        positions
            .iter()
            .map(|p| known.covers(reshard_id, *p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64) -> Span {
        Span { start, end }
    }

    #[test]
    fn known_copies_keep_sorted_spans_per_reshard() {
        let mut k = Known::default();
        k.learn("r1", &[span(30, 39), span(10, 19)]);
        k.learn("r1", &[span(20, 29), span(10, 19)]);
        assert_eq!(k.spans, vec![span(10, 19), span(20, 29), span(30, 39)]);
        assert!(k.covers("r1", 10) && k.covers("r1", 25) && k.covers("r1", 39));
        assert!(!k.covers("r1", 9) && !k.covers("r1", 40));
        // Another reshard's markers say nothing about this one.
        assert!(!k.covers("r2", 25));
        k.learn("r2", &[span(50, 59)]);
        assert!(!k.covers("r1", 25));
        assert!(k.covers("r2", 55));
        assert_eq!(k.spans, vec![span(50, 59)]);
    }
}
