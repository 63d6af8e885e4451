//! Training: optimiser, schedule, checkpoints, and the stage runners.

pub mod cache;
pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod stage1;
pub mod stage2;
