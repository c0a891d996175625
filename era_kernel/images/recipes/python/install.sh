#!/bin/sh
# Runs as root inside the parent image, with host networking and the host's CA bundle
# (PIP_CERT) for this build step only; the container is then committed as era/python.
# Lines starting with "era-progress <percent>" drive the build's progress bar.
set -eu

echo "era-progress 5 creating venv"
python3 -m venv /opt/era/venv

echo "era-progress 15 installing ipykernel"
# Pinned so that an unchanged recipe means an unchanged image.
/opt/era/venv/bin/pip install --no-cache-dir --progress-bar off "ipykernel==7.4.0"

echo "era-progress 85 compiling bytecode"
# The root filesystem is read-only at run time: compile now, not at every import.
/opt/era/venv/bin/python -m compileall -q /opt/era/venv >/dev/null || true

echo "era-progress 95 finishing"
# The kernel's working directory, mounted from the host at run time.
mkdir -p /workspace
chmod 0777 /workspace
/opt/era/venv/bin/python -c "import ipykernel, zmq; print('ipykernel', ipykernel.__version__, 'pyzmq', zmq.__version__)"
echo "era-progress 100 done"
