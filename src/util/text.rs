//! Text helpers: "did you mean" suggestions and text histograms.

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if any is reasonably close.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A text histogram of `xs` in `bins` equal-width bins, bars up to `width` characters.
pub fn text_histogram(xs: &[usize], bins: usize, width: usize) -> String {
    let (Some(&lo), Some(&hi)) = (xs.iter().min(), xs.iter().max()) else {
        return String::new();
    };
    let span = (hi - lo + 1).div_ceil(bins).max(1);
    let mut counts = vec![0usize; bins];
    for &x in xs {
        counts[((x - lo) / span).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut s = String::new();
    for (i, c) in counts.iter().enumerate() {
        let a = lo + i * span;
        if a > hi {
            break;
        }
        let bar = "#".repeat((c * width).div_ceil(top));
        s.push_str(&format!("  {:>6}-{:<6} {:>6} {bar}\n", a, a + span - 1, c));
    }
    s
}

/// "`word` is not one of a, b, c; did you mean `b`?": the error for a value outside a closed
/// set of `names`, suggesting the closest of every accepted spelling.
pub fn not_one_of(word: &str, names: &[&str], spellings: &[&str]) -> String {
    let hint = closest(word, spellings.iter().copied())
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default();
    format!("`{word}` is not one of {}{hint}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_typos() {
        let keys = ["learning_rate", "beta", "max_length"];
        assert_eq!(closest("learnig_rate", keys), Some("learning_rate"));
        assert_eq!(closest("max_lenght", keys), Some("max_length"));
        assert_eq!(closest("zzzzzzzzzzzz", keys), None);
    }
}
