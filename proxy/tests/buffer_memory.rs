//! Memory per pending (counter, minute) entry, measured with a counting
//! allocator: the SPEC's budget is at most 200 bytes. Deterministic (it
//! counts bytes, not time), so it can be a test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tally_admin::{ShardRing, routing_key};
use tally_proxy::testing::{Delta, FlushRows, GroupBuffer};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocator's count is global: measurements must not overlap (the
/// test harness runs tests on parallel threads).
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Bytes per entry for `counters` counters with `minutes` minutes each,
/// keys shaped like real video ids (`views` / `BV1x` + 8 characters).
fn bytes_per_entry(counters: usize, minutes: i64) -> f64 {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let keys: Vec<(Vec<u8>, u64)> = (0..counters)
        .map(|i| {
            let rk = routing_key("views", &format!("BV1x{i:08}"));
            let pos = ShardRing::position(&rk);
            (rk, pos)
        })
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let buffer = GroupBuffer::new("g0", usize::MAX, usize::MAX);
    for m in 0..minutes {
        buffer.merge(keys.iter().map(|(rk, pos)| Delta {
            routing_key: rk,
            ring_pos: *pos,
            minute: 1_700_000_000 + m * 60,
            delta: 1,
            id: None,
            dups: None,
        }));
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(buffer.pending(), counters * minutes as usize);
    let per_entry = used as f64 / buffer.pending() as f64;
    println!("{counters} counters x {minutes} minute(s): {per_entry:.1} bytes per pending entry");
    drop(buffer);
    per_entry
}

#[test]
fn a_pending_entry_costs_at_most_200_bytes() {
    // One minute per counter is the worst case: the key is not shared.
    let one = bytes_per_entry(1_000_000, 1);
    let three = bytes_per_entry(300_000, 3);
    assert!(
        one <= 200.0,
        "{one:.1} bytes per entry with one minute per counter"
    );
    assert!(
        three <= 200.0,
        "{three:.1} bytes per entry with three minutes per counter"
    );
}

/// Bytes per entry of what a flush holds while its master is down: the
/// batch cut from the buffer plus the rows derived from it (four tiers).
/// The rows share each counter's key bytes across tiers instead of copying
/// them per row, so a batch held through an outage stays near the budget
/// of its entries.
fn in_flight_bytes_per_entry(counters: usize) -> f64 {
    let _alone = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let keys: Vec<(Vec<u8>, u64)> = (0..counters)
        .map(|i| {
            let rk = routing_key("views", &format!("BV1x{i:08}-a-longer-video-key"));
            let pos = ShardRing::position(&rk);
            (rk, pos)
        })
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let buffer = GroupBuffer::new("g0", usize::MAX, usize::MAX);
    buffer.merge(keys.iter().map(|(rk, pos)| Delta {
        routing_key: rk,
        ring_pos: *pos,
        minute: 1_700_000_000,
        delta: 1,
        id: None,
        dups: None,
    }));
    let batch = buffer.cut();
    let rows = FlushRows::derive(&batch);
    let used = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(rows.len(), 4 * counters);
    let per_entry = used as f64 / counters as f64;
    println!("{counters} counters in flight with their rows: {per_entry:.1} bytes per entry");
    drop(rows);
    drop(batch);
    drop(buffer);
    per_entry
}

#[test]
fn a_batch_in_flight_with_its_rows_costs_at_most_400_bytes_per_entry() {
    let held = in_flight_bytes_per_entry(200_000);
    assert!(
        held <= 400.0,
        "{held:.1} bytes per entry for a cut batch and its derived rows"
    );
}
