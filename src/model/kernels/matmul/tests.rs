use super::*;

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn rounding_is_to_nearest_even() {
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1)
    assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
    assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
    assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
    assert_eq!(round_to_bf16(-2.5), -2.5);
    assert!(round_to_bf16(f32::NAN).is_nan());
    assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
    // the same rounding as the `half` crate (which candle's bf16 conversion uses)
    let xs: Vec<f32> = lcg(7, 1000).iter().map(|v| v * 1e3).collect();
    let dev = candle_core::Device::Cpu;
    let theirs: Vec<f32> = Tensor::new(xs.as_slice(), &dev)
        .and_then(|t| {
            t.to_dtype(candle_core::DType::BF16)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()
        })
        .unwrap();
    for (x, t) in xs.iter().zip(theirs) {
        assert_eq!(round_to_bf16(*x), t, "{x}");
    }
}

/// Every bf16 path this CPU has (the rounded f32 GEMM always; `vdpbf16ps` and AMX tiles where
/// present, whatever `PREFER_KERNELS` says) against an f64 sum of the rounded operands'
/// products, for shapes that are not multiples of the tiles and for transposed (strided)
/// operands.
#[test]
fn bf16_matmul_matches_an_f64_sum_of_rounded_products() {
    let mut paths = vec![(false, CpuPath::Portable)];
    for p in [CpuPath::Avx512Bf16, CpuPath::Amx] {
        if CpuPath::detected() >= p {
            paths.push((true, p));
        }
    }
    eprintln!(
        "bf16 matmul paths tested on this CPU: rounded f32 GEMM{}",
        paths[1..]
            .iter()
            .map(|(_, p)| format!(", {} tiles", p.name()))
            .collect::<String>()
    );
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 45),
        (64, 96, 40),
        (70, 576, 33),
        (33, 64, 130),
        (130, 1536, 100),
        (40, 3000, 20),
    ] {
        let a = lcg(m as u64 * 31 + k as u64, m * k);
        let b = lcg(n as u64 * 17 + 3, k * n);
        for &(at, bt) in &[(false, false), (true, false), (false, true), (true, true)] {
            // a stored as [k, m] when transposed, b as [n, k]
            let av = if at {
                View::row_major(&a, k, m).t()
            } else {
                View::row_major(&a, m, k)
            };
            let bv = if bt {
                View::row_major(&b, n, k).t()
            } else {
                View::row_major(&b, k, n)
            };
            let at_ = |i: usize, j: usize| round_to_bf16(av.data[i * av.rs + j * av.cs]) as f64;
            let bt_ = |i: usize, j: usize| round_to_bf16(bv.data[i * bv.rs + j * bv.cs]) as f64;
            for (&(tiles, path), parallel) in paths.iter().flat_map(|p| [(p, true), (p, false)]) {
                let rhs = Rhs::prepare(bv, tiles, parallel).unwrap();
                let ldc = n + 3;
                let init = lcg(99, m * ldc);
                for accumulate in [false, true] {
                    let mut c = init.clone();
                    on(path, av, &rhs, &mut c, ldc, accumulate, parallel).unwrap();
                    if !parallel {
                        // on this thread alone: the same blocks, so the same values bit for bit
                        let mut par = init.clone();
                        on(
                            path,
                            av,
                            &Rhs::prepare(bv, tiles, true).unwrap(),
                            &mut par,
                            ldc,
                            accumulate,
                            true,
                        )
                        .unwrap();
                        assert_eq!(c, par, "{path:?} tiles {tiles} ({m},{k},{n}) serial vs parallel");
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut scale) = (0f64, 0f64);
                            for p in 0..k {
                                want += at_(i, p) * bt_(p, j);
                                scale += (at_(i, p) * bt_(p, j)).abs();
                            }
                            if accumulate {
                                want += init[i * ldc + j] as f64;
                                scale += (init[i * ldc + j] as f64).abs();
                            }
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() <= 2e-6 * scale + 1e-30,
                                "{path:?} tiles {tiles} parallel {parallel} ({m},{k},{n}) at {at} bt {bt} acc {accumulate} [{i},{j}]: {got} vs {want}"
                            );
                        }
                        // the padding between rows is left alone
                        for j in n..ldc {
                            assert_eq!(c[i * ldc + j], init[i * ldc + j]);
                        }
                    }
                }
            }
        }
    }
}

/// Non-finite operands on every bf16 path: an infinity times a finite non-zero value gives
/// that infinity in its row and column, a NaN gives NaN, infinity times zero gives NaN (as in
/// f32), and rows and columns without them stay finite and exact.
#[test]
fn bf16_matmul_propagates_nan_and_infinity_on_every_path() {
    let mut paths = vec![(false, CpuPath::Portable)];
    for p in [CpuPath::Avx512Bf16, CpuPath::Amx] {
        if CpuPath::detected() >= p {
            paths.push((true, p));
        }
    }
    let (m, k, n) = (35, 70, 33);
    let mut a: Vec<f32> = lcg(5, m * k).iter().map(|v| v + 2.0).collect(); // all ≥ 1
    let b: Vec<f32> = lcg(6, k * n).iter().map(|v| v + 2.0).collect();
    a[3 * k + 40] = f32::INFINITY; // row 3: +inf everywhere
    a[7 * k + 1] = f32::NAN; // row 7: NaN everywhere
    a[9 * k + 69] = f32::NEG_INFINITY; // row 9: -inf, except column 0 where b is zero
    let mut b = b;
    b[69 * n] = 0.0;
    for (tiles, path) in paths {
        let rhs = Rhs::prepare(View::row_major(&b, k, n), tiles, true).unwrap();
        let mut c = vec![0f32; m * n];
        on(path, View::row_major(&a, m, k), &rhs, &mut c, n, false, true).unwrap();
        for i in 0..m {
            for j in 0..n {
                let v = c[i * n + j];
                match i {
                    3 => assert_eq!(v, f32::INFINITY, "{path:?} [{i},{j}]"),
                    7 => assert!(v.is_nan(), "{path:?} [{i},{j}]"),
                    9 if j == 0 => assert!(v.is_nan(), "{path:?} [{i},{j}]: -inf·0"),
                    9 => assert_eq!(v, f32::NEG_INFINITY, "{path:?} [{i},{j}]"),
                    _ => {
                        let want: f64 = (0..k)
                            .map(|p| round_to_bf16(a[i * k + p]) as f64 * round_to_bf16(b[p * n + j]) as f64)
                            .sum();
                        assert!((v as f64 - want).abs() <= 2e-6 * want.abs(), "{path:?} [{i},{j}]");
                    }
                }
            }
        }
    }
}

/// [`linear`] on seeded `[37, 70]` inputs and `[45, 70]` weights: the op's output, its
/// input and weight gradients for the output gradient `g`, and the f64 values of the
/// same products (`y = xWᵀ`, `dx = gW`, `dW = gᵀx`) with every operand first passed
/// through bf16 rounding when `bf16`. Returns the output, the max |diff| of y, dx and dW,
/// whether dW is contiguous, and the plain f32 product.
fn linear_against_f64(bf16: bool, seed: u64) -> (Tensor, [f64; 3], bool, Tensor) {
    use candle_core::{DType, Device, Var};
    let dev = Device::Cpu;
    let (rows, inp, out) = (37, 70, 45);
    let x = Var::from_vec(lcg(seed, rows * inp), (rows, inp), &dev).unwrap();
    let w = Var::from_vec(lcg(seed + 1, out * inp), (out, inp), &dev).unwrap();
    let g = Tensor::from_vec(lcg(seed + 2, rows * out), (rows, out), &dev).unwrap();
    let y = linear(x.as_tensor(), w.as_tensor(), bf16).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let prep = |t: &Tensor| {
        let t = if bf16 {
            t.to_dtype(DType::BF16).unwrap()
        } else {
            t.clone()
        };
        t.to_dtype(DType::F64).unwrap()
    };
    let (x64, w64, g64) = (prep(x.as_tensor()), prep(w.as_tensor()), prep(&g));
    let dw = grads.get(w.as_tensor()).unwrap();
    let diff = |got: &Tensor, want: Tensor| -> f64 {
        let d = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
        d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let diffs = [
        diff(&y, x64.matmul(&w64.t().unwrap()).unwrap()),
        diff(grads.get(x.as_tensor()).unwrap(), g64.matmul(&w64).unwrap()),
        diff(dw, g64.t().unwrap().matmul(&x64).unwrap()),
    ];
    let y32 = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
    (y, diffs, dw.is_contiguous(), y32)
}

/// In f32: the op's value and both gradients against candle's matmul in f64, and `dW`
/// comes out contiguous in `W`'s layout.
#[test]
fn linear_f32_value_and_gradients_match_f64() {
    let (_, diffs, contiguous, _) = linear_against_f64(false, 4);
    assert!(contiguous);
    for (d, what) in diffs.iter().zip(["y", "dx", "dW"]) {
        assert!(*d < 1e-5, "{what}: max |diff| {d}");
    }
}

/// The op's value and both gradients against candle's f32 ops on bf16-rounded operands.
#[test]
fn linear_bf16_value_and_gradients_match_rounded_f32() {
    let (y, diffs, _, y32) = linear_against_f64(true, 1);
    for (d, what) in diffs.iter().zip(["y", "dx", "dW"]) {
        assert!(*d < 2e-5, "{what}: max |diff| {d}");
    }
    // and it is not simply the f32 product: rounding changes the result measurably
    let diff = (&y - &y32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-4, "bf16 result equals the f32 one ({diff})");
}

/// The few-rows product (row by row below 4 rows, in tiles above) on every CPU path this
/// machine has (portable, AVX2, AVX-512) against f64 sums, at row counts and widths that
/// leave partial tiles, lanes and tasks; and a row's result is the same bit for bit alone or
/// among others.
#[test]
fn few_rows_matches_f64_sums() {
    let paths: Vec<CpuPath> = CpuPath::supported()
        .into_iter()
        .filter(|p| *p <= CpuPath::Avx512)
        .collect();
    eprintln!(
        "few-rows product: paths tested on this CPU: {}",
        paths.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    );
    for path in paths {
        few_rows_on_path(path);
    }
}

fn few_rows_on_path(path: CpuPath) {
    let dev = candle_core::Device::Cpu;
    let mut rng = crate::util::Rng::new(3);
    let few_rows = |x: &Tensor, w: &Tensor| few_rows_on(path, x, w);
    for (m, k, n) in [
        (1, 37, 67),
        (3, 576, 130),
        (4, 8, 2),
        (5, 37, 129),
        (8, 576, 64),
        (9, 48, 13),
        (32, 100, 131),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() as f32 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() as f32 - 0.5).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
        let y: Vec<Vec<f32>> = few_rows(&xt, &wt).unwrap().unwrap().to_vec2().unwrap();
        for r in 0..m {
            for o in 0..n {
                let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum();
                assert!(
                    (y[r][o] as f64 - want).abs() < 1e-4,
                    "{path:?}: m {m} k {k} n {n}: [{r}][{o}] {} vs {want}",
                    y[r][o]
                );
            }
        }
    }
    // a row's result is the same, bit for bit, alone or among others (batched sampling draws
    // what sampling prompt by prompt draws)
    for (k, n) in [(37, 67), (576, 40)] {
        let x: Vec<f32> = (0..9 * k).map(|_| rng.uniform() as f32 - 0.5).collect();
        let w = Tensor::from_vec(
            (0..n * k).map(|_| rng.uniform() as f32 - 0.5).collect::<Vec<f32>>(),
            (n, k),
            &dev,
        )
        .unwrap();
        let nine: Vec<Vec<f32>> = few_rows(&Tensor::from_vec(x.clone(), (9, k), &dev).unwrap(), &w)
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
        for r in 0..9 {
            let one: Vec<Vec<f32>> = few_rows(
                &Tensor::from_vec(x[r * k..(r + 1) * k].to_vec(), (1, k), &dev).unwrap(),
                &w,
            )
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
            assert_eq!(one[0], nine[r], "{path:?}: k {k}, row {r}");
        }
    }
    let big = Tensor::zeros((FEW_ROWS + 1, 8), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
    assert!(few_rows(&big, &w).unwrap().is_none());
    // bf16 weights (decoding from bf16 copies): bit for bit the f32 product with the weights
    // widened first, for one row (widened in registers) and many (widened in blocks), above
    // FEW_ROWS too; and several weights at once give each one's product alone
    for (m, k, n) in [(1, 37, 67), (2, 576, 130), (5, 100, 33), (40, 48, 21)] {
        let x = Tensor::from_vec(
            (0..m * k).map(|_| rng.uniform() as f32 - 0.5).collect::<Vec<f32>>(),
            (m, k),
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..n * k).map(|_| rng.uniform() as f32 - 0.5).collect::<Vec<f32>>(),
            (n, k),
            &dev,
        )
        .unwrap()
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
        let got: Vec<Vec<f32>> = few_rows(&x, &w).unwrap().unwrap().to_vec2().unwrap();
        let widened = w.to_dtype(candle_core::DType::F32).unwrap();
        let want: Vec<Vec<f32>> = match m <= FEW_ROWS {
            true => few_rows(&x, &widened).unwrap().unwrap().to_vec2().unwrap(),
            // past FEW_ROWS the f32 path does not apply: per row instead (the same sums)
            false => (0..m)
                .map(|r| {
                    few_rows(&x.narrow(0, r, 1).unwrap(), &widened)
                        .unwrap()
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap()
                        .remove(0)
                })
                .collect(),
        };
        assert_eq!(got, want, "{path:?}: bf16 m {m} k {k} n {n}");
        let w2 = w.narrow(0, 0, n / 2).unwrap();
        let both = few_rows_many_on(path, &x, &[&w, &w2]).unwrap().unwrap();
        assert_eq!(both[0].to_vec2::<f32>().unwrap(), got);
        let alone: Vec<Vec<f32>> = few_rows(&x, &w2).unwrap().unwrap().to_vec2().unwrap();
        assert_eq!(both[1].to_vec2::<f32>().unwrap(), alone);
        // mixed dtypes, or another k: not for this path
        assert!(few_rows_many_on(path, &x, &[&w, &widened]).unwrap().is_none());
    }
}

/// Weights packed into bf16 tiles for decoding (`packed::packed_products`), multiplied on AMX
/// tiles and with `vdpbf16ps` (where this CPU has them): against an f64 sum
/// of the bf16-rounded operands' products, for shapes that are not multiples of the tiles, from
/// 1 row to past one 32-row block; each row's result bit for bit the same alone as among the
/// others (batched sampling draws what sampling one by one draws); several weights at once each
/// as alone. Below AVX512-BF16 nothing is packed.
#[test]
fn packed_products_are_bf16_products_whatever_the_rows_beside() {
    use super::packed::{packed_products, PackedWeight};
    let dev = candle_core::Device::Cpu;
    for path in CpuPath::supported() {
        let w = Tensor::from_vec(lcg(1, 6 * 40), (6, 40), &dev).unwrap();
        let packed = PackedWeight::new_on(path, &w).unwrap();
        if path < CpuPath::Avx512Bf16 {
            assert!(packed.is_none(), "{path:?}");
            continue;
        }
        assert_eq!(
            packed.as_ref().map(|p| p.on_amx()),
            Some(path >= CpuPath::Amx),
            "{path:?}"
        );
        for (m, k, n) in [
            (1, 40, 6),
            (5, 70, 50),
            (10, 64, 70),
            (11, 96, 130),
            (16, 576, 33),
            (17, 64, 64),
            (40, 100, 96),
        ] {
            let xs = lcg(m as u64 * 31 + k as u64, m * k);
            let ws = lcg(n as u64 * 17 + k as u64, n * k);
            let x = Tensor::from_vec(xs.clone(), (m, k), &dev).unwrap();
            let w = Tensor::from_vec(ws.clone(), (n, k), &dev).unwrap();
            let p = PackedWeight::new_on(path, &w).unwrap().unwrap();
            let got: Vec<Vec<f32>> = packed_products(&x, &[&p]).unwrap().remove(0).to_vec2().unwrap();
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| round_to_bf16(xs[r * k + c]) as f64 * round_to_bf16(ws[j * k + c]) as f64)
                        .sum();
                    assert!((got[r][j] as f64 - want).abs() < 1e-4, "m {m} k {k} n {n} ({r}, {j})");
                }
                let alone: Vec<f32> = packed_products(&x.narrow(0, r, 1).unwrap(), &[&p])
                    .unwrap()
                    .remove(0)
                    .to_vec2()
                    .unwrap()
                    .remove(0);
                assert_eq!(alone, got[r], "m {m} k {k} n {n}: row {r}");
            }
            let half = PackedWeight::new_on(path, &w.narrow(0, 0, n.div_ceil(2)).unwrap())
                .unwrap()
                .unwrap();
            let both = packed_products(&x, &[&p, &half]).unwrap();
            assert_eq!(both[0].to_vec2::<f32>().unwrap(), got);
            let want_half: Vec<Vec<f32>> = got.iter().map(|row| row[..n.div_ceil(2)].to_vec()).collect();
            assert_eq!(both[1].to_vec2::<f32>().unwrap(), want_half);
        }
        // a k that does not match is an error, not a wrong product
        let x = Tensor::zeros((2, 41), candle_core::DType::F32, &dev).unwrap();
        assert!(packed_products(&x, &[&packed.unwrap()]).is_err());
    }
}

/// [`matmul_on`] into a slice, checked as [`matmul`] checks it.
fn on(
    path: CpuPath,
    a: View,
    b: &Rhs,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) -> candle_core::Result<()> {
    check_out("test", a.rows, b.n(), c.len(), ldc)?;
    // SAFETY: `c` holds [a.rows, b.n] at stride ldc (checked), initialised.
    unsafe { matmul_on(path, a, b, c.as_mut_ptr(), ldc, accumulate, parallel) }
}

/// The products into new buffers (not zero-filled first) equal those into zero-filled ones, bit
/// for bit, for every kind of right operand this CPU has, transposed operands, shapes that are
/// no multiple of a tile, and an empty inner dimension (whose product is all zeros).
#[test]
fn products_into_new_buffers_equal_those_into_zeroed_ones() {
    for (m, k, n) in [(1, 7, 3), (37, 70, 33), (64, 576, 65), (5, 0, 9)] {
        let a = lcg(m as u64 + 7, m * k);
        let b = lcg(n as u64 + 11, k * n);
        for at in [false, true] {
            let av = match at {
                true => View::row_major(&a, k, m).t(),
                false => View::row_major(&a, m, k),
            };
            let bv = View::row_major(&b, k, n);
            let mut want = vec![0f32; m * n];
            matmul_f32(av, bv, &mut want, n, false).unwrap();
            assert_eq!(matmul_f32_new(av, bv).unwrap(), want, "f32 ({m},{k},{n}) at {at}");
            if k == 0 {
                assert!(want.iter().all(|&v| v == 0.0));
            }
            for tiles in [false, true] {
                if tiles && !CpuPath::Avx512Bf16.allows() {
                    continue;
                }
                let rhs = Rhs::prepare(bv, tiles, true).unwrap();
                let mut want = vec![0f32; m * n];
                matmul(av, &rhs, &mut want, n, false).unwrap();
                assert_eq!(
                    matmul_new(av, &rhs).unwrap(),
                    want,
                    "bf16 tiles {tiles} ({m},{k},{n}) at {at}"
                );
            }
        }
    }
}
