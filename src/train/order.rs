//! The data order: which examples each micro-batch holds, epoch after epoch, and how many
//! optimizer steps a run takes.

use crate::config::TrainConfig;
use crate::util::Rng;

/// The data order: micro-batch `k` of an endless stream over epochs, each epoch a seeded
/// permutation (or file order when `shuffle = false`).
pub struct Order {
    n: usize,
    batch: usize,
    seed: u64,
    shuffle: bool,
    /// The last epoch's permutation: drawn once per epoch, not once per micro-batch (an SFT
    /// set can hold millions of rows).
    cached_epoch: std::sync::Mutex<Option<(usize, std::sync::Arc<Vec<usize>>)>>,
}

impl Order {
    pub fn new(n: usize, batch: usize, seed: u64, shuffle: bool) -> Self {
        Order {
            n,
            batch,
            seed,
            shuffle,
            cached_epoch: std::sync::Mutex::new(None),
        }
    }
    pub fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch)
    }
    /// Indices of micro-batch `k`.
    pub fn micro_batch(&self, k: usize) -> Vec<usize> {
        let per = self.batches_per_epoch();
        let (epoch, j) = (k / per, k % per);
        let idx = {
            let mut cache = self.cached_epoch.lock().unwrap_or_else(|e| e.into_inner());
            match &*cache {
                Some((e, idx)) if *e == epoch => idx.clone(),
                _ => {
                    let mut idx: Vec<usize> = (0..self.n).collect();
                    if self.shuffle {
                        Rng::new(self.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut idx);
                    }
                    let idx = std::sync::Arc::new(idx);
                    *cache = Some((epoch, idx.clone()));
                    idx
                }
            }
        };
        idx[j * self.batch..((j + 1) * self.batch).min(self.n)].to_vec()
    }
}

impl crate::algorithms::DataOrder for Order {
    fn micro_batch(&self, k: usize) -> Vec<usize> {
        Order::micro_batch(self, k)
    }
}

/// Total optimizer steps (transformers' arithmetic: whole update steps per epoch, each step's
/// data serving `steps_per_batch` steps).
pub fn total_steps(cfg: &TrainConfig, n_units: usize, units_per_micro_batch: usize, steps_per_batch: usize) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps as usize;
    }
    let batches = n_units.div_ceil(units_per_micro_batch.max(1));
    let per_epoch = (batches / cfg.gradient_accumulation_steps).max(1) * steps_per_batch.max(1);
    (cfg.num_train_epochs * per_epoch as f64).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_is_seeded_and_file_order_without_shuffle() {
        let plain = Order::new(10, 4, 42, false);
        assert_eq!(plain.batches_per_epoch(), 3);
        assert_eq!(plain.micro_batch(0), vec![0, 1, 2, 3]);
        assert_eq!(plain.micro_batch(2), vec![8, 9]);
        assert_eq!(
            plain.micro_batch(3),
            vec![0, 1, 2, 3],
            "epoch 2 starts over in file order"
        );
        let a = Order::new(10, 4, 42, true);
        let b = Order::new(10, 4, 42, true);
        let ea: Vec<usize> = (0..3).flat_map(|k| a.micro_batch(k)).collect();
        let eb: Vec<usize> = (0..3).flat_map(|k| b.micro_batch(k)).collect();
        assert_eq!(ea, eb, "same seed, same order");
        assert_ne!(ea, (0..10).collect::<Vec<_>>());
        let mut sorted = ea.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "an epoch visits every pair once");
        let e2: Vec<usize> = (3..6).flat_map(|k| a.micro_batch(k)).collect();
        assert_ne!(ea, e2, "each epoch is reshuffled");
        let c = Order::new(10, 4, 7, true);
        let ec: Vec<usize> = (0..3).flat_map(|k| c.micro_batch(k)).collect();
        assert_ne!(ea, ec, "another seed, another order");
    }

    #[test]
    fn total_steps_follow_transformers() {
        let cfg = TrainConfig {
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 2,
            num_train_epochs: 1.5,
            ..TrainConfig::default()
        };
        // 10 pairs -> 3 batches -> 1 update/epoch (floor) -> ceil(1.5) = 2
        assert_eq!(total_steps(&cfg, 10, 4, 1), 2);
        // GRPO's num_iterations = 3: each update's data serves 3 -> ceil(1.5 · 3) = 5
        assert_eq!(total_steps(&cfg, 10, 4, 3), 5);
        assert_eq!(total_steps(&TrainConfig { max_steps: 7, ..cfg }, 10, 4, 1), 7);
    }
}
