//! Data layer: formats, TRL-exact tokenisation, truncation, and errors that name file:line:field.

use prefer::data::tokenize::{load_text_examples, tokenize_example};
use prefer::data::{load_tokenized_examples, DataFormat, TokenizeOptions, TruncationMode};
use prefer::testing::tiny_tokenizer;
use std::path::PathBuf;

fn write(name: &str, content: &[u8]) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let p = DIR.get_or_init(|| prefer::testing::scratch_dir("data")).join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn no_limits() -> TokenizeOptions {
    TokenizeOptions {
        max_length: None,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
        columns: Vec::new(),
    }
}

#[test]
fn standard_pairs_tokenise_like_trl() {
    for add_bos in [false, true] {
        let tok = tiny_tokenizer(add_bos).unwrap();
        let p = write(
            "std.jsonl",
            br#"{"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"}"#,
        );
        let (pairs, rep) = load_tokenized_examples(&p, &tok, &no_limits(), false).unwrap();
        assert_eq!(rep.format, Some(DataFormat::Standard));
        let t = &pairs[0];
        let prompt = tok.encode("Q: 2+2=", true).unwrap();
        assert_eq!(t.prompt_ids, prompt);
        assert_eq!(prompt[0] == 0, add_bos, "BOS only when the tokenizer adds it");
        let full = tok.encode("Q: 2+2= 4<|im_end|>", true).unwrap();
        assert_eq!(t.chosen_ids(), full[prompt.len()..].to_vec());
        assert_eq!(
            *t.chosen_ids().last().unwrap(),
            tok.eos_id,
            "EOS is appended and scored"
        );
        assert_eq!(t.chosen_ids().len(), 3); // "Ġ", "4", eos (digits are split individually)
        assert!(!t.chosen_ids().contains(&0), "no BOS inside the completion");
    }
}

#[test]
fn conversational_pairs_use_the_chat_template() {
    let tok = tiny_tokenizer(false).unwrap();
    let p = write(
        "conv.jsonl",
        br#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away"}]}"#,
    );
    let (pairs, rep) = load_text_examples(&p, Some(&tok), false).unwrap();
    assert_eq!(rep.format, Some(DataFormat::Conversational));
    assert!(pairs[0]
        .prompt
        .ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
    assert_eq!(pairs[0].chosen(), "hello<|im_end|>\n");
    assert_eq!(pairs[0].rejected(), "go away<|im_end|>\n");
}

#[test]
fn hh_transcripts_split_at_the_last_assistant_turn() {
    let p = write(
        "hh.jsonl",
        concat!(
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: help?\n\nAssistant: Sure.", "rejected": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: help?\n\nAssistant: No."}"#,
            "\n",
            r#"{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"}"#,
            "\n"
        )
        .as_bytes(),
    );
    let (pairs, rep) = load_text_examples(&p, None, true).unwrap();
    assert_eq!(rep.format, Some(DataFormat::Hh));
    assert_eq!(pairs.len(), 1);
    assert_eq!(
        pairs[0].prompt,
        "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: help?\n\nAssistant:"
    );
    assert_eq!((pairs[0].chosen(), pairs[0].rejected()), (" Sure.", " No."));
    assert_eq!(rep.skipped.len(), 1);
    let e = rep.skipped[0].to_string();
    assert!(e.contains("hh.jsonl:2:") && e.contains("`rejected`"), "{e}");
    // without --skip-invalid, the same row is the error
    let e = load_text_examples(&p, None, false).unwrap_err().to_string();
    assert!(e.contains("hh.jsonl:2:"), "{e}");
}

#[test]
fn real_hh_file_reports_rows_without_shared_prefix() {
    // a slice of the real HH file: 60 good rows, then two empty chosen replies and two pairs
    // whose chosen and rejected transcripts do not share a prompt (lines 87, 517, 1255, 1689 of
    // the full file)
    let path = prefer::testing::fixture("hh-rlhf-harmless-base/pairs.jsonl");
    let (pairs, rep) = load_text_examples(&path, None, true).unwrap();
    assert_eq!(rep.records, 64);
    assert_eq!(pairs.len() + rep.skipped.len(), 64);
    let skipped: Vec<String> = rep.skipped.iter().map(|e| e.to_string()).collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    for (e, line) in skipped.iter().zip(61..) {
        assert!(e.contains(&format!("pairs.jsonl:{line}:")), "{e}");
    }
    assert!(
        skipped[..2].iter().all(|e| e.contains("empty completion")),
        "{skipped:?}"
    );
    assert!(
        skipped[2..].iter().all(|e| e.contains("does not share the prompt")),
        "{skipped:?}"
    );
    assert!(pairs.iter().all(|p| p.prompt.ends_with("\n\nAssistant:")));
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let tok = tiny_tokenizer(false).unwrap();
    let cases: Vec<(&[u8], &str)> = vec![
        (b"{\"prompt\": \"a\", \"chosen\": \"b\"", "malformed JSON"),
        (b"{\"prompt\": \"a\", \"chosen\": \"b\"}", "`rejected`"),
        (
            b"{\"prompt\": \"a\", \"chosen\": \"  \", \"rejected\": \"c\"}",
            "empty completion",
        ),
        (
            b"{\"prompt\": \"a\", \"chosen\": 3, \"rejected\": \"c\"}",
            "expected a string, found a number",
        ),
        (
            b"{\"prompt\": \"a\xff\", \"chosen\": \"b\", \"rejected\": \"c\"}",
            "not valid UTF-8",
        ),
        (b"[1, 2]", "expected a JSON object"),
    ];
    for (i, (content, want)) in cases.into_iter().enumerate() {
        let mut body = b"{\"prompt\": \"ok \", \"chosen\": \"x\", \"rejected\": \"y\"}\n\n".to_vec();
        body.extend_from_slice(content);
        let p = write(&format!("bad{i}.jsonl"), &body);
        let e = load_tokenized_examples(&p, &tok, &no_limits(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("bad{i}.jsonl:3:")), "line number missing: {e}");
        assert!(e.contains(want), "case {i}: {e}");
        // --skip-invalid keeps the good row and reports the bad one
        let (ok, rep) = load_tokenized_examples(&p, &tok, &no_limits(), true).unwrap();
        assert_eq!((ok.len(), rep.skipped.len()), (1, 1));
    }
}

/// A UTF-8 byte-order mark at the start of a JSONL file (Windows editors, some exporters) is
/// skipped: the first row loads as the others do. One inside the file is still an error.
#[test]
fn a_byte_order_mark_at_the_start_is_skipped() {
    let row = b"{\"prompt\": \"ok \", \"chosen\": \"x\", \"rejected\": \"y\"}\n";
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(row);
    body.extend_from_slice(row);
    let p = write("bom.jsonl", &body);
    let (pairs, rep) = load_text_examples(&p, None, false).unwrap();
    assert_eq!((pairs.len(), rep.skipped.len()), (2, 0));
    assert_eq!(pairs[0].prompt, "ok ");
    let mut body = row.to_vec();
    body.extend_from_slice(b"\xEF\xBB\xBF");
    body.extend_from_slice(row);
    let e = load_text_examples(&write("bom-inside.jsonl", &body), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bom-inside.jsonl:2:") && e.contains("malformed JSON"), "{e}");
}

#[test]
fn truncation_follows_trl() {
    let tok = tiny_tokenizer(false).unwrap();
    let p = write(
        "trunc.jsonl",
        br#"{"prompt": "abcdefgh", "chosen": " 123456", "rejected": " 9"}"#,
    );
    let opts = |mode| TokenizeOptions {
        max_length: Some(8),
        max_prompt_length: Some(4),
        truncation_mode: mode,
        columns: Vec::new(),
    };
    let (pairs, _) = load_text_examples(&p, None, false).unwrap();
    let full_prompt = tok.encode("abcdefgh", true).unwrap();
    let end = tokenize_example(&pairs[0], &tok, &opts(TruncationMode::KeepEnd), &p).unwrap();
    assert_eq!(end.prompt_ids, full_prompt[full_prompt.len() - 4..].to_vec());
    let start = tokenize_example(&pairs[0], &tok, &opts(TruncationMode::KeepStart), &p).unwrap();
    assert_eq!(start.prompt_ids, full_prompt[..4].to_vec());
    assert!(end.prompt_truncated && end.completion_truncated);
    assert_eq!(end.chosen_ids().len(), 4, "completion cut to max_length - prompt");
    assert_eq!(end.rejected_ids().len(), 3, "short completion untouched");
    // a prompt that fills max_length is an error naming the field
    let no_room = TokenizeOptions {
        max_length: Some(5),
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
        columns: Vec::new(),
    };
    let e = tokenize_example(&pairs[0], &tok, &no_room, &p).unwrap_err().to_string();
    assert!(
        e.contains("trunc.jsonl:1: field `prompt`") && e.contains("max_length"),
        "{e}"
    );
}

#[test]
fn merge_across_the_prompt_boundary_is_an_error() {
    let tok = tiny_tokenizer(false).unwrap();
    // "th" + "e": the merge h+e crosses the boundary
    let p = write("merge.jsonl", br#"{"prompt": "th", "chosen": "e", "rejected": " x"}"#);
    let e = load_tokenized_examples(&p, &tok, &no_limits(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("merge.jsonl:1: field `chosen`") && e.contains("boundary"),
        "{e}"
    );
}

#[test]
fn ranked_and_unpaired_shapes_parse_and_tokenise() {
    let tok = tiny_tokenizer(false).unwrap();
    let p = write(
        "ranked.jsonl",
        br#"{"prompt": "Q:", "responses": [" b", " a", " c"], "ranks": [1, 0, 2]}
{"prompt": "Q:", "responses": [" x", " y"], "scores": [0.2, 0.9], "annotator": 7}"#,
    );
    let (ex, rep) = load_tokenized_examples(&p, &tok, &no_limits(), false).unwrap();
    assert_eq!(rep.shape, Some(prefer::data::Shape::Ranked));
    // best first, ranks become graded labels K−1−rank
    assert_eq!(tok.decode(&ex[0].responses[0], false).unwrap(), " a<|im_end|>");
    assert_eq!(ex[0].meta.scores, Some(vec![2.0, 1.0, 0.0]));
    assert!(ex[0].meta.scores_from_ranks);
    assert_eq!(ex[1].meta.scores, Some(vec![0.9, 0.2]));
    assert_eq!(ex[1].meta.annotator.as_deref(), Some("7"));
    assert_eq!(tok.decode(&ex[1].responses[0], false).unwrap(), " y<|im_end|>");

    let p = write("unpaired.jsonl", b"{\"prompt\": \"Q:\", \"completion\": \" a\", \"label\": true}\n{\"prompt\": \"Q:\", \"completion\": \" b\", \"label\": false}\n");
    let (ex, rep) = load_tokenized_examples(&p, &tok, &no_limits(), false).unwrap();
    assert_eq!(rep.shape, Some(prefer::data::Shape::Unpaired));
    assert_eq!((ex[0].meta.label, ex[1].meta.label), (Some(true), Some(false)));
    assert_eq!(ex[0].responses.len(), 1);

    let p = write("scored.jsonl", br#"{"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_score": 8, "rejected_score": 3, "preference_strength": 0.7}"#);
    let (ex, _) = load_tokenized_examples(&p, &tok, &no_limits(), false).unwrap();
    assert_eq!(
        (ex[0].meta.scores.clone(), ex[0].meta.strength),
        (Some(vec![8.0, 3.0]), Some(0.7))
    );

    // errors name the field
    let cases: Vec<(&[u8], &str)> = vec![
        (br#"{"prompt": "Q", "responses": ["a", "b"]}"#, "field `ranks`"),
        (
            br#"{"prompt": "Q", "responses": ["a", "b"], "ranks": [0]}"#,
            "one per response",
        ),
        (br#"{"prompt": "Q", "responses": ["a"], "ranks": [0]}"#, "at least 2"),
        (
            br#"{"prompt": "Q", "completion": "a", "label": "yes"}"#,
            "field `label`",
        ),
        (
            br#"{"prompt": "Q", "chosen": "a", "rejected": "b", "preference_strength": 1.5}"#,
            "outside [0, 1]",
        ),
        (
            br#"{"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_score": 1}"#,
            "field `rejected_score`",
        ),
    ];
    for (i, (body, want)) in cases.into_iter().enumerate() {
        let p = write(&format!("shape-bad{i}.jsonl"), body);
        let e = load_tokenized_examples(&p, &tok, &no_limits(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("shape-bad{i}.jsonl:1:")) && e.contains(want), "{e}");
    }
    // one file, one shape
    let p = write("mixed.jsonl", b"{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"Q\", \"completion\": \" a\", \"label\": true}\n");
    let e = load_tokenized_examples(&p, &tok, &no_limits(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mixed.jsonl:2:") && e.contains("one shape"), "{e}");
}

#[test]
fn oasst_trees_convert_to_ranked_lists_and_pairs() {
    let path = prefer::testing::fixture("oasst-en100/en_10_tree.jsonl");
    let lists = prefer::data::convert::oasst_trees(&path, prefer::data::convert::OasstTarget::Lists).unwrap();
    let pairs = prefer::data::convert::oasst_trees(&path, prefer::data::convert::OasstTarget::Pairs).unwrap();
    // counted independently: prompter messages with ≥ 2 ranked replies, and their ordered pairs
    let (mut want_lists, mut want_pairs) = (0, 0);
    fn walk(m: &serde_json::Value, lists: &mut usize, pairs: &mut usize) {
        let replies = m["replies"].as_array().cloned().unwrap_or_default();
        let mut ranks: Vec<f64> = replies.iter().filter_map(|r| r["rank"].as_f64()).collect();
        if m["role"] == "prompter" && ranks.len() >= 2 {
            *lists += 1;
            ranks.sort_by(f64::total_cmp);
            for i in 0..ranks.len() {
                for j in i + 1..ranks.len() {
                    *pairs += (ranks[i] < ranks[j]) as usize;
                }
            }
        }
        for r in &replies {
            walk(r, lists, pairs);
        }
    }
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        walk(&v["prompt"], &mut want_lists, &mut want_pairs);
    }
    assert_eq!((lists.len(), pairs.len()), (want_lists, want_pairs));
    assert_eq!(
        lists.len(),
        18,
        "the 10 trees hold 18 prompts with at least two ranked replies"
    );
    let first: serde_json::Value = serde_json::from_str(&lists[0]).unwrap();
    assert_eq!(first["prompt"][0]["role"], "user");
    assert_eq!(first["ranks"], serde_json::json!([0.0, 1.0, 2.0]));
    // the converted files load as ranked lists / pairs with a chat template
    let tok = tiny_tokenizer(false).unwrap();
    let lp = write("oasst-lists.jsonl", lists[..5].join("\n").as_bytes());
    let (ex, rep) = load_tokenized_examples(&lp, &tok, &no_limits(), false).unwrap();
    assert_eq!(
        (ex.len(), rep.shape, rep.format),
        (5, Some(prefer::data::Shape::Ranked), Some(DataFormat::Conversational))
    );
    let pp = write("oasst-pairs.jsonl", pairs[..5].join("\n").as_bytes());
    let (_, rep) = load_tokenized_examples(&pp, &tok, &no_limits(), false).unwrap();
    assert_eq!(rep.shape, Some(prefer::data::Shape::Pairwise));
}

#[test]
fn reward_augmentation_makes_two_score_conditioned_pairs() {
    let p = write(
        "scored-aug.jsonl",
        concat!(
            r#"{"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_score": 8, "rejected_score": 3}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}], "chosen_score": 7, "rejected_score": 2}"#
        )
        .as_bytes(),
    );
    let lines = prefer::data::convert::reward_augment(&p).unwrap();
    assert_eq!(lines.len(), 4);
    let v: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        (v[0]["chosen"].as_str(), v[0]["goal_score"].as_f64()),
        (Some(" a"), Some(8.0))
    );
    assert_eq!(
        (
            v[1]["chosen"].as_str(),
            v[1]["rejected"].as_str(),
            v[1]["goal_score"].as_f64()
        ),
        (Some(" b"), Some(" a"), Some(3.0))
    );
    assert!(
        v[1]["prompt"].as_str().unwrap().contains("score is 3") && v[1]["prompt"].as_str().unwrap().ends_with("Q:")
    );
    assert_eq!(v[2]["prompt"][0]["role"], "system");
    assert!(v[3]["prompt"][0]["content"].as_str().unwrap().contains("score is 2"));
    assert_eq!(v[3]["chosen"][0]["content"], "y");
    let bad = write(
        "unscored-aug.jsonl",
        br#"{"prompt": "Q:", "chosen": " a", "rejected": " b"}"#,
    );
    let e = prefer::data::convert::reward_augment(&bad).unwrap_err().to_string();
    assert!(e.contains("unscored-aug.jsonl:1: field `chosen_score`"), "{e}");
}

#[test]
fn corrupt_flips_a_seeded_fraction_of_labels() {
    let lines: Vec<String> = (0..400)
        .map(|i| serde_json::json!({"prompt": "Q:", "chosen": format!(" good{i}"), "rejected": format!(" bad{i}"), "chosen_score": 9, "rejected_score": 1}).to_string())
        .collect();
    let p = write("clean.jsonl", lines.join("\n").as_bytes());
    let (out, flipped) = prefer::data::convert::corrupt_labels(&p, 0.2, 7).unwrap();
    assert_eq!(out.len(), 400);
    assert!((60..=100).contains(&flipped), "{flipped} of 400 at rate 0.2");
    assert_eq!(
        prefer::data::convert::corrupt_labels(&p, 0.2, 7).unwrap().0,
        out,
        "seeded"
    );
    assert_ne!(prefer::data::convert::corrupt_labels(&p, 0.2, 8).unwrap().0, out);
    let mut marked = 0;
    for l in &out {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let f = v["flipped"].as_bool().unwrap();
        marked += f as usize;
        assert_eq!(v["chosen"].as_str().unwrap().starts_with(" bad"), f);
        assert_eq!(v["chosen_score"].as_f64().unwrap() == 1.0, f);
    }
    assert_eq!(marked, flipped);
    assert_eq!(prefer::data::convert::corrupt_labels(&p, 0.0, 1).unwrap().1, 0);
    assert_eq!(prefer::data::convert::corrupt_labels(&p, 1.0, 1).unwrap().1, 400);
}

/// Parquet, JSON arrays and `datasets` directories (as `datasets` 5.2 wrote them) give the same
/// rows as the JSONL they were made from; a DatasetDict must be narrowed to a split; a bad row
/// in a Parquet file is named by file, row and field.
#[test]
fn datasets_files_read_like_jsonl() {
    use prefer::data::jsonl::read_records;
    let dir = prefer::testing::fixture("datasets");
    let rows = |p: &std::path::Path| -> Vec<serde_json::Map<String, serde_json::Value>> {
        read_records(p).unwrap().into_iter().map(|r| r.unwrap().obj).collect()
    };
    let want = rows(&dir.join("pairs.jsonl"));
    assert_eq!(want.len(), 8);
    assert_eq!(rows(&dir.join("pairs.parquet")), want);
    assert_eq!(rows(&dir.join("pairs-array.json")), want);
    let mut split = rows(&dir.join("pairs-dict/train"));
    split.extend(rows(&dir.join("pairs-dict/test")));
    assert_eq!(split, want);
    let e = read_records(&dir.join("pairs-dict")).unwrap_err().to_string();
    assert!(
        e.contains("dataset_train_split") && e.contains("pairs-dict/train"),
        "{e}"
    );
    // a hub download: data/<split>-*.parquet shards, read by split as DIR/<split>
    let hub = dir.join("pairs-hub");
    assert_eq!(prefer::data::tables::splits(&hub), ["test", "train"]);
    assert_eq!(prefer::data::tables::splits(&dir.join("pairs-dict")), ["train", "test"]);
    assert!(prefer::data::tables::splits(&dir.join("pairs-dict/train")).is_empty());
    let mut split = rows(&hub.join("train"));
    assert_eq!(split.len(), 6);
    split.extend(rows(&hub.join("test")));
    assert_eq!(split, want);
    let e = read_records(&hub).unwrap_err().to_string();
    assert!(e.contains("[\"test\", \"train\"]"), "{e}");
    assert!(read_records(&hub.join("validation")).is_err());
    // conversational rows keep their nested messages
    let m = rows(&dir.join("messages.parquet"));
    let jsonl = rows(&prefer::testing::fixture("trl-sft/messages.jsonl"));
    assert_eq!(m, jsonl);
    // errors name the file and the row
    let tok = prefer::testing::tiny_tokenizer(false).unwrap();
    let recs = read_records(&dir.join("messages.parquet")).unwrap();
    let r = recs[2].as_ref().unwrap();
    let e = prefer::data::examples::detect(r).unwrap_err().to_string();
    assert!(e.contains("messages.parquet:3") && e.contains("chosen"), "{e}");
    // and a preference loader reads them as it reads JSONL
    let opts = prefer::data::TokenizeOptions::default();
    let (a, _) = prefer::data::load_tokenized_examples(&dir.join("pairs.jsonl"), &tok, &opts, false).unwrap();
    let (b, _) = prefer::data::load_tokenized_examples(&dir.join("pairs.parquet"), &tok, &opts, false).unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.prompt_ids, &x.responses), (&y.prompt_ids, &y.responses));
    }
}

/// Datasets whose columns have other names: `columns = {...}` (or prompt_column /
/// chosen_column / rejected_column) reads them as prefer's fields, in any file format.
#[test]
fn renamed_columns_read_as_prefers_fields() {
    let dir = prefer::testing::scratch_dir("columns");
    let std_rows = [
        "{\"prompt\": \"2+2=\", \"chosen\": \" 4\", \"rejected\": \" 5\"}",
        "{\"prompt\": \"1+1=\", \"chosen\": \" 2\", \"rejected\": \" 3\"}",
    ];
    let other: Vec<String> = std_rows
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap();
            serde_json::json!({"question": v["prompt"], "good": v["chosen"], "bad": v["rejected"], "id": 7}).to_string()
        })
        .collect();
    std::fs::write(dir.join("std.jsonl"), std_rows.join("\n")).unwrap();
    std::fs::write(dir.join("other.jsonl"), other.join("\n")).unwrap();
    let tok = prefer::testing::tiny_tokenizer(false).unwrap();
    let cfg = prefer::config::TrainConfig::load(
        None,
        &[
            "model_name_or_path=\"m\"".into(),
            "train_file=\"t\"".into(),
            "columns={prompt = \"question\"}".into(),
            "chosen_column=\"good\"".into(),
            "rejected_column=\"bad\"".into(),
        ],
    )
    .unwrap();
    let opts = cfg.tokenize_options();
    let (a, _) =
        prefer::data::load_tokenized_examples(&dir.join("std.jsonl"), &tok, &Default::default(), false).unwrap();
    let (b, _) = prefer::data::load_tokenized_examples(&dir.join("other.jsonl"), &tok, &opts, false).unwrap();
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.prompt_ids, &x.responses), (&y.prompt_ids, &y.responses));
    }
    // without the mapping, the missing field is named
    let e = prefer::data::load_tokenized_examples(&dir.join("other.jsonl"), &tok, &Default::default(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.jsonl:1") && e.contains("chosen"), "{e}");
}
