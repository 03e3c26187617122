//! Learning-rate schedules with the semantics of transformers' `get_scheduler`.

choice! {
    /// The learning-rate schedule (`lr_scheduler_type`), as transformers' `get_scheduler`.
    pub enum LrSchedulerType {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
    }
}

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn learning_rate(kind: LrSchedulerType, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    let s = step as f64;
    let w = warmup as f64;
    let in_warmup = step < warmup;
    match kind {
        LrSchedulerType::Constant => base,
        LrSchedulerType::ConstantWithWarmup => {
            if in_warmup {
                base * s / w.max(1.0)
            } else {
                base
            }
        }
        LrSchedulerType::Cosine => {
            if in_warmup {
                return base * s / w.max(1.0);
            }
            let progress = (s - w) / ((total as f64 - w).max(1.0));
            base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
        }
        LrSchedulerType::Linear => {
            if in_warmup {
                return base * s / w.max(1.0);
            }
            base * ((total as f64 - s) / (total as f64 - w).max(1.0)).max(0.0)
        }
    }
}

/// Warm-up steps: `warmup_steps` if set, else `ceil(warmup_ratio * total)` (as transformers).
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // linear, 10 steps, 2 warm-up: 0, .5, 1, 7/8, ...
        let lr: Vec<f64> = (0..10)
            .map(|s| learning_rate(LrSchedulerType::Linear, 1.0, s, 10, 2))
            .collect();
        assert_eq!(lr[0], 0.0);
        assert_eq!(lr[1], 0.5);
        assert_eq!(lr[2], 1.0);
        assert!((lr[3] - 7.0 / 8.0).abs() < 1e-15);
        assert!((lr[9] - 1.0 / 8.0).abs() < 1e-15);
        // cosine: half-way through the decay = 0.5
        assert!((learning_rate(LrSchedulerType::Cosine, 1.0, 6, 10, 2) - 0.5).abs() < 1e-15);
        assert!((learning_rate(LrSchedulerType::Cosine, 2.0, 2, 10, 2) - 2.0).abs() < 1e-15);
        assert_eq!(learning_rate(LrSchedulerType::Constant, 3.0, 0, 10, 2), 3.0);
        assert_eq!(learning_rate(LrSchedulerType::ConstantWithWarmup, 3.0, 1, 10, 2), 1.5);
        assert_eq!(warmup_steps(0, 0.1, 25), 3);
        assert_eq!(warmup_steps(4, 0.1, 25), 4);
    }
}
