#!/usr/bin/env python3
"""Writes the GGUF seed corpus of tests/io/fuzz/gguf_corpus: small valid files (every value
type, every dequantisable tensor format, a tiny Llama model with its byte-level tokenizer) and
one file per malformed class the reader must refuse. Plain Python (struct), so the bytes are
exactly what each case says. Files the fuzzer finds are added by hand (crash-<what>.gguf)."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_corpus")


def s(x):
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key, v): return kv(key, 4, struct.pack("<I", v))
def f32(key, v): return kv(key, 6, struct.pack("<f", v))
def st(key, v): return kv(key, 8, s(v))
def arr(key, etype, items): return kv(key, 9, struct.pack("<IQ", etype, len(items)) + b"".join(items))


def tinfo(name, extents, ttype, offset):
    return s(name) + struct.pack("<I", len(extents)) + b"".join(struct.pack("<Q", e) for e in extents) + \
        struct.pack("<IQ", ttype, offset)


def gguf(kvs, tensors, data=b"", n_kv=None, n_t=None, version=3, align=32):
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_t is None else n_t,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += b"\0" * ((-len(body)) % align)
    return body + data


def byte_aliases():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def tiny_llama():
    toks = byte_aliases() + ["ab", "<|im_start|>"]
    types = [1] * 257 + [3]
    C, F, V = 4, 8, len(toks)
    shapes = [("token_embd.weight", [C, V]), ("output_norm.weight", [C])]
    for n, e in [("attn_norm", [C]), ("attn_q", [C, C]), ("attn_k", [C, 2]), ("attn_v", [C, 2]),
                 ("attn_output", [C, C]), ("ffn_norm", [C]), ("ffn_gate", [C, F]),
                 ("ffn_up", [C, F]), ("ffn_down", [F, C])]:
        shapes.append((f"blk.0.{n}.weight", e))
    infos, data = [], b""
    for name, e in shapes:
        n = 1
        for x in e:
            n *= x
        infos.append(tinfo(name, e, 0, len(data)))
        chunk = struct.pack(f"<{n}f", *[((i * 7) % 5 - 2) * 0.25 for i in range(n)])
        data += chunk + b"\0" * ((-len(chunk)) % 32)
    kvs = [st("general.architecture", "llama"), u32("llama.block_count", 1),
           u32("llama.embedding_length", C), u32("llama.attention.head_count", 2),
           u32("llama.attention.head_count_kv", 1), u32("llama.feed_forward_length", F),
           f32("llama.attention.layer_norm_rms_epsilon", 1e-5), st("tokenizer.ggml.model", "gpt2"),
           st("tokenizer.ggml.pre", "smollm"),
           arr("tokenizer.ggml.tokens", 8, [s(t) for t in toks]),
           arr("tokenizer.ggml.token_type", 5, [struct.pack("<i", t) for t in types]),
           arr("tokenizer.ggml.merges", 8, [s("a b")]), u32("tokenizer.ggml.bos_token_id", 257)]
    return gguf(kvs, infos, data)


def block_q4_1():
    return struct.pack("<ee", 0.5, -1.0) + bytes(range(16))


CASES = {
    "valid-empty.gguf": gguf([], []),
    "valid-all-value-types.gguf": gguf([
        kv("u8", 0, b"\x07"), kv("i8", 1, b"\xff"), kv("u16", 2, b"\x01\x02"), kv("i16", 3, b"\xff\xff"),
        u32("u32", 5), kv("i32", 5, struct.pack("<i", -5)), f32("f32", 1.5), kv("b", 7, b"\x01"),
        st("s", "x\u00e9"), kv("u64", 10, struct.pack("<Q", 1 << 60)), kv("i64", 11, struct.pack("<q", -1)),
        kv("f64", 12, struct.pack("<d", 2.5)), arr("a", 4, [struct.pack("<I", 1), struct.pack("<I", 2)]),
        arr("as", 8, [s("p"), s("")]), arr("ab", 7, [b"\x00", b"\x01"])], []),
    "valid-formats.gguf": gguf([u32("general.alignment", 64)], [
        tinfo("f32", [3], 0, 0), tinfo("f16", [2, 2], 1, 64), tinfo("bf16", [2], 30, 128),
        tinfo("q4_0", [32], 2, 192), tinfo("q4_1", [32], 3, 256), tinfo("q8_0", [32], 8, 320),
        tinfo("q4_k", [256], 12, 384), tinfo("empty", [0, 5], 0, 576)],
        (struct.pack("<3f", 1, 2, 3).ljust(64, b"\0") + struct.pack("<4e", 1, -2, 0.5, 3).ljust(64, b"\0") +
         b"\x80\x3f\x00\xc0".ljust(64, b"\0") + (struct.pack("<e", 0.25) + bytes(range(16))).ljust(64, b"\0") +
         block_q4_1().ljust(64, b"\0") + (struct.pack("<e", 0.1) + bytes(range(32))).ljust(64, b"\0") +
         (struct.pack("<ee", 0.01, 0.02) + bytes(range(12)) + bytes(range(128))).ljust(192, b"\0")),
        align=64),
    "valid-tiny-llama.gguf": tiny_llama(),
    "bad-magic.gguf": b"GGUX" + bytes(20),
    "bad-version.gguf": gguf([], [], version=1),
    "bad-big-endian.gguf": gguf([], [], version=0x03000000),
    "bad-array-elem-type.gguf": gguf([kv("a", 9, struct.pack("<IQ", 13, 1) + b"\0")], []),
    "bad-nested-array.gguf": gguf([kv("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))], []),
    "bad-bool-byte.gguf": gguf([kv("b", 7, b"\x02")], []),
    "bad-huge-string.gguf": gguf([kv("s", 8, struct.pack("<Q", 1 << 63))], []),
    "bad-huge-array.gguf": gguf([kv("a", 9, struct.pack("<IQ", 8, 1 << 62))], []),
    "bad-huge-kv-count.gguf": gguf([], [], n_kv=1 << 40),
    "bad-huge-tensor-count.gguf": gguf([], [], n_t=1 << 40),
    "bad-extent-overflow.gguf": gguf([], [tinfo("t", [1 << 32, 1 << 32, 4], 0, 0)], bytes(32)),
    "bad-bytes-overflow.gguf": gguf([], [tinfo("t", [1 << 62], 0, 0)], bytes(32)),
    "bad-offset-wrap.gguf": gguf([], [tinfo("t", [8], 0, 0xFFFFFFFFFFFFFFE0)], bytes(32)),
    "bad-misaligned.gguf": gguf([], [tinfo("t", [8], 0, 16)], bytes(64)),
    "bad-alignment-24.gguf": gguf([u32("general.alignment", 24)], [tinfo("t", [8], 0, 0)], bytes(48), align=24),
    "bad-overlap.gguf": gguf([], [tinfo("a", [16], 0, 0), tinfo("b", [8], 0, 32)], bytes(64)),
    "bad-block-size.gguf": gguf([], [tinfo("t", [33], 2, 0)], bytes(64)),
    "bad-n-dims.gguf": gguf([], [tinfo("t", [1, 1, 1, 1, 1], 0, 0)], bytes(32)),
    "bad-duplicate-key.gguf": gguf([u32("a", 1), u32("a", 2)], []),
}

if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    for name, data in CASES.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(CASES)} files to {HERE}")
