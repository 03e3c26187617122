//! `prefer tokenize`: token ids and pieces of each text of a JSONL file.

use super::*;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// The model whose tokenizer (and chat template) is used: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The texts: a JSONL file (or any data format prefer reads), one text per row.
    #[arg(long = "data", alias = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// The field holding the text (a string, or a list of messages with --chat).
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Render the field (a list of {role, content} messages) with the chat template first.
    #[arg(long)]
    pub chat: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let TokenizeArgs {
        model,
        file,
        field,
        chat,
    } = args;
    let tok = model::load_tokenizer(&model)?;
    let mut out = std::io::stdout().lock();
    for (line, v) in read_jsonl(&file)? {
        let text = if chat {
            let msgs: Vec<Message> = serde_json::from_value(v.get(&field).cloned().unwrap_or(Value::Null))
                .with_context(|| {
                    format!(
                        "{}:{line}: field `{field}`: expected a list of {{role, content}} messages",
                        file.display()
                    )
                })?;
            tok.apply_chat_template(&msgs, true)?
        } else {
            str_field(&v, &field, &file, line)?.to_string()
        };
        let ids = tok.encode(&text, true)?;
        let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect();
        writeln!(
            out,
            "{}",
            json!({"line": line, "text": text, "ids": ids, "pieces": pieces})
        )?;
    }
    Ok(())
}
