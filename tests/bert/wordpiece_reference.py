#!/usr/bin/env python3
"""Reference WordPiece ids from the Hugging Face `tokenizers` library, for tests/bert.

Why: tessera's WordPieceTokenizer must give exactly the ids the model was trained with. The
C++ test writes its texts (one JSON value per line: a string, or {"a": ..., "b": ...} for a
sentence pair), runs this script on the same tokenizer.json, and compares.

  wordpiece_reference.py --tokenizer-json F --texts in.jsonl --out out.jsonl [--max-lengths 256,24]

Output, one JSON object per input line:
  {"ids": [...], "type_ids": [...], "ids_max": {"256": [...], ...}, "decoded": "..."}
ids/type_ids: encode with special tokens and no truncation; ids_max[N]: truncated to N tokens
(longest-first for pairs, the file's own strategy); decoded: decode(ids) without specials.
The truncation and padding settings stored in the file (128, fixed padding) are switched off
first, so that the test sees the tokenizer itself.
Exit code 77 when `tokenizers` cannot be imported (the test then reports skipped).
"""
import argparse
import json
import sys

try:
    from tokenizers import Tokenizer
except ImportError as e:  # pragma: no cover
    print(f"tokenizers not importable: {e}", file=sys.stderr)
    sys.exit(77)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-json", required=True)
    ap.add_argument("--texts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-lengths", default="256")
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    truncs = {}
    for n in args.max_lengths.split(","):
        t = Tokenizer.from_file(args.tokenizer_json)
        t.no_padding()
        t.enable_truncation(int(n))
        truncs[n] = t
    with open(args.texts, encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    singles = [x for x in items if isinstance(x, str)]
    pairs = [(x["a"], x["b"]) for x in items if not isinstance(x, str)]
    def run(t, batch):
        return t.encode_batch(batch) if batch else []

    enc_s, enc_p = run(tok, singles), run(tok, pairs)
    max_s = {n: run(t, singles) for n, t in truncs.items()}
    max_p = {n: run(t, pairs) for n, t in truncs.items()}
    si = pi = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for x in items:
            if isinstance(x, str):
                e, m = enc_s[si], {n: v[si].ids for n, v in max_s.items()}
                si += 1
            else:
                e, m = enc_p[pi], {n: v[pi].ids for n, v in max_p.items()}
                pi += 1
            out.write(json.dumps({"ids": e.ids, "type_ids": e.type_ids, "ids_max": m,
                                  "decoded": tok.decode(e.ids)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
