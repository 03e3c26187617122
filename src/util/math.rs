//! Scalar f64 functions shared by objectives, evaluation and reward models.

/// `log σ(x)` in f64, stable for large |x| (the scalar twin of `objectives::log_sigmoid`).
pub fn log_sigmoid(x: f64) -> f64 {
    if x < 0.0 {
        x - x.exp().ln_1p()
    } else {
        -(-x).exp().ln_1p()
    }
}

/// `log Φ(z)`, the log of the standard normal CDF, in f64: `log(erfc(−z/√2)/2)`, and for
/// z < −35 (erfc underflows near −38) the asymptotic series
/// `−z²/2 − log(−z) − ½log 2π + log(1 − 1/z² + 3/z⁴ − 15/z⁶ + 105/z⁸)`.
pub fn log_ndtr(z: f64) -> f64 {
    if z < -35.0 {
        let u = 1.0 / (z * z);
        let series = 1.0 - u * (1.0 - u * (3.0 - u * (15.0 - 105.0 * u)));
        -0.5 * z * z - (-z).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
    } else if z > 6.0 {
        // Φ(z) = 1 − Φ(−z), with Φ(−z) tiny
        (-0.5 * libm::erfc(z / std::f64::consts::SQRT_2)).ln_1p()
    } else {
        (0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)).ln()
    }
}

/// P(r_w > r_l) for independent r_w ~ N(μ_w, e^{lv_w}), r_l ~ N(μ_l, e^{lv_l}):
/// Φ((μ_w − μ_l)/√(σ_w² + σ_l²)).
pub fn gaussian_preference_probability(mean_w: f64, log_var_w: f64, mean_l: f64, log_var_l: f64) -> f64 {
    log_ndtr((mean_w - mean_l) / (log_var_w.exp() + log_var_l.exp()).sqrt()).exp()
}

/// `d/dz log Φ(z) = φ(z) / Φ(z)` (the inverse Mills ratio of −z), stable in both tails.
pub fn d_log_ndtr(z: f64) -> f64 {
    (-0.5 * z * z - 0.5 * (2.0 * std::f64::consts::PI).ln() - log_ndtr(z)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ndtr_matches_known_values_and_its_derivative() {
        // Φ(0) = ½; Φ(1.959963984540054) = 0.975; Φ(−1) = 0.15865525393145707
        assert!((log_ndtr(0.0) - 0.5f64.ln()).abs() < 1e-15);
        assert!((log_ndtr(1.959963984540054) - 0.975f64.ln()).abs() < 1e-12);
        assert!((log_ndtr(-1.0) - 0.15865525393145707f64.ln()).abs() < 1e-13);
        // log Φ(−30) and log Φ(−50), computed with mpmath at 30 digits
        assert!(
            (log_ndtr(-30.0) + 454.321_243_956_343_2).abs() < 1e-9,
            "{}",
            log_ndtr(-30.0)
        );
        assert!(
            (log_ndtr(-50.0) + 1_254.831_361_139_42).abs() < 1e-9,
            "{}",
            log_ndtr(-50.0)
        );
        // continuity where the two branches meet, and a saturating upper tail
        assert!((log_ndtr(-35.0 - 1e-12) - log_ndtr(-35.0)).abs() < 1e-9);
        assert!(log_ndtr(60.0) <= 0.0 && log_ndtr(60.0) > -1e-300);
        for z in [-60.0, -36.0, -34.0, -19.0, -3.0, -0.5, 0.0, 0.7, 4.0, 8.0] {
            let h = 1e-5 * (1.0 + f64::abs(z));
            let fd = (log_ndtr(z + h) - log_ndtr(z - h)) / (2.0 * h);
            assert!(
                (fd - d_log_ndtr(z)).abs() < 1e-6 * (1.0 + fd.abs()),
                "z {z}: fd {fd} vs {}",
                d_log_ndtr(z)
            );
        }
    }
}
