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
}

/// β = 0.1 turns h = ±600 into margins of ±60. Batch-sorted quantities have no ties.
fn rows() -> Vec<Row> {
    let r = |pc, pr, rc, rr, nc, nr| Row { pc, pr, rc, rr, nc, nr };
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

fn fdiv(p: &ObjectiveParams, d: f64) -> f64 {
    match p.f_divergence_type.as_str() {
        "forward_kl" => -(-d).exp(),
        "js_divergence" => ls(d),
        "alpha_divergence" => {
            let a = p.f_alpha_divergence_coef;
            ((a - 1.0) * d).min(80.0).exp() / (a - 1.0)
        }
        _ => d,
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The formulas, written independently of the library, per batch.
fn by_hand(name: &str, rows: &[Row], p: &ObjectiveParams) -> Vec<f64> {
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
                    let m = sg(z / p.discopop_tau);
                    (1.0 - m) * -ls(z) + m * (-z).exp()
                }
                "sft" => nll,
                "sigmoid_norm" => -ls(b * (sw / nw - sl / nl)),
                "cdpo" => smooth(h),
                "ipo_sum" => (h - 1.0 / (2.0 * b)).powi(2),
                "simpo" => smooth(mw - ml - p.simpo_gamma / b),
                "alphapo" => {
                    let a = p.alpha;
                    let rw = |x: f64| if a == 0.0 { x } else { (1.0 - (-a * x).exp()) / a };
                    smooth(rw(mw) - rw(ml) - p.simpo_gamma / b)
                }
                "cpo" => smooth(r.pc - r.pr) + p.cpo_alpha * nll,
                "orpo" => {
                    let lo = |x: f64| x - (1.0 - x.exp()).ln();
                    nll - b * ls(lo(mw) - lo(ml))
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
                by_hand(name, &rs, p)
            };
            let x = if which == "chosen" { rows[i].pc } else { rows[i].pr };
            let step = 1e-6 * x.abs().max(1.0);
            // row by row, so the huge but unchanged losses of other rows cancel exactly
            let (up, down) = (perturbed(step), perturbed(-step));
            let fd = up.iter().zip(&down).map(|(a, b)| a - b).sum::<f64>() / (2.0 * step);
            let tol = 1e-5 * fd.abs().max(g[i].abs()).max(1.0);
            assert!(
                (fd - g[i]).abs() <= tol,
                "{name} {p:?}: d/d{which}[{i}] backprop {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn every_objective_matches_its_formula_and_gradient() {
    let base = ObjectiveParams::default();
    for e in REGISTRY {
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
    for f in ["forward_kl", "js_divergence", "alpha_divergence"] {
        for name in [
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "apo_down",
            "discopop",
            "sigmoid_norm",
        ] {
            check_rows(
                name,
                &ObjectiveParams {
                    f_divergence_type: f.into(),
                    ..base.clone()
                },
                &moderate,
            );
        }
    }
    check(
        "alphapo",
        &ObjectiveParams {
            alpha: 0.25,
            ..base.clone()
        },
    );
    check(
        "simpo",
        &ObjectiveParams {
            simpo_gamma: 1.5,
            beta: 2.0,
            ..base.clone()
        },
    );
    check("cpo", &ObjectiveParams { cpo_alpha: 0.3, ..base });
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
