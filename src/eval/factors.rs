//! Factor-level analysis of preferences (PROFILE-style): how strongly the preference labels, and
//! a model's own preferences, line up with measurable properties of the responses. The factor
//! list is a table: add a name and a function of (prompt, response).

use serde::Serialize;

pub type FactorFn = fn(&str, &str) -> f64;

/// Every factor: name and its function of (prompt, response).
pub const FACTORS: &[(&str, FactorFn)] = &[
    ("length_words", length_words),
    ("list_items", list_items),
    ("refusal_phrases", refusal_phrases),
    ("question_echo", question_echo),
];

pub fn length_words(_prompt: &str, response: &str) -> f64 {
    response.split_whitespace().count() as f64
}

/// Lines formatted as list items (`- `, `* `, `• `, `1. `, `2) `).
pub fn list_items(_prompt: &str, response: &str) -> f64 {
    response
        .lines()
        .map(str::trim_start)
        .filter(|l| {
            l.starts_with("- ") || l.starts_with("* ") || l.starts_with("• ") || {
                let digits: String = l.chars().take_while(char::is_ascii_digit).collect();
                !digits.is_empty() && (l[digits.len()..].starts_with(". ") || l[digits.len()..].starts_with(") "))
            }
        })
        .count() as f64
}

const REFUSALS: &[&str] = &[
    "i'm sorry",
    "i am sorry",
    "i can't",
    "i cannot",
    "i won't",
    "i will not",
    "as an ai",
    "i'm not able",
    "i am not able",
    "not appropriate",
    "i don't think i can",
];

pub fn refusal_phrases(_prompt: &str, response: &str) -> f64 {
    let r = response.to_lowercase();
    REFUSALS.iter().map(|p| r.matches(p).count()).sum::<usize>() as f64
}

fn content_words(s: &str) -> std::collections::BTreeSet<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 4)
        .map(str::to_lowercase)
        .collect()
}

/// Fraction of the prompt's content words (≥ 4 letters) that the response repeats.
pub fn question_echo(prompt: &str, response: &str) -> f64 {
    let p = content_words(prompt);
    if p.is_empty() {
        return 0.0;
    }
    let r = content_words(response);
    p.intersection(&r).count() as f64 / p.len() as f64
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FactorRow {
    pub factor: String,
    /// Pairs whose chosen and rejected responses differ in this factor.
    pub pairs_differing: usize,
    /// Among those: fraction where the label prefers the response with more of the factor.
    pub labels_prefer_more: Option<f64>,
    /// Among those: fraction where the model prefers the response with more of the factor.
    pub model_prefers_more: Option<f64>,
    /// Pearson correlation of Δfactor (chosen − rejected) with the model's score difference.
    pub model_correlation: Option<f64>,
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

/// One row per factor. `texts` are (prompt, chosen, rejected); `model_diff` is the model's
/// score of chosen minus rejected (log-prob, implicit or explicit reward) per pair.
pub fn analyze(texts: &[(String, String, String)], model_diff: &[f64]) -> Vec<FactorRow> {
    FACTORS
        .iter()
        .map(|(name, f)| {
            let deltas: Vec<f64> = texts.iter().map(|(p, c, r)| f(p, c) - f(p, r)).collect();
            let idx: Vec<usize> = (0..deltas.len()).filter(|&i| deltas[i] != 0.0).collect();
            let n = idx.len();
            let frac = |pred: &dyn Fn(usize) -> bool| {
                (n > 0).then(|| idx.iter().filter(|&&i| pred(i)).count() as f64 / n as f64)
            };
            FactorRow {
                factor: name.to_string(),
                pairs_differing: n,
                labels_prefer_more: frac(&|i| deltas[i] > 0.0),
                model_prefers_more: frac(&|i| (deltas[i] > 0.0) == (model_diff[i] > 0.0)),
                model_correlation: pearson(&deltas, model_diff),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_and_agreement_by_hand() {
        assert_eq!(length_words("", "one two  three"), 3.0);
        assert_eq!(list_items("", "Intro\n- a\n* b\n  3. c\n12) d\nnot 4.x"), 4.0);
        assert_eq!(refusal_phrases("", "I'm sorry, but I cannot help. As an AI..."), 3.0);
        assert!((question_echo("How do I bake bread quickly?", "To bake bread, knead it.") - 2.0 / 3.0).abs() < 1e-12);
        let texts = vec![
            ("Q".to_string(), "a b c".to_string(), "a".to_string()), // chosen longer
            ("Q".to_string(), "a".to_string(), "a b".to_string()),   // rejected longer
            ("Q".to_string(), "x y".to_string(), "z w".to_string()), // same length
        ];
        let rows = analyze(&texts, &[1.0, 2.0, -1.0]);
        let len = &rows[0];
        assert_eq!((len.factor.as_str(), len.pairs_differing), ("length_words", 2));
        assert_eq!(len.labels_prefer_more, Some(0.5));
        // the model prefers chosen in both differing pairs: agrees with "more words" once
        assert_eq!(len.model_prefers_more, Some(0.5));
        // Δ = (2, −1, 0) vs model (1, 2, −1)
        let want = pearson(&[2.0, -1.0, 0.0], &[1.0, 2.0, -1.0]).unwrap();
        assert!((len.model_correlation.unwrap() - want).abs() < 1e-12);
        assert!((want - (-1.0 / 7.0)).abs() < 1e-12); // by hand: cov −6/9, both variances 42/9
    }
}
