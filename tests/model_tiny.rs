//! The model layer on generated tiny models: loaders, save/load, log-probs, gradients.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use prefer::batch::{Layout, PaddingSide, ScoredGroup, ScoredSeq};
use prefer::model::autograd::BackwardOptions;
use prefer::model::{self, logprobs, Kernels, Transformer};
use prefer::testing::{tiny_model, write_gguf, write_hf, TinySpec};

fn seqs() -> Vec<ScoredSeq> {
    vec![
        ScoredSeq {
            ids: vec![5, 9, 17, 200, 33, 2],
            completion_start: 3,
        },
        ScoredSeq {
            ids: vec![7, 8, 100, 2],
            completion_start: 1,
        },
        ScoredSeq {
            ids: vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 2],
            completion_start: 6,
        },
    ]
}

fn logps(m: &Transformer, s: &[ScoredSeq], side: PaddingSide) -> Vec<f64> {
    let lp = model::sequence_logps(m, s, side).unwrap();
    lp.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn batched_equals_one_at_a_time_with_either_padding() {
    prefer::testing::set_threads_for_tests();
    let m = tiny_model(&TinySpec::default(), DType::F32, 1).unwrap().transformer;
    let s = seqs();
    let right = logps(&m, &s, PaddingSide::Right);
    let left = logps(&m, &s, PaddingSide::Left);
    let single: Vec<f64> = s
        .iter()
        .flat_map(|x| logps(&m, std::slice::from_ref(x), PaddingSide::Right))
        .collect();
    assert_close(&right, &single, 1e-5, "right vs single");
    assert_close(&left, &single, 1e-5, "left vs single");
}

#[test]
fn chunked_gather_equals_full_log_softmax() {
    prefer::testing::set_threads_for_tests();
    let m = tiny_model(&TinySpec::default(), DType::F64, 2).unwrap().transformer;
    let s = &seqs()[2];
    let got = logps(&m, std::slice::from_ref(s), PaddingSide::Right);
    // independent: full logits, explicit log-softmax in f64 on the host
    let t = s.ids.len();
    let input = Tensor::new(s.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = model::AttentionInputs::padded(&m.cfg, &[vec![true; t]], DType::F64, &Device::Cpu).unwrap();
    let h = m.hidden_states(&input, &a).unwrap().squeeze(0).unwrap();
    let logits: Vec<Vec<f64>> = m.logits(&h).unwrap().to_vec2().unwrap();
    let want: Vec<f64> = (s.completion_start..t)
        .map(|i| {
            let row = &logits[i - 1];
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            row[s.ids[i] as usize] - lse
        })
        .collect();
    assert_close(&got, &want, 1e-12, "gather vs log_softmax");
    // sums are the sums of the token log-probs
    let lp = model::sequence_logps(&m, &seqs(), PaddingSide::Right).unwrap();
    let sums: Vec<f64> = lp.sums.to_vec1().unwrap();
    let toks: Vec<f64> = lp.token_logps.to_vec1().unwrap();
    for (k, w) in lp.offsets.windows(2).enumerate() {
        let s: f64 = toks[w[0]..w[1]].iter().sum();
        assert!((s - sums[k]).abs() < 1e-12);
    }
    assert_eq!(lp.counts(), vec![3, 3, 4]);
}

fn variants() -> Vec<TinySpec> {
    vec![
        TinySpec::default(),
        TinySpec {
            tie_embeddings: false,
            model_type: "qwen2",
            ..TinySpec::default()
        },
        TinySpec {
            kv_heads: 4,
            llama3_rope_scaling: true,
            model_type: "mistral",
            ..TinySpec::default()
        },
    ]
}

#[test]
fn every_parameter_gets_a_gradient() {
    prefer::testing::set_threads_for_tests();
    for spec in variants() {
        let (m, vars) = tiny_model(&spec, DType::F32, 3).unwrap().into_trainable().unwrap();
        let lp = model::sequence_logps(&m.transformer, &seqs(), PaddingSide::Right).unwrap();
        let grads = lp.sums.sum_all().unwrap().backward().unwrap();
        assert!(vars.len() >= 9 * spec.layers);
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", spec.model_type));
            let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                n > 0.0 && n.is_finite(),
                "{}: zero or non-finite gradient for {name}",
                spec.model_type
            );
        }
    }
}

/// Prompts with one, two and three responses of different lengths.
/// [`groups`] as the scorer takes them.
fn scored(g: &[(Vec<u32>, Vec<Vec<u32>>)]) -> Vec<ScoredGroup<'_>> {
    g.iter()
        .map(|(p, r)| ScoredGroup {
            prompt: p,
            responses: r,
        })
        .collect()
}

fn groups() -> Vec<(Vec<u32>, Vec<Vec<u32>>)> {
    vec![
        (vec![5, 9, 17], vec![vec![200, 33, 2], vec![41, 2]]),
        (vec![7], vec![vec![8, 100, 2]]),
        (
            vec![11, 12, 13, 14, 15, 16],
            vec![vec![17, 18, 19, 2], vec![3, 2], vec![250, 251, 252, 253, 254, 2]],
        ),
    ]
}

/// Token log-probs and the gradient of a weighted sum of the sequence log-probs, flattened.
fn logps_and_grads(m: &model::LoadedModel, layout: Layout, kernels: Kernels) -> (Vec<f64>, Vec<f64>) {
    logps_and_grads_with(m, layout, kernels, Default::default())
}

fn logps_and_grads_with(
    m: &model::LoadedModel,
    layout: Layout,
    kernels: Kernels,
    opts: BackwardOptions,
) -> (Vec<f64>, Vec<f64>) {
    let mut m = m.clone();
    m.transformer.backward_options = opts;
    let (mut tm, vars) = m.into_trainable().unwrap();
    assert_eq!(tm.transformer.backward_options, opts);
    let checkpointing = opts.gradient_checkpointing;
    tm.transformer.kernels = kernels;
    let g = groups();
    let groups = scored(&g);
    let lp = model::group_sequence_logps(&tm.transformer, &groups, layout, false).unwrap();
    let dt = lp.sums.dtype();
    let w: Vec<f64> = (0..lp.sums.dim(0).unwrap()).map(|i| 0.3 + 0.5 * i as f64).collect();
    let w = Tensor::new(w, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
    let loss = (&lp.sums * w).unwrap().sum_all().unwrap();
    let grads = tm.transformer.backward(&loss).unwrap();
    if checkpointing || opts.layer_graphs {
        // a second backward pass through the same graph, whose layers' saved inputs or
        // activations the first one consumed, recomputes them and gives the same gradients (the
        // layers': the embedding's scattered rows went to the first)
        let again = tm.transformer.backward(&loss).unwrap();
        for (name, v) in vars.iter().filter(|(n, _)| n.contains(".layers.")) {
            let (a, b) = (grads.get(v.as_tensor()).unwrap(), again.get(v.as_tensor()).unwrap());
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(
                d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
                0.0,
                "{name}"
            );
        }
    }
    if checkpointing {
        // the layers really were recomputed: candle's own backward sees no layer parameter
        let raw = loss.backward().unwrap();
        let q = &tm.transformer.layers[0].self_attn.q_proj.weight;
        assert!(raw.get(q).is_none() && grads.get(q).is_some());
    }
    if opts.sparse_embedding_grad {
        // the lookup's rows reach the embedding only through Transformer::backward
        let raw = loss.backward().unwrap();
        let w = &tm.transformer.embed_tokens;
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_ne!(raw.get(w).map(flat), grads.get(w).map(flat));
    }
    let mut flat = Vec::new();
    for (_, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        flat.extend(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
    }
    let tok = lp.token_logps.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    (tok, flat)
}

/// Shared-prompt and padding-free layouts, with fused or primitive kernels and with or without
/// gradient checkpointing, compute exactly what separate padded sequences through primitive
/// ops do: the same token log-probs and the same parameter gradients (f64: to rounding; f32:
/// 1e-5).
#[test]
fn every_layout_gives_the_same_logps_and_gradients() {
    prefer::testing::set_threads_for_tests();
    for spec in variants() {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let m = tiny_model(&spec, dtype, 5).unwrap();
            let (want_lp, want_g) = logps_and_grads(&m, Layout::PADDED, Kernels::PRIMITIVE);
            let gmax = want_g.iter().fold(0f64, |a, x| a.max(x.abs()));
            assert!(gmax > 1e-3, "gradients too small to compare: {gmax}");
            for share_prompt in [false, true] {
                for padding_free in [false, true] {
                    for (padding_side, kernels) in [
                        (PaddingSide::Left, Kernels::FUSED),
                        (PaddingSide::Right, Kernels::FUSED),
                        (PaddingSide::Right, Kernels::PRIMITIVE),
                    ] {
                        let layout = Layout {
                            share_prompt,
                            padding_free,
                            padding_side,
                        };
                        let (lp, g) = logps_and_grads(&m, layout, kernels);
                        let what = format!("{} {dtype:?} {layout:?} {kernels:?}", spec.model_type);
                        assert_close(&lp, &want_lp, tol, &format!("{what} log-probs"));
                        assert_close(&g, &want_g, tol * gmax.max(1.0), &format!("{what} gradients"));
                    }
                }
            }
            // gradient checkpointing (each layer recomputed in backward) and sparse embedding
            // gradients: the same numbers
            for kernels in [Kernels::FUSED, Kernels::PRIMITIVE] {
                for layout in [Layout::PADDED, Layout::PACKED] {
                    for (gradient_checkpointing, sparse_embedding_grad, layer_graphs) in [
                        (true, false, false),
                        (false, true, false),
                        (true, true, false),
                        (false, false, true),
                        (false, true, true),
                    ] {
                        let opts = BackwardOptions {
                            gradient_checkpointing,
                            sparse_embedding_grad,
                            layer_graphs,
                        };
                        let (lp, g) = logps_and_grads_with(&m, layout, kernels, opts);
                        let what = format!("{} {dtype:?} {layout:?} {kernels:?} {opts:?}", spec.model_type);
                        assert_close(&lp, &want_lp, tol, &format!("{what} log-probs"));
                        assert_close(&g, &want_g, tol * gmax.max(1.0), &format!("{what} gradients"));
                    }
                }
            }
        }
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// `bf16 = true`: the linear layers and the log-prob head multiply bf16-rounded operands.
/// Every layout and kernel choice computes the same products, so they agree with each other far
/// more closely than with f32; and bf16 stays near f32 (log-probs and gradients) while being
/// measurably different from it (the rounding is really applied).
#[test]
fn bf16_matmuls_agree_across_layouts_and_stay_near_f32() {
    prefer::testing::set_threads_for_tests();
    let bf16 = Kernels::bf16;
    for spec in variants() {
        let m = tiny_model(&spec, DType::F32, 5).unwrap();
        let (lp32, g32) = logps_and_grads(&m, Layout::PADDED, Kernels::PRIMITIVE);
        let (want_lp, want_g) = logps_and_grads(&m, Layout::PADDED, bf16(false));
        let gnorm = g32.iter().map(|g| g * g).sum::<f64>().sqrt();
        let to_f32 = (max_diff(&want_lp, &lp32), max_diff(&want_g, &g32));
        let rel_g = |g: &[f64], h: &[f64]| g.iter().zip(h).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / gnorm;
        eprintln!(
            "{}: bf16 vs f32: log-probs {:.2e}, gradients {:.2e} (relative {:.2e})",
            spec.model_type,
            to_f32.0,
            to_f32.1,
            rel_g(&want_g, &g32)
        );
        assert!(
            to_f32.0 > 1e-5 && to_f32.0 < 0.25,
            "bf16 log-probs vs f32: {}",
            to_f32.0
        );
        assert!(
            rel_g(&want_g, &g32) < 0.05,
            "bf16 gradients vs f32: {}",
            rel_g(&want_g, &g32)
        );
        let ckpt = BackwardOptions {
            gradient_checkpointing: true,
            sparse_embedding_grad: true,
            layer_graphs: false,
        };
        let layer_graphs = BackwardOptions {
            sparse_embedding_grad: true,
            layer_graphs: true,
            ..Default::default()
        };
        for (layout, kernels, opts) in [
            (Layout::PACKED, bf16(true), BackwardOptions::default()),
            (Layout::PADDED, bf16(true), BackwardOptions::default()),
            (Layout::PACKED, bf16(false), BackwardOptions::default()),
            (Layout::PACKED, bf16(true), ckpt),
            (Layout::PACKED, bf16(true), layer_graphs),
        ] {
            let (lp, g) = logps_and_grads_with(&m, layout, kernels, opts);
            let (dl, dg) = (max_diff(&lp, &want_lp), rel_g(&g, &want_g));
            let what = format!("{} {layout:?} {kernels:?} {opts:?}", spec.model_type);
            eprintln!("{what}: vs padded primitive bf16: log-probs {dl:.2e}, gradients (relative) {dg:.2e}");
            assert!(
                dl < 0.2 * to_f32.0,
                "{what}: log-probs {dl} apart (f32 is {})",
                to_f32.0
            );
            assert!(dg < 0.4 * rel_g(&want_g, &g32), "{what}: gradients {dg} apart");
        }
    }
}

/// Central finite differences in f64 against backprop, for a few entries of every parameter.
#[test]
fn finite_difference_gradients_every_parameter_kind() {
    prefer::testing::set_threads_for_tests();
    for spec in variants() {
        let spec = TinySpec { layers: 1, ..spec };
        let base = tiny_model(&spec, DType::F64, 4).unwrap();
        let weights = [0.7, -1.3, 0.4];
        let objective = |m: &Transformer| -> Tensor {
            let lp = model::sequence_logps(m, &seqs(), PaddingSide::Left).unwrap();
            let w = Tensor::new(&weights, &Device::Cpu).unwrap();
            (lp.sums * w).unwrap().sum_all().unwrap()
        };
        let (tm, vars) = base.clone().into_trainable().unwrap();
        let grads = objective(&tm.transformer).backward().unwrap();
        let mut checked = 0;
        for (name, v) in &vars {
            let g: Vec<f64> = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = g.len();
            for &idx in &[0, n / 3, n - 1] {
                let eps = 1e-5;
                let f = |delta: f64| -> f64 {
                    let m = base
                        .transformer
                        .map(|nm, t| {
                            if nm != name {
                                return Ok(t.clone());
                            }
                            let mut x: Vec<f64> = t.flatten_all()?.to_vec1()?;
                            x[idx] += delta;
                            Ok(Tensor::from_vec(x, t.shape(), t.device())?)
                        })
                        .unwrap();
                    objective(&m).to_scalar::<f64>().unwrap()
                };
                let fd = (f(eps) - f(-eps)) / (2.0 * eps);
                let tol = 1e-6 + 1e-5 * fd.abs().max(g[idx].abs());
                assert!(
                    (fd - g[idx]).abs() < tol,
                    "{} {name}[{idx}]: fd {fd} vs backprop {}",
                    spec.model_type,
                    g[idx]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, vars.len() * 3);
    }
}

#[test]
fn hf_save_load_round_trip_is_bit_identical() {
    prefer::testing::set_threads_for_tests();
    let dir = tempdir("hf_round_trip");
    for spec in variants() {
        let m = tiny_model(&spec, DType::F32, 5).unwrap();
        write_hf(&m, &dir).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        let back = model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        // the special ids come from the tokenizer (BOS: where it is added), the rest as it was
        let mut want = m.transformer.cfg.clone();
        want.bos_token_id = back.transformer.cfg.bos_token_id;
        assert_eq!(back.transformer.cfg, want);
        let a = logps(&m.transformer, &seqs(), PaddingSide::Right);
        let b = logps(&back.transformer, &seqs(), PaddingSide::Right);
        assert_eq!(a, b, "{}: log-probs differ after save/load", spec.model_type);
        assert_eq!(
            back.tokenizer.encode("the cat is here", true).unwrap(),
            m.tokenizer.encode("the cat is here", true).unwrap()
        );
    }
}

#[test]
fn gguf_f32_loads_to_the_same_model_and_quantised_close() {
    prefer::testing::set_threads_for_tests();
    let dir = tempdir("gguf");
    for spec in [
        TinySpec::default(),
        TinySpec {
            tie_embeddings: false,
            ..TinySpec::default()
        },
    ] {
        let m = tiny_model(&spec, DType::F32, 6).unwrap();
        let want = logps(&m.transformer, &seqs(), PaddingSide::Right);
        let p = dir.join("tiny-f32.gguf");
        write_gguf(&m, &p, GgmlDType::F32).unwrap();
        let g = model::load(&p, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(g.transformer.cfg.tie_word_embeddings, spec.tie_embeddings);
        for ((n1, t1), (n2, t2)) in m.transformer.params().iter().zip(g.transformer.params()) {
            assert_eq!(n1, n2);
            let d = prefer::testing::max_abs_diff(t1, t2).unwrap();
            assert_eq!(d, 0.0, "{n1} differs after GGUF round trip (Q/K permutation?)");
        }
        assert_close(
            &logps(&g.transformer, &seqs(), PaddingSide::Right),
            &want,
            1e-6,
            "gguf f32",
        );
        // the tokenizer rebuilt from metadata tokenises like the original tokenizer.json
        let text = "<|im_start|>user\nthe 12 cats=  is<|im_end|>";
        assert_eq!(
            g.tokenizer.encode(text, true).unwrap(),
            m.tokenizer.encode(text, true).unwrap()
        );
        assert_eq!(g.tokenizer.chat_template, m.tokenizer.chat_template);
        // quantised: close, not equal
        let q = dir.join("tiny-q8.gguf");
        write_gguf(&m, &q, GgmlDType::Q8_0).unwrap();
        let gq = model::load(&q, DType::F32, &Device::Cpu).unwrap();
        let got = logps(&gq.transformer, &seqs(), PaddingSide::Right);
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 0.02 * y.abs() + 0.05, "gguf q8_0: {x} vs {y}");
        }
        assert_ne!(got, want);
        // a frozen copy whose layers stay quantised (the live reference) computes exactly the
        // same, with its layers in under a third of the bytes; F32 files gain nothing
        let frozen = model::load_frozen(&q, DType::F32, &Device::Cpu).unwrap().unwrap();
        let c = frozen.transformer.compact_layers().unwrap();
        assert!(
            frozen.transformer.layers.is_empty() && c.bytes() * 3 < c.widened_bytes(),
            "{c:?}"
        );
        assert_eq!(logps(&frozen.transformer, &seqs(), PaddingSide::Right), got);
        assert!(model::load_frozen(&p, DType::F32, &Device::Cpu).unwrap().is_none());
        // and a GGUF model saved as HF is a valid HF checkpoint
        let hf = dir.join("from-gguf");
        prefer::model::hf::save_dir(&gq, &hf).unwrap();
        let back = model::load(&hf, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(logps(&back.transformer, &seqs(), PaddingSide::Right), got);
    }
}

#[test]
fn unknown_gguf_quantisation_is_named() {
    let dir = tempdir("gguf_bad");
    let m = tiny_model(&TinySpec::default(), DType::F32, 7).unwrap();
    let p = dir.join("bad.gguf");
    write_gguf(&m, &p, GgmlDType::F32).unwrap();
    // patch the ggml type of the first tensor info to 16 (IQ2_XXS)
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let dtype_at = at + 4 + 8 * n_dims;
    bytes[dtype_at..dtype_at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let e = model::load(&p, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("IQ2_XXS") && e.contains("bad.gguf"), "{e}");
}

/// A GGUF whose header claims four billion layers (found by the fuzzer, which saw 80 MB
/// allocated for a 58 KB file): the load fails at the first missing layer, with the file and
/// the tensor named, without allocating for the claimed layers.
#[test]
fn a_gguf_claiming_more_layers_than_it_holds_is_refused() {
    let dir = tempdir("gguf_layers");
    let m = tiny_model(&TinySpec::default(), DType::F32, 7).unwrap();
    let p = dir.join("layers.gguf");
    write_gguf(&m, &p, GgmlDType::F32).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    let key = b"llama.block_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let ty = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(ty, 4, "block_count written as u32");
    bytes[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let e = model::load(&p, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("layers.gguf") && e.contains("blk.2."), "{e}");
}

#[test]
fn greedy_generation_is_deterministic() {
    let m = tiny_model(&TinySpec::default(), DType::F32, 8).unwrap();
    let a = logprobs::generate_greedy(&m.transformer, &[5, 6, 7], 5, &[]).unwrap();
    let b = logprobs::generate_greedy(&m.transformer, &[5, 6, 7], 5, &[]).unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(a, b);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    prefer::testing::scratch_dir(&format!("model-{name}"))
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    prefer::testing::set_threads_for_tests();
    let dir = tempdir("sharded");
    let m = tiny_model(
        &TinySpec {
            tie_embeddings: false,
            ..TinySpec::default()
        },
        DType::F32,
        9,
    )
    .unwrap();
    write_hf(&m, &dir).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let want = logps(&m.transformer, &seqs(), PaddingSide::Right);
    for (dtype, tol) in [(DType::BF16, 0.5), (DType::F16, 0.05), (DType::F32, 0.0)] {
        // two shards in `dtype` plus the index, as transformers writes them
        let params = m.transformer.params();
        let half = params.len() / 2;
        let mut map = serde_json::Map::new();
        for (i, part) in [&params[..half], &params[half..]].iter().enumerate() {
            let file = format!("model-0000{}-of-00002.safetensors", i + 1);
            let ts: Vec<(String, Tensor)> = part
                .iter()
                .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
                .collect();
            std::fs::write(
                dir.join(&file),
                prefer::model::hf::model_safetensors_bytes(&ts).unwrap(),
            )
            .unwrap();
            for (n, _) in part.iter() {
                map.insert(n.clone(), serde_json::json!(file));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let back = model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.weight_files.len(), 2);
        let got = logps(&back.transformer, &seqs(), PaddingSide::Right);
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs() / 10.0), "{dtype:?}: {x} vs {y}");
        }
        if dtype == DType::F32 {
            assert_eq!(got, want);
        } else {
            assert_ne!(got, want, "{dtype:?} weights should round");
        }
        // the frozen copy keeps bf16/f16 layers as stored (half the bytes), with the same
        // numbers; an f32 checkpoint gains nothing
        let frozen = model::load_frozen(&dir, DType::F32, &Device::Cpu).unwrap();
        match frozen {
            Some(f) => {
                assert_ne!(dtype, DType::F32);
                let c = f.transformer.compact_layers().unwrap();
                assert_eq!(c.bytes() * 2, c.widened_bytes());
                assert_eq!(logps(&f.transformer, &seqs(), PaddingSide::Right), got);
            }
            None => assert_eq!(dtype, DType::F32),
        }
    }
}

/// `save_gguf` (prefer export): f32 reads back bit for bit with the same tokenizer and chat
/// template, f16 as the f16-rounded weights, and every quantisation loads to log-probs near
/// the f32 model's, closer with more bits; a model with a LoRA adapter is written merged.
#[test]
fn gguf_export_reads_back_exactly_at_f32_and_f16_and_closely_quantised() {
    use prefer::model::gguf::{save_gguf, ExportQuant};
    prefer::testing::set_threads_for_tests();
    let dir = tempdir("gguf-export");
    for spec in variants() {
        // blocks of 32 and 256 along the rows: hidden 256, intermediate 512
        let spec = TinySpec {
            hidden: 256,
            intermediate: 512,
            heads: 4,
            kv_heads: 2,
            ..spec
        };
        let mut m = tiny_model(&spec, DType::F32, 9).unwrap();
        m.tokenizer.chat_template = Some(prefer::testing::CHATML_TEMPLATE.into());
        let lp = |t: &Transformer| logps(t, &seqs(), PaddingSide::Right);
        let base = lp(&m.transformer);
        let path = dir.join(format!("{}-f32.gguf", spec.model_type));
        save_gguf(&m, &path, ExportQuant::F32).unwrap();
        let back = model::load(&path, DType::F32, &Device::Cpu).unwrap();
        for ((n, a), (_, b)) in m.transformer.params().iter().zip(back.transformer.params()) {
            assert_eq!(prefer::testing::max_abs_diff(a, b).unwrap(), 0.0, "{n}");
        }
        // the special ids come from the tokenizer (BOS: where it is added), the rest as it was
        // (Llama-3 rope scaling included: written as llama.cpp's rope_freqs tensor, read back
        // to the same parameters)
        let mut want = m.transformer.cfg.clone();
        want.bos_token_id = back.transformer.cfg.bos_token_id;
        assert_eq!(back.transformer.cfg, want);
        assert_eq!(lp(&back.transformer), base, "{}: f32 round trip", spec.model_type);
        let text = "<|im_start|>user\nhello 123 wörld<|im_end|>";
        assert_eq!(
            back.tokenizer.encode(text, true).unwrap(),
            m.tokenizer.encode(text, true).unwrap()
        );
        assert_eq!(back.tokenizer.chat_template, m.tokenizer.chat_template);
        assert_eq!(
            (back.tokenizer.eos_id, back.tokenizer.pad_id),
            (m.tokenizer.eos_id, m.tokenizer.pad_id)
        );
        // f16: the weights rounded to f16, exactly
        save_gguf(&m, &path, ExportQuant::F16).unwrap();
        let back = model::load(&path, DType::F32, &Device::Cpu).unwrap();
        for ((n, a), (_, b)) in m.transformer.params().iter().zip(back.transformer.params()) {
            let r = if a.rank() == 2 {
                a.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap()
            } else {
                a.clone()
            };
            assert_eq!(prefer::testing::max_abs_diff(&r, b).unwrap(), 0.0, "{n}");
        }
        let mut errs = Vec::new();
        for q in [
            ExportQuant::Q8_0,
            ExportQuant::Q6K,
            ExportQuant::Q5KM,
            ExportQuant::Q4KM,
            ExportQuant::Q4_0,
        ] {
            save_gguf(&m, &path, q).unwrap();
            let back = model::load(&path, DType::F32, &Device::Cpu).unwrap();
            // relative to the log-prob's size (these random models' log-probs reach −30)
            let d = lp(&back.transformer)
                .iter()
                .zip(&base)
                .map(|(a, b)| (a - b).abs() / (b.abs() + 1.0))
                .fold(0.0, f64::max);
            errs.push((q, d));
        }
        assert!(errs[0].1 < 0.02, "{}: q8_0 {errs:?}", spec.model_type);
        assert!(
            errs[0].1 < errs[4].1,
            "{}: q8_0 closer than q4_0: {errs:?}",
            spec.model_type
        );
        assert!(errs.iter().all(|(_, d)| *d < 0.3), "{}: {errs:?}", spec.model_type);
    }
    // an adapter is merged on the way out
    let m = tiny_model(&TinySpec::default(), DType::F32, 10).unwrap();
    let t = &m.transformer;
    let spec = prefer::model::lora::LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: prefer::model::lora::Module::ALL.to_vec(),
        use_rslora: false,
        modules_to_save: vec![],
        base: String::new(),
        task_type: "CAUSAL_LM".into(),
    };
    let a = prefer::model::lora::Adapters::init(&t.cfg, spec, 3, DType::F32, &Device::Cpu)
        .unwrap()
        .map(|_, x| Ok((x.ones_like()? * 0.05)?))
        .unwrap();
    let adapted = model::LoadedModel {
        transformer: t.with_adapters(a).unwrap(),
        ..m.clone()
    };
    let path = dir.join("adapted.gguf");
    save_gguf(&adapted, &path, ExportQuant::F32).unwrap();
    let back = model::load(&path, DType::F32, &Device::Cpu).unwrap();
    let (x, y) = (
        logps(&adapted.transformer, &seqs(), PaddingSide::Right),
        logps(&back.transformer, &seqs(), PaddingSide::Right),
    );
    assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-4), "{x:?} vs {y:?}");
    assert!(x
        .iter()
        .zip(&logps(t, &seqs(), PaddingSide::Right))
        .any(|(p, q)| (p - q).abs() > 1e-3));
}

/// A frozen copy whose layers are packed for bf16 products (a live reference under
/// `bf16 = true`) computes the f32 copy's bf16 log-probs bit for bit, for every variant
/// (untied head, q/k/v biases, grouped heads) and either padding; its layers take half the
/// bytes; it cannot be merged, and with bf16 off it refuses instead of multiplying otherwise. It
/// is a copy: the model it was made from, changed in place afterwards, leaves it as it was.
/// Where the CPU has no AVX512-BF16 (or `PREFER_KERNELS` caps it below) nothing is packed.
#[test]
fn packed_frozen_copy_gives_the_f32_copys_bf16_log_probs() {
    use prefer::model::kernels::CpuPath;
    prefer::testing::set_threads_for_tests();
    for spec in variants() {
        let mut m = tiny_model(&spec, DType::F32, 9).unwrap().transformer;
        m.kernels = Kernels::bf16(true);
        // a policy whose parameters are variables, changed in place after the copy below
        let mut vars = Vec::new();
        let mut policy = m
            .map(|_, t| {
                let v = candle_core::Var::from_tensor(t)?;
                vars.push(v.clone());
                Ok(v.as_tensor().clone())
            })
            .unwrap();
        policy.kernels = m.kernels;
        let packed = policy.frozen_packed_copy().unwrap();
        for v in &vars {
            v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
        }
        if !CpuPath::Avx512Bf16.allows() {
            assert!(packed.is_none(), "packed without AVX512-BF16");
            eprintln!("kernel path {:?}: no bf16 tiles, nothing packed", CpuPath::active());
            continue;
        }
        let packed = packed.expect("AVX512-BF16 packs");
        assert!(packed.layers.is_empty());
        for side in [PaddingSide::Right, PaddingSide::Left] {
            let (want, got) = (logps(&m, &seqs(), side), logps(&packed, &seqs(), side));
            assert!(want.iter().all(|x| x.is_finite()));
            assert_eq!(got, want, "{} {side:?}", spec.model_type);
        }
        let c = packed.compact_layers().unwrap();
        assert!(!c.holds_weights());
        let dense: usize = m
            .layers
            .iter()
            .flat_map(|b| b.tensors())
            .map(|t| t.elem_count() * 4)
            .sum();
        assert_eq!(c.widened_bytes(), dense);
        assert!(c.bytes() < dense * 6 / 10, "{} of {dense} bytes", c.bytes());
        assert!(packed.merged().is_err());
        let mut f32_kernels = packed.clone();
        f32_kernels.kernels = Kernels::FUSED;
        assert!(model::sequence_logps(&f32_kernels, &seqs(), PaddingSide::Right).is_err());
    }
}

/// `optimizer_in_backward` at the model level: `backward` keeps no gradient of a decoder layer,
/// of the fused head's projection or of the embedding, only each one's squared norm, equal to
/// that of the plain backward's gradient; `backward_again` then hands over exactly the plain
/// gradients, in order, each value once (the layers last first, the matrices a block of rows at
/// a time). The other parameters' gradients are the plain ones. Tied and untied embeddings, with
/// and without checkpointing. A loss through two forward passes of the layers is refused
/// (streaming cannot sum them).
#[test]
fn a_streamed_backward_measures_then_hands_over_the_plain_gradients() {
    prefer::testing::set_threads_for_tests();
    let g = groups();
    let groups = scored(&g);
    let loss_of = |t: &Transformer| {
        let lp = model::group_sequence_logps(t, &groups, Layout::PACKED, false).unwrap();
        let w: Vec<f32> = (0..lp.sums.dim(0).unwrap()).map(|i| 0.3 + 0.5 * i as f32).collect();
        (&lp.sums * Tensor::new(w, &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (tie_embeddings, checkpointing) in [(true, false), (true, true), (false, false)] {
        let what = format!("tied {tie_embeddings}, checkpointing {checkpointing}");
        let spec = TinySpec {
            tie_embeddings,
            ..TinySpec::default()
        };
        let mut m = tiny_model(&spec, DType::F32, 3).unwrap();
        m.transformer.backward_options = BackwardOptions {
            gradient_checkpointing: checkpointing,
            sparse_embedding_grad: true,
            layer_graphs: true,
        };
        let (mut tm, vars) = m.into_trainable().unwrap();
        let plain = tm.transformer.backward(&loss_of(&tm.transformer)).unwrap();
        tm.transformer.set_optimizer_in_backward(true);
        let mut grads = tm.transformer.backward(&loss_of(&tm.transformer)).unwrap();
        let norms = tm.transformer.streamed_norms().unwrap();
        let mut streamed = Vec::new();
        for (name, v) in &vars {
            let want = values(plain.get(v.as_tensor()).unwrap());
            let is_matrix = name.contains("embed_tokens") || name.contains("lm_head");
            if name.contains(".layers.") || is_matrix {
                assert!(grads.get(v.as_tensor()).is_none(), "{what}: {name} kept its gradient");
                let sq: f64 = want.iter().map(|&x| x as f64 * x as f64).sum();
                let got = norms[&v.as_tensor().id()];
                assert!((got - sq).abs() <= 1e-12 * sq, "{what}: {name}: {got} vs {sq}");
                streamed.push((v.as_tensor().id(), name.clone(), want, Vec::<f32>::new()));
            } else {
                assert_eq!(values(&grads.remove(v.as_tensor()).unwrap()), want, "{what}: {name}");
            }
        }
        assert_eq!(norms.len(), streamed.len(), "{what}");
        let mut parts = Vec::new();
        let mut done = |id, offset: usize, g: &[f32]| {
            let (_, name, _, got) = streamed.iter_mut().find(|p| p.0 == id).unwrap();
            assert_eq!(offset, got.len(), "{name}: in order");
            got.extend_from_slice(g);
            parts.push(name.clone());
            Ok(())
        };
        tm.transformer.backward_again(Some(&mut done)).unwrap();
        for (_, name, want, got) in &streamed {
            assert!(got == want, "{what}: {name}: the second pass's gradient differs");
        }
        let last = format!(".layers.{}.", spec.layers - 1);
        assert!(parts[0].contains(&last), "{what}: the last layer first: {parts:?}");
        // the matrices came in several blocks
        let blocks = parts.iter().filter(|n| n.contains("embed_tokens")).count();
        assert!(blocks > 1, "{what}: {blocks} blocks of the embedding");
        // nothing is left for another pass
        assert!(tm.transformer.backward_again(Some(&mut |_, _, _| Ok(()))).is_err());
        let twice = (loss_of(&tm.transformer) + loss_of(&tm.transformer)).unwrap();
        let e = tm.transformer.backward(&twice).unwrap_err().to_string();
        assert!(e.contains("backpropagated twice"), "{what}: {e}");
    }
}
