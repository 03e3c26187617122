//! Every pairwise objective against an independent scalar f64 implementation of its formula
//! (ALGORITHMS.md §0 / TRL), losses and gradients (central finite differences of the scalar
//! formula vs backprop), with saturated (±60) and equal-log-prob cases; and the documented
//! special cases.

use candle_core::{Device, Tensor, Var};
use prefer::objectives::{build, ObjectiveParams, PairStats, REGISTRY};

#[derive(Clone, Copy, Debug)]
struct Row {
    pc: f64,
    pr: f64,
    rc: f64,
    rr: f64,
    nc: usize,
    nr: usize,
    strength: f64,
    sc: f64,
    sr: f64,
}

/// β = 0.1 turns h = ±600 into margins of ±60. Batch-sorted quantities have no ties.
fn rows() -> Vec<Row> {
    let r = |pc, pr, rc, rr, nc, nr| Row {
        pc,
        pr,
        rc,
        rr,
        nc,
        nr,
        strength: 1.0,
        sc: 0.0,
        sr: 0.0,
    };
    vec![
        r(-10.0, -12.0, -11.0, -11.5, 5, 7),
        r(-5.0, -5.0, -5.0, -5.0, 3, 3),     // equal log-probs everywhere
        r(-1.0, -601.0, -1.2, -1.0, 10, 20), // βh ≈ +60
        r(-601.0, -1.0, -2.0, -1.5, 20, 10), // βh ≈ −60
        r(-3.0, -2.0, -2.5, -2.7, 2, 1),
    ]
}

fn ls(x: f64) -> f64 {
    if x < 0.0 {
        x - x.exp().ln_1p()
    } else {
        -(-x).exp().ln_1p()
    }
}
fn sg(x: f64) -> f64 {
    ls(x).exp()
}

/// TRL 1.16's f-divergence scores, transcribed from `DPOTrainer._compute_loss`
/// (trl/trainer/dpo_trainer.py) with their constant terms, which matter once chosen and
/// rejected are divided by different lengths.
fn fdiv(p: &ObjectiveParams, d: f64) -> f64 {
    match p.f_divergence_type.as_str() {
        "forward_kl" => 1.0 - (-d).exp(),
        "js_divergence" => 2f64.ln() + ls(d),
        "alpha_divergence" => {
            let a = p.f_alpha_divergence_coef;
            (((a - 1.0) * d).min(80.0).exp() - 1.0) / (a - 1.0)
        }
        _ => d,
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The formulas, written independently of the library, per batch. `frozen` holds the rows at
/// which quantities without gradient (LCPO's γ) are evaluated.
fn by_hand(name: &str, rows: &[Row], p: &ObjectiveParams) -> Vec<f64> {
    by_hand_frozen(name, rows, rows, p)
}

fn by_hand_frozen(name: &str, rows: &[Row], frozen: &[Row], p: &ObjectiveParams) -> Vec<f64> {
    let (b, e) = (p.beta, p.label_smoothing);
    let n = rows.len() as f64;
    let sum_nc: usize = rows.iter().map(|r| r.nc).sum();
    let smooth = |u: f64| -(1.0 - e) * ls(b * u) - e * ls(-b * u);
    let a_sorted = sorted(rows.iter().map(|r| r.pc - r.pr).collect());
    let b_sorted = sorted(rows.iter().map(|r| r.rc - r.rr).collect());
    let dw_sorted = sorted(rows.iter().map(|r| r.pc - r.rc).collect());
    let dl_sorted = sorted(rows.iter().map(|r| r.pr - r.rr).collect());
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let (dw, dl) = (r.pc - r.rc, r.pr - r.rr);
            let (sw, sl) = (fdiv(p, dw), fdiv(p, dl));
            let d = sw - sl;
            let (nw, nl) = (r.nc.max(1) as f64, r.nr.max(1) as f64);
            let h = dw - dl;
            let nll = -r.pc * n / sum_nc as f64;
            let (mw, ml) = (r.pc / nw, r.pr / nl);
            match name {
                "sigmoid" => -ls(b * d),
                "hinge" => (1.0 - b * d).max(0.0),
                "dpop" => -ls(b * (h - p.dpo.dpop_lambda * (-dw).max(0.0))),
                "ipo" => (sw / nw - sl / nl - 1.0 / (2.0 * b)).powi(2),
                "exo_pair" => {
                    let eps = if e > 0.0 { e } else { 1e-3 };
                    let z = b * d;
                    sg(z) * (ls(z) - (1.0 - eps).ln()) + sg(-z) * (ls(-z) - eps.ln())
                }
                "nca_pair" => -ls(b * sw) - 0.5 * ls(-b * sw) - 0.5 * ls(-b * sl),
                "robust" => (-(1.0 - e) * ls(b * d) + e * ls(-b * d)) / (1.0 - 2.0 * e),
                "bco_pair" => -ls(b * sw) - ls(-b * sl),
                "sppo_hard" => (sw - 1.0 / (2.0 * b)).powi(2) + (sl + 1.0 / (2.0 * b)).powi(2),
                "aot" => smooth(a_sorted[i] - b_sorted[i]),
                "aot_unpaired" => smooth(dw_sorted[i] - dl_sorted[i]),
                "apo_zero" => 1.0 - sg(b * dw) + sg(b * dl),
                "apo_down" => sg(b * dw) + 1.0 - sg(b * d),
                "discopop" => {
                    let z = b * d;
                    let m = sg(z / p.dpo.discopop_tau);
                    (1.0 - m) * -ls(z) + m * (-z).exp()
                }
                "sft" => nll,
                "sigmoid_norm" => -ls(b * (sw / nw - sl / nl)),
                "cdpo" => smooth(h),
                "ipo_sum" => (h - 1.0 / (2.0 * b)).powi(2),
                "simpo" => smooth(mw - ml - p.reference_free.simpo_gamma / b),
                "alphapo" => {
                    let a = p.reference_free.alpha;
                    let rw = |x: f64| if a == 0.0 { x } else { (1.0 - (-a * x).exp()) / a };
                    smooth(rw(mw) - rw(ml) - p.reference_free.simpo_gamma / b)
                }
                "cpo" => smooth(r.pc - r.pr) + p.reference_free.cpo_alpha * nll,
                "orpo" => {
                    let lo = |x: f64| x - (1.0 - x.exp()).ln();
                    nll - b * ls(lo(mw) - lo(ml))
                }
                "osp" => -(r.strength * ls(b * h) + (1.0 - r.strength) * ls(-b * h)),
                "copg" => ((r.sc - r.sr) - b * h).powi(2),
                "mapo" => {
                    let phi = |x: f64| p.reference_free.mapo_k * x / ((p.reference_free.mapo_k * x).exp() - 1.0);
                    let (nw_, nl_) = (-mw, -ml);
                    nw_ - b * ls(p.reference_free.mapo_t * (phi(nw_) - phi(nl_)))
                }
                "bradley_terry" => {
                    // the statistics are rewards; margin = sc − sr in these rows
                    let l = -ls(r.pc - r.pr - (r.sc - r.sr));
                    l + p
                        .reward
                        .center_rewards_coefficient
                        .map_or(0.0, |eta| eta * (r.pc + r.pr).powi(2))
                }
                "slic" => (p.reference_free.slic_delta - (r.pc - r.pr)).max(0.0) - p.reference_free.slic_lambda * r.pc,
                "lcpo" => {
                    assert_eq!(p.noisy.lcpo_base, "sigmoid");
                    let fwd = -ls(b * d);
                    let back = -ls(-b * d);
                    let fr = frozen[i];
                    let (fsw, fsl) = (fdiv(p, fr.pc - fr.rc), fdiv(p, fr.pr - fr.rr));
                    let fd_ = fsw - fsl;
                    let pp = sg(-ls(-b * fd_) - -ls(b * fd_));
                    let eta = p.noisy.lcpo_noise_rate;
                    let g = (1.0 - eta) * pp / ((1.0 - eta) * pp + eta * (1.0 - pp));
                    g * fwd + (1.0 - g) * back
                }
                other => panic!("no hand formula for {other}"),
            }
        })
        .collect()
}

fn stats(rows: &[Row], pc: &Var, pr: &Var, with_ref: bool) -> PairStats {
    let dev = Device::Cpu;
    let col = |f: fn(&Row) -> f64| Tensor::new(rows.iter().map(f).collect::<Vec<f64>>(), &dev).unwrap();
    PairStats {
        policy_chosen: pc.as_tensor().clone(),
        policy_rejected: pr.as_tensor().clone(),
        ref_chosen: with_ref.then(|| col(|r| r.rc)),
        ref_rejected: with_ref.then(|| col(|r| r.rr)),
        chosen_tokens: rows.iter().map(|r| r.nc).collect(),
        rejected_tokens: rows.iter().map(|r| r.nr).collect(),
        weights: None,
        strength: rows.iter().map(|r| r.strength).collect(),
        scores: Some(rows.iter().map(|r| (r.sc, r.sr)).collect()),
        margin: rows.iter().map(|r| r.sc - r.sr).collect(),
        log_variance: None,
    }
}

fn check(name: &str, p: &ObjectiveParams) {
    check_rows(name, p, &rows());
}

fn check_rows(name: &str, p: &ObjectiveParams, rows: &[Row]) {
    let rows = rows.to_vec();
    let dev = Device::Cpu;
    let pc = Var::new(rows.iter().map(|r| r.pc).collect::<Vec<_>>(), &dev).unwrap();
    let pr = Var::new(rows.iter().map(|r| r.pr).collect::<Vec<_>>(), &dev).unwrap();
    let obj = build(&[name.to_string()], None, p).unwrap();
    let out = obj.loss_pairs(&stats(&rows, &pc, &pr, obj.needs_reference())).unwrap();
    let got: Vec<f64> = out.losses.to_vec1().unwrap();
    let want = by_hand(name, &rows, p);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_finite(), "{name} {p:?}: row {i} loss not finite");
        assert!(
            (g - w).abs() <= 1e-10 * (1.0 + w.abs()),
            "{name} {p:?}: row {i} loss {g} vs {w}"
        );
    }
    let grads = out.losses.sum_all().unwrap().backward().unwrap();
    for (which, var) in [("chosen", &pc), ("rejected", &pr)] {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .map(|t| t.to_vec1().unwrap())
            .unwrap_or(vec![0.0; rows.len()]);
        for i in 0..rows.len() {
            let perturbed = |delta: f64| -> Vec<f64> {
                let mut rs = rows.clone();
                if which == "chosen" {
                    rs[i].pc += delta;
                } else {
                    rs[i].pr += delta;
                }
                by_hand_frozen(name, &rs, &rows, p)
            };
            let x = if which == "chosen" { rows[i].pc } else { rows[i].pr };
            let step = 1e-6 * x.abs().max(1.0);
            // row by row, so the huge but unchanged losses of other rows cancel exactly
            let (up, down) = (perturbed(step), perturbed(-step));
            let fd = up.iter().zip(&down).map(|(a, b)| a - b).sum::<f64>() / (2.0 * step);
            let tol = 1e-5 * fd.abs().max(g[i].abs()).max(1.0);
            // at a kink (dpop's max(0, ·) at exactly 0) backprop gives one one-sided derivative
            let at = perturbed(0.0);
            let one_sided = |side: &[f64], sign: f64| -> f64 {
                side.iter().zip(&at).map(|(a, b)| a - b).sum::<f64>() / (sign * step)
            };
            let kink_ok = [one_sided(&up, 1.0), one_sided(&down, -1.0)]
                .iter()
                .any(|d| (d - g[i]).abs() <= 1e-4 * d.abs().max(g[i].abs()).max(1.0));
            assert!(
                (fd - g[i]).abs() <= tol || kink_ok && (fd - g[i]).abs() > 1e-2,
                "{name} {p:?}: d/d{which}[{i}] backprop {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn every_objective_matches_its_formula_and_gradient() {
    let base = ObjectiveParams::default();
    // `gaussian` reads a head's log-variances too: gaussian_reward_loss_matches_its_formula_and_gradient
    let gaussian = prefer::objectives::RewardKind::RewardDistribution;
    for e in REGISTRY
        .iter()
        .filter(|e| e.loss.shape() == Shape::Pairwise && e.rewards != gaussian)
    {
        check(e.name, &base);
        if !matches!(e.name, "sigmoid") {
            check(
                e.name,
                &ObjectiveParams {
                    label_smoothing: 0.1,
                    beta: 0.5,
                    ..base.clone()
                },
            );
        }
    }
    // the f-divergence transforms, on every loss written in s or d (without the ±600 rows:
    // exp(599) makes any finite difference meaningless there)
    let moderate: Vec<Row> = rows().into_iter().filter(|r| (r.pc - r.pr).abs() < 100.0).collect();
    // every loss TRL 1.16 allows an f-divergence with; the rows have unequal lengths, so the
    // transforms' constant terms count in the length-normalised ones (ipo, sigmoid_norm)
    for f in ["forward_kl", "js_divergence", "alpha_divergence"] {
        for name in [
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "robust",
            "discopop",
            "sigmoid_norm",
        ] {
            check_rows(
                name,
                &{
                    let mut p = base.clone();
                    p.f_divergence_type = prefer::objectives::FDivergenceType::parse(f).unwrap();
                    p
                },
                &moderate,
            );
        }
    }
    check("alphapo", &{
        let mut p = base.clone();
        p.reference_free.alpha = 0.25;
        p
    });
    check("simpo", &{
        let mut p = base.clone();
        p.reference_free.simpo_gamma = 1.5;
        p.beta = 2.0;
        p
    });
    check("cpo", &{
        let mut p = base.clone();
        p.reference_free.cpo_alpha = 0.3;
        p
    });
    check("bradley_terry", &{
        let mut p = base;
        p.reward.center_rewards_coefficient = Some(0.01);
        p
    });
}

fn losses(names: &[&str], weights: Option<&[f64]>, p: &ObjectiveParams, rows: &[Row]) -> Vec<f64> {
    let dev = Device::Cpu;
    let pc = Var::new(rows.iter().map(|r| r.pc).collect::<Vec<_>>(), &dev).unwrap();
    let pr = Var::new(rows.iter().map(|r| r.pr).collect::<Vec<_>>(), &dev).unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let obj = build(&names, weights, p).unwrap();
    obj.loss_pairs(&stats(rows, &pc, &pr, true))
        .unwrap()
        .losses
        .to_vec1()
        .unwrap()
}

fn same(a: &[f64], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn documented_special_cases() {
    let p = ObjectiveParams::default();
    let rs = rows();
    let sigmoid = losses(&["sigmoid"], None, &p, &rs);
    same(&losses(&["robust"], None, &p, &rs), &sigmoid); // rDPO with ε = 0 is DPO
    same(&losses(&["cdpo"], None, &p, &rs), &sigmoid); // cDPO with ε = 0 is DPO
    let ones: Vec<Row> = rs.iter().map(|r| Row { nc: 1, nr: 1, ..*r }).collect();
    same(
        &losses(&["sigmoid_norm"], None, &p, &ones),
        &losses(&["sigmoid"], None, &p, &ones),
    );
    same(
        &losses(&["ipo"], None, &p, &ones),
        &losses(&["ipo_sum"], None, &p, &ones),
    );
    same(&losses(&["alphapo"], None, &p, &rs), &losses(&["simpo"], None, &p, &rs)); // α = 0
                                                                                    // LCPO with zero noise is its base loss; OSP with strength 1 is DPO
    let clean = {
        let mut p = p.clone();
        p.noisy.lcpo_noise_rate = 0.0;
        p
    };
    same(
        &losses(&["lcpo"], None, &clean, &rs),
        &losses(&["sigmoid"], None, &clean, &rs),
    );
    let sure: Vec<Row> = rs.iter().map(|r| Row { strength: 1.0, ..*r }).collect();
    same(
        &losses(&["osp"], None, &p, &sure),
        &losses(&["sigmoid"], None, &p, &sure),
    );
    // AOT on a batch of one is cDPO
    let ps = ObjectiveParams {
        label_smoothing: 0.2,
        ..p.clone()
    };
    for r in &rs {
        same(
            &losses(&["aot"], None, &ps, &[*r]),
            &losses(&["cdpo"], None, &ps, &[*r]),
        );
    }
    // combinations: RPO = sigmoid + 0.005 sft; MPO = sigmoid + bco_pair + sft
    let rpo = losses(&["sigmoid", "sft"], Some(&[1.0, 0.005]), &p, &rs);
    let sft = losses(&["sft"], None, &p, &rs);
    let want: Vec<f64> = sigmoid.iter().zip(&sft).map(|(a, b)| a + 0.005 * b).collect();
    same(&rpo, &want);
    let mpo = losses(&["sigmoid", "bco_pair", "sft"], None, &p, &rs);
    let bco = losses(&["bco_pair"], None, &p, &rs);
    let want: Vec<f64> = (0..rs.len()).map(|i| sigmoid[i] + bco[i] + sft[i]).collect();
    same(&mpo, &want);
    // the sft term's batch mean is the token-mean NLL of the chosen completions
    let mean_sft: f64 = sft.iter().sum::<f64>() / rs.len() as f64;
    let token_mean = -rs.iter().map(|r| r.pc).sum::<f64>() / rs.iter().map(|r| r.nc).sum::<usize>() as f64;
    assert!((mean_sft - token_mean).abs() < 1e-12);
}

#[test]
fn reference_free_objectives_need_no_reference_and_bad_configs_fail() {
    for name in ["simpo", "cpo", "alphapo", "orpo", "sft"] {
        let obj = build(&[name.to_string()], None, &ObjectiveParams::default()).unwrap();
        assert!(!obj.needs_reference(), "{name}");
    }
    let e = build(
        &["sigmoid".into()],
        None,
        &ObjectiveParams {
            label_smoothing: 0.1,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("cdpo"), "{e}");
    let e = build(
        &["sigmoid".into(), "sft".into()],
        Some(&[1.0]),
        &ObjectiveParams::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("loss_weights"), "{e}");
    let e = build(&["simp0".into()], None, &ObjectiveParams::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("did you mean `simpo`"), "{e}");
    // ORPO logs its odds-ratio metrics
    let rs = rows();
    let dev = Device::Cpu;
    let pc = Var::new(rs.iter().map(|r| r.pc).collect::<Vec<_>>(), &dev).unwrap();
    let pr = Var::new(rs.iter().map(|r| r.pr).collect::<Vec<_>>(), &dev).unwrap();
    let out = build(&["orpo".into()], None, &ObjectiveParams::default())
        .unwrap()
        .loss_pairs(&stats(&rs, &pc, &pr, false))
        .unwrap();
    let names: Vec<&str> = out.metrics.iter().map(|(k, _)| k.as_str()).collect();
    for k in ["nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"] {
        assert!(names.contains(&k), "{k} missing from {names:?}");
    }
}

// ---- unpaired and listwise objectives -------------------------------------------------------

use prefer::data::{ExampleMeta, Shape};
use prefer::stats::SeqStats;

/// A batch of examples given as (policy, reference, tokens) per response and a meta per example.
fn batch(groups: &[Vec<(f64, f64, usize)>], meta: Vec<ExampleMeta>) -> (SeqStats, Var) {
    let dev = Device::Cpu;
    let pol: Vec<f64> = groups.iter().flatten().map(|r| r.0).collect();
    let var = Var::new(pol, &dev).unwrap();
    let mut offsets = vec![0];
    for g in groups {
        offsets.push(offsets.last().unwrap() + g.len());
    }
    let st = SeqStats {
        policy: var.as_tensor().clone(),
        reference: Some(Tensor::new(groups.iter().flatten().map(|r| r.1).collect::<Vec<f64>>(), &dev).unwrap()),
        tokens: groups.iter().flatten().map(|r| r.2).collect(),
        offsets,
        meta,
        weights: None,
        log_variance: None,
    };
    (st, var)
}

fn grads_vs_fd(var: &Var, losses: &Tensor, hand: &dyn Fn(&[f64]) -> Vec<f64>, check: &[usize], what: &str) {
    let g: Vec<f64> = losses
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    let x0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
    for &i in check {
        let f = |d: f64| {
            let mut x = x0.clone();
            x[i] += d;
            hand(&x)
        };
        let step = 1e-6 * x0[i].abs().max(1.0);
        let fd: f64 = f(step).iter().zip(f(-step)).map(|(a, b)| a - b).sum::<f64>() / (2.0 * step);
        assert!(
            (fd - g[i]).abs() <= 1e-5 * fd.abs().max(1.0),
            "{what}: d/dx[{i}] backprop {} vs fd {fd}",
            g[i]
        );
    }
}

fn unpaired(label: bool) -> ExampleMeta {
    ExampleMeta {
        label: Some(label),
        ..ExampleMeta::new(Shape::Unpaired)
    }
}

#[test]
fn kto_and_apo_zero_unpaired_match_their_formulas() {
    // (completion, mismatched completion) per example: (policy, reference, tokens)
    let groups = vec![
        vec![(-4.0, -5.0, 3), (-7.0, -8.0, 4)],
        vec![(-6.0, -5.5, 2), (-3.0, -3.5, 2)],
        vec![(-2.0, -2.0, 1), (-7.0, -6.9, 5)],
        vec![(-605.0, -5.0, 9), (-4.0, -4.2, 2)],
    ];
    let labels = [true, false, true, false];
    let p = {
        let mut p = ObjectiveParams {
            beta: 0.1,
            ..Default::default()
        };
        p.unpaired.desirable_weight = 1.3;
        p.unpaired.undesirable_weight = 0.7;
        p
    };
    let meta: Vec<ExampleMeta> = labels.iter().map(|&l| unpaired(l)).collect();
    let (st, var) = batch(&groups, meta.clone());
    let refs: Vec<f64> = groups.iter().flatten().map(|r| r.1).collect();
    let hand = |x: &[f64], kto: bool| -> Vec<f64> {
        let kl: f64 = (0..4).map(|e| x[2 * e + 1] - refs[2 * e + 1]).sum::<f64>() / 4.0;
        let z0 = if kto { kl.max(0.0) } else { 0.0 };
        (0..4)
            .map(|e| {
                let d = x[2 * e] - refs[2 * e];
                match (kto, labels[e]) {
                    (true, true) => 1.3 * (1.0 - sg(0.1 * (d - z0))),
                    (true, false) => 0.7 * (1.0 - sg(0.1 * (z0 - d))),
                    (false, true) => 1.3 * (1.0 - sg(0.1 * d)),
                    (false, false) => 0.7 * sg(0.1 * d),
                }
            })
            .collect()
    };
    let x0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
    let kto = build(&["kto".into()], None, &p).unwrap();
    assert!(kto.needs_kl() && kto.shape() == Shape::Unpaired);
    let out = kto.loss(&st).unwrap();
    let got: Vec<f64> = out.losses.to_vec1().unwrap();
    for (g, w) in got.iter().zip(hand(&x0, true)) {
        assert!((g - w).abs() < 1e-12, "kto {g} vs {w}");
    }
    // z0 carries no gradient: check only the completions' own log-probs
    grads_vs_fd(&var, &out.losses, &|x| hand(x, true), &[0, 2, 4, 6], "kto");
    let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
    assert!(
        (m["kl"] - 0.4).abs() < 1e-12,
        "z0 = mean(1, 0.5, −0.1, 0.2) = 0.4: {}",
        m["kl"]
    );
    // apo_zero_unpaired reads only the completion
    let groups1: Vec<Vec<(f64, f64, usize)>> = groups.iter().map(|g| vec![g[0]]).collect();
    let (st1, var1) = batch(&groups1, meta);
    let apo = build(&["apo_zero_unpaired".into()], None, &p).unwrap();
    let out = apo.loss(&st1).unwrap();
    let refs1: Vec<f64> = groups1.iter().flatten().map(|r| r.1).collect();
    let hand1 = |x: &[f64]| -> Vec<f64> {
        (0..4)
            .map(|e| {
                let d = x[e] - refs1[e];
                if labels[e] {
                    1.3 * (1.0 - sg(0.1 * d))
                } else {
                    0.7 * sg(0.1 * d)
                }
            })
            .collect()
    };
    let x1: Vec<f64> = var1.as_tensor().to_vec1().unwrap();
    for (g, w) in out.losses.to_vec1::<f64>().unwrap().iter().zip(hand1(&x1)) {
        assert!((g - w).abs() < 1e-12);
    }
    grads_vs_fd(&var1, &out.losses, &hand1, &[0, 1, 2, 3], "apo_zero_unpaired");
}

fn ranked(scores: Vec<f64>, from_ranks: bool) -> ExampleMeta {
    ExampleMeta {
        scores: Some(scores),
        scores_from_ranks: from_ranks,
        ..ExampleMeta::new(Shape::Ranked)
    }
}

#[test]
fn lipo_matches_lambda_weighted_pairs_and_reduces_to_weighted_dpo() {
    let p = ObjectiveParams {
        beta: 0.5,
        ..Default::default()
    };
    let groups = vec![
        vec![(-3.0, -4.0, 2), (-5.0, -4.5, 3), (-2.0, -1.0, 2)],
        vec![(-1.0, -2.0, 1), (-6.0, -3.0, 4)],
    ];
    let psi = [vec![2.0, 1.0, 0.0], vec![1.0, 0.0]];
    let (st, var) = batch(&groups, psi.iter().map(|s| ranked(s.clone(), true)).collect());
    let refs: Vec<f64> = groups.iter().flatten().map(|r| r.1).collect();
    let hand = |x: &[f64]| -> Vec<f64> {
        let mut out = vec![];
        let mut off = 0;
        for ps in &psi {
            let k = ps.len();
            let s: Vec<f64> = (0..k).map(|i| 0.5 * (x[off + i] - refs[off + i])).collect();
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            let mut tau = vec![0; k];
            for (pos, &i) in order.iter().enumerate() {
                tau[i] = pos + 1;
            }
            let mut l = 0.0;
            for i in 0..k {
                for j in 0..k {
                    if ps[i] > ps[j] {
                        let g = (2f64.powf(ps[i]) - 2f64.powf(ps[j])).abs();
                        let d = (1.0 / (1.0 + tau[i] as f64).ln() - 1.0 / (1.0 + tau[j] as f64).ln()).abs();
                        l += g * d * -ls(s[i] - s[j]);
                    }
                }
            }
            out.push(l);
            off += k;
        }
        out
    };
    let obj = build(&["lipo".into()], None, &p).unwrap();
    let out = obj.loss(&st).unwrap();
    let got: Vec<f64> = out.losses.to_vec1().unwrap();
    let x0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
    for (g, w) in got.iter().zip(hand(&x0)) {
        assert!((g - w).abs() < 1e-12, "{g} vs {w}");
    }
    grads_vs_fd(&var, &out.losses, &hand, &[0, 1, 2, 3, 4], "lipo");
    // two responses: the λ weight times the DPO loss at β
    let dpo = -ls(0.5 * ((-1.0 - -2.0) - (-6.0 - -3.0)));
    let w = (2f64.powf(1.0) - 1.0) * (1.0 / 2f64.ln() - 1.0 / 3f64.ln());
    assert!((got[1] - w * dpo).abs() < 1e-12);
}

#[test]
fn pro_matches_plackett_luce_with_and_without_dynamic_temperature() {
    let p = {
        let mut p = ObjectiveParams::default();
        p.listwise.pro_sft_weight = 0.5;
        p
    };
    let groups = vec![
        vec![(-3.0, 0.0, 2), (-5.0, 0.0, 5), (-2.0, 0.0, 1)],
        vec![(-4.0, 0.0, 4), (-6.0, 0.0, 3), (-1.0, 0.0, 1)],
    ];
    let psi = [vec![0.9, 0.5, 0.1], vec![2.0, 1.0, 0.0]];
    let from_ranks = [false, true];
    let meta = psi.iter().zip(from_ranks).map(|(s, r)| ranked(s.clone(), r)).collect();
    let (st, var) = batch(&groups, meta);
    let toks: Vec<f64> = groups.iter().flatten().map(|r| r.2 as f64).collect();
    let hand = |x: &[f64]| -> Vec<f64> {
        (0..2)
            .map(|e| {
                let r: Vec<f64> = (0..3).map(|i| x[3 * e + i] / toks[3 * e + i]).collect();
                let mut l = -0.5 * r[0];
                for k in 0..2 {
                    let f: Vec<f64> = if from_ranks[e] {
                        vec![1.0; 3 - k]
                    } else {
                        let d: Vec<f64> = (k + 1..3).map(|i| psi[e][k] - psi[e][i]).collect();
                        let mx = d.iter().cloned().fold(0.0, f64::max);
                        std::iter::once(mx).chain(d).collect()
                    };
                    let xs: Vec<f64> = (k..3).map(|i| r[i] * f[i - k]).collect();
                    let lse = xs.iter().map(|v| v.exp()).sum::<f64>().ln();
                    l += lse - xs[0];
                }
                l
            })
            .collect()
    };
    let obj = build(&["pro".into()], None, &p).unwrap();
    assert!(!obj.needs_reference());
    let out = obj.loss(&st).unwrap();
    let x0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
    for (g, w) in out.losses.to_vec1::<f64>().unwrap().iter().zip(hand(&x0)) {
        assert!((g - w).abs() < 1e-12, "{g} vs {w}");
    }
    grads_vs_fd(&var, &out.losses, &hand, &[0, 1, 2, 3, 4, 5], "pro");
    // shapes cannot be mixed in one objective
    let e = build(&["kto".into(), "sigmoid".into()], None, &p).err().unwrap();
    assert!(e.to_string().contains("same data shape"), "{e}");
}

/// The Gaussian reward head's loss −log Φ((μ_w − μ_l − m)/√(e^{v_w} + e^{v_l})) against the
/// scalar formula, with its gradient in all four inputs by central differences, including
/// saturation (z = ±60) and equal means.
#[test]
fn gaussian_reward_loss_matches_its_formula_and_gradient() {
    // (μ_w, μ_l, log σ²_w, log σ²_l, margin)
    let rows: [(f64, f64, f64, f64, f64); 6] = [
        (1.0, -0.5, 0.0, 0.0, 0.0),
        (0.3, 0.3, -1.0, 0.5, 0.0),               // equal means: Φ(0) = ½
        (60.0 * 2f64.sqrt(), 0.0, 0.0, 0.0, 0.0), // z = +60
        (0.0, 60.0 * 2f64.sqrt(), 0.0, 0.0, 0.0), // z = −60
        (2.0, 1.0, 1.5, -2.0, 0.5),
        (-1.0, 2.0, -3.0, -3.0, 0.0),
    ];
    let hand = |r: &(f64, f64, f64, f64, f64)| {
        let z = (r.0 - r.1 - r.4) / (r.2.exp() + r.3.exp()).sqrt();
        -prefer::util::log_ndtr(z)
    };
    let dev = Device::Cpu;
    let col =
        |f: fn(&(f64, f64, f64, f64, f64)) -> f64| Var::new(rows.iter().map(f).collect::<Vec<f64>>(), &dev).unwrap();
    let (mw, ml, vw, vl) = (col(|r| r.0), col(|r| r.1), col(|r| r.2), col(|r| r.3));
    let n = rows.len();
    let st = PairStats {
        policy_chosen: mw.as_tensor().clone(),
        policy_rejected: ml.as_tensor().clone(),
        ref_chosen: None,
        ref_rejected: None,
        chosen_tokens: vec![1; n],
        rejected_tokens: vec![1; n],
        weights: None,
        strength: vec![1.0; n],
        scores: None,
        margin: rows.iter().map(|r| r.4).collect(),
        log_variance: Some((vw.as_tensor().clone(), vl.as_tensor().clone())),
    };
    let obj = build(&["gaussian".into()], None, &ObjectiveParams::default()).unwrap();
    assert!(obj.needs_reward_variance() && !obj.needs_reference());
    let out = obj.loss_pairs(&st).unwrap();
    let got: Vec<f64> = out.losses.to_vec1().unwrap();
    for (i, r) in rows.iter().enumerate() {
        let want = hand(r);
        assert!(
            (got[i] - want).abs() < 1e-12 * (1.0 + want.abs()),
            "row {i}: {} vs {want}",
            got[i]
        );
    }
    assert!((got[1] - 2f64.ln()).abs() < 1e-14 && got[2] < 1e-300 && (got[3] - 1805.0135).abs() < 1e-3);
    let grads = out.losses.sum_all().unwrap().backward().unwrap();
    let vars = [&mw, &ml, &vw, &vl];
    for (k, v) in vars.iter().enumerate() {
        let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        for (i, r) in rows.iter().enumerate() {
            let h = 1e-6;
            let bump = |d: f64| {
                let mut x = [r.0, r.1, r.2, r.3, r.4];
                x[k] += d;
                hand(&(x[0], x[1], x[2], x[3], x[4]))
            };
            let fd = (bump(h) - bump(-h)) / (2.0 * h);
            assert!(
                (g[i] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                "input {k} row {i}: {} vs {fd}",
                g[i]
            );
        }
    }
    // without a Gaussian head the objective says what it needs
    let plain = PairStats {
        log_variance: None,
        ..st
    };
    let e = obj.loss_pairs(&plain).unwrap_err();
    assert!(e.to_string().contains("Gaussian reward head"), "{e}");
}
