#!/usr/bin/env python3
"""Writes worker/tests/fixtures/smollm2_tokenizer_cases.json: the reference encodings of a
set of strings by an independent tokenizer for SmolLM2 (Hugging Face `transformers`
building the tokenizer from the GGUF's metadata), for worker/tests/serving_tokenizer.rs.

Needs: `pip install transformers gguf` (torch is not needed: we read the GGUF metadata with
the `gguf` package and hand it to transformers' own GGUF tokenizer converter, which is what
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` runs after its torch-based reader).

transformers does not know llama.cpp's `smollm` pre-tokenizer (digits split one by one
before the byte-level split); the script checks that on every case the digit split makes no
difference to transformers' result, and fails otherwise, so the fixture cannot silently
disagree with the model's real tokenizer.

Usage: deploy/make-tokenizer-fixture.py [MODEL.gguf] [OUT.json]
"""
import json
import sys
from pathlib import Path

from gguf import GGUFReader
from tokenizers import Regex, pre_tokenizers
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "worker/tests/fixtures/smollm2_tokenizer_cases.json"

CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "Crème brûlée, naïve café, São Paulo, Ærøskøbing",
    "日本語のテキストと中文文本，한국어도",
    "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, skin: 👍🏽, heart: ❤️",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b):\n\treturn a ** b  # power\n",
    "a\n\nb\n\n\n\nc\t\td\r\n e",
    "    \n\t \n",
    "12345 3.14159",
    "Call 555-0199 or +1 (800) 123-4567 before 2024-12-31.",
    "x=1000000; y=0.0001; z=1e-9",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
    "don't won't it's we'll they've I'm you'd",
    "Mixed 中文 and English, with émojis 🎉!",
    "",
    " ",
    "\n",
    "tab\tseparated\tvalues\t1\t2\t3",
    "<<not special>> <|im_start (broken) |im_end|>",
]


def main():
    reader = GGUFReader(str(MODEL))
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith(("tokenizer.", "general.architecture"))}
    tokenizer_dict = {
        short: meta[f"tokenizer.{key}"]
        for key, short in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    architecture = meta["general.architecture"]
    assert meta.get("tokenizer.ggml.pre") == "smollm", meta.get("tokenizer.ggml.pre")
    tok, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)

    # The same vocabulary with llama.cpp's `smollm` split (digits isolated first).
    smollm = tok.__class__.from_str(tok.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )

    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        other = smollm.encode(text, add_special_tokens=False).ids
        if ids != other:
            sys.exit(f"transformers and the smollm split disagree on {text!r}: {ids} vs {other}")
        cases.append(
            {
                "text": text,
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
    out = {
        "model": MODEL.name,
        "reference": "transformers GGUF tokenizer converter (convert_gguf_tokenizer), tokenizers "
        + __import__("tokenizers").__version__
        + ", transformers "
        + __import__("transformers").__version__,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One case per line: diffs of a regenerated fixture stay readable.
    lines = [json.dumps(case, ensure_ascii=False) for case in out.pop("cases")]
    head = json.dumps(out, ensure_ascii=False)[:-1]
    OUT.write_text(head + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
