//! Evaluation metrics for the dense-prediction tasks (SPEC.md section 6), one file per family.

pub mod boundary;
