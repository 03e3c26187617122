//! Text ⇄ token ids and chat templates: a `tokenizers::Tokenizer` (from `tokenizer.json` or
//! built from GGUF metadata) plus the special tokens and the Jinja chat template that
//! `tokenizer_config.json` carries.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The tokenizer.json text this was built from (saved unchanged).
    pub json: String,
    pub eos_token: String,
    pub eos_id: u32,
    pub bos_token: Option<String>,
    pub pad_id: u32,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("eos_token", &self.eos_token)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// A chat message `{role, content}`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Build from tokenizer.json text plus the fields of tokenizer_config.json.
    /// `eos_id_hint` (config.json's `eos_token_id`) is used when tokenizer_config has no eos.
    pub fn from_parts(
        json: String,
        tok_config: &Value,
        eos_id_hint: Option<u32>,
        pad_id_hint: Option<u32>,
    ) -> Result<Self> {
        // malformed JSON is reported here: the tokenizers crate panics on some of it
        serde_json::from_str::<Value>(&json)
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        // and a panic inside it on a well-formed but unexpected file is an error, not a crash
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json.as_bytes()))
            .map_err(|_| {
                Error::Tokenizer("cannot parse tokenizer.json: the tokenizers crate rejected its structure".into())
            })?
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        let eos_token = match token_str(tok_config.get("eos_token")) {
            Some(s) => s,
            None => {
                let id = eos_id_hint.ok_or_else(|| {
                    Error::Tokenizer("no eos_token in tokenizer_config.json and no eos_token_id in config.json".into())
                })?;
                inner
                    .id_to_token(id)
                    .ok_or_else(|| Error::Tokenizer(format!("eos_token_id {id} is not in the vocabulary")))?
            }
        };
        let eos_id = inner
            .token_to_id(&eos_token)
            .ok_or_else(|| Error::Tokenizer(format!("eos token {eos_token:?} is not in the vocabulary")))?;
        let pad_id = token_str(tok_config.get("pad_token"))
            .and_then(|p| inner.token_to_id(&p))
            .or(pad_id_hint)
            .unwrap_or(eos_id);
        Ok(TextTokenizer {
            inner,
            json,
            eos_token,
            eos_id,
            bos_token: token_str(tok_config.get("bos_token")),
            pad_id,
            chat_template: tok_config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja` if present) from a dir.
    pub fn from_dir(dir: &Path, eos_id_hint: Option<u32>, pad_id_hint: Option<u32>) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&tj).map_err(|e| Error::io(&tj, e))?;
        let tc = dir.join("tokenizer_config.json");
        let mut cfg: Value = match std::fs::read_to_string(&tc) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::Tokenizer(format!("{}: {e}", tc.display())))?,
            Err(_) => json!({}),
        };
        let jinja = dir.join("chat_template.jinja");
        if let Ok(t) = std::fs::read_to_string(&jinja) {
            cfg["chat_template"] = Value::String(t);
        }
        Self::from_parts(json, &cfg, eos_id_hint, pad_id_hint)
    }

    /// `tokenizer(text)`: with the post-processor's special tokens (BOS if it adds one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Render `messages` with the model's chat template (Jinja, as transformers does).
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("this model has no chat_template; conversational data needs one".into()))?;
        render_chat_template(
            tpl,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            &self.eos_token,
        )
    }

    /// The tokenizer_config.json written beside a saved checkpoint.
    pub fn config_json(&self) -> Value {
        let mut v = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.id_to_token(self.pad_id),
            "clean_up_tokenization_spaces": false,
        });
        if let Some(b) = &self.bos_token {
            v["bos_token"] = json!(b);
        }
        if let Some(t) = &self.chat_template {
            v["chat_template"] = json!(t);
        }
        v
    }
}

/// Render a HF chat template with minijinja (Python string methods enabled, `raise_exception`).
/// `template` without `{% generation %}` / `{% endgeneration %}` tags.
pub fn strip_generation_tags(template: &str) -> std::borrow::Cow<'_, str> {
    replace_generation_tags(template, "", "")
}

/// `template` with each `{% generation %}` replaced by `start` and each `{% endgeneration %}`
/// by `end` (any whitespace and `-` trimming in the tags).
pub fn replace_generation_tags<'a>(template: &'a str, start: &str, end: &str) -> std::borrow::Cow<'a, str> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").expect("valid regex"))
        .replace_all(template, |c: &regex::Captures| match c.get(1) {
            Some(_) => end.to_string(),
            None => start.to_string(),
        })
}

pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    // `{% generation %}` marks assistant tokens for transformers' assistant masks; rendering
    // ignores it (prefer's SFT reads it, `data::sft`)
    let template = strip_generation_tags(template);
    env.add_template("chat", &template)
        .map_err(|e| Error::Template(format!("cannot parse: {e}")))?;
    let tpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
    tpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token,
    })
    .map_err(|e| Error::Template(format!("cannot render: {e}")))
}

/// GPT-2's byte → printable-char map used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).expect("valid char");
    }
    map
}

/// The pre-tokenisation of a byte-level BPE, named as llama.cpp's `tokenizer.ggml.pre`.
pub fn byte_level_pre_tokenizer(pre: &str) -> Result<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, llama-bpe, qwen2); load the model's HF directory instead"
            )))
        }
    })
}

/// A tokenizer.json for a byte-level BPE (GPT-2 style) vocabulary. `token_types` follow
/// llama.cpp: 3 = control, 4 = user-defined (both become added special tokens).
pub fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    token_types: &[i64],
    pre_tokenizer: Value,
    bos: Option<(u32, &str)>,
) -> Value {
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(token_types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let post = match bos {
        Some((id, tok)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}}}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_renders_like_transformers() {
        let m = vec![Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        let s = render_chat_template(CHATML, &m, true, None, "<|im_end|>").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let m = vec![Message {
            role: "user".into(),
            content: "  x ".into(),
        }];
        let s = render_chat_template("{{ messages[0]['content'].strip() }}", &m, false, None, "e").unwrap();
        assert_eq!(s, "x");
        let e = render_chat_template("{{ raise_exception('bad role') }}", &m, false, None, "e").unwrap_err();
        assert!(e.to_string().contains("bad role"), "{e}");
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = bytes_to_unicode();
        let mut v: Vec<char> = m.clone();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'a' as usize], 'a');
    }
}
