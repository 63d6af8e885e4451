//! distillery: turn large frozen vision foundation models into small, fast task models.
//!
//! This crate provides the teacher zoo ([`models`]): DINOv2 (with and without registers),
//! CLIP and SigLIP vision towers, plain ViT (transformers and timm naming) and the SAM image
//! encoder, loaded from Hugging Face folders or hub ids with the checkpoints' own weight names,
//! runnable at any input resolution, with every block's output available.

pub mod atomic;
pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod embedded;
pub mod error;
pub mod export;
pub mod features;
pub mod hub;
pub mod interp;
pub mod kernels;
pub mod losses;
pub mod macs;
pub mod mat;
pub mod metrics;
pub mod models;
pub mod onnx;
pub mod predict;
pub mod preprocess;
pub mod retrieval;
pub mod target_norm;
pub mod tasks;
pub mod teacher;
pub mod train;
pub mod transfer;
pub mod viz;
pub mod weights;

pub use error::{Error, Result};
pub use models::{
    load, EncoderOutput, Family, FeatureRequest, LoadOptions, ModelInfo, VisionEncoder,
};
