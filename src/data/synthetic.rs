//! A preference set with a checkable truth: two-digit addition questions in chat form, the
//! correct sum chosen and a near miss rejected. Used by the README's first job; the same
//! questions as prompt rows with their `answer` feed online training and evaluation by
//! generation.

use crate::util::Rng;
use serde_json::json;

/// `n` pairs as conversational JSONL lines, seeded.
pub fn arithmetic_pairs(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let a = 10 + rng.below(90);
            let b = 10 + rng.below(90);
            let sum = a + b;
            let offsets = [1i64, -1, 10, -10, 2, -2, 9, 11];
            let wrong = (sum as i64 + offsets[rng.below(offsets.len())]).max(0);
            json!({
                "prompt": [{"role": "user", "content": format!("What is {a} + {b}? Answer with the number only.")}],
                "chosen": [{"role": "assistant", "content": sum.to_string()}],
                "rejected": [{"role": "assistant", "content": wrong.to_string()}],
            })
            .to_string()
        })
        .collect()
}

/// The questions of [`arithmetic_pairs`] (same `n`, same `seed`) as prompt rows with their
/// `answer`, for online methods and `prefer eval --prompts` (reward `accuracy`).
pub fn arithmetic_prompts(n: usize, seed: u64) -> Vec<String> {
    arithmetic_pairs(n, seed)
        .iter()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("made above");
            json!({"prompt": v["prompt"], "answer": v["chosen"][0]["content"]}).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_are_correct_and_seeded() {
        let a = super::arithmetic_pairs(50, 3);
        assert_eq!(a, super::arithmetic_pairs(50, 3));
        for line in &a {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let q = v["prompt"][0]["content"].as_str().unwrap();
            let nums: Vec<i64> = q
                .trim_start_matches("What is ")
                .split('?')
                .next()
                .unwrap()
                .split(" + ")
                .map(|x| x.parse().unwrap())
                .collect();
            let chosen: i64 = v["chosen"][0]["content"].as_str().unwrap().parse().unwrap();
            let rejected: i64 = v["rejected"][0]["content"].as_str().unwrap().parse().unwrap();
            assert_eq!(chosen, nums[0] + nums[1]);
            assert_ne!(rejected, chosen);
        }
        let p = super::arithmetic_prompts(50, 3);
        let v: serde_json::Value = serde_json::from_str(&p[7]).unwrap();
        let pair: serde_json::Value = serde_json::from_str(&a[7]).unwrap();
        assert_eq!(v["prompt"], pair["prompt"]);
        assert_eq!(v["answer"], pair["chosen"][0]["content"]);
    }
}
