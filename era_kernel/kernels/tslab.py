"""Start tslab (JavaScript with ``--js``, TypeScript without) through ``tslab_launcher.js``.

    python -m era_kernel.kernels.tslab [--js] -f CONNECTION_FILE

A kernelspec cannot name a file inside a Python package, so this module does: it finds
the tslab package from the ``tslab`` command on PATH (npm's global bin, wherever the
prefix is), then replaces itself with ``node tslab_launcher.js`` (see that file for
what the launcher changes). No process of ours stays between Jupyter and node, so
signals and the exit status are node's own.

``NODE_OPTIONS`` gets ``--disable-wasm-trap-handler`` (for the kernel and the node
processes it starts): WebAssembly's trap handler reserves about 10 GiB of address space
per memory, more than a local kernel's cap (``ERA_KERNEL_MEMORY``, an ``RLIMIT_AS``), and
Node's ``fetch`` parses HTTP with WebAssembly (llhttp), so without it every fetch fails
with "Out of memory: Cannot allocate Wasm memory". Bounds checks instead cost little.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

LAUNCHER = Path(__file__).with_name("tslab_launcher.js")
NO_WASM_RESERVATION = "--disable-wasm-trap-handler"  # Node 20.15+ (we install 20.19+)


def tslab_package_dir() -> Path:
    command = shutil.which("tslab")
    if command is None:
        raise SystemExit("tslab is not installed (npm install -g tslab), or its bin directory is not on PATH")
    package = Path(os.path.realpath(command)).parent.parent  # <package>/bin/tslab
    if not (package / "dist" / "main.js").is_file():
        raise SystemExit(f"{command} does not belong to a tslab package (no dist/main.js beside it)")
    return package


def main(argv: list[str]) -> None:
    js = "--js" in argv
    args = [a for a in argv if a != "--js"]
    if len(args) != 2 or args[0] != "-f":
        raise SystemExit("usage: python -m era_kernel.kernels.tslab [--js] -f CONNECTION_FILE")
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise SystemExit("node is not installed, or not on PATH")
    command = [node, str(LAUNCHER), str(tslab_package_dir()), *(["--js"] if js else []), args[1]]
    options = os.environ.get("NODE_OPTIONS", "")
    if NO_WASM_RESERVATION not in options.split():
        os.environ["NODE_OPTIONS"] = f"{options} {NO_WASM_RESERVATION}".strip()
    os.execv(node, command)


if __name__ == "__main__":
    main(sys.argv[1:])
