#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp for Python), the optional extra that runs an exported
# GGUF file in the tests. It compiles llama.cpp: about 20 minutes on two CPU cores.
# Needs a C/C++ compiler and CMake (Debian/Ubuntu: apt-get install build-essential cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cc c++ cmake; do
    if ! command -v "$tool" >/dev/null; then
        echo "install_llama_cpp.sh: $tool is missing; install a C/C++ compiler and CMake first" >&2
        exit 1
    fi
done
# Build for the CPU that runs it; quiet unless it fails.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" python -m pip install --disable-pip-version-check \
    -r requirements-llama.txt
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'is installed')"
