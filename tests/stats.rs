//! Sequence statistics options (LD-DPO's ld_alpha, WPO's weights) and reference management
//! (weight-space soup, TR-DPO sync), each against an independent computation.

use candle_core::{DType, Device, Tensor};
use prefer::data::{ExampleMeta, Shape, TokenizedExample};
use prefer::model::{logprobs::token_logprobs, AttentionInputs, Transformer};
use prefer::stats::{group_logps, StatsOptions};
use prefer::testing::{tiny_model, write_hf, TinySpec};

fn pairs() -> Vec<TokenizedExample> {
    let p = |prompt: Vec<u32>, c: Vec<u32>, r: Vec<u32>| TokenizedExample {
        line: 1,
        prompt_ids: prompt,
        responses: vec![c, r],
        meta: ExampleMeta::new(Shape::Pairwise),
        prompt_truncated: false,
        completion_truncated: false,
    };
    vec![
        p(vec![5, 6, 7], vec![8, 9, 2], vec![10, 11, 12, 13, 2]),
        p(vec![20, 21], vec![22, 23, 24, 25, 26, 2], vec![30, 2]),
    ]
}

fn completion_logps(m: &Transformer, p: &TokenizedExample, c: &[u32]) -> Vec<f64> {
    let ids: Vec<u32> = p.prompt_ids.iter().chain(c).copied().collect();
    token_logprobs(m, &ids, p.prompt_ids.len())
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

#[test]
fn ld_alpha_weighs_tokens_past_the_shorter_completion() {
    prefer::testing::set_threads_for_tests();
    let m = tiny_model(&TinySpec::default(), DType::F32, 21).unwrap().transformer;
    let ps = pairs();
    let refs: Vec<&TokenizedExample> = ps.iter().collect();
    let plain = group_logps(&m, &refs, &StatsOptions::default()).unwrap();
    let one = group_logps(
        &m,
        &refs,
        &StatsOptions {
            ld_alpha: Some(1.0),
            ..Default::default()
        },
    )
    .unwrap();
    let v = |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).unwrap().to_vec1().unwrap() };
    assert_eq!(v(&plain.policy), v(&one.policy));
    let alpha = 0.3;
    let ld = group_logps(
        &m,
        &refs,
        &StatsOptions {
            ld_alpha: Some(alpha),
            ..Default::default()
        },
    )
    .unwrap();
    for (i, p) in ps.iter().enumerate() {
        let m_len = p.chosen_ids().len().min(p.rejected_ids().len());
        for (k, ids) in p.responses.iter().enumerate() {
            let got = v(&ld.policy)[ld.offsets[i] + k];
            let toks = completion_logps(&m, p, ids);
            let want: f64 = toks
                .iter()
                .enumerate()
                .map(|(t, x)| if t < m_len { *x } else { alpha * x })
                .sum();
            assert!((got - want).abs() < 1e-4, "pair {i} response {k}: {got} vs {want}");
        }
    }
}

#[test]
fn wpo_weights_match_a_full_vocabulary_computation() {
    prefer::testing::set_threads_for_tests();
    let m = tiny_model(&TinySpec::default(), DType::F64, 22).unwrap().transformer;
    let ps = pairs();
    let refs: Vec<&TokenizedExample> = ps.iter().collect();
    let lp = group_logps(
        &m,
        &refs,
        &StatsOptions {
            use_weighting: true,
            ..Default::default()
        },
    )
    .unwrap();
    let got: Vec<f64> = lp.weights.unwrap().to_vec1().unwrap();
    // by hand: full logits per position, log p(y_t) − log Σ_v p(v)², mean over tokens, exp of the sum
    let omega = |p: &TokenizedExample, c: &[u32]| -> f64 {
        let ids: Vec<u32> = p.prompt_ids.iter().chain(c).copied().collect();
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let a = AttentionInputs::padded(&m.cfg, &[vec![true; t]], DType::F64, &Device::Cpu).unwrap();
        let h = m.hidden_states(&input, &a).unwrap().squeeze(0).unwrap();
        let logits: Vec<Vec<f64>> = m.logits(&h).unwrap().to_vec2().unwrap();
        let terms: Vec<f64> = (p.prompt_ids.len()..t)
            .map(|i| {
                let row = &logits[i - 1];
                let mx = row.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = row.iter().map(|x| (x - mx).exp()).sum();
                let probs: Vec<f64> = row.iter().map(|x| (x - mx).exp() / z).collect();
                probs[ids[i] as usize].ln() - probs.iter().map(|q| q * q).sum::<f64>().ln()
            })
            .collect();
        terms.iter().sum::<f64>() / terms.len() as f64
    };
    for (i, p) in ps.iter().enumerate() {
        let want = (omega(p, p.chosen_ids()) + omega(p, p.rejected_ids())).exp();
        assert!(
            (got[i] - want).abs() < 1e-10 * want.max(1.0),
            "pair {i}: {} vs {want}",
            got[i]
        );
    }
}

#[test]
fn weights_scale_the_objective_losses() {
    let dev = Device::Cpu;
    let t = |x: &[f64]| Tensor::new(x, &dev).unwrap();
    let mut st = prefer::objectives::PairStats {
        policy_chosen: t(&[-1.0, -2.0]),
        policy_rejected: t(&[-3.0, -1.5]),
        ref_chosen: Some(t(&[-2.0, -2.0])),
        ref_rejected: Some(t(&[-2.0, -2.0])),
        chosen_tokens: vec![1, 1],
        rejected_tokens: vec![1, 1],
        weights: None,
        strength: vec![1.0; 2],
        scores: None,
        margin: vec![0.0; 2],
        log_variance: None,
    };
    let obj = prefer::objectives::build(&["sigmoid".into()], None, &Default::default()).unwrap();
    let plain: Vec<f64> = obj.loss_pairs(&st).unwrap().losses.to_vec1().unwrap();
    st.weights = Some(t(&[0.5, 2.0]));
    let weighted: Vec<f64> = obj.loss_pairs(&st).unwrap().losses.to_vec1().unwrap();
    assert_eq!(weighted, vec![plain[0] * 0.5, plain[1] * 2.0]);
}

#[test]
fn reference_soup_averages_weights_and_sync_mixes_them() {
    prefer::testing::set_threads_for_tests();
    let dir = prefer::testing::scratch_dir("stats");
    let a = tiny_model(&TinySpec::default(), DType::F32, 31).unwrap();
    let b = tiny_model(&TinySpec::default(), DType::F32, 32).unwrap();
    write_hf(&a, &dir.join("a")).unwrap();
    write_hf(&b, &dir.join("b")).unwrap();
    let soup = prefer::model::load_soup(&[dir.join("a"), dir.join("b")], DType::F32, &Device::Cpu).unwrap();
    for (((n, s), (_, x)), (_, y)) in soup
        .transformer
        .params()
        .iter()
        .zip(a.transformer.params())
        .zip(b.transformer.params())
    {
        let want = ((x + y).unwrap() / 2.0).unwrap();
        let d = prefer::testing::max_abs_diff(s, &want).unwrap();
        assert!(d < 1e-6, "{n}");
    }
    let mixed = prefer::model::mix_into_reference(&a.transformer, &b.transformer, 0.6).unwrap();
    for (((n, m), (_, r)), (_, p)) in mixed
        .params()
        .iter()
        .zip(a.transformer.params())
        .zip(b.transformer.params())
    {
        let want = ((p * 0.6).unwrap() + (r * 0.4).unwrap()).unwrap();
        let d = prefer::testing::max_abs_diff(m, &want).unwrap();
        assert!(d < 1e-6, "{n}");
    }
    // a soup of differently shaped models is refused
    write_hf(
        &tiny_model(
            &TinySpec {
                hidden: 64,
                ..TinySpec::default()
            },
            DType::F32,
            33,
        )
        .unwrap(),
        &dir.join("c"),
    )
    .unwrap();
    let e = prefer::model::load_soup(&[dir.join("a"), dir.join("c")], DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("another architecture"), "{e}");
}

/// Positions a forward pass computes under each layout, counted by hand for `pairs()`:
/// prompts of 3 and 2 tokens, responses of 3 and 5, and 6 and 2 tokens.
#[test]
fn forward_positions_by_layout() {
    use prefer::batch::{Layout, PaddingSide};
    let ps = pairs();
    let refs: Vec<&TokenizedExample> = ps.iter().collect();
    let layout = |share_prompt, padding_free| Layout {
        share_prompt,
        padding_free,
        padding_side: PaddingSide::Right,
    };
    let count = |l| prefer::batch::forward_positions(&refs, l);
    assert_eq!(count(layout(true, true)), (3 + 3 + 5) + (2 + 6 + 2));
    assert_eq!(count(layout(true, false)), 2 * 11);
    assert_eq!(count(layout(false, true)), (3 + 3) + (3 + 5) + (2 + 6) + (2 + 2));
    assert_eq!(count(layout(false, false)), 4 * 8);
}
