//! Multiply-accumulate counting: the layers that do the arithmetic (convolutions, linear
//! layers, attention's matrix products) report how many MACs they run, and [`count`] sums what
//! one closure runs on the calling thread. This is how `distillery info` reports a model's MACs
//! at its input size for every family without per-family formulas; it counts what fvcore and
//! `torch.utils.flop_counter` count (convolutions, linear layers, matrix products), not the
//! element-wise work.

use std::cell::Cell;

thread_local! {
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Record `n` multiply-accumulates (a no-op unless [`count`] is running on this thread).
pub fn add(n: usize) {
    MACS.with(|c| {
        if let Some(v) = c.get() {
            c.set(Some(v + n as u64));
        }
    });
}

/// Run `f` and return its result with the MACs it recorded.
pub fn count<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = MACS.with(|c| c.replace(Some(0)));
    let r = f();
    let n = MACS.with(|c| c.replace(outer)).unwrap_or(0);
    if let Some(o) = outer {
        MACS.with(|c| c.set(Some(o + n)));
    }
    (r, n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_inside_and_nests() {
        super::add(5);
        let ((), n) = super::count(|| {
            super::add(3);
            let ((), inner) = super::count(|| super::add(4));
            assert_eq!(inner, 4);
        });
        assert_eq!(n, 7);
    }
}
