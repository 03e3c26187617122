//! Final answers of math completions and solutions, as the `accuracy` reward compares them:
//! the text after the last `####` (GSM8K's solutions end `#### n`), else the last `\boxed{}`,
//! else the last number; normalised so `1,024`, `1024.0` and `$1024` are equal.

use regex::Regex;
use std::sync::OnceLock;

fn number() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid pattern"))
}

/// A number's canonical spelling: no thousands separators, currency or trailing zeros
/// (`1,024.50` → `1024.5`, `7.0` → `7`); other text trimmed as is.
pub fn normalize(s: &str) -> String {
    let t: String = s
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    match t.parse::<f64>() {
        Ok(x) if x.is_finite() => {
            if x == x.trunc() && x.abs() < 1e15 {
                format!("{}", x as i64)
            } else {
                format!("{x}")
            }
        }
        _ => t,
    }
}

/// The content of the last `\boxed{...}` (braces balanced).
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The final answer of a completion or a solution, normalised; `None` if it has none.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(i) = text.rfind("####") {
        let rest = &text[i + 4..];
        return number().find(rest).map(|m| normalize(m.as_str())).or_else(|| {
            let t = rest.trim();
            (!t.is_empty()).then(|| normalize(t))
        });
    }
    if let Some(b) = last_boxed(text) {
        return Some(normalize(b));
    }
    number().find_iter(text).last().map(|m| normalize(m.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_found_and_normalised() {
        assert_eq!(final_answer("a\n#### 1,024").as_deref(), Some("1024"));
        assert_eq!(final_answer("#### $18.00").as_deref(), Some("18"));
        assert_eq!(
            final_answer("x = \\boxed{\\frac{1}{2}} so").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(final_answer("3 apples and 4.50 pears.").as_deref(), Some("4.5"));
        assert_eq!(final_answer("minus -7").as_deref(), Some("-7"));
        assert_eq!(final_answer("none"), None);
        assert_eq!(normalize("1,000,000"), "1000000");
    }
}
