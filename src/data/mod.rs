//! Data: unlabeled image sources and the stage-1 augmentation.

pub mod augment;
pub mod dense;
pub mod dense_aug;
pub mod folder;
pub mod lists;
pub mod npy;
pub mod tar;

pub use augment::{CropBox, RandomResizedCrop};
pub use folder::ImageSet;

use crate::error::Result;
use std::path::PathBuf;

/// A source of encoded images addressed by index.
pub trait ImageSource: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Name of item `i` for messages.
    fn name(&self, i: usize) -> String;
    /// Decode item `i` to RGB.
    fn load(&self, i: usize) -> Result<image::RgbImage>;
    /// Where the data set lives (for messages).
    fn root(&self) -> PathBuf;
}
