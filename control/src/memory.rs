//! How the daemon's heap gives memory back (issue 23, ADR 0031). glibc's allocator keeps
//! what was freed for reuse: after a burst (a resync of 10,000 endpoints, an `lb ls` of
//! 10,000 services) the daemon held about twice its live heap, spread over one arena per
//! thread that had allocated. Two settings bound that: at most two arenas, and every few
//! seconds the free pages inside the heap go back to the kernel.

use std::time::Duration;

/// How often free pages are handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// At most two malloc arenas (glibc makes up to eight per core, one per thread that
/// allocates while another holds the arena it used). Call before any thread starts.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator; it is called before the
    // runtime starts its threads, and its result (0 on a refused value) is only advisory.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands the free pages of every arena back to the kernel (glibc's `malloc_trim`: the
/// pages inside the heap, not only its top). Returns whether any went back.
pub fn trim() -> bool {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the allocator's own locks; it is safe to call from any
    // thread at any time.
    unsafe {
        libc::malloc_trim(0) == 1
    }
    #[cfg(not(target_env = "gnu"))]
    false
}

/// Trims every `period`, off the runtime's worker threads.
pub async fn trim_every(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_env = "gnu")]
    #[test]
    fn a_freed_burst_goes_back_to_the_kernel() {
        fn rss_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").expect("status");
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("VmRSS")
        }
        // 64 MiB in small blocks, one in 64 kept: what is freed lies between live blocks,
        // where the heap's top cannot give it back.
        let mut blocks: Vec<Vec<u8>> = (0..(64 << 20) / 512).map(|i| vec![i as u8; 512]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(64).map(std::mem::take).collect();
        drop(blocks);
        let before = rss_kib();
        assert!(trim(), "glibc gave nothing back");
        let after = rss_kib();
        assert!(kept.iter().all(|b| b.len() == 512));
        assert!(after + 16 * 1024 < before, "RSS {before} KiB before the trim, {after} KiB after");
    }
}
