//! The sampler: cached decoding against full forward passes, greedy against recomputed argmax,
//! sampled frequencies against the softmax, reproducibility, and sampling log-probs against the
//! training path's log-probs.

use candle_core::DType;
use prefer::model::{logprobs, Transformer};
use prefer::sample::{full_forward_logits, sample, FinishReason, SamplingParams};
use prefer::testing::{tiny_model, TinySpec};

fn model(spec: &TinySpec, seed: u64) -> Transformer {
    prefer::testing::set_threads_for_tests();
    tiny_model(spec, DType::F32, seed).unwrap().transformer
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// At every step, each sample's cached logits equal a full forward pass over its prompt and
/// tokens so far: GQA, q/k/v bias (Qwen2) and Llama-3 RoPE scaling, 1 and 3 samples. The
/// prompt (18 tokens) fills one block of 16 cached keys and starts another, the 36 steps two.
#[test]
fn cached_logits_equal_a_full_forward_at_every_step() {
    let specs = [
        TinySpec::default(),
        TinySpec {
            model_type: "qwen2",
            kv_heads: 1,
            ..TinySpec::default()
        },
        TinySpec {
            llama3_rope_scaling: true,
            kv_heads: 4,
            layers: 3,
            ..TinySpec::default()
        },
    ];
    for (i, spec) in specs.iter().enumerate() {
        let m = model(spec, 3 + i as u64);
        let prompt: Vec<u32> = vec![5, 17, 9, 40, 3, 22, 8, 31, 2, 14, 50, 6, 27, 11, 44, 19, 1, 33];
        let (first, cache) = m.prefill(&prompt).unwrap();
        let full: Vec<f32> = full_forward_logits(&m, &prompt).unwrap().to_vec1().unwrap();
        assert!(max_diff(&first.to_vec1().unwrap(), &full) < 1e-4, "{spec:?}: prefill");
        for g in [1usize, 3] {
            let mut cache = cache.fork(g).unwrap();
            let mut seqs: Vec<Vec<u32>> = vec![prompt.clone(); g];
            for step in 0..36 {
                let next: Vec<u32> = (0..g).map(|s| ((step * 7 + s * 13 + 1) % 60) as u32).collect();
                for (s, t) in seqs.iter_mut().zip(&next) {
                    s.push(*t);
                }
                let rows: Vec<Vec<f32>> = m.decode(&mut cache, &next).unwrap().to_vec2().unwrap();
                assert_eq!(cache.len(), prompt.len() + step + 1);
                for (s, row) in rows.iter().enumerate() {
                    let want: Vec<f32> = full_forward_logits(&m, &seqs[s]).unwrap().to_vec1().unwrap();
                    let d = max_diff(row, &want);
                    assert!(d < 1e-4, "{spec:?}: {g} samples, step {step}, sample {s}: {d}");
                }
            }
        }
    }
}

/// Greedy sampling is the argmax continuation recomputed from scratch at every step.
#[test]
fn greedy_equals_argmax_by_full_recompute() {
    let m = model(&TinySpec::default(), 5);
    let prompt = vec![5u32, 6, 7, 30];
    let p = SamplingParams {
        temperature: 0.0,
        max_completion_length: 12,
        ..Default::default()
    };
    let got = sample(&m, std::slice::from_ref(&prompt), 2, &p, 1, &|_| false, &mut |_| {}).unwrap();
    let want = logprobs::generate_greedy(&m, &prompt, 12, &[]).unwrap();
    for c in &got {
        assert_eq!(c.ids, want);
        assert_eq!(c.finish_reason, FinishReason::Length);
    }
}

/// First tokens drawn from one prompt follow the model's softmax: Pearson's χ² over the
/// tokens (those expected fewer than 5 times pooled) stays below df + 4·√(2·df), far in the
/// tail for a correct sampler (p < 0.001) and exceeded by any visible bias.
#[test]
fn sampled_frequencies_match_the_softmax() {
    let m = model(&TinySpec::default(), 7);
    let prompt = vec![3u32, 14, 15, 9];
    let logits: Vec<f32> = full_forward_logits(&m, &prompt).unwrap().to_vec1().unwrap();
    // the tiny model's logits are large (tied unit-variance embeddings): high temperatures
    // spread them over enough tokens to test
    for t in [4.0f64, 8.0] {
        let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let w: Vec<f64> = logits.iter().map(|&x| ((x as f64 - mx) / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / z).collect();
        let n = 6000;
        let p = SamplingParams {
            temperature: t,
            max_completion_length: 1,
            ..Default::default()
        };
        let got = sample(&m, std::slice::from_ref(&prompt), n, &p, 11, &|_| false, &mut |_| {}).unwrap();
        let mut counts = vec![0usize; probs.len()];
        for c in &got {
            counts[c.ids[0] as usize] += 1;
            // the reported log-prob is the token's log-probability at the temperature
            let lp = probs[c.ids[0] as usize].ln();
            assert!((c.logprobs[0] as f64 - lp).abs() < 1e-4, "{} vs {lp}", c.logprobs[0]);
        }
        let (mut chi2, mut df) = (0.0, 0usize);
        let (mut pooled_e, mut pooled_o) = (0.0, 0.0);
        for (pr, &o) in probs.iter().zip(&counts) {
            let e = pr * n as f64;
            if e < 5.0 {
                pooled_e += e;
                pooled_o += o as f64;
            } else {
                chi2 += (o as f64 - e).powi(2) / e;
                df += 1;
            }
        }
        if pooled_e > 0.0 {
            chi2 += (pooled_o - pooled_e).powi(2) / pooled_e;
            df += 1;
        }
        let df = (df - 1) as f64;
        assert!(df >= 5.0, "too few categories to test: {df}");
        assert!(
            chi2 < df + 4.0 * (2.0 * df).sqrt(),
            "T = {t}: χ² = {chi2} with {df} degrees of freedom"
        );
    }
}

/// The same seed draws the same completions, whether the prompts are sampled together or one
/// at a time; another seed draws others. Stop tokens end a completion and are kept in it.
#[test]
fn same_seed_same_samples_batched_or_one_at_a_time() {
    let m = model(&TinySpec::default(), 9);
    let prompts = vec![vec![5u32, 6, 7], vec![40u32, 41], vec![9u32, 9, 9, 9, 2]];
    let p = SamplingParams {
        max_completion_length: 10,
        top_k: 20,
        top_p: 0.95,
        repetition_penalty: 1.2,
        stop_tokens: vec![1],
        ..Default::default()
    };
    let all = sample(&m, &prompts, 3, &p, 42, &|_| false, &mut |_| {}).unwrap();
    assert_eq!(all.len(), 9);
    let mut one_by_one = Vec::new();
    for (i, pr) in prompts.iter().enumerate() {
        // the same prompt at another position of the batch draws from another seed stream
        let mut got = sample(&m, std::slice::from_ref(pr), 3, &p, 42, &|_| false, &mut |_| {}).unwrap();
        let moved = sample(&m, &[vec![0u32], pr.clone()], 3, &p, 42, &|_| false, &mut |_| {}).unwrap();
        if i == 0 {
            for (a, b) in got.iter().zip(&moved[3..]) {
                assert_ne!(a.ids, b.ids, "prompt index seeds the stream");
            }
        }
        for c in got.iter_mut() {
            c.prompt_index = i;
        }
        one_by_one.extend(got);
    }
    // prompt 0 alone is prompt index 0 in both runs; the others differ only by their index
    assert_eq!(all[..3], one_by_one[..3]);
    let again = sample(&m, &prompts, 3, &p, 42, &|_| false, &mut |_| {}).unwrap();
    assert_eq!(all, again);
    let other = sample(&m, &prompts, 3, &p, 43, &|_| false, &mut |_| {}).unwrap();
    assert_ne!(
        all.iter().map(|c| &c.ids).collect::<Vec<_>>(),
        other.iter().map(|c| &c.ids).collect::<Vec<_>>()
    );
    for c in &all {
        assert_eq!(c.ids.len(), c.logprobs.len());
        match c.finish_reason {
            FinishReason::Stop => assert_eq!(c.ids.last(), Some(&1)),
            FinishReason::Length => assert_eq!(c.ids.len(), 10),
        }
        assert!(!c.ids[..c.ids.len() - 1].contains(&1));
    }
    // a stop function (stop strings) ends a completion where it says
    let short = sample(&m, &prompts[..1], 2, &p, 42, &|ids| ids.len() == 3, &mut |_| {}).unwrap();
    for c in &short {
        assert!(c.ids.len() <= 3 && c.finish_reason == FinishReason::Stop, "{c:?}");
    }
}

/// The log-probs the sampler reports at T = 1 are the ones the training path computes for the
/// same tokens (so a trainer can reuse them as the old policy's).
#[test]
fn sampling_logprobs_equal_the_training_log_probs() {
    let m = model(&TinySpec::default(), 13);
    let prompt = vec![5u32, 6, 7, 8];
    let p = SamplingParams {
        max_completion_length: 8,
        ..Default::default()
    };
    for c in sample(&m, std::slice::from_ref(&prompt), 4, &p, 3, &|_| false, &mut |_| {}).unwrap() {
        let ids: Vec<u32> = prompt.iter().chain(&c.ids).copied().collect();
        let want = logprobs::token_logprobs(&m, &ids, prompt.len()).unwrap();
        assert!(max_diff(&c.logprobs, &want) < 1e-4, "{:?} vs {want:?}", c.logprobs);
    }
}

/// `prefer generate`: string and chat prompts, one JSON line per completion with its ids and
/// log-probs; a row without a prompt is an error naming the file, line and field.
#[test]
fn generate_command_writes_completions_and_names_bad_rows() {
    let dir = prefer::testing::scratch_dir("generate-cli");
    let m = tiny_model(&TinySpec::default(), DType::F32, 21).unwrap();
    prefer::testing::write_hf(&m, &dir.join("model")).unwrap();
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"the cat\", \"answer\": 4}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let out = dir.join("out.jsonl");
    let run = |prompts: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_prefer"))
            .env("RAYON_NUM_THREADS", "1")
            .args(["generate", "--model"])
            .arg(dir.join("model"))
            .arg("--prompts")
            .arg(prompts)
            .arg("--out")
            .arg(&out)
            .args([
                "--num-generations",
                "2",
                "--temperature",
                "0",
                "--max-completion-length",
                "5",
            ])
            .output()
            .unwrap()
    };
    let o = run(&prompts);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["prompt_index"], i / 2);
        let ids = l["completion_ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 5);
        assert_eq!(ids.len(), l["logprobs"].as_array().unwrap().len());
        assert!(l["completion"].is_string());
        assert!(matches!(l["finish_reason"].as_str(), Some("stop" | "length")), "{l}");
    }
    // greedy: both samples of a prompt agree
    assert_eq!(lines[0]["completion_ids"], lines[1]["completion_ids"]);
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    let o = run(&bad);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.jsonl:2: field `prompt`: missing"), "{e}");
}

/// `prefer eval --prompts`: completions sampled and scored by each reward, summarised, and
/// written with their rewards; a reward command's scores come through as it wrote them.
#[test]
fn eval_by_generation_scores_completions_with_rewards() {
    let dir = prefer::testing::scratch_dir("eval-generation");
    let m = tiny_model(&TinySpec::default(), DType::F32, 23).unwrap();
    prefer::testing::write_hf(&m, &dir.join("model")).unwrap();
    let prompts = dir.join("gsm.jsonl");
    std::fs::write(
        &prompts,
        "{\"question\": \"1 + 1?\", \"answer\": \"#### 2\"}\n{\"question\": \"2 + 2?\", \"answer\": \"#### 4\"}\n",
    )
    .unwrap();
    let out = dir.join("scored.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_prefer"))
        .env("RAYON_NUM_THREADS", "1")
        .args(["eval", "--json", "--model"])
        .arg(dir.join("model"))
        .arg("--prompts")
        .arg(&prompts)
        .args([
            "--prompt-field",
            "question",
            "--chat",
            "--num-generations",
            "3",
            "--temperature",
            "1",
        ])
        .args(["--max-completion-length", "4", "--reward", "accuracy"])
        .args(["--reward", "cmd:while read -r l; do echo 0.25; done", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((s["prompts"].as_u64(), s["completions"].as_u64()), (Some(2), Some(6)));
    assert_eq!(s["rewards"][0]["name"], "accuracy");
    let acc = s["rewards"][0]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(s["rewards"][1]["mean"].as_f64(), Some(0.25));
    assert!((s["reward"].as_f64().unwrap() - (acc + 0.25)).abs() < 1e-12);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert_eq!(l["rewards"][1].as_f64(), Some(0.25));
        let a = l["rewards"][0].as_f64().unwrap();
        assert!(a == 0.0 || a == 1.0);
        assert!((l["reward"].as_f64().unwrap() - a - 0.25).abs() < 1e-12);
    }
}

/// At T ≠ 1 too, the sampler's log-probs are the training path's at that temperature.
#[test]
fn sampling_logprobs_at_a_temperature_equal_the_training_ones() {
    let m = model(&TinySpec::default(), 17);
    let prompt = vec![5u32, 6, 7, 8];
    let p = SamplingParams {
        temperature: 2.5,
        max_completion_length: 6,
        ..Default::default()
    };
    for c in sample(&m, std::slice::from_ref(&prompt), 3, &p, 3, &|_| false, &mut |_| {}).unwrap() {
        let r = [c.ids.clone()];
        let g = [prefer::batch::ScoredGroup {
            prompt: &prompt,
            responses: &r,
        }];
        let lp = logprobs::group_sequence_logps_at(&m, &g, prefer::batch::Layout::PACKED, false, 2.5).unwrap();
        let want: Vec<f32> = lp.token_logps.to_vec1().unwrap();
        assert!(max_diff(&c.logprobs, &want) < 1e-4, "{:?} vs {want:?}", c.logprobs);
    }
}

/// Nash-MD's geometric mixture, sampled with one KV cache per model, draws each token from
/// `log softmax(α·ref + (1−α)·policy)` of the full-recompute logits: greedily it picks their
/// argmax at every step, and the log-prob it reports is that of the mixture.
#[test]
fn mixture_sampling_follows_the_recomputed_geometric_mixture() {
    let spec = TinySpec::default();
    let (policy, reference) = (model(&spec, 5), model(&spec, 9));
    let prompts = vec![vec![5u32, 6, 7, 30], vec![11u32, 2]];
    let alpha = 0.3;
    let p = SamplingParams {
        temperature: 0.0,
        max_completion_length: 8,
        ..Default::default()
    };
    let got = prefer::sample::sample_mixture(
        &[(&policy, 1.0 - alpha), (&reference, alpha)],
        &prompts,
        2,
        &p,
        3,
        &|_| false,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(got.len(), 4);
    let mut differs = false;
    for c in &got {
        let mut ids = prompts[c.prompt_index].clone();
        for (&tok, &lp) in c.ids.iter().zip(&c.logprobs) {
            let a: Vec<f32> = full_forward_logits(&policy, &ids).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = full_forward_logits(&reference, &ids).unwrap().to_vec1().unwrap();
            let z: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (1.0 - alpha) * x as f64 + alpha * y as f64)
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let best = (0..z.len()).max_by(|&i, &j| z[i].total_cmp(&z[j])).unwrap();
            assert_eq!(tok as usize, best);
            assert!((lp as f64 - (z[best] - lse)).abs() < 1e-4, "{lp} vs {}", z[best] - lse);
            let pa = (0..a.len()).max_by(|&i, &j| a[i].total_cmp(&a[j])).unwrap();
            differs |= pa != best;
            ids.push(tok);
        }
    }
    // the mixture is not the policy alone (else the test would not see the reference)
    let alone = sample(&policy, &prompts, 2, &p, 3, &|_| false, &mut |_| {}).unwrap();
    assert!(differs || alone.iter().zip(&got).any(|(x, y)| x.ids != y.ids));
}

/// The entropies the log-prob head leaves beside the log-probs (fused kernel and primitive
/// ops) equal `−Σ_v p_v log p_v` of the full-recompute logits at the same temperature.
#[test]
fn logprob_entropies_equal_the_softmax_entropy() {
    use prefer::batch::{Layout, ScoredGroup};
    let mut m = model(&TinySpec::default(), 5);
    let prompt = vec![5u32, 6, 7];
    let responses = vec![vec![30u32, 31, 2], vec![9u32]];
    let t = 0.7;
    let groups = [ScoredGroup {
        prompt: &prompt,
        responses: &responses,
    }];
    let mut got = Vec::new();
    for k in [prefer::model::Kernels::FUSED, prefer::model::Kernels::PRIMITIVE] {
        m.kernels = k;
        let lp = logprobs::group_sequence_logps_entropy(&m, &groups, Layout::PACKED, t).unwrap();
        got.push(lp.entropies.unwrap());
    }
    let mut want = Vec::new();
    for r in &responses {
        let mut ids = prompt.clone();
        for &tok in r {
            let z: Vec<f32> = full_forward_logits(&m, &ids).unwrap().to_vec1().unwrap();
            let z: Vec<f64> = z.iter().map(|&x| x as f64 / t).collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + z.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            want.push(-z.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>());
            ids.push(tok);
        }
    }
    for g in &got {
        assert_eq!(g.len(), want.len());
        for (a, b) in g.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{g:?} vs {want:?}");
        }
    }
}

/// Decoding from bf16 weights (`bf16_weights`, `--bf16-weights`), both ways it runs:
/// - below AVX512-BF16, bf16 copies of the weight matrices widened on the fly: the decoding of the f32
///   model with those matrices rounded to bf16 (cached logits against a full forward of the
///   rounded model at every step, to 1e-4);
/// - on AVX512-BF16 and AMX (where this CPU has them), the matrices packed into tiles and the activations rounded
///   too: a full forward with training's bf16 products (`Kernels::bf16`), to 1e-4 as well.
///
/// Tied and untied heads, Qwen2's biases; and the sampler's own bf16 copy samples what the copy
/// made here samples.
#[test]
fn bf16_weight_decoding_is_the_rounded_models_decoding() {
    use prefer::model::kernels::CpuPath;
    let mut paths = vec![CpuPath::Avx512.min(CpuPath::detected())];
    for p in [CpuPath::Avx512Bf16, CpuPath::Amx] {
        if p.allows() {
            paths.push(p);
        }
    }
    eprintln!("bf16 decoding paths tested on this CPU: {paths:?}");
    for spec in [
        TinySpec::default(),
        TinySpec {
            tie_embeddings: false,
            model_type: "qwen2",
            kv_heads: 1,
            ..TinySpec::default()
        },
    ] {
        for &path in &paths {
            let m = model(&spec, 11);
            let fast = m.with_bf16_matrices_on(path).unwrap();
            let tiles = path >= CpuPath::Avx512Bf16;
            assert_eq!(fast.decodes_from_tiles(), tiles, "{path:?}");
            let round = |t: &candle_core::Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            // the reference: below the tiles the rounded model (its projections rounded; a tied head is a
            // rounded copy of the embedding, so that model reads its input through the f32
            // embedding); with tiles the model with bf16 products
            let reference = match tiles {
                false => m
                    .map(
                        |name, t| match name.ends_with("_proj.weight") || name == "lm_head.weight" {
                            true => Ok(round(t)),
                            false => Ok(t.clone()),
                        },
                    )
                    .unwrap(),
                true => {
                    // bf16 linear products; attention f32, as decoding's cached attention
                    let mut r = m.clone();
                    r.kernels.bf16 = true;
                    r
                }
            };
            let prompt: Vec<u32> = vec![5, 17, 9, 40, 3];
            let (first, mut cache) = fast.prefill(&prompt).unwrap();
            let mut seq = prompt.clone();
            // a full forward of the reference, its last hidden state times the rounded head (the
            // hidden state rounded too with tiles)
            let full = |s: &[u32]| -> Vec<f32> {
                let r = &reference;
                let dev = r.device();
                let input = candle_core::Tensor::new(s, dev).unwrap().unsqueeze(0).unwrap();
                let attn =
                    prefer::model::AttentionInputs::padded(&r.cfg, &[vec![true; s.len()]], r.dtype(), dev).unwrap();
                let h = r.hidden_states(&input, &attn).unwrap();
                let last = h
                    .narrow(1, s.len() - 1, 1)
                    .unwrap()
                    .reshape((1, r.cfg.hidden_size))
                    .unwrap();
                let last = if tiles { round(&last) } else { last };
                let head = round(r.output_weight());
                last.matmul(&head.t().unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert!(
                max_diff(&first.to_vec1().unwrap(), &full(&seq)) < 1e-4,
                "{spec:?} {path:?}: prefill"
            );
            for step in 0..5 {
                let t = ((step * 11 + 3) % 60) as u32;
                seq.push(t);
                let row: Vec<f32> = fast
                    .decode(&mut cache, &[t])
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let d = max_diff(&row, &full(&seq));
                assert!(d < 1e-4, "{spec:?} {path:?}: step {step}: {d}");
            }
            // the path the sampler's own copy takes: the fast bf16 product, else widened copies
            if path != CpuPath::fast_bf16().unwrap_or(paths[0]) {
                continue;
            }
            // sampling: the bf16 copy is made inside the sampler
            let p = SamplingParams {
                temperature: 0.0,
                max_completion_length: 6,
                ..Default::default()
            };
            let a = sample(
                &m,
                std::slice::from_ref(&prompt),
                1,
                &SamplingParams {
                    bf16_weights: true,
                    ..p.clone()
                },
                3,
                &|_| false,
                &mut |_| {},
            )
            .unwrap();
            let b = sample(&fast, std::slice::from_ref(&prompt), 1, &p, 3, &|_| false, &mut |_| {}).unwrap();
            assert_eq!(a[0].ids, b[0].ids, "{spec:?}");
        }
    }
}
