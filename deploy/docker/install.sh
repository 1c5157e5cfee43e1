#!/bin/sh
# The one install recipe of the harken images (Dockerfile.cpu, Dockerfile.cuda run it in their builder
# stage; tests/test_deploy_install.py runs it here in a fresh venv, so the recipe is exercised without Docker).
#
#   sh deploy/docker/install.sh VENV_DIR SRC_DIR [cpu|cuda]
#
# Creates VENV_DIR with PYTHON (default python3), installs torch (HARKEN_TORCH_SPEC, default per flavor,
# from HARKEN_TORCH_INDEX when set), the pinned runtime requirements (requirements.txt plus
# requirements-<flavor>.txt: onnxruntime or onnxruntime-gpu) and harken from SRC_DIR (not editable),
# then checks that the result imports and that `harken serve --help` runs.
set -eu

usage() { echo "usage: install.sh VENV_DIR SRC_DIR [cpu|cuda]" >&2; exit 2; }
[ $# -ge 2 ] || usage
venv=$1
src=$2
flavor=${3:-cpu}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

case "$flavor" in
  cpu) default_torch="torch==2.13.0+cpu" ;;
  cuda) default_torch="torch==2.13.0" ;;
  *) echo "install.sh: flavor must be cpu or cuda, not '$flavor'" >&2; exit 2 ;;
esac
[ -f "$src/pyproject.toml" ] || { echo "install.sh: $src has no pyproject.toml (expected the harken source tree)" >&2; exit 2; }
torch_spec=${HARKEN_TORCH_SPEC:-$default_torch}

"$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check --no-input "$@"; }
pip install "pip==26.3"

# torch first and alone: the CPU build comes from the PyTorch CPU index (HARKEN_TORCH_INDEX), the CUDA
# build from PyPI (it brings its own nvidia-* CUDA libraries).
if [ -n "${HARKEN_TORCH_INDEX:-}" ]; then
  pip install --extra-index-url "$HARKEN_TORCH_INDEX" "$torch_spec"
else
  pip install "$torch_spec"
fi

pip install -r "$here/requirements.txt" -r "$here/requirements-$flavor.txt" "$src"

# smoke check: the recipe is only done when the package imports and the CLI answers
"$venv/bin/python" -c "import harken, onnxruntime, torch; print('harken', harken.__version__ if hasattr(harken, '__version__') else '?', 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
"$venv/bin/harken" serve --help > /dev/null
echo "install.sh: $flavor install in $venv is complete"
