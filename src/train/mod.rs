//! Training: optimiser, schedule, checkpoints, and the stage runners.

pub mod cache;
pub mod checkpoint;
pub mod engine;
pub mod heldout;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod stage1;
pub mod stage2;

/// The training progress bar (position, throughput message, ETA); hidden when not wanted.
pub fn progress_bar(total: u64, start: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(start);
    pb
}
