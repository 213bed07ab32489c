#!/usr/bin/env python3
"""Writes the seed corpus of tests/io/fuzz: small valid files and one file per malformed
class the reader must refuse. Plain Python (no safetensors package), so the bytes are exactly
what each case says. Re-run after adding a case; files found by the fuzzer are added by hand
(as crash-<what>.st) and never regenerated."""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def st(header, data=b"", length=None, pad=True):
    text = header if isinstance(header, (bytes, str)) else json.dumps(header, separators=(",", ":"))
    if isinstance(text, str):
        text = text.encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CASES = {
    "valid-empty.st": st({}),
    "valid-metadata.st": st({"__metadata__": {"format": "pt"}}),
    "valid-one-f32.st": st({"w": t("F32", [2], 0, 8)}, struct.pack("<2f", 1.5, -2)),
    "valid-mixed.st": st({"a": t("BF16", [1, 2], 0, 4), "b": t("U8", [3], 4, 7),
                          "c": t("BOOL", [1], 7, 8), "d": t("F8_E4M3", [0], 8, 8),
                          "e": t("I64", [], 8, 16)}, bytes(range(16))),
    "valid-scalar-zero-size.st": st({"s": t("F64", [], 0, 8), "z": t("I32", [0, 1 << 40], 8, 8)},
                                    struct.pack("<d", 3.25)),
    "bad-too-short.st": b"\x05\x00\x00",
    "bad-header-longer-than-file.st": struct.pack("<Q", 1000) + b"{}",
    "bad-header-2pow63.st": struct.pack("<Q", 1 << 63) + b"{}      ",
    "bad-not-json.st": st(b"{not json"),
    "bad-json-array.st": st(b"[1,2,3]"),
    "bad-dtype.st": st({"w": t("F33", [1], 0, 4)}, bytes(4)),
    "bad-negative-shape.st": st({"w": t("F32", [-1], 0, 4)}, bytes(4)),
    "bad-float-shape.st": st({"w": t("F32", [1.5], 0, 4)}, bytes(4)),
    "bad-overflow-shape.st": st({"w": t("F32", [1 << 40, 1 << 40], 0, 4)}, bytes(4)),
    "bad-overflow-shape-with-zero.st": st({"w": t("F32", [0, 1 << 40, 1 << 40], 0, 0)}),
    # With a zero extent the byte count is 0, but strides derived from the other extents
    # would overflow int64 (UBSan: signed overflow in contiguous_strides); both orders.
    "bad-overflow-shape-zero-last.st": st({"w": t("F32", [1 << 32, 1 << 32, 0], 0, 0)}),
    "bad-offsets-outside.st": st({"w": t("F32", [1], 4, 8)}, bytes(4)),
    "bad-offsets-reversed.st": st({"w": t("F32", [0], 4, 0)}, bytes(4)),
    "bad-offsets-huge.st": st({"w": t("U8", [1], 18446744073709551615, 0)}, bytes(1)),
    "bad-overlap.st": st({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, bytes(12)),
    "bad-hole.st": st({"a": t("F32", [1], 4, 8)}, bytes(8)),
    "bad-trailing-bytes.st": st({"a": t("F32", [1], 0, 4)}, bytes(8)),
    "bad-size-mismatch.st": st({"a": t("F32", [3], 0, 8)}, bytes(8)),
    "bad-duplicate-name.st": st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
    "bad-duplicate-field.st": st(b'{"a":{"dtype":"U8","dtype":"I8","shape":[1],'
                                 b'"data_offsets":[0,1]}}', bytes(1)),
    "bad-deep-nesting.st": st(b"[" * 5000 + b"]" * 5000),
    "bad-metadata-value.st": st({"__metadata__": {"k": 1}}),
    "bad-unknown-field.st": st({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1],
                                      "extra": 0}}, bytes(1)),
    "bad-missing-field.st": st({"w": {"dtype": "U8", "shape": [1]}}, bytes(1)),
    "odd-bool-byte.st": st({"b": t("BOOL", [2], 0, 2)}, b"\x01\x07"),
    "odd-rank-7.st": st({"r": t("U8", [1, 1, 1, 1, 1, 1, 1], 0, 1)}, b"\x09"),
    "bad-shape-string.st": st(b'{"w":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}}', bytes(1)),
    "odd-unicode-name.st": st({"\u6743\u91cd.\u0000x": t("U8", [1], 0, 1)}, b"\x01"),
}

if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    for name, data in CASES.items():
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(CASES)} files to {HERE}")
