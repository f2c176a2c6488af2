//! The chat template is shared with the worker: [`shardline_proto::chat_template`]
//! renders the model's Jinja template (from the worker's `Info`) the way Hugging Face's
//! `apply_chat_template` does, with ChatML for models that ship none.

pub use shardline_proto::chat_template::{
    ChatMessage as Message, ChatTemplate, ChatTemplateError as TemplateError,
};
