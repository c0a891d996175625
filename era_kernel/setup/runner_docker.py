"""Setup steps in short-lived containers from the session's image.

Each step is one container: the session's image (``<prefix>/<language>:latest``) and uid,
the same confinement as a kernel container (read-only root, tmpfs /tmp, no
capabilities, no-new-privileges, memory and process limits, an init). Its network:
``none`` with the egress proxy's listener opened in its namespace when the manager gives
an ``EgressHook`` (ERA_SETUP_NETWORK=proxy: the package registries only), else the
operator's egress network when it exists, or the host's. Mounted: the staging directory
read-write at the environment's final path, a scratch home, and the host's CA bundle
read-only at its own path. Containers carry the provisioner's ``era.managed`` and owner
labels, so a crashed server's leftovers are reaped with its kernels.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import docker
import docker.errors
from docker.types import LogConfig, Mount

from ..config import Settings
from ..images.reference import validate_image_ref, validate_language
from ..provisioning.commands import EgressHook, after_proxy  # as run_command puts a command behind the proxy
from ..provisioning.docker import IMAGE_PREFIX, LABEL_MANAGED, LABEL_OWNER, remove_container, shared_docker_client
from .logs import LineSplitter
from .runner_local import DEFAULT_MEMORY, DEFAULT_PIDS, setting
from .steps import SetupFailed, Step, StepTimeout, Toolchain

LABEL_SETUP = "era.setup"  # the environment key a setup container is building
TMP_SIZE = "1g"  # pip and npm unpack into /tmp; counts against the memory limit


@dataclass(frozen=True)
class ImageFacts:
    ref: str
    id: str
    path: str  # the image's PATH, which our environment variables would otherwise replace


class DockerRunner:
    def __init__(self, settings: Settings, client: Any = None):
        self.settings = settings
        self._client = client
        self.memory = int(setting(settings, "ERA_SETUP_MEMORY", DEFAULT_MEMORY))
        self.pids = int(setting(settings, "ERA_SETUP_PIDS", DEFAULT_PIDS))
        self.ca_bundle: str | None = None  # set by the manager: host path, mounted read-only

    @property
    def client(self) -> Any:
        return self._client if self._client is not None else shared_docker_client()

    def image_ref(self, language: str) -> str:
        validate_language(language)
        return validate_image_ref(f"{self.settings['ERA_DOCKER_IMAGE_PREFIX']}/{language}:latest")

    def inspect_image(self, language: str) -> ImageFacts:
        """Blocking: the image a session of ``language`` runs, by id (a rebuilt image is a
        different runtime, so its environments are built afresh)."""
        ref = self.image_ref(language)
        try:
            image = self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            raise SetupFailed(f"image {ref} not found; build it with `era images build --language {language}`") from None
        env = dict(item.split("=", 1) for item in (image.attrs.get("Config") or {}).get("Env") or [] if "=" in item)
        return ImageFacts(ref, image.id, env.get("PATH") or "/usr/local/bin:/usr/bin:/bin")

    @staticmethod
    def identity(facts: ImageFacts) -> str:
        return f"docker:{facts.ref}@{facts.id}"

    @staticmethod
    def toolchain(facts: ImageFacts) -> Toolchain:
        return Toolchain(python=f"{IMAGE_PREFIX}/bin/python", base_path=facts.path)

    @staticmethod
    def build_path(final: Path, staging: Path) -> Path:
        return final  # the container sees the staging directory at the final path

    def _network(self) -> str:
        name = str(setting(self.settings, "ERA_DOCKER_EGRESS_NETWORK", "era-egress"))
        try:
            self.client.networks.get(name)
            return name
        except docker.errors.NotFound:
            return "host"

    def _spec(self, step: Step, facts: ImageFacts, *, final: Path, staging: Path, home: Path, uid: int,
              env: dict[str, str], egress: EgressHook | None = None) -> dict[str, Any]:
        gid = uid if os.getuid() == 0 else os.getgid()
        mounts = [Mount(target=str(final), source=str(staging), type="bind", read_only=False),
                  Mount(target=str(home), source=str(home), type="bind", read_only=False)]
        if self.ca_bundle:
            mounts.append(Mount(target=self.ca_bundle, source=os.path.realpath(self.ca_bundle), type="bind",
                                read_only=True))
        # Behind the proxy: network none, and the step starts once the proxy's listener
        # (opened in its namespace when the container runs) answers.
        argv = after_proxy(egress.port, list(step.argv)) if egress is not None else step.argv
        return dict(
            image=facts.id, entrypoint=argv[:1], command=argv[1:],
            name=f"era-setup-{secrets.token_hex(5)}", hostname="era-setup", user=f"{uid}:{gid}",
            working_dir=str(final), environment=env,
            labels={LABEL_MANAGED: "1", LABEL_OWNER: str(os.getpid()), LABEL_SETUP: final.name},
            mounts=mounts, tmpfs={"/tmp": f"rw,nosuid,nodev,mode=1777,size={TMP_SIZE}"}, read_only=True,
            network_mode="none" if egress is not None else self._network(), cap_drop=["ALL"], security_opt=["no-new-privileges"], init=True,
            mem_limit=self.memory, memswap_limit=self.memory, pids_limit=self.pids,
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}), detach=True)

    async def run(self, step: Step, *, facts: ImageFacts, final: Path, staging: Path, home: Path, uid: int,
                  env: dict[str, str], timeout: float, on_line: Callable[[str], None],
                  egress: EgressHook | None = None) -> int:
        """Run one step in a fresh container; same contract as ``LocalRunner.run``."""
        spec = await asyncio.to_thread(self._spec, step, facts, final=final, staging=staging, home=home,
                                       uid=uid, env=env, egress=egress)
        try:
            container = await asyncio.to_thread(self.client.containers.create, **spec)
        except docker.errors.ImageNotFound:
            raise SetupFailed(f"image {facts.ref} not found; build it with `era images build`") from None
        except docker.errors.APIError as exc:
            raise SetupFailed(f"cannot create the setup container: {exc.explanation or exc}") from None
        try:
            try:
                await asyncio.to_thread(container.start)
            except docker.errors.APIError as exc:
                text = str(exc.explanation or exc)
                if "executable file not found" in text or "no such file or directory" in text:
                    raise SetupFailed(f"{step.argv[0]} is not installed in image {facts.ref}") from None
                raise SetupFailed(f"cannot start the setup container: {text}") from None
            if egress is not None:  # network none: the proxy's listener goes into its namespace
                state = (await asyncio.to_thread(self.client.api.inspect_container, container.id))["State"]
                if not state.get("Pid"):
                    raise SetupFailed("the setup container stopped before the egress proxy could be opened in it")
                await egress.attach(f"/proc/{state['Pid']}/ns/net")
            splitter = LineSplitter()
            loop = asyncio.get_running_loop()

            seen: list[str] = []  # the first lines: where an init reports a failed exec

            def feed(chunk: bytes) -> None:
                for line in splitter.feed(chunk):
                    if len(seen) < 5:
                        seen.append(line)
                    on_line(line)

            def follow() -> None:  # ends when the container exits (or is killed)
                for chunk in self.client.api.logs(container.id, stream=True, follow=True):
                    loop.call_soon_threadsafe(feed, chunk)

            try:
                await asyncio.wait_for(asyncio.to_thread(follow), timeout)
            except asyncio.TimeoutError:
                raise StepTimeout(f"{step.title} timed out after {timeout:g}s") from None
            for line in splitter.flush():
                seen.append(line)
                on_line(line)
            state = (await asyncio.to_thread(self.client.api.inspect_container, container.id))["State"]
            if state.get("OOMKilled"):
                on_line(f"(the step was killed: it went past the setup memory limit of {self.memory} bytes)")
            result = await asyncio.to_thread(self.client.api.wait, container.id)
            code = int(result.get("StatusCode", -1))
            said = "\n".join(seen)
            if code == 127 and (f"exec {step.argv[0]} failed" in said or f"exec: {step.argv[0]}: not found" in said):
                # The container's init (or, behind the proxy, its bash) could not run the tool at all.
                raise SetupFailed(f"{step.argv[0]} is not installed in image {facts.ref}; "
                                  f"{step.kind} setup needs an image that has it")
            return code
        finally:
            # Kills whatever still runs (a timeout, a cancelled setup) and frees the name.
            await asyncio.shield(asyncio.to_thread(remove_container, self.client, container.id))
