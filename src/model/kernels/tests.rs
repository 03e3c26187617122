use super::Kernels;
use candle_core::{DType, Device, Tensor, Var};

/// Values and input gradients of `f` under fused and primitive kernels, for a random
/// linear functional of the output.
fn compare(dtype: DType, tol: f64, shapes: &[&[usize]], trainable: &[bool], f: impl Fn(Kernels, &[Tensor]) -> Tensor) {
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|s| {
            Tensor::randn(0f64, 1.0, *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        })
        .collect();
    compare_kernels(dtype, tol, &inputs, trainable, [Kernels::FUSED, Kernels::PRIMITIVE], f);
}

/// [`compare`] on `inputs` between the two kernel choices `kernels` (fused first, the
/// reference second), returning both's values and gradients.
fn compare_kernels(
    dtype: DType,
    tol: f64,
    inputs: &[Tensor],
    trainable: &[bool],
    kernels: [Kernels; 2],
    f: impl Fn(Kernels, &[Tensor]) -> Tensor,
) -> [(Vec<f64>, Vec<Vec<f64>>); 2] {
    let dev = Device::Cpu;
    let run = |k: Kernels| -> (Vec<f64>, Vec<Vec<f64>>) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars
            .iter()
            .zip(trainable)
            .map(|(v, &tr)| {
                if tr {
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach()
                }
            })
            .collect();
        let y = f(k, &ts);
        // the same weights for both runs
        let r: Vec<f64> = (0..y.elem_count())
            .map(|i| ((i * 7919 % 97) as f64 / 48.5) - 1.0)
            .collect();
        let r = Tensor::from_vec(r, y.shape(), &dev).unwrap().to_dtype(dtype).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let g = vars
            .iter()
            .zip(trainable)
            .filter(|(_, &tr)| tr)
            .map(|(v, _)| flat(grads.get(v.as_tensor()).expect("a gradient for every trainable input")))
            .collect();
        (flat(&y), g)
    };
    let (yf, gf) = run(kernels[0]);
    let (yp, gp) = run(kernels[1]);
    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}] {dtype:?}: fused {x} vs primitive {y}"
            );
        }
    };
    close(&yf, &yp, "value");
    for (k, (a, b)) in gf.iter().zip(&gp).enumerate() {
        close(a, b, &format!("gradient of input {k}"));
    }
    [(yf, gf), (yp, gp)]
}

const DTYPES: [(DType, f64); 2] = [(DType::F64, 1e-12), (DType::F32, 1e-5)];

/// The polynomial exp against f64 exp over the range the kernels use.
#[test]
fn exp_f32_is_within_two_ulp() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f64 / 200_000.0;
        let got = super::exp_f32(x as f32) as f64;
        let want = (x as f32 as f64).exp();
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 2.5e-7, "max relative error {worst:e}");
    assert_eq!(super::exp_f32(-1e9), 0.0);
    assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
}

#[test]
fn fused_rms_norm_matches_primitive() {
    for (dt, tol) in DTYPES {
        compare(dt, tol, &[&[2, 5, 16], &[16]], &[true, true], |k, x| {
            k.rms_norm(&x[0], &x[1], 1e-5).unwrap()
        });
    }
}

/// The weight gradient owns its `H` values: a view into the `[rows + 1, H]` buffer the backward
/// kernel writes would keep the whole buffer alive for as long as the optimizer holds it.
#[test]
fn rms_norm_weight_gradient_owns_only_its_values() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64, 16), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, 16, &dev).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (64, 16), &dev).unwrap();
    let (dx, dw) = super::rms_norm_grads(&x, &w, &dy, 1e-5).unwrap();
    assert_eq!(dx.dims(), [64, 16]);
    let (storage, layout) = dw.storage_and_layout();
    let len = match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len(),
        _ => panic!("an f32 CPU gradient"),
    };
    assert_eq!((len, layout.start_offset(), dw.dims()), (16, 0, &[16][..]));
}

#[test]
fn fused_rope_matches_primitive() {
    for (dt, tol) in DTYPES {
        compare(
            dt,
            tol,
            &[&[2, 3, 5, 8], &[2, 1, 5, 8], &[2, 1, 5, 8]],
            &[true, false, false],
            |k, x| k.rope(&x[0], &x[1], &x[2]).unwrap(),
        );
    }
}

#[test]
fn fused_masked_softmax_matches_primitive() {
    for (dt, tol) in DTYPES {
        compare(dt, tol, &[&[2, 3, 6, 6]], &[true], |k, x| {
            // a causal mask with a blocked key, as packed units have
            let mask: Vec<f64> = (0..2 * 36)
                .map(|i| {
                    let (q, key) = ((i % 36) / 6, i % 6);
                    if key <= q && !(key == 2 && q > 3) {
                        0.0
                    } else {
                        -1e9
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (2, 1, 6, 6), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            k.masked_softmax(&x[0], &mask, 0.35).unwrap()
        });
    }
}

/// Whole attention (rope, grouped-query scores, masked softmax, values) of the model's
/// `Attention` block under both kernels, through a tiny model's first layer.
#[test]
fn fused_attention_matches_primitive() {
    use crate::model::AttentionInputs;
    for_one_layer_models(|dt, tol, m| {
        // two batch rows, the second left-padded by two
        let valid = vec![vec![true; 6], vec![false, false, true, true, true, true]];
        let attn = AttentionInputs::padded(&m.cfg, &valid, dt, &Device::Cpu).unwrap();
        let layer = m.layers[0].self_attn.clone();
        compare(dt, tol, &[&[2 * 6, m.cfg.hidden_size]], &[true], |k, x| {
            layer.forward(&x[0], &attn, k).unwrap().out
        });
    });
}

/// `f(dtype, tolerance, model)` for one-layer tiny models with 4 heads over 1, 2 and 4 kv
/// heads, in each of [`DTYPES`].
fn for_one_layer_models(f: impl Fn(DType, f64, &crate::model::Transformer)) {
    use crate::testing::{tiny_model, TinySpec};
    for (dt, tol) in DTYPES {
        for kv_heads in [1, 2, 4] {
            let spec = TinySpec {
                heads: 4,
                kv_heads,
                layers: 1,
                ..TinySpec::default()
            };
            f(dt, tol, &tiny_model(&spec, dt, 9).unwrap().transformer);
        }
    }
}

/// A packed row whose first unit is a prompt shared by three responses (split into one dense
/// part per run: the fused kernel's block-sparse path) and whose second is a prompt with one
/// response (one dense block): values and gradients equal masked attention on primitives.
#[test]
fn fused_attention_of_shared_prompt_parts_matches_primitive() {
    use crate::model::AttentionInputs;
    let (p1, r1) = (
        vec![1u32, 2, 3],
        vec![vec![4u32, 5, 6, 7], vec![8], vec![9, 10, 11, 12, 13]],
    );
    let (p2, r2) = (vec![3u32, 4], vec![vec![5u32, 6]]);
    let batch = packed_batch([(&p1, &r1), (&p2, &r2)]);
    for_one_layer_models(|dt, tol, m| {
        let attn = AttentionInputs::for_batch(&m.cfg, &batch, dt, &Device::Cpu).unwrap();
        let parts = attn.blocks[0]
            .parts
            .as_ref()
            .expect("the shared prompt's block is split");
        let rows: Vec<(usize, usize)> = parts.iter().map(|p| p.rows).collect();
        assert_eq!(rows, [(0, 3), (3, 4), (7, 1), (8, 5)]);
        let keys: Vec<Vec<(usize, usize)>> = parts.iter().map(|p| p.keys.clone()).collect();
        assert_eq!(keys[3], [(0, 3), (8, 5)], "a response sees the prompt and itself");
        assert!(attn.blocks[1].parts.is_none(), "one response: nothing to skip");
        let layer = m.layers[0].self_attn.clone();
        compare(dt, tol, &[&[batch.cols, m.cfg.hidden_size]], &[true], |k, x| {
            layer.forward(&x[0], &attn, k).unwrap().out
        });
    });
}

/// One packed row of the units (prompt, its responses).
fn packed_batch(units: [(&[u32], &[Vec<u32>]); 2]) -> crate::batch::Collated {
    use crate::batch::{collate, Layout, ScoredGroup};
    let groups = units.map(|(prompt, responses)| ScoredGroup { prompt, responses });
    collate(&groups, Layout::PACKED).unwrap()
}

/// Two padded rows of 150 tokens, the second left-padded by 37: longer than the fused
/// attention's runs of query rows (64). Returns the length and which tokens are real.
fn long_rows() -> (usize, Vec<Vec<bool>>) {
    let t = 150;
    (t, vec![vec![true; t], (0..t).map(|i| i >= 37).collect()])
}

/// Rows longer than the fused kernel's runs of query rows (64), each run attending only the
/// keys up to the last one it may see: a padded batch whose second row is left-padded, and a
/// packed row with a 70-token prompt shared by responses of 80, 3 and 90 tokens (split into
/// parts) followed by a unit of its own. Values and gradients equal masked attention on
/// primitives.
#[test]
fn fused_attention_over_long_rows_matches_primitive() {
    use crate::model::AttentionInputs;
    let (t, valid) = long_rows();
    let ids = |n: usize, from: u32| (0..n as u32).map(|i| (from + i) % 50).collect::<Vec<u32>>();
    let (p1, r1) = (ids(70, 1), vec![ids(80, 2), ids(3, 3), ids(90, 4)]);
    let (p2, r2) = (ids(20, 5), vec![ids(100, 6)]);
    let batch = packed_batch([(&p1, &r1), (&p2, &r2)]);
    for_one_layer_models(|dt, tol, m| {
        let padded = AttentionInputs::padded(&m.cfg, &valid, dt, &Device::Cpu).unwrap();
        let packed = AttentionInputs::for_batch(&m.cfg, &batch, dt, &Device::Cpu).unwrap();
        assert!(packed.blocks[0].parts.is_some(), "the shared prompt's block is split");
        let layer = m.layers[0].self_attn.clone();
        compare(dt, tol, &[&[2 * t, m.cfg.hidden_size]], &[true], |k, x| {
            layer.forward(&x[0], &padded, k).unwrap().out
        });
        compare(dt, tol, &[&[batch.cols, m.cfg.hidden_size]], &[true], |k, x| {
            layer.forward(&x[0], &packed, k).unwrap().out
        });
    });
}

/// With `bf16 = true` the fused attention multiplies bf16-rounded operands (and rounded result
/// gradients) with f32 sums, on this process's CPU path (the tests rerun on every lower one):
/// it equals the reference attention built from rounded operands (to 2e-3: the two sum the
/// scores in different orders, so now and then a probability rounds to the neighbouring bf16
/// value), and differs from f32 attention by far more (the rounding is really applied).
#[test]
fn fused_bf16_attention_is_attention_of_rounded_operands() {
    use crate::model::AttentionInputs;
    let (t, valid) = long_rows();
    let bf16 = Kernels::bf16;
    for_one_layer_models(|dt, _, m| {
        if dt != DType::F32 {
            return;
        }
        let attn = AttentionInputs::padded(&m.cfg, &valid, dt, &Device::Cpu).unwrap();
        let layer = m.layers[0].self_attn.clone();
        // seeded values in [-1, 1)
        let mut state = 12345u64;
        let x: Vec<f32> = (0..2 * t * m.cfg.hidden_size)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        let x = [Tensor::from_vec(x, (2 * t, m.cfg.hidden_size), &Device::Cpu).unwrap()];
        let f = |k: Kernels, x: &[Tensor]| layer.forward(&x[0], &attn, k).unwrap().out;
        let [fused, reference] = compare_kernels(dt, 2e-3, &x, &[true], [bf16(true), bf16(false)], f);
        let [_, f32_reference] = compare_kernels(dt, 1e-5, &x, &[true], [Kernels::FUSED, Kernels::PRIMITIVE], f);
        let apart = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        let to_reference = (apart(&fused.0, &reference.0), apart(&fused.1[0], &reference.1[0]));
        let to_f32 = (
            apart(&reference.0, &f32_reference.0),
            apart(&reference.1[0], &f32_reference.1[0]),
        );
        eprintln!(
            "bf16 attention: values {:.2e} from the reference, {:.2e} from f32; gradients {:.2e}, {:.2e}",
            to_reference.0, to_f32.0, to_reference.1, to_f32.1
        );
        assert!(
            to_reference.0 < 0.25 * to_f32.0 && to_reference.1 < 0.25 * to_f32.1,
            "bf16 attention is as far from the rounded reference as from f32"
        );
    });
}

/// The fused head against log-softmax on primitives, over more rows than one chunk, with
/// gradients for both the hidden rows and the projection.
#[test]
fn fused_token_logps_matches_primitive() {
    use crate::model::kernels::primitive::logsumexp_last;
    for (dt, tol) in DTYPES {
        let n = super::logprob_head::HEAD_CHUNK_ROWS + 7;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 13) % 50).collect();
        compare(dt, tol, &[&[n, 16], &[50, 16]], &[true, true], |k, x| {
            if k == Kernels::FUSED {
                super::token_logps(&x[0], &x[1], &targets, false).unwrap()
            } else {
                let logits = x[0].matmul(&x[1].t().unwrap()).unwrap();
                let lse = logsumexp_last(&logits).unwrap().squeeze(1).unwrap();
                let t = Tensor::new(targets.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap();
                (logits.gather(&t, 1).unwrap().squeeze(1).unwrap() - lse).unwrap()
            }
        });
    }
}

/// With `bf16`, the head's values and gradients are those of bf16-rounded operands with
/// exact sums (f64 here), over several backward chunks (a unit test's chunk is 64 rows): the
/// logits from rounded `h` and `W`, `dh` and `dW` from the rounded logits' gradient.
#[test]
fn fused_bf16_token_logps_gradients_are_products_of_rounded_operands() {
    use crate::model::kernels::matmul::round_to_bf16;
    let (n, v, k) = (super::logprob_head::HEAD_CHUNK_ROWS * 2 + 5, 50, 40);
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.5, (v, k), &dev).unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 17) % v as u32).collect();
    let r: Vec<f32> = (0..n).map(|i| ((i * 7919 % 97) as f32 / 48.5) - 1.0).collect();
    let (hv, wv) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
    let lp = super::token_logps(hv.as_tensor(), wv.as_tensor(), &targets, true).unwrap();
    let grads = (&lp * Tensor::new(r.as_slice(), &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (got_lp, got_dh, got_dw) = (
        flat(&lp),
        flat(grads.get(hv.as_tensor()).unwrap()),
        flat(grads.get(wv.as_tensor()).unwrap()),
    );
    let rb = |x: f64| round_to_bf16(x as f32) as f64;
    let (h, w) = (flat(&h), flat(&w));
    let (mut dh, mut dw) = (vec![0f64; n * k], vec![0f64; v * k]);
    for i in 0..n {
        let logits: Vec<f64> = (0..v)
            .map(|c| (0..k).map(|j| rb(h[i * k + j] as f64) * rb(w[c * k + j] as f64)).sum())
            .collect();
        let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = mx + logits.iter().map(|z| (z - mx).exp()).sum::<f64>().ln();
        let t = targets[i] as usize;
        assert!(
            (got_lp[i] as f64 - (logits[t] - lse)).abs() < 1e-4,
            "log-prob of row {i}: {} vs {}",
            got_lp[i],
            logits[t] - lse
        );
        for c in 0..v {
            let dl = rb(r[i] as f64 * ((c == t) as u8 as f64 - (logits[c] - lse).exp()));
            for j in 0..k {
                dh[i * k + j] += dl * rb(w[c * k + j] as f64);
                dw[c * k + j] += dl * rb(h[i * k + j] as f64);
            }
        }
    }
    for (what, got, want) in [("dh", &got_dh, &dh), ("dW", &got_dw, &dw)] {
        let scale = want.iter().fold(0f64, |a, x| a.max(x.abs()));
        for (i, (&g, &e)) in got.iter().zip(want.iter()).enumerate() {
            // a logit gradient an ulp away from a bf16 tie may round the other way
            assert!(
                (g as f64 - e).abs() < 5e-3 * scale,
                "{what}[{i}]: {g} vs {e} (scale {scale})"
            );
        }
    }
}

#[test]
fn fused_swiglu_matches_primitive() {
    for (dt, tol) in DTYPES {
        compare(dt, tol, &[&[3, 7, 10], &[3, 7, 10]], &[true, true], |k, x| {
            k.swiglu(&x[0], &x[1]).unwrap()
        });
    }
}

/// This module's tests again in child processes, once per CPU path below the one this CPU
/// has (`PREFER_KERNELS` caps the row kernels, the few-row products and the bf16 products),
/// down to the portable one: each fallback is exercised on a machine that has better.
#[test]
fn kernel_tests_pass_on_every_lower_cpu_path() {
    use super::CpuPath;
    if std::env::var_os("PREFER_KERNELS").is_some() {
        return; // a child (or a run capped on purpose): the cap applies to this process
    }
    let exe = std::env::current_exe().unwrap();
    let mut ran = Vec::new();
    for path in CpuPath::supported() {
        if path == CpuPath::detected() {
            continue; // this process runs them there
        }
        let out = std::process::Command::new(&exe)
            .args(["model::kernels::", "--test-threads=2"])
            .env("PREFER_KERNELS", path.name())
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kernel tests on the {} path failed:\n{text}",
            path.name()
        );
        // the child ran the module's tests, not an empty selection
        let passed: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("test result: ok. "))
            .and_then(|l| l.split(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert!(
            passed >= 10,
            "the {} run passed only {passed} tests:\n{text}",
            path.name()
        );
        ran.push(format!("{} ({passed} tests)", path.name()));
    }
    eprintln!(
        "kernel tests ran on: {} (this process), {}",
        CpuPath::detected().name(),
        if ran.is_empty() {
            "no lower path".to_string()
        } else {
            ran.join(", ")
        }
    );
}
