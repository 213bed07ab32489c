#!/usr/bin/env python3
"""Reference ids from the Hugging Face `tokenizers` library, for tessera's tokenizer tests.

Why: tessera must reproduce exactly the ids the reference library gives for the same
tokenizer files. The C++ test writes its sample texts (one JSON string per line), runs this
script, and compares ids and decoded text with its own.

  tokenizer_reference.py --texts in.jsonl --out out.jsonl (--tokenizer-json F | --gpt2 ENC BPE)

Output: one JSON object per input line: {"ids": [...], "ids_plain": [...], "decoded": "..."},
where ids_plain is the encoding with special tokens treated as ordinary text
(encode_special_tokens=True) and decoded is decode(ids).
Exit code 77 when `tokenizers` cannot be imported (the test then reports skipped).

  tokenizer_reference.py --jieba --texts runs.txt --out words.txt   (see jieba_reference)

Benchmark modes (benchmarks/tokenizer_bench.cpp runs them, so both sides time the same work):
  tokenizer_reference.py --bench-encode --texts in.jsonl --tokenizer-json F [--repeat 3]
      prints {"seconds": best encode_batch time}; set RAYON_NUM_THREADS=1 for one thread
  tokenizer_reference.py --bench-train FILE --vocab-size N --tokenizer-json F
      trains a BPE with F's pre-tokeniser on FILE's lines and prints {"seconds": ...}
"""
import time
import argparse
import json
import sys

try:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover
    IMPORT_ERROR = e


def jieba_reference(args):
    """--jieba: each input line is a run of Chinese characters; prints jieba's words
    (maximum-probability path, HMM off) space-separated, one line per run. Exit 77 without jieba."""
    try:
        import jieba
    except ImportError as e:
        print(f"jieba not importable: {e}", file=sys.stderr)
        sys.exit(77)
    jieba.setLogLevel(60)
    with open(args.texts, encoding="utf-8") as f, open(args.out, "w", encoding="utf-8") as out:
        for line in f:
            out.write(" ".join(jieba.lcut(line.rstrip("\n"), HMM=False)) + "\n")


def load(args):
    if args.tokenizer_json:
        return Tokenizer.from_file(args.tokenizer_json)
    enc, bpe = args.gpt2
    tok = Tokenizer(BPE.from_file(enc, bpe))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts")
    ap.add_argument("--out")
    ap.add_argument("--bench-encode", action="store_true")
    ap.add_argument("--bench-train")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer-json")
    ap.add_argument("--gpt2", nargs=2, metavar=("ENCODER_JSON", "VOCAB_BPE"))
    ap.add_argument("--jieba", action="store_true")
    args = ap.parse_args()
    if args.jieba:
        return jieba_reference(args)
    if IMPORT_ERROR is not None:
        print(f"tokenizers not importable: {IMPORT_ERROR}", file=sys.stderr)
        sys.exit(77)
    tok = load(args)
    if args.bench_train:
        from tokenizers.trainers import BpeTrainer
        fresh = Tokenizer(BPE())
        fresh.pre_tokenizer = tok.pre_tokenizer
        fresh.decoder = tok.decoder
        trainer = BpeTrainer(vocab_size=args.vocab_size, min_frequency=2, show_progress=False,
                             special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t0 = time.perf_counter()
        fresh.train([args.bench_train], trainer)
        print(json.dumps({"seconds": time.perf_counter() - t0,
                          "vocab": fresh.get_vocab_size()}))
        return
    with open(args.texts, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f]
    if args.bench_encode:
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            tok.encode_batch(texts, add_special_tokens=False)
            best = min(best, time.perf_counter() - t0)
        print(json.dumps({"seconds": best}))
        return
    encs = tok.encode_batch(texts, add_special_tokens=False)
    tok.encode_special_tokens = True
    plain = tok.encode_batch(texts, add_special_tokens=False)
    with open(args.out, "w", encoding="utf-8") as out:
        for e, p in zip(encs, plain):
            decoded = tok.decode(e.ids, skip_special_tokens=False)
            out.write(json.dumps({"ids": e.ids, "ids_plain": p.ids, "decoded": decoded},
                                 ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
