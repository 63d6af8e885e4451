//! The integration tests, one binary (each file was its own binary: 17 test executables of
//! ~550 MB linked the whole crate again each and filled a CI disk). `hub` stays separate: it
//! sets process environment variables.

mod boundary;
mod cli;
mod cnn_parity;
mod common;
mod dense_data;
mod distill;
mod full_size;
mod load_errors;
mod metrics;
mod onnx;
mod onnx_teacher;
mod parity;
mod retrieval;
mod stage2;
mod student_sources;
mod transfer;
mod transfer_seg;
