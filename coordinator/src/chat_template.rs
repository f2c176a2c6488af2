//! Renders a chat into a prompt with the model's own Jinja chat template (from the
//! worker's `Info`), the way Hugging Face `apply_chat_template` does: the template sees
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and may call
//! `raise_exception`. A model without a template gets a plain ChatML rendering.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

const FALLBACK: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Rendering failed (the template raised, or is broken).
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source` (empty = the ChatML fallback).
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, TemplateError> {
        let source = if source.trim().is_empty() {
            FALLBACK
        } else {
            source
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| {
                // `raise_exception` messages are the useful part.
                let detail = e
                    .detail()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string());
                TemplateError(detail)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> Message {
        Message {
            role: "user".into(),
            content: text.into(),
        }
    }

    #[test]
    fn renders_smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, "", "<|im_end|>").unwrap();
        let out = t.render(&[user("Hi")], true).unwrap();
        assert!(out.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert!(out.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let err = t
            .render(
                &[Message {
                    role: "assistant".into(),
                    content: "x".into(),
                }],
                true,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("first message must be user"),
            "{err}"
        );
    }

    #[test]
    fn bos_token_is_available() {
        let t =
            ChatTemplate::new("{{ bos_token }}{{ messages[0].content }}", "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[user("a")], false).unwrap(), "<s>a");
    }

    #[test]
    fn empty_template_falls_back_to_chatml() {
        let t = ChatTemplate::new("", "", "").unwrap();
        assert_eq!(
            t.render(&[user("a")], true).unwrap(),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
