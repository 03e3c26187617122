//! Where reference log-probs come from: a frozen model run alongside the policy, or a cache
//! computed once (`precompute_ref_log_probs`), stored on disk keyed by a hash of the reference
//! weights and the tokenised data, and reused by later runs; or nothing (reference-free).

use super::{group_logps, StatsOptions};
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Transformer};
use crate::util::{write_atomic, Fnv64};
use candle_core::{DType, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where a checkpoint keeps the reference that `sync_ref_model` has moved.
pub const SYNCED_REF_DIR: &str = "ref_model";

pub enum Reference {
    Model(Box<Transformer>),
    /// Per-example summed log-probs of each response, for the train and eval sets.
    Cached {
        train: Vec<Vec<f64>>,
        eval: Vec<Vec<f64>>,
    },
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Reference {
    /// Reference log-probs `[R]` of every response of the examples at `indices` of `split`,
    /// laid out as [`crate::stats::SeqStats::reference`].
    pub fn logps(
        &self,
        split: Split,
        indices: &[usize],
        examples: &[&TokenizedExample],
        dtype: DType,
        opts: &StatsOptions,
    ) -> Result<Option<Tensor>> {
        match self {
            Reference::None => Ok(None),
            Reference::Model(m) => {
                let opts = StatsOptions {
                    use_weighting: false,
                    ..opts.clone()
                };
                Ok(Some(group_logps(m, examples, &opts)?.policy.detach()))
            }
            Reference::Cached { train, eval } => {
                let table = if split == Split::Train { train } else { eval };
                let v: Vec<f64> = indices.iter().flat_map(|&i| table[i].iter().copied()).collect();
                Ok(Some(Tensor::new(v, &candle_core::Device::Cpu)?.to_dtype(dtype)?))
            }
        }
    }
}

/// A hash of a model's weights: the bytes of its weight files, or of its tensors when it was
/// built in memory.
pub fn model_hash(m: &LoadedModel) -> Result<u64> {
    let mut h = Fnv64::default();
    if m.weight_files.is_empty() {
        for (name, t) in m.transformer.params() {
            h.update(name.as_bytes());
            let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            for x in v {
                h.update(&x.to_le_bytes());
            }
        }
    } else {
        let mut buf = vec![0u8; 1 << 20];
        for f in &m.weight_files {
            let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            loop {
                let n = file.read(&mut buf).map_err(|e| Error::io(f, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(h.finish())
}

pub fn data_hash(examples: &[TokenizedExample]) -> u64 {
    let mut h = Fnv64::default();
    for e in examples {
        for ids in std::iter::once(&e.prompt_ids).chain(&e.responses) {
            h.update_u32s(&[ids.len() as u32]);
            h.update_u32s(ids);
        }
    }
    h.finish()
}

/// Cache file for (model, data, dtype, bf16 matmuls, statistics options).
pub fn cache_path(
    dir: &Path,
    model_hash: u64,
    examples: &[TokenizedExample],
    dtype: DType,
    bf16: bool,
    opts: &StatsOptions,
) -> PathBuf {
    let mut h = Fnv64::default();
    h.update(&model_hash.to_le_bytes());
    h.update(&data_hash(examples).to_le_bytes());
    h.update(dtype.as_str().as_bytes());
    if bf16 {
        h.update(b"bf16");
    }
    if let Some(a) = opts.ld_alpha {
        h.update(b"ld_alpha");
        h.update(&a.to_le_bytes());
    }
    dir.join(format!("{:016x}.json", h.finish()))
}

/// Read a cache file written by [`store_cache`], if present and of the right length.
pub fn load_cache(path: &Path, n: usize) -> Option<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: Vec<Vec<f64>> = serde_json::from_str(&text).ok()?;
    (v.len() == n).then_some(v)
}

pub fn store_cache(path: &Path, v: &[Vec<f64>]) -> Result<()> {
    if let Some(dir) = path.parent() {
        crate::util::create_dir_all(dir)?;
    }
    write_atomic(path, serde_json::to_string(v).expect("numbers serialise").as_bytes())
}
