"""``run_command`` on Docker: one short-lived container from the session's image.

Configured as the session's kernel container is (``docker.py``): the session's uid, a
read-only root, no capabilities, ``no-new-privileges``, an init, memory, CPU and process
limits, the workspace at ``/workspace`` (the working directory), the session's ``/tmp``
(or a tmpfs), the read-only directories at their host paths; network ``none`` unless
``allow_network`` (then the egress network, else the host's, as for kernels); gVisor's runtime for a
session with ``"isolation": "gvisor"`` (``docker.oci_runtime``). Labelled
``era.managed`` with this process as owner, so a crashed server's leftovers are reaped
with its kernels. stdout and stderr are followed apart from the container's log.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
from docker.types import LogConfig, Mount

from ..errors import KernelFailed
from ..images.reference import validate_image_ref, validate_language
from .base import LaunchOptions
from .docker import (CONTAINER_WORKSPACE, DEFAULT_UID, LABEL_MANAGED, LABEL_OWNER, LABEL_OWNER_START, _check_readonly,
                     remove_container, shared_docker_client)
from .gvisor import oci_runtime, process_limits, runtime_error, security_options
from .owner import me

if TYPE_CHECKING:
    from .commands import EgressHook, _Capture

LABEL_COMMAND = "era.command"
TMP_SIZE = "256m"


def _network(client: Any, options: LaunchOptions) -> str:
    if not options.allow_network:
        return "none"
    try:
        client.networks.get(options.egress_network)
        return options.egress_network
    except docker.errors.NotFound:
        return "host"  # as kernels with internet access get it (see docker.py and README's Known limits)


def _spec(client: Any, options: LaunchOptions, argv: list[str], language: str) -> dict[str, Any]:
    """Blocking: the container's configuration, every value checked."""
    image = validate_image_ref(options.image or f"{options.image_prefix}/{validate_language(language)}:latest")
    uid = options.uid if options.uid is not None else (DEFAULT_UID if os.getuid() == 0 else os.getuid())
    gid = uid if os.getuid() == 0 else os.getgid()
    workspace = options.workspace.resolve()
    if not workspace.is_dir():
        raise KernelFailed(f"the workspace {workspace.name} is not a directory")
    mounts = [Mount(target=CONTAINER_WORKSPACE, source=str(workspace), type="bind", read_only=False),
              *(Mount(target=p, source=p, type="bind", read_only=True) for p in _check_readonly(list(options.readonly)))]
    if options.tmp_dir is not None:
        mounts.append(Mount(target="/tmp", source=str(options.tmp_dir), type="bind", read_only=False))
    owner = me()
    network = _network(client, options)
    runtime = oci_runtime(options, network)
    return dict(**({"runtime": runtime} if runtime else {}),
        image=image, entrypoint=argv[:1], command=argv[1:], name=f"era-cmd-{secrets.token_hex(6)}",
        hostname="era", user=f"{uid}:{gid}", working_dir=CONTAINER_WORKSPACE,
        environment={"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", **options.env},
        labels={**options.labels, LABEL_MANAGED: "1", LABEL_COMMAND: "1", LABEL_OWNER: str(owner[0]),
                LABEL_OWNER_START: str(owner[1])},
        mounts=mounts,
        tmpfs=None if options.tmp_dir is not None else {"/tmp": f"rw,nosuid,nodev,mode=1777,size={TMP_SIZE}"},
        read_only=True, network_mode=network, cap_drop=["ALL"],
        security_opt=security_options(options), init=True, mem_limit=options.memory, memswap_limit=options.memory,
        nano_cpus=int(options.cpus * 1e9), **process_limits(options),
        log_config=LogConfig(type="json-file", config={"max-size": "8m", "max-file": "1"}), detach=True)


async def run_in_container(options: LaunchOptions, argv: list[str], *, language: str, timeout: float,
                           out: "_Capture", err: "_Capture", client: Any = None,
                           egress: "EgressHook | None" = None) -> tuple[int, bool, bool]:
    """(exit code, timed out, out of memory) of ``argv`` in a fresh container."""
    from .commands import TIMEOUT_EXIT

    client = client or shared_docker_client()
    try:
        spec = await asyncio.to_thread(_spec, client, options, argv, language)
        container = await asyncio.to_thread(client.containers.create, **spec)
    except docker.errors.ImageNotFound:
        raise KernelFailed(f"image for {language} not found; build it with `era images build --language {language}`") \
            from None
    except docker.errors.APIError as exc:
        raise KernelFailed(runtime_error(oci_runtime(options, "none"), exc)
                           or f"cannot create the command's container: {exc.explanation or exc}") from None
    loop = asyncio.get_running_loop()
    try:
        try:
            await asyncio.to_thread(container.start)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if "executable file not found" in text or "no such file or directory" in text:
                return 127, False, False  # as a shell says of a missing program
            raise KernelFailed(f"cannot start the command's container: {text}") from None
        if egress is not None:  # network none: the proxy's listener goes into its namespace
            state = (await asyncio.to_thread(client.api.inspect_container, container.id))["State"]
            if not state.get("Pid"):
                raise KernelFailed("the command's container stopped before the egress proxy could be opened in it")
            await egress.attach(f"/proc/{state['Pid']}/ns/net")

        def follow(stdout: bool, capture: "_Capture") -> None:  # ends when the container exits
            for chunk in client.api.logs(container.id, stdout=stdout, stderr=not stdout, stream=True, follow=True):
                loop.call_soon_threadsafe(capture.feed, chunk)

        async def finish() -> dict:
            await asyncio.gather(asyncio.to_thread(follow, True, out), asyncio.to_thread(follow, False, err))
            return await asyncio.to_thread(client.api.wait, container.id)

        try:
            result = await asyncio.wait_for(finish(), timeout)
        except asyncio.TimeoutError:
            return TIMEOUT_EXIT, True, False
        await asyncio.sleep(0)  # the last chunks' call_soon_threadsafe callbacks run first
        code = int(result.get("StatusCode", -1))
        state = (await asyncio.to_thread(client.api.inspect_container, container.id))["State"]
        return code, False, bool(state.get("OOMKilled"))
    finally:
        # Kills whatever still runs (a timeout, a cancelled caller) and frees the name.
        await asyncio.shield(asyncio.to_thread(remove_container, client, container.id))
