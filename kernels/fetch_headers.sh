#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ headers (Debian trixie's libonnxruntime-dev, API 1.21) into
# build/apt without touching the system's apt sources, then print the include dir.
#
# Idempotent: a second run finds the headers and only prints the path.
# Honour ORT_INCLUDE_DIR when it already points at a folder holding onnxruntime_c_api.h.
# Usage: bash kernels/fetch_headers.sh   (from anywhere; paths are relative to the repo root)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
header="onnxruntime_c_api.h"

if [[ -n "${ORT_INCLUDE_DIR:-}" && -f "${ORT_INCLUDE_DIR}/${header}" ]]; then
    echo "${ORT_INCLUDE_DIR}"
    exit 0
fi

build="${here}/build/apt"
include="${build}/root/usr/include/onnxruntime"
if [[ -f "${include}/${header}" ]]; then
    echo "${include}"
    exit 0
fi

if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "fetch_headers: apt-get/dpkg not found; set ORT_INCLUDE_DIR to onnxruntime's include dir" >&2
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ ! -f "${keyring}" ]]; then
    echo "fetch_headers: ${keyring} missing (package debian-archive-keyring)" >&2
    exit 1
fi

mkdir -p "${build}/lists/partial" "${build}/archives/partial"
cd "${build}"
echo "deb [signed-by=${keyring}] http://deb.debian.org/debian trixie main" > trixie.list
opts=(-o "Dir::Etc::SourceList=${build}/trixie.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=${build}/lists" -o "Dir::Cache=${build}/cache"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update >&2
rm -f libonnxruntime-dev_*.deb
apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2
dpkg -x libonnxruntime-dev_*.deb root
if [[ ! -f "${include}/${header}" ]]; then
    echo "fetch_headers: ${header} not found after unpacking libonnxruntime-dev" >&2
    exit 1
fi
echo "${include}"
