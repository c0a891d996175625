"""Waiting for a new kernel to answer, without jupyter_client's fixed costs.

``KernelClient.wait_for_ready`` ends with an IOPub "flush": it reads until 0.2 s pass
with no message, so every kernel start paid 0.2 s after the kernel had answered (of a
forked kernel's whole start, about 0.45 s, it was the largest part). Here the wait ends
on the one message that says IOPub has delivered all there is of the kernel_info
exchange: the ``idle`` status whose parent is the request answered.

The client's sockets also connect before the kernel has bound its (IPC) endpoints, and
ZeroMQ retries a refused connect every ``RECONNECT_IVL`` (100 ms by default): a kernel
ready in 50 ms was reached up to 100 ms later. The clients' context (``wire.kernel_context``)
starts the retries at 5 ms, backing off to the default 100 ms, so a kernel that stays
away costs no more than before.
"""

from __future__ import annotations

import asyncio
import time
from queue import Empty
from typing import Any, Callable

SHELL_WAIT = 1.0  # per kernel_info request, as jupyter_client's (a request sent again after)
# For the status after the reply; not seen means IOPub was not connected yet when the
# kernel published it, and another request is sent: waits of 10 ms, doubling up to 0.2 s
# (jupyter_client's one wait), since the subscription usually lands a few ms after the
# kernel's first reply.
IOPUB_WAITS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.2)


async def wait_for_ready(kc: Any, timeout: float) -> None:
    """Until the kernel answers ``kernel_info`` on shell and IOPub carries its status
    (IOPub is a subscription: what is published before it connects is lost, so a reply
    alone does not mean output will reach us). RuntimeError when the kernel dies first or
    ``timeout`` passes, as jupyter_client's."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        msg_id = kc.kernel_info()
        reply = await _reply(kc, msg_id, min(SHELL_WAIT, max(deadline - time.monotonic(), 0.01)))
        iopub_wait = IOPUB_WAITS[min(tries, len(IOPUB_WAITS) - 1)]
        tries += 1 if reply is not None else 0
        if reply is not None and await _idle_seen(kc, reply["parent_header"].get("msg_id", msg_id), iopub_wait):
            kc._handle_kernel_info_reply(reply)
            return
        if not await kc.is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")


async def _first(channel: Any, match: Callable[[dict[str, Any]], bool], wait: float) -> dict[str, Any] | None:
    """The first message on ``channel`` that ``match``es within ``wait`` seconds, else None."""
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await channel.get_msg(timeout=left)
        except (Empty, asyncio.TimeoutError):
            return None
        if match(msg):
            return msg
    return None


async def _reply(kc: Any, msg_id: str, wait: float) -> dict[str, Any] | None:
    """A kernel_info reply (to this request or an earlier one) within ``wait``."""
    return await _first(kc.shell_channel, lambda msg: msg["msg_type"] == "kernel_info_reply", wait)


async def _idle_seen(kc: Any, msg_id: str, wait: float) -> bool:
    return await _first(kc.iopub_channel, lambda msg: (
        msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle"
        and msg["parent_header"].get("msg_id") == msg_id), wait) is not None
