"""Our kernelspecs (``era-<language>[-local]/kernel.json`` beside this file, shipped as
package data) for the engine and for Jupyter.

The engine reads them straight from the package through ``EraKernelSpecManager``, so
neither a checkout nor a wheel needs an install step; ``era kernelspecs install`` copies them
where JupyterLab's kernel picker looks. In both cases an argv that starts with bare
``python`` is pinned to the interpreter running ERA, whose environment has ipykernel,
and the Python kernels get ERA's ipykernel tuning and fixes (``languages.PYTHON_KERNEL_TUNING``
and ``PYTHON_KERNEL_FIXES``).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

from ..languages import PYTHON_KERNEL_FIXES, PYTHON_KERNEL_TUNING

KERNELSPECS_DIR = Path(__file__).resolve().parent


def _pin_python(spec: dict) -> dict:
    """Local kernels only: a container's argv names the interpreter as the image sees it."""
    provisioner = spec.get("metadata", {}).get("kernel_provisioner", {}).get("provisioner_name")
    argv = list(spec.get("argv", []))
    if provisioner in (None, "era-local", "local-provisioner") and argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    if spec.get("language") == "python" and "ipykernel_launcher" in argv:
        argv += [flag for flag in (*PYTHON_KERNEL_TUNING, *PYTHON_KERNEL_FIXES) if flag not in argv]  # languages.py
    return dict(spec, argv=argv)


@functools.lru_cache(maxsize=1)
def available() -> tuple[str, ...]:
    """The kernelspecs shipped in the package (read once: package data)."""
    if not KERNELSPECS_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in KERNELSPECS_DIR.iterdir() if (p / "kernel.json").is_file()))


@functools.lru_cache(maxsize=None)
def read_spec(kernel_name: str) -> dict:
    """A kernelspec's kernel.json, argv pinned. Package data does not change while the
    process runs, so each is read once (jupyter_client asks on every kernel start, on the
    event loop). Raises ``NoSuchKernel``."""
    if kernel_name not in available():
        raise NoSuchKernel(kernel_name)
    return _pin_python(json.loads((KERNELSPECS_DIR / kernel_name / "kernel.json").read_text()))


class EraKernelSpecManager(KernelSpecManager):
    """Serves only ERA's kernelspecs, from the package, with argv pinned."""

    def find_kernel_specs(self) -> dict[str, str]:
        return {name: str(KERNELSPECS_DIR / name) for name in available()}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = read_spec(kernel_name)
        return KernelSpec(resource_dir=str(KERNELSPECS_DIR / kernel_name), **json.loads(json.dumps(spec)))


def install(user: bool = False, prefix: str | None = None, names: list[str] | None = None) -> list[str]:
    """Install ERA's kernelspecs for Jupyter; returns the installed paths."""
    ksm = KernelSpecManager()
    installed = []
    for name in names or available():
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / name
            shutil.copytree(KERNELSPECS_DIR / name, staged)
            spec = _pin_python(json.loads((staged / "kernel.json").read_text()))
            (staged / "kernel.json").write_text(json.dumps(spec, indent=2))
            installed.append(ksm.install_kernel_spec(str(staged), kernel_name=name, user=user, prefix=prefix))
    return installed
