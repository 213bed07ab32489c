#!/usr/bin/env bash
# Installs the Debian packages tessera needs, only when some are missing.
#   scripts/install-deps.sh          what the library, examples and tests need
#   scripts/install-deps.sh --demo   only what the demo program needs (no LibTorch)
# The CUDA toolkit (nvcc) is not a Debian package here; when it is absent the CUDA path is
# simply not built.
set -euo pipefail

packages=(cmake ninja-build g++ ccache pkg-config
          libeigen3-dev libopenblas-dev libdnnl-dev nlohmann-json3-dev libboost-dev
          fortunes-zh)  # real text the demo trains on
if [[ "${1:-}" != "--demo" ]]; then
  packages+=(libboost-test-dev libtorch-dev
             libre2-dev libutf8proc-dev libxxhash-dev libopencc-dev  # data cleaning
             fortunes bible-kjv debian-reference-zh-cn python3-jieba  # real text the tests read
             python3-pip)
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
  for module in tokenizers safetensors; do
    if ! python3 -c "import $module" 2>/dev/null; then
      echo "tessera: pip installing $module (reference for the tests)"
      python3 -m pip install --quiet "$module" 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages "$module" ||
        echo "tessera: could not install $module; the tests that need it will report skipped"
    fi
  done
fi
