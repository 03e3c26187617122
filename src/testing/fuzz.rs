//! Fuzzing on the stable toolchain: every parser a user feeds, driven by seeded random
//! mutations of a seed corpus of valid inputs. A target fails on a panic, on an input that
//! takes longer than [`SLOW`], or (where the driver counts allocations, as the `fuzz` example
//! does) on an allocation far beyond the input's size, the sign of a size field trusted without
//! checking it against the file.
//!
//! `cargo test` runs each target for a short budget (`fuzz_targets_survive_a_short_run`);
//! `scripts/fuzz.sh` runs them for a million inputs each.

use super::{tiny_model, tiny_tokenizer, write_gguf, write_hf, TinySpec};
use crate::util::Rng;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An input slower than this is reported as a hang.
pub const SLOW: Duration = Duration::from_secs(2);

/// Feeds a parser one input; the directory is scratch space for parsers that read files.
type Feed = Box<dyn Fn(&[u8], &Path) + Send + Sync>;

/// One parser under test: `run` feeds it the bytes (through files in `scratch` where the parser
/// reads files) and ignores its errors; only panics and hangs count.
pub struct Target {
    pub name: &'static str,
    /// Valid inputs to mutate.
    pub corpus: Vec<Vec<u8>>,
    /// Text formats get textual mutations besides byte-level ones.
    pub text: bool,
    run: Feed,
}

impl Target {
    pub fn run(&self, input: &[u8], scratch: &Path) {
        (self.run)(input, scratch)
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("the scratch directory is writable");
    p
}

fn lines_of(path: &Path, n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().take(n).collect::<Vec<_>>().join("\n").into_bytes()
}

/// Every target, with its seed corpus made from the repository's fixtures and tiny models.
pub fn targets() -> Vec<Target> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let model = tiny_model(&TinySpec::default(), candle_core::DType::F32, 5).expect("the tiny model builds");
    let seeds = super::scratch_dir("fuzz-seeds");
    let gguf = seeds.join("tiny.gguf");
    write_gguf(&model, &gguf, candle_core::quantized::GgmlDType::Q8_0).expect("the tiny GGUF writes");
    let hf = seeds.join("hf");
    write_hf(&model, &hf).expect("the tiny HF model writes");
    let read = |p: &Path| std::fs::read(p).expect("a seed file");
    let tok = tiny_tokenizer(false).expect("the tiny tokenizer builds");
    let tok_json = read(&hf.join("tokenizer.json"));
    let config_json = read(&hf.join("config.json"));
    let safetensors = read(&hf.join("model.safetensors"));
    let hf_dir = hf.clone();

    let pairs = vec![
        lines_of(&fixtures.join("hh-rlhf-harmless-base/pairs.jsonl"), 3),
        br#"{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}"#.to_vec(),
        br#"{"prompt": "a", "completions": ["b", "c", "d"], "ranks": [2, 1, 3]}"#.to_vec(),
        br#"{"prompt": "a", "completion": "b", "label": true}"#.to_vec(),
        br#"{"prompt": "q", "chosen": "x", "rejected": "y", "score_chosen": 1.5, "score_rejected": -0.5}"#.to_vec(),
    ];
    let prompts = vec![
        lines_of(&fixtures.join("gsm8k/train.jsonl"), 2),
        br#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "answer": "3"}"#
            .to_vec(),
        br#"{"prompt": "plain", "solution": "\\boxed{2}"}"#.to_vec(),
    ];
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut configs: Vec<Vec<u8>> = std::fs::read_dir(&examples)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
                .map(|e| read(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    configs.push(
        b"model_name_or_path = \"m\"\ntrain_file = \"d.jsonl\"\nloss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0, 0.5]\nbeta = 0.2\nref_model = [\"a\", \"b\"]\n".to_vec(),
    );
    let templates = vec![
        tok.chat_template.clone().unwrap_or_default().into_bytes(),
        b"{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".to_vec(),
        b"{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}".to_vec(),
    ];
    let messages = vec![
        crate::tokenizer::Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        crate::tokenizer::Message {
            role: "user".into(),
            content: "What is 2 + 2?".into(),
        },
    ];
    let tok_for_prompts = tok.clone();

    vec![
        Target {
            name: "jsonl_pairs",
            corpus: pairs,
            text: true,
            run: Box::new(|b, dir| {
                let p = write(dir, "pairs.jsonl", b);
                let _ = crate::data::tokenize::load_text_examples(&p, None, true);
                let _ = crate::data::tokenize::load_text_examples(&p, None, false);
            }),
        },
        Target {
            name: "jsonl_prompts",
            corpus: prompts,
            text: true,
            run: Box::new(move |b, dir| {
                let p = write(dir, "prompts.jsonl", b);
                let field = crate::data::prompts::PromptField::default();
                let _ = crate::data::prompts::load_prompts(&p, &tok_for_prompts, &field, Some(64), 4);
            }),
        },
        Target {
            name: "config_toml",
            corpus: configs,
            text: true,
            run: Box::new(|b, dir| {
                let p = write(dir, "run.toml", b);
                if let Ok(c) = crate::config::TrainConfig::load(Some(&p), &[]) {
                    let _ = c.validate();
                }
                // the same text as `--set` overrides, line by line
                let sets: Vec<String> = String::from_utf8_lossy(b).lines().map(str::to_string).collect();
                let _ = crate::config::TrainConfig::load(None, &sets);
            }),
        },
        Target {
            name: "gguf",
            corpus: vec![read(&gguf)],
            text: false,
            run: Box::new(|b, dir| {
                let p = write(dir, "model.gguf", b);
                let _ = crate::model::load(&p, candle_core::DType::F32, &candle_core::Device::Cpu);
            }),
        },
        Target {
            name: "safetensors",
            corpus: vec![safetensors],
            text: false,
            run: Box::new(move |b, dir| {
                let d = dir.join("hf");
                if !d.join("config.json").is_file() {
                    std::fs::create_dir_all(&d).expect("scratch");
                    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
                        if hf_dir.join(f).is_file() {
                            std::fs::copy(hf_dir.join(f), d.join(f)).expect("scratch");
                        }
                    }
                }
                write(&d, "model.safetensors", b);
                let _ = crate::model::load(&d, candle_core::DType::F32, &candle_core::Device::Cpu);
            }),
        },
        Target {
            name: "config_json",
            corpus: vec![config_json],
            text: true,
            run: Box::new(|b, _| {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) {
                    if let Ok(c) = crate::model::ModelConfig::from_json(&v, Path::new("config.json")) {
                        let _ = c.num_params();
                        let _ = c.rope_inv_freq();
                    }
                }
            }),
        },
        Target {
            name: "tokenizer_json",
            corpus: vec![tok_json],
            text: true,
            run: Box::new(|b, _| {
                let tc = serde_json::json!({"eos_token": "<|endoftext|>"});
                if let Ok(t) = crate::tokenizer::TextTokenizer::from_parts(
                    String::from_utf8_lossy(b).into_owned(),
                    &tc,
                    Some(0),
                    None,
                ) {
                    if let Ok(ids) = t.encode("Hello, world! 2 + 2 = 4\n\n", true) {
                        let _ = t.decode(&ids, false);
                    }
                }
            }),
        },
        Target {
            name: "chat_template",
            corpus: templates,
            text: true,
            run: Box::new(move |b, _| {
                let _ = crate::tokenizer::render_chat_template(
                    &String::from_utf8_lossy(b),
                    &messages,
                    true,
                    Some("<s>"),
                    "</s>",
                );
            }),
        },
    ]
}

const TOKENS: [&[u8]; 22] = [
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"-1e999",
    b"1e400",
    b"\\u0000",
    b"\n",
    b"\xEF\xBB\xBF",
    b"\\",
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"=",
    b"\"\"\"",
    b"18446744073709551615",
    b"-0",
];
const NUMBERS: [u64; 9] = [0, 1, 2, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// A value of another kind or an extreme of this one, for a JSON node.
fn odd_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    let deep = (0..64).fold(json!(1), |v, _| json!([v]));
    let choices = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(-1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(""),
        json!("\u{0}\u{feff}\n"),
        json!("x".repeat(5000)),
        json!([]),
        json!({}),
        json!(["a", 1, null]),
        json!({"role": "user", "content": "hi"}),
        json!([{"role": "assistant"}]),
        deep,
    ];
    choices[(rng.uniform() * choices.len() as f64) as usize % choices.len()].clone()
}

/// Mutates one node of `v` (descending at random): replaced by an odd value, or, in an object,
/// a key removed or renamed, or, in an array, an element removed or repeated.
fn mutate_json_value(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    let descend = rng.uniform() < 0.7;
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[(rng.uniform() * keys.len() as f64) as usize % keys.len()].clone();
            if descend {
                if let Some(child) = m.get_mut(&k) {
                    return mutate_json_value(rng, child);
                }
            }
            match (rng.uniform() * 3.0) as usize {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    let x = m.remove(&k).unwrap_or_default();
                    m.insert(format!("{k}_"), x);
                }
                _ => {
                    m.insert(k, odd_json(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = (rng.uniform() * a.len() as f64) as usize % a.len();
            if descend {
                return mutate_json_value(rng, &mut a[i]);
            }
            match (rng.uniform() * 3.0) as usize {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                }
                _ => a[i] = odd_json(rng),
            }
        }
        _ => *v = odd_json(rng),
    }
}

/// A structural mutation of JSON or JSON lines: one line parsed, one node changed, written
/// back (`None` where no line parses).
fn mutate_json(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(input).ok()?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let parsed: Vec<usize> = (0..lines.len())
        .filter(|&i| serde_json::from_str::<serde_json::Value>(&lines[i]).is_ok())
        .collect();
    let &i = parsed.get((rng.uniform() * parsed.len() as f64) as usize % parsed.len().max(1))?;
    let mut v: serde_json::Value = serde_json::from_str(&lines[i]).ok()?;
    mutate_json_value(rng, &mut v);
    lines[i] = v.to_string();
    Some(lines.join("\n").into_bytes())
}

/// One mutation of `input` (several edits stacked), splicing from `corpus` at times. Text
/// inputs that are JSON (or JSON lines) get structural edits half of the time.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], text: bool) -> Vec<u8> {
    if text && rng.uniform() < 0.5 {
        if let Some(v) = mutate_json(rng, input) {
            return v;
        }
    }
    let mut v = input.to_vec();
    let edits = 1 + (rng.uniform() * 4.0) as usize;
    for _ in 0..edits {
        let pos = |rng: &mut Rng, len: usize| (rng.uniform() * (len + 1) as f64) as usize % (len + 1);
        match (rng.uniform() * if text { 9.0 } else { 8.0 }) as usize {
            0 if !v.is_empty() => {
                let i = pos(rng, v.len() - 1);
                v[i] ^= 1 << (rng.uniform() * 8.0) as u32;
            }
            1 if !v.is_empty() => {
                let i = pos(rng, v.len() - 1);
                v[i] = (rng.uniform() * 256.0) as u8;
            }
            2 => {
                let i = pos(rng, v.len());
                let n = 1 + (rng.uniform() * 8.0) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| (rng.uniform() * 256.0) as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if !v.is_empty() => {
                let i = pos(rng, v.len() - 1);
                let n = (1 + (rng.uniform() * 16.0) as usize).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 if !v.is_empty() => {
                // duplicate a stretch
                let i = pos(rng, v.len() - 1);
                let n = (1 + (rng.uniform() * 64.0) as usize).min(v.len() - i);
                let stretch = v[i..i + n].to_vec();
                let j = pos(rng, v.len());
                v.splice(j..j, stretch);
            }
            5 if v.len() >= 8 => {
                // an interesting integer over 1, 2, 4 or 8 bytes, little-endian
                let w = [1usize, 2, 4, 8][(rng.uniform() * 4.0) as usize % 4];
                let i = pos(rng, v.len() - w);
                let x = NUMBERS[(rng.uniform() * NUMBERS.len() as f64) as usize % NUMBERS.len()];
                v[i..i + w].copy_from_slice(&x.to_le_bytes()[..w]);
            }
            6 => {
                // splice: the head of this input and the tail of another
                let other = &corpus[(rng.uniform() * corpus.len() as f64) as usize % corpus.len()];
                let i = pos(rng, v.len());
                let j = pos(rng, other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            7 => {
                let i = pos(rng, v.len());
                v.truncate(i);
            }
            _ => {
                let t = TOKENS[(rng.uniform() * TOKENS.len() as f64) as usize % TOKENS.len()];
                let i = pos(rng, v.len());
                v.splice(i..i, t.iter().copied());
            }
        }
    }
    v
}

/// What a run of one target found.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    /// Inputs that panicked, with the panic message (the first few).
    pub panics: Vec<(Vec<u8>, String)>,
    pub panic_count: u64,
    /// Inputs slower than [`SLOW`].
    pub slow: Vec<(Vec<u8>, Duration)>,
    pub slowest: Duration,
}

/// Feeds `target` `iterations` inputs (the corpus first, then mutations of corpus entries
/// and of earlier mutants) under `seed`; `check` is called after each input (an allocation
/// bound, say) and may return a failure message.
pub fn run(target: &Target, iterations: u64, seed: u64, mut check: impl FnMut(&[u8]) -> Option<String>) -> Report {
    let scratch = super::scratch_dir(&format!("fuzz-{}-{}-{seed}", target.name, std::process::id()));
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let mut pool: Vec<Vec<u8>> = target.corpus.clone();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..iterations {
        let input = if (i as usize) < target.corpus.len() {
            target.corpus[i as usize].clone()
        } else {
            let base = &pool[(rng.uniform() * pool.len() as f64) as usize % pool.len()];
            mutate(&mut rng, base, &target.corpus, target.text)
        };
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.run(&input, &scratch)));
        let took = t0.elapsed();
        report.executions += 1;
        report.slowest = report.slowest.max(took);
        if took > SLOW && report.slow.len() < 5 {
            report.slow.push((input.clone(), took));
        }
        if let Err(e) = outcome {
            report.panic_count += 1;
            if report.panics.len() < 5 {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                report.panics.push((input.clone(), msg));
            }
        }
        if let Some(msg) = check(&input) {
            report.panic_count += 1;
            if report.panics.len() < 5 {
                report.panics.push((input.clone(), msg));
            }
        }
        // keep some mutants as bases, so edits compound
        if i as usize >= target.corpus.len() && rng.uniform() < 0.05 && input.len() < 1 << 20 {
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let k = (rng.uniform() * pool.len() as f64) as usize % pool.len();
                if k >= target.corpus.len() {
                    pool[k] = input;
                }
            }
        }
    }
    std::panic::set_hook(hook);
    let _ = std::fs::remove_dir_all(&scratch);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each target's seed corpus parses, and a short seeded run (a few hundred inputs each;
    /// `scripts/fuzz.sh` runs a million) finds no panic and no hang.
    #[test]
    fn fuzz_targets_survive_a_short_run() {
        crate::testing::set_threads_for_tests();
        let iterations = std::env::var("PREFER_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let mut lines = Vec::new();
        for t in targets() {
            let r = run(&t, iterations, 1, |_| None);
            assert!(
                r.panics.is_empty() && r.slow.is_empty(),
                "{}: {} panics, e.g. {:?} on {:?}; slow: {:?}",
                t.name,
                r.panic_count,
                r.panics.first().map(|p| &p.1),
                r.panics.first().map(|p| String::from_utf8_lossy(&p.0).into_owned()),
                r.slow.iter().map(|s| s.1).collect::<Vec<_>>()
            );
            lines.push(format!("{} {} inputs (slowest {:?})", t.name, r.executions, r.slowest));
        }
        eprintln!("fuzzed: {}", lines.join(", "));
    }

    #[test]
    fn mutations_are_seeded_and_change_the_input() {
        let corpus = vec![b"{\"prompt\": \"a\"}".to_vec()];
        let a: Vec<Vec<u8>> = {
            let mut rng = Rng::new(3);
            (0..50).map(|_| mutate(&mut rng, &corpus[0], &corpus, true)).collect()
        };
        let b: Vec<Vec<u8>> = {
            let mut rng = Rng::new(3);
            (0..50).map(|_| mutate(&mut rng, &corpus[0], &corpus, true)).collect()
        };
        assert_eq!(a, b, "the same seed, the same mutants");
        assert!(
            a.iter().filter(|m| **m != corpus[0]).count() >= 40,
            "most mutants differ"
        );
    }
}
