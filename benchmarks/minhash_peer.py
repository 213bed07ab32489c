#!/usr/bin/env python3
"""The peer for minhash_bench: the same near-duplicate removal with `datasketch`.

Reads documents (one JSON string per line), and for each: shingles of K code points, a MinHash
signature of P permutations, an LSH query over B bands; the document is a near duplicate when a
candidate's estimated Jaccard similarity reaches the threshold, else it is inserted. That is
what tessera's clean::NearDedup does. Prints one JSON object: seconds, docs, removed.

  minhash_peer.py DOCS.jsonl --shingle 5 --permutations 128 --bands 16 --threshold 0.8

Needs numpy, scipy (Debian: python3-numpy python3-scipy) and `pip install --no-deps datasketch`.
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("docs")
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--permutations", type=int, default=128)
    ap.add_argument("--bands", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.8)
    a = ap.parse_args()
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError as e:
        print(json.dumps({"error": f"datasketch not importable: {e}"}))
        return 0
    with open(a.docs, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    rows = a.permutations // a.bands
    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=a.permutations, params=(a.bands, rows))
    kept = {}
    removed = 0
    for i, text in enumerate(docs):
        k = a.shingle
        shingles = {text[s:s + k] for s in range(max(1, len(text) - k + 1))}
        m = MinHash(num_perm=a.permutations)
        m.update_batch([s.encode("utf-8") for s in shingles])
        best = max((m.jaccard(kept[c]) for c in lsh.query(m)), default=-1.0)
        if best >= a.threshold:
            removed += 1
            continue
        kept[i] = m
        lsh.insert(i, m)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "docs": len(docs), "removed": removed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
