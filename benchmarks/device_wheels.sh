#!/usr/bin/env bash
# Wheels for the lent GPU machine (no network; Python 3.12, torch 2.11+cu130, transformers 5.17,
# no pydantic / liger-kernel / bitsandbytes): downloads into .whl/ (git-ignored) what the project
# needs there and the machine lacks or has too old, so that benchmarks/gpu_checks.sh can install it
# with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
#   bash benchmarks/device_wheels.sh            # fill .whl/ (its old wheels are removed first)
#   BNB=full bash benchmarks/device_wheels.sh   # the whole bitsandbytes wheel (41 MiB)
#   BNB=none bash benchmarks/device_wheels.sh   # no bitsandbytes: QLoRA rows are skipped
#
# What and why (versions from requirements/cpu.lock unless said):
# - transformers (5.24 pinned by pyproject; the device has 5.17) and peft (the lock's);
# - pydantic, pydantic-core, annotated-types, typing-inspection (phi3v_data.schema, TrainConfig);
#   typing-extensions: pydantic 2.14 requires >= 4.16, the device's version is not known;
# - regex and tqdm: transformers 5.24 checks regex >= 2025.10.22 and tqdm >= 4.60 at import, the
#   device's versions are not known (huggingface-hub 1.33, tokenizers 0.23.2, safetensors 0.8.0,
#   accelerate 1.15, numpy, pyyaml and packaging there satisfy every Requires-Dist; typer is only
#   imported by the transformers CLI);
# - orjson and rapidfuzz: imported by phi3v_train.evaluation (test_evaluate.py holds a GPU test);
# - liger-kernel (LIGER_VERSION, not in the lock: Requires-Dist torch >= 2.1.2, triton >= 2.3.1);
# - bitsandbytes (the lock's): its wheel carries one native library per CUDA release (41 MiB in
#   all), which would take the wheels past the 50 MiB the device call can carry next to the
#   tracked files. BNB=slim (the default) repacks it with only the CUDA 13.x libraries (the
#   device's torch is cu130; bitsandbytes picks the closest same-major library) and the CPU one.
#   The repacked wheel's RECORD lists exactly the files it holds.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST="${WHEEL_DIR:-.whl}"
BNB="${BNB:-slim}"
BNB_KEEP="${BNB_KEEP:-cuda13}"  # library names kept by BNB=slim (besides the CPU one)
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
LIMIT_MIB="${LIMIT_MIB:-50}"
PY="${PYTHON:-.venv/bin/python}"
LOCK=requirements/cpu.lock

case "$BNB" in slim | full | none) ;; *) echo "BNB must be slim, full or none" >&2 && exit 2 ;; esac

# The lock's pin of a package ("name==version"), or a failure naming the package.
lock_pin() {
    local pin
    pin="$(grep -m1 -i "^$1==" "$LOCK" | sed 's/ .*//')"
    [ -n "$pin" ] || { echo "$1 is not in $LOCK" >&2 && return 1; }
    echo "$pin"
}

PINS=()
for name in transformers peft pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions regex tqdm orjson rapidfuzz; do
    PINS+=("$(lock_pin "$name")")
done
PINS+=("liger-kernel==$LIGER_VERSION")
[ "$BNB" = none ] || PINS+=("$(lock_pin bitsandbytes)")

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "downloading: ${PINS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$TMP" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

if [ "$BNB" = slim ]; then
    for wheel in "$TMP"/bitsandbytes-*.whl; do
        "$PY" - "$wheel" "$BNB_KEEP" <<'EOF'
"""Repack a bitsandbytes wheel with only the native libraries named KEEP (and the CPU one)."""
import re
import sys
import zipfile
from pathlib import Path

wheel, keep = Path(sys.argv[1]), sys.argv[2]
native = re.compile(r"libbitsandbytes_(\w+)\.so$")


def kept(name: str) -> bool:
    match = native.search(name)
    return match is None or match.group(1) == "cpu" or match.group(1).startswith(keep)


slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    names = [info.filename for info in src.infolist()]
    if not any(native.search(n) and kept(n) and "cpu" not in n for n in names):
        sys.exit(f"{wheel.name}: no native library matches {keep!r}")
    for info in src.infolist():
        if not kept(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if kept(line.split(",", 1)[0])).encode()
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
dropped = sorted(n for n in names if not kept(n))
slim.replace(wheel)
print(f"{wheel.name}: repacked without {len(dropped)} native libraries (kept {keep}* and cpu)")
EOF
    done
fi

total=$(du -cb "$TMP"/*.whl | tail -n 1 | cut -f1)
limit=$((LIMIT_MIB * 1024 * 1024))
if [ "$total" -gt "$limit" ]; then
    du -b "$TMP"/*.whl | sort -n
    echo "the wheels total $((total / 1048576)) MiB, over LIMIT_MIB=$LIMIT_MIB: .whl/ left as it was" >&2
    exit 1
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mv "$TMP"/*.whl "$DEST"/
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
echo "total: $(awk "BEGIN {printf \"%.2f\", $total / 1048576}") MiB in $DEST/"
[ "$BNB" = none ] && echo "no bitsandbytes (BNB=none): QLoRA rows will be skipped on the device"
exit 0
