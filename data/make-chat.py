"""Build data/chat/python-docstrings.jsonl.gz (see chat/README.md) from data/code/python.jsonl.gz.

Every function (top-level or method, undecorated) of the Python corpus whose docstring's first line is a sentence
of 12 to 80 characters, and whose code without the docstring and that line together are at most 180 UTF-8 bytes
(so that a conversation in ChatML fits the byte-level demo model's 256-byte context), becomes one conversation: the user
asks with the docstring's first line, the assistant answers with the function's code (its `def` line and body,
dedented, the docstring removed). Rows keep their source file's split. Output: rows sorted by (split, path, line),
json.dumps(..., ensure_ascii=False, sort_keys=True, separators=(",", ":")), gzip level 9, mtime 0: rebuilt byte
for byte from the same corpus.

Usage: python3 data/make-chat.py [data/code/python.jsonl.gz] [data/chat/python-docstrings.jsonl.gz]
"""
import ast
import gzip
import io
import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_PAIR = 180
DOC_MIN, DOC_MAX = 12, 80


def functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def row(source_lines, node):
    doc = ast.get_docstring(node, clean=True)
    if not doc:
        return None
    first = doc.strip().split("\n")[0].strip()
    if not (DOC_MIN <= len(first) <= DOC_MAX) or not first.endswith("."):
        return None
    if node.decorator_list:
        return None
    body = node.body
    doc_node = body[0]
    lines = source_lines[node.lineno - 1:node.end_lineno]
    # Drop the docstring's lines (it is the first statement), keep the def line(s) and the rest.
    start, end = doc_node.lineno - node.lineno, doc_node.end_lineno - node.lineno
    kept = lines[:start] + lines[end + 1:]
    if len(body) == 1:  # only a docstring: nothing to answer with
        return None
    code = textwrap.dedent("".join(kept)).rstrip() + "\n"
    if len(code.encode("utf-8")) + len(first.encode("utf-8")) > MAX_PAIR or "\t" in code:
        return None
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    return first, code


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "code", "python.jsonl.gz")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "chat", "python-docstrings.jsonl.gz")
    rows = []
    for line in gzip.open(src, "rt", encoding="utf-8"):
        rec = json.loads(line)
        try:
            tree = ast.parse(rec["text"])
        except SyntaxError:
            continue
        source_lines = rec["text"].splitlines(keepends=True)
        seen = set()
        for node in functions(tree):
            r = row(source_lines, node)
            if r is None or r in seen:
                continue
            seen.add(r)
            question, code = r
            rows.append({
                "messages": [{"content": question, "role": "user"}, {"content": code, "role": "assistant"}],
                "source": f"{rec['path']}:{node.lineno}",
                "license": rec["license"],
                "split": rec["split"],
                "_key": (rec["split"], rec["path"], node.lineno),
            })
    rows.sort(key=lambda r: r["_key"])
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        for r in rows:
            del r["_key"]
            g.write((json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
        f.write(buf.getvalue())
    train = sum(r["split"] == "train" for r in rows)
    print(f"{out}: {len(rows)} conversations ({train} train, {len(rows) - train} validation), {len(buf.getvalue())} bytes",
          file=sys.stderr)


if __name__ == "__main__":
    main()
