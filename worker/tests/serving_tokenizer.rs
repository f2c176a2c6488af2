//! The GGUF-built tokenizer against an independent one: the fixture
//! `fixtures/smollm2_tokenizer_cases.json` was written by `deploy/make-tokenizer-fixture.py`
//! (Hugging Face `transformers` building SmolLM2's tokenizer from the same GGUF).

use std::path::PathBuf;

use serde::Deserialize;
use shardline_worker::tokenizer::ModelTokenizer;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn smollm2() -> ModelTokenizer {
    let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run deploy/fetch-model.sh",
        path.display()
    );
    ModelTokenizer::from_gguf_file(&path).expect("tokenizer from the SmolLM2 GGUF")
}

fn fixture() -> Fixture {
    let path = root().join("worker/tests/fixtures/smollm2_tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with deploy/make-tokenizer-fixture.py",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("fixture is valid JSON")
}

#[test]
fn encode_and_decode_match_the_reference() {
    let tok = smollm2();
    let fixture = fixture();
    assert!(fixture.cases.len() >= 20);
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let ids = tok.encode(&case.text).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "encode {:?}: ours {ids:?}, reference {:?}",
                case.text, case.ids
            ));
        }
        let text = tok.decode(&case.ids, false).unwrap();
        if text != case.decoded {
            failures.push(format!(
                "decode {:?}: ours {text:?}, reference {:?}",
                case.ids, case.decoded
            ));
        }
        let text = tok.decode(&case.ids, true).unwrap();
        if text != case.decoded_skip_special {
            failures.push(format!(
                "decode(skip special) {:?}: ours {text:?}, reference {:?}",
                case.ids, case.decoded_skip_special
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decode_of_encode_is_identity() {
    let tok = smollm2();
    for case in fixture().cases {
        let ids = tok.encode(&case.text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), case.text);
    }
}

#[test]
fn smollm2_facts() {
    let tok = smollm2();
    assert_eq!(tok.tokenizer.get_vocab_size(true), 49152);
    assert!(!tok.add_bos);
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    // <|endoftext|> (0) and <|im_end|> (2) both end generation.
    assert_eq!(tok.eos_token_ids, vec![0, 2]);
    assert_eq!(
        tok.encode("12345").unwrap().len(),
        5,
        "digits are split one by one"
    );
    let template = tok
        .chat_template
        .as_deref()
        .expect("SmolLM2 ships a chat template");
    assert!(template.contains("<|im_start|>"));
    // What coordinators get in Info reloads into the same tokenizer.
    let shipped: tokenizers::Tokenizer = tok.json.parse().unwrap();
    let ids = shipped
        .encode("<|im_start|>user\nhi 42<|im_end|>", true)
        .unwrap();
    assert_eq!(
        ids.get_ids(),
        tok.encode("<|im_start|>user\nhi 42<|im_end|>").unwrap()
    );
}

#[test]
fn chat_template_renders_with_the_model_template() {
    use shardline_coordinator::chat_template::{ChatMessage, ChatTemplate};
    let tok = smollm2();
    let t = ChatTemplate::new(
        tok.chat_template.as_deref().unwrap(),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )
    .unwrap();
    let prompt = t.render(&[ChatMessage::new("user", "hi")], true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
}
