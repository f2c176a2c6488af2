#!/usr/bin/env python3
"""Rewrites the `shardline <command> --help` blocks of a Markdown file (default
docs/configuration.md) from the binary, so the flags reference stays verbatim (the e2e
test `configuration_docs_show_every_flag_verbatim` checks it).

  deploy/sync-flags.py [--bin target/debug/shardline] [FILE]

A block is a `<summary><code>shardline COMMAND</code></summary>` line followed by a
```text fence; only the fence's content is replaced."""
import argparse
import os
import re
import subprocess
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "debug", "shardline"))
ap.add_argument("file", nargs="?", default=os.path.join(root, "docs", "configuration.md"))
args = ap.parse_args()
env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")}
text = open(args.file).read()
pattern = re.compile(r"(<summary><code>shardline ([a-z-]+)</code></summary>\s*\n\s*```text\n)(.*?)(\n```)", re.S)


def replace(m):
    help_text = subprocess.run([args.bin, m.group(2), "--help"], env=env, check=True,
                               capture_output=True, text=True).stdout.rstrip()
    return m.group(1) + help_text + m.group(4)


new, n = pattern.subn(replace, text)
if n == 0:
    sys.exit(f"sync-flags: no `shardline COMMAND --help` block in {args.file}")
open(args.file, "w").write(new)
print(f"sync-flags: {n} blocks in {args.file}" + (" (changed)" if new != text else " (unchanged)"))
