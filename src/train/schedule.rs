//! Learning-rate schedules, evaluated per iteration.

use serde::{Deserialize, Serialize};

/// Linear warm-up from `warmup_lr` to `lr` over `warmup` steps, then cosine decay to `min_lr`
/// at `total` steps (timm's per-iteration cosine scheduler, as the reference uses).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl CosineSchedule {
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.warmup_lr + (self.lr - self.warmup_lr) * step as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Polynomial decay `lr * (1 - step/total)^power` (stage 2).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolySchedule {
    pub lr: f64,
    pub power: f64,
    pub total: u64,
}

impl PolySchedule {
    pub fn at(&self, step: u64) -> f64 {
        let t = (step as f64 / self.total.max(1) as f64).min(1.0);
        self.lr * (1.0 - t).powf(self.power)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup() {
        let s = CosineSchedule {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_lr: 1.25e-7,
            warmup: 10,
            total: 110,
        };
        assert!((s.at(0) - 1.25e-7).abs() < 1e-15);
        assert!((s.at(5) - (1.25e-7 + (1e-3 - 1.25e-7) * 0.5)).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        // half-way through the cosine: mean of lr and min_lr
        assert!((s.at(60) - (1e-3 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((s.at(110) - 1e-5).abs() < 1e-12);
        let p = PolySchedule {
            lr: 2e-5,
            power: 0.9,
            total: 100,
        };
        assert!((p.at(50) - 2e-5 * 0.5f64.powf(0.9)).abs() < 1e-15);
    }
}
