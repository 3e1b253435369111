//! Returning freed memory to the system while the gateway is quiet.
//!
//! mimalloc (the agent's allocator) gives freed pages back to the system a second
//! after they are freed, but only when the thread that owns them next allocates or
//! frees: a gateway that goes quiet after a burst of thousands of calls would keep
//! the burst's memory until traffic came back. [`keep_collecting`] asks mimalloc to
//! collect once a second on the thread it runs on: with a thread per core, every
//! worker runs one; the shared runtime runs one on one of its threads (the others
//! return their share with their next call).

use std::time::Duration;

const EVERY: Duration = Duration::from_secs(1);

/// Runs until its runtime stops.
pub async fn keep_collecting() {
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        return_freed();
    }
}

#[allow(
    unsafe_code,
    reason = "mimalloc's collect call, which takes no pointers"
)]
fn return_freed() {
    // SAFETY: `mi_collect` takes a flag and no pointers; it collects the calling
    // thread's own heap, and may be called at any time from any thread, with mimalloc
    // as the global allocator or not.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
