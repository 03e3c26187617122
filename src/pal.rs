//! PAL: pluralistic reward modelling with an ideal-point mixture (Chen, Chen, Rege, Vinayak,
//! ICLR 2025, arXiv:2406.08469), in its PAL-A form over frozen embeddings, as in the authors'
//! code (`RamyaLab/pluralistic-alignment`, `pal_rm_a`: the `f(Pw)` user learner with the
//! `dist` preference learner and the logistic loss).
//!
//! - Every (prompt, response) is embedded once by the frozen LM body: z = the final hidden
//!   state of its last token ([`embed_pairs`]).
//! - A shared linear map f: R^H → R^d places items and users in one preference space.
//! - K prototypes p_k ∈ R^H. User u mixes them with weights w_u = softmax(θ_u), and its ideal
//!   point is a_u = f(Σ_k w_uk·p_k).
//! - A response's reward for user u is r_u(y) = −‖f(z_y) − a_u‖: the closer item is preferred,
//!   with P(y_w ≻ y_l | u) = σ(r_u(y_w) − r_u(y_l)). The loss is −log of that probability.
//! - A new user keeps f and the prototypes frozen; only their K mixture logits are fitted on a
//!   few of their pairs ([`Pal::adapt`]).

use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::model::kernels::primitive::softmax_last;
use crate::model::Transformer;
use crate::optim::{OptimKind, Optimizer};
use candle_core::{DType, Device, Tensor, Var, D};
use std::path::Path;

/// Preference pairs as frozen embeddings: row i is a pair of user `users[i]`.
pub struct PairEmbeddings {
    /// `[N, H]` embeddings of the chosen and of the rejected responses.
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub users: Vec<u32>,
}

impl PairEmbeddings {
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The same pairs, all as user 0 (for a single user's mixture `[1, K]`).
    fn as_one_user(&self) -> PairEmbeddings {
        PairEmbeddings {
            chosen: self.chosen.clone(),
            rejected: self.rejected.clone(),
            users: vec![0; self.len()],
        }
    }

    /// The pairs at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Result<PairEmbeddings> {
        let i = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), self.chosen.device())?;
        Ok(PairEmbeddings {
            chosen: self.chosen.index_select(&i, 0)?,
            rejected: self.rejected.index_select(&i, 0)?,
            users: idx.iter().map(|&i| self.users[i]).collect(),
        })
    }
}

/// Embed every pair of `examples` (chosen and rejected, each with its prompt) with the frozen
/// body of `model`, `batch_size` pairs at a time; `users[i]` is the user of example i.
pub fn embed_pairs(
    model: &Transformer,
    examples: &[TokenizedExample],
    users: Vec<u32>,
    batch_size: usize,
    pad_id: u32,
) -> Result<PairEmbeddings> {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for chunk in examples.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .flat_map(|e| [e.chosen_ids(), e.rejected_ids()].map(|r| [&e.prompt_ids[..], r].concat()))
            .collect();
        let h = model.last_hidden(&seqs, pad_id)?.detach().to_dtype(DType::F32)?;
        let n = chunk.len();
        let h = h.reshape((n, 2, model.cfg.hidden_size))?;
        chosen.push(h.narrow(1, 0, 1)?.squeeze(1)?);
        rejected.push(h.narrow(1, 1, 1)?.squeeze(1)?);
    }
    Ok(PairEmbeddings {
        chosen: Tensor::cat(&chosen, 0)?,
        rejected: Tensor::cat(&rejected, 0)?,
        users,
    })
}

/// How to fit a PAL model.
#[derive(Clone, Debug)]
pub struct PalOptions {
    /// Number of prototypes K.
    pub k: usize,
    /// Dimension d of the preference space.
    pub dim: usize,
    /// Full-batch Adam steps, and their learning rate.
    pub steps: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for PalOptions {
    fn default() -> Self {
        PalOptions {
            k: 2,
            dim: 16,
            steps: 300,
            learning_rate: 0.02,
            seed: 0,
        }
    }
}

/// A fitted ideal-point mixture: the projector, the prototypes and each known user's logits.
pub struct Pal {
    /// f as a `[d, H]` matrix.
    pub projector: Var,
    /// `[K, H]` prototypes p_k.
    pub prototypes: Var,
    /// `[U, K]` mixture logits θ_u of the users in `users`.
    pub user_logits: Var,
    pub users: Vec<String>,
}

const EPS: f64 = 1e-12;

fn adam(vars: Vec<(String, Var)>) -> Optimizer {
    let kind = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        bf16_moments: false,
    };
    Optimizer::new(kind, 0.0, vars)
}

impl Pal {
    /// Seeded initialisation: f ~ N(0, 1/H), prototypes = K distinct chosen embeddings of the
    /// data, logits ~ N(0, 1) (as the reference code's `torch.randn`).
    pub fn init(users: Vec<String>, data: &PairEmbeddings, opts: &PalOptions) -> Result<Pal> {
        let (n, h) = data.chosen.dims2()?;
        if n < opts.k || opts.k == 0 {
            return Err(Error::Config(format!(
                "PAL needs at least K = {} pairs to place its prototypes, and K ≥ 1; got {n} pairs",
                opts.k
            )));
        }
        let dev = data.chosen.device();
        let mut rng = crate::util::Rng::new(opts.seed);
        let mut normal =
            |count: usize, std: f64| -> Vec<f32> { (0..count).map(|_| (std * rng.normal()) as f32).collect() };
        let projector = Tensor::from_vec(normal(opts.dim * h, 1.0 / (h as f64).sqrt()), (opts.dim, h), dev)?;
        let logits = Tensor::from_vec(normal(users.len() * opts.k, 1.0), (users.len(), opts.k), dev)?;
        // K distinct rows, seeded: the first K steps of a Fisher-Yates shuffle
        let mut rows: Vec<usize> = (0..n).collect();
        let mut rng = crate::util::Rng::new(opts.seed.wrapping_add(1));
        for i in 0..opts.k {
            let j = i + (rng.uniform() * (n - i) as f64) as usize % (n - i);
            rows.swap(i, j);
        }
        let idx = Tensor::new(rows[..opts.k].iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
        let prototypes = data.chosen.index_select(&idx, 0)?.copy()?;
        Ok(Pal {
            projector: Var::from_tensor(&projector)?,
            prototypes: Var::from_tensor(&prototypes)?,
            user_logits: Var::from_tensor(&logits)?,
            users,
        })
    }

    pub fn k(&self) -> usize {
        self.prototypes.dims()[0]
    }

    /// r(y) = −‖f(z_y) − a_u‖ `[N]` for embeddings `z` `[N, H]` of users `users`, with the
    /// mixture logits `logits` `[U, K]`.
    fn rewards_with(&self, logits: &Tensor, z: &Tensor, users: &[u32]) -> Result<Tensor> {
        let w = softmax_last(logits)?;
        let ideal = w.matmul(self.prototypes.as_tensor())?.matmul(&self.projector.t()?)?; // [U, d]
        let idx = Tensor::new(users, z.device())?;
        let a = ideal.index_select(&idx, 0)?;
        let fz = z.matmul(&self.projector.t()?)?;
        Ok(((fz - a)?.sqr()?.sum(D::Minus1)? + EPS)?.sqrt()?.neg()?)
    }

    /// Mean −log σ(r_u(y_w) − r_u(y_l)) over the pairs.
    fn loss_with(&self, logits: &Tensor, data: &PairEmbeddings) -> Result<Tensor> {
        let m = (self.rewards_with(logits, &data.chosen, &data.users)?
            - self.rewards_with(logits, &data.rejected, &data.users)?)?;
        Ok(crate::objectives::log_sigmoid(&m)?.neg()?.mean_all()?)
    }

    fn accuracy_with(&self, logits: &Tensor, data: &PairEmbeddings) -> Result<f64> {
        if data.is_empty() {
            return Ok(f64::NAN);
        }
        let c: Vec<f32> = self.rewards_with(logits, &data.chosen, &data.users)?.to_vec1()?;
        let r: Vec<f32> = self.rewards_with(logits, &data.rejected, &data.users)?.to_vec1()?;
        Ok(c.iter().zip(&r).filter(|(c, r)| c > r).count() as f64 / c.len() as f64)
    }

    /// Each known user's reward for each row: `[N]`.
    pub fn rewards(&self, z: &Tensor, users: &[u32]) -> Result<Tensor> {
        self.rewards_with(self.user_logits.as_tensor(), z, users)
    }

    /// Fraction of pairs whose chosen response the model prefers for the pair's user.
    pub fn accuracy(&self, data: &PairEmbeddings) -> Result<f64> {
        self.accuracy_with(self.user_logits.as_tensor(), data)
    }

    /// Each known user's mixture weights w_u.
    pub fn weights(&self) -> Result<Vec<Vec<f64>>> {
        Ok(softmax_last(self.user_logits.as_tensor())?
            .to_dtype(DType::F64)?
            .to_vec2()?)
    }

    /// Fit everything (f, prototypes, users' logits) by full-batch Adam; the loss per step.
    pub fn fit(&mut self, data: &PairEmbeddings, opts: &PalOptions) -> Result<Vec<f64>> {
        let vars = vec![
            ("projector".to_string(), self.projector.clone()),
            ("prototypes".to_string(), self.prototypes.clone()),
            ("user_logits".to_string(), self.user_logits.clone()),
        ];
        let mut opt = adam(vars);
        let mut losses = Vec::with_capacity(opts.steps);
        for _ in 0..opts.steps {
            opt.zero_grad();
            let loss = self.loss_with(self.user_logits.as_tensor(), data)?;
            losses.push(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
            opt.accumulate(&mut loss.backward()?)?;
            opt.step(opts.learning_rate)?;
        }
        Ok(losses)
    }

    /// Few-shot fitting of a new user: f and the prototypes stay frozen, and the user's K
    /// mixture logits (starting from the uniform mixture) are fitted to `shots` (every row is
    /// this user's; `users` is ignored). Returns the logits.
    pub fn adapt(&self, shots: &PairEmbeddings, steps: usize, learning_rate: f64) -> Result<Tensor> {
        let theta = Var::zeros((1, self.k()), DType::F32, shots.chosen.device())?;
        let one = shots.as_one_user();
        let mut opt = adam(vec![("theta".to_string(), theta.clone())]);
        for _ in 0..steps {
            opt.zero_grad();
            let loss = self.loss_with(theta.as_tensor(), &one)?;
            opt.accumulate(&mut loss.backward()?)?;
            opt.step(learning_rate)?;
        }
        Ok(theta.as_tensor().detach())
    }

    /// Accuracy on `data` (all of one user) under the mixture `logits` `[1, K]` from
    /// [`Self::adapt`].
    pub fn accuracy_for(&self, logits: &Tensor, data: &PairEmbeddings) -> Result<f64> {
        self.accuracy_with(logits, &data.as_one_user())
    }

    /// `pal.safetensors` (projector, prototypes, user_logits) and `pal.json` (users, and
    /// whatever `meta` the caller records, e.g. the embedding model).
    pub fn save(&self, dir: &Path, meta: serde_json::Value) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = [
            ("projector", self.projector.as_tensor().clone()),
            ("prototypes", self.prototypes.as_tensor().clone()),
            ("user_logits", self.user_logits.as_tensor().clone()),
        ];
        let map: std::collections::HashMap<String, Tensor> =
            tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        candle_core::safetensors::save(&map, dir.join("pal.safetensors"))?;
        let mut info = serde_json::json!({"users": self.users, "k": self.k(), "dim": self.projector.dims()[0]});
        if let (Some(o), Some(m)) = (info.as_object_mut(), meta.as_object()) {
            o.extend(m.clone());
        }
        let path = dir.join("pal.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&info).map_err(|e| Error::msg(e.to_string()))?,
        )
        .map_err(|e| Error::io(&path, e))?;
        Ok(())
    }

    /// Load what [`Self::save`] wrote; also returns `pal.json`.
    pub fn load(dir: &Path) -> Result<(Pal, serde_json::Value)> {
        let path = dir.join("pal.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let info: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::model(&path, e.to_string()))?;
        let users: Vec<String> = info
            .get("users")
            .and_then(|u| serde_json::from_value(u.clone()).ok())
            .ok_or_else(|| Error::model(&path, "field `users` missing or not a list of strings"))?;
        let file = dir.join("pal.safetensors");
        let mut t =
            candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| Error::model(&file, e.to_string()))?;
        let mut take = |name: &str| -> Result<Var> {
            let v = t
                .remove(name)
                .ok_or_else(|| Error::model(&file, format!("tensor `{name}` missing")))?;
            Ok(Var::from_tensor(&v)?)
        };
        let pal = Pal {
            projector: take("projector")?,
            prototypes: take("prototypes")?,
            user_logits: take("user_logits")?,
            users,
        };
        if pal.user_logits.dims() != [pal.users.len(), pal.k()] {
            return Err(Error::model(&file, "user_logits does not match the users in pal.json"));
        }
        Ok((pal, info))
    }
}

/// Each example's annotator as an index into the returned list of names (in order of first
/// appearance); a row without `annotator` is an error naming its file and line.
pub fn annotators(examples: &[TokenizedExample], path: &Path) -> Result<(Vec<String>, Vec<u32>)> {
    let mut names: Vec<String> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut users = Vec::with_capacity(examples.len());
    for e in examples {
        let a = e.meta.annotator.clone().ok_or_else(|| Error::Data {
            path: path.to_path_buf(),
            line: e.line,
            field: "annotator".into(),
            msg: "missing; PAL learns one mixture per annotator, so every row needs one".into(),
        })?;
        let next = names.len() as u32;
        let u = *index.entry(a.clone()).or_insert_with(|| {
            names.push(a);
            next
        });
        users.push(u);
    }
    Ok((names, users))
}

/// One user's part of a [`FitReport`] or [`AdaptReport`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct UserReport {
    pub user: String,
    /// Pairs used to fit (all of the user's training pairs, or the few-shot pairs).
    pub fit_pairs: usize,
    pub held_out_pairs: usize,
    pub held_out_accuracy: f64,
    /// Held-out accuracy with the uniform mixture, before adaptation (adapt only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uniform_accuracy: Option<f64>,
    /// Mixture weights w_u over the K prototypes.
    pub weights: Vec<f64>,
}

/// What `prefer pal fit` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FitReport {
    pub k: usize,
    pub train_pairs: usize,
    pub held_out_pairs: usize,
    pub train_accuracy: f64,
    pub held_out_accuracy: f64,
    /// The same fit with one prototype (a single shared ideal point) for comparison.
    pub single_prototype_held_out_accuracy: f64,
    /// How many users have each prototype as their largest weight.
    pub users_per_prototype: Vec<usize>,
    pub users: Vec<UserReport>,
    pub first_loss: f64,
    pub final_loss: f64,
}

/// Split each user's pairs in file order: the last `ceil(eval_fraction · n)` are held out
/// (none for a user with a single pair).
pub fn split_by_user(users: &[u32], eval_fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let mut by_user: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &u) in users.iter().enumerate() {
        by_user.entry(u).or_default().push(i);
    }
    let (mut train, mut held) = (vec![], vec![]);
    for rows in by_user.values() {
        let n = rows.len();
        let h = if n > 1 {
            ((eval_fraction * n as f64).ceil() as usize).min(n - 1)
        } else {
            0
        };
        train.extend(&rows[..n - h]);
        held.extend(&rows[n - h..]);
    }
    train.sort_unstable();
    held.sort_unstable();
    (train, held)
}

/// Fit PAL on `data` (users named by `names`), holding out the last `eval_fraction` of each
/// user's pairs; also fits a single-prototype model for comparison.
pub fn fit(
    data: &PairEmbeddings,
    names: Vec<String>,
    eval_fraction: f64,
    opts: &PalOptions,
) -> Result<(Pal, FitReport)> {
    let (train_rows, held_rows) = split_by_user(&data.users, eval_fraction);
    let (train, held) = (data.select(&train_rows)?, data.select(&held_rows)?);
    let mut pal = Pal::init(names.clone(), &train, opts)?;
    let losses = pal.fit(&train, opts)?;
    let single_opts = PalOptions { k: 1, ..opts.clone() };
    let mut single = Pal::init(names.clone(), &train, &single_opts)?;
    single.fit(&train, &single_opts)?;
    let weights = pal.weights()?;
    let mut users_per_prototype = vec![0; pal.k()];
    let mut users = Vec::with_capacity(names.len());
    for (u, name) in names.iter().enumerate() {
        let best = (0..pal.k())
            .max_by(|&a, &b| weights[u][a].total_cmp(&weights[u][b]))
            .unwrap_or(0);
        users_per_prototype[best] += 1;
        let mine: Vec<usize> = (0..held.len()).filter(|&i| held.users[i] == u as u32).collect();
        users.push(UserReport {
            user: name.clone(),
            fit_pairs: train.users.iter().filter(|&&x| x == u as u32).count(),
            held_out_pairs: mine.len(),
            held_out_accuracy: pal.accuracy(&held.select(&mine)?)?,
            uniform_accuracy: None,
            weights: weights[u].clone(),
        });
    }
    let report = FitReport {
        k: pal.k(),
        train_pairs: train.len(),
        held_out_pairs: held.len(),
        train_accuracy: pal.accuracy(&train)?,
        held_out_accuracy: pal.accuracy(&held)?,
        single_prototype_held_out_accuracy: single.accuracy(&held)?,
        users_per_prototype,
        users,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
    };
    Ok((pal, report))
}

/// What `prefer pal adapt` did: each new user fitted from their first `shots` pairs and
/// tested on the rest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdaptReport {
    pub shots: usize,
    pub users: Vec<UserReport>,
    /// Over all new users' held-out pairs.
    pub held_out_accuracy: f64,
    pub uniform_accuracy: f64,
}

/// Few-shot adaptation of every user in `data` (named by `names`): the first `shots` pairs of
/// each fit their mixture ([`Pal::adapt`]), the rest measure it.
pub fn adapt_users(
    pal: &Pal,
    data: &PairEmbeddings,
    names: &[String],
    shots: usize,
    steps: usize,
    learning_rate: f64,
) -> Result<AdaptReport> {
    let uniform = Tensor::zeros((1, pal.k()), DType::F32, data.chosen.device())?;
    let (mut users, mut right, mut right_uniform, mut total) = (vec![], 0.0, 0.0, 0usize);
    for (u, name) in names.iter().enumerate() {
        let rows: Vec<usize> = (0..data.len()).filter(|&i| data.users[i] == u as u32).collect();
        if rows.len() <= shots {
            return Err(Error::Config(format!(
                "annotator `{name}` has {} pairs: adapting needs more than --shots {shots} (the rest are the test)",
                rows.len()
            )));
        }
        let (fit_rows, test_rows) = rows.split_at(shots);
        let test = data.select(test_rows)?;
        let theta = pal.adapt(&data.select(fit_rows)?, steps, learning_rate)?;
        let (acc, before) = (pal.accuracy_for(&theta, &test)?, pal.accuracy_for(&uniform, &test)?);
        right += acc * test.len() as f64;
        right_uniform += before * test.len() as f64;
        total += test.len();
        users.push(UserReport {
            user: name.clone(),
            fit_pairs: shots,
            held_out_pairs: test.len(),
            held_out_accuracy: acc,
            uniform_accuracy: Some(before),
            weights: softmax_last(&theta)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
        });
    }
    Ok(AdaptReport {
        shots,
        users,
        held_out_accuracy: right / total.max(1) as f64,
        uniform_accuracy: right_uniform / total.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic users with planted ideal points: two groups, each mixing two true prototypes
    /// 0.9/0.1 or 0.1/0.9, items drawn at random, the closer item chosen. Returns the pairs,
    /// each user's group, and the pairs of each user as row lists.
    fn planted(users: usize, per_user: usize, item_seed: u64) -> (PairEmbeddings, Vec<usize>, Vec<Vec<usize>>) {
        let h = 12;
        let mut rng = crate::util::Rng::new(5);
        let protos: Vec<Vec<f32>> = (0..2)
            .map(|_| (0..h).map(|_| 2.0 * rng.normal() as f32).collect())
            .collect();
        let mut rng = crate::util::Rng::new(item_seed);
        let mut g = || rng.normal() as f32;
        let (mut c, mut r, mut u, mut rows) = (vec![], vec![], vec![], vec![]);
        let mut group = vec![];
        for user in 0..users {
            let w = if user % 2 == 0 { 0.9 } else { 0.1 };
            group.push(user % 2);
            let ideal: Vec<f32> = (0..h).map(|i| w * protos[0][i] + (1.0 - w) * protos[1][i]).collect();
            let mut mine = vec![];
            for _ in 0..per_user {
                let a: Vec<f32> = (0..h).map(|_| 2.0 * g()).collect();
                let b: Vec<f32> = (0..h).map(|_| 2.0 * g()).collect();
                let d = |x: &[f32]| x.iter().zip(&ideal).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
                let (win, lose) = if d(&a) < d(&b) { (a, b) } else { (b, a) };
                mine.push(u.len());
                c.extend(win);
                r.extend(lose);
                u.push(user as u32);
            }
            rows.push(mine);
        }
        let n = u.len();
        let dev = Device::Cpu;
        (
            PairEmbeddings {
                chosen: Tensor::from_vec(c, (n, h), &dev).unwrap(),
                rejected: Tensor::from_vec(r, (n, h), &dev).unwrap(),
                users: u,
            },
            group,
            rows,
        )
    }

    /// K = 2 prototypes fit two planted groups of users (held-out accuracy), a single
    /// prototype cannot, the learned mixture weights separate the groups, and a new user is
    /// recognised from 8 pairs. Save/load keeps the rewards bit for bit.
    #[test]
    fn pal_recovers_planted_groups_and_adapts_to_new_users_from_few_pairs() {
        crate::testing::set_threads_for_tests();
        let (data, group, rows) = planted(16, 80, 6);
        let (train, test): (Vec<usize>, Vec<usize>) = {
            let (mut a, mut b) = (vec![], vec![]);
            for r in &rows {
                a.extend(&r[..60]);
                b.extend(&r[60..]);
            }
            (a, b)
        };
        let (train, test) = (data.select(&train).unwrap(), data.select(&test).unwrap());
        let names: Vec<String> = (0..16).map(|u| format!("user{u}")).collect();
        let fit = |k: usize| {
            let opts = PalOptions {
                k,
                dim: 12,
                steps: 400,
                learning_rate: 0.03,
                seed: 1,
            };
            let mut pal = Pal::init(names.clone(), &train, &opts).unwrap();
            let losses = pal.fit(&train, &opts).unwrap();
            assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
            pal
        };
        let (one, two) = (fit(1), fit(2));
        let (acc1, acc2) = (one.accuracy(&test).unwrap(), two.accuracy(&test).unwrap());
        assert!(
            acc2 > 0.9 && acc2 > acc1 + 0.05,
            "held-out accuracy K=2 {acc2}, K=1 {acc1}"
        );
        // the dominant prototype of each user follows the planted group
        let w = two.weights().unwrap();
        let side: Vec<usize> = w.iter().map(|w| (w[1] > w[0]) as usize).collect();
        for u in 0..16 {
            assert_eq!(side[u] == side[0], group[u] == group[0], "weights {w:?}");
        }
        // new users from the same two groups: 8 pairs fit their mixture, the rest test it
        let (fresh, _, fresh_rows) = planted(4, 48, 7);
        for r in &fresh_rows {
            let shots = fresh.select(&r[..8]).unwrap();
            let rest = fresh.select(&r[8..]).unwrap();
            let theta = two.adapt(&shots, 200, 0.1).unwrap();
            let uniform = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
            let (adapted, before) = (
                two.accuracy_for(&theta, &rest).unwrap(),
                two.accuracy_for(&uniform, &rest).unwrap(),
            );
            assert!(
                adapted > 0.8 && adapted >= before,
                "new user: {adapted} after 8 shots, {before} before"
            );
        }
        // save / load
        let dir = crate::testing::scratch_dir("pal-unit");
        two.save(&dir, serde_json::json!({"model": "synthetic"})).unwrap();
        let (back, info) = Pal::load(&dir).unwrap();
        assert_eq!(info["model"], "synthetic");
        assert_eq!(back.users, two.users);
        let a: Vec<f32> = two.rewards(&test.chosen, &test.users).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.rewards(&test.chosen, &test.users).unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }
}
