"""Our kernelspecs and provisioner from the outside: plain jupyter_client and nbclient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from era_kernel.kernelspecs import install

from .conftest import require_docker

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def installed_specs(tmp_path, monkeypatch):
    install(prefix=str(tmp_path), names=["era-python-local", "era-python"])
    share = tmp_path / "share" / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(share))
    # Launched from a kernelspec by a Jupyter app running as root, the kernel runs as
    # nobody: its working directory must be usable by that uid.
    tmp_path.chmod(0o777)
    monkeypatch.chdir(tmp_path)
    return share


def test_kernelspec_selects_our_provisioner(installed_specs):
    spec = json.loads((installed_specs / "kernels" / "era-python-local" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "era-local"
    assert spec["argv"][0] == sys.executable
    from jupyter_client.provisioning import KernelProvisionerFactory

    assert KernelProvisionerFactory.instance()._check_availability("era-local")


async def test_plain_jupyter_client_launches_era_local(installed_specs, tmp_path):
    ksm = KernelSpecManager(kernel_dirs=[str(installed_specs / "kernels")])
    km = AsyncKernelManager(kernel_name="era-python-local", kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(tmp_path))
    assert type(km.provisioner).__name__ == "EraLocalProvisioner" and km.transport == "ipc"
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        outputs = []
        reply = await kc.execute_interactive("print(6 * 7)", output_hook=lambda m: outputs.append(m), timeout=30)
        assert reply["content"]["status"] == "ok"
        assert any(m["content"].get("text") == "42\n" for m in outputs)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


@pytest.mark.parametrize("kernel_name", ["era-python", "era-python-local"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
async def test_notebooks_execute_on_era_kernel(installed_specs, path, tmp_path, kernel_name):
    if kernel_name == "era-python":
        require_docker()
    nb = nbformat.read(path, as_version=4)
    ksm = KernelSpecManager(kernel_dirs=[str(installed_specs / "kernels")])
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=60, allow_errors=False,
                            kernel_manager_class=AsyncKernelManager, resources={"metadata": {"path": str(tmp_path)}})
    client.km = client.create_kernel_manager()
    client.km.kernel_spec_manager = ksm
    await client.async_execute()
    texts = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "blocked" in texts and "hello from the sandbox" in texts


def test_era_cli_run_exit_code_and_output(era_settings):
    env = {"PATH": "/usr/bin:/bin", "ERA_DATA_DIR": str(era_settings.data_dir),
           "ERA_RUNTIME_DIR": str(era_settings.runtime_dir), "HOME": str(era_settings.data_dir)}
    era = [sys.executable, "-m", "era_kernel.cli"]
    ok = subprocess.run(era + ["run", "--language", "python", "print('hi from era')"], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "hi from era\n"
    failed = subprocess.run(era + ["run", "import sys; print('bye'); sys.exit(4)"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 4 and failed.stdout == "bye\n"
    boom = subprocess.run(era + ["run", "1/0"], env=env, capture_output=True, text=True, timeout=60)
    assert boom.returncode == 1 and "ZeroDivisionError" in boom.stderr
    doctor = subprocess.run(era + ["doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert "sandbox" in doctor.stdout and "ipc" in doctor.stdout


def test_every_setting_is_documented_in_the_readme():
    from era_kernel.config import SETTINGS

    readme = (ROOT / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in readme]
    assert not missing, f"settings missing from the README's configuration table: {missing}"
