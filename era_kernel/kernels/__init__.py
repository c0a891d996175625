"""Kernels and kernel launchers for the languages that have no IPC-ready Jupyter kernel.

Every module here runs *inside* the sandbox or the container, started from a
kernelspec argv as ``python -m era_kernel.kernels.<module>``. So each one depends only on
the standard library, pyzmq and ipykernel (never on the rest of ``era_kernel``, the
engine), and the language images carry copies of them at the same import path
(``era_kernel/images/recipes/<language>/`` links to the files here).

- ``go_kernel``: runs each cell as a ``package main`` program (``go build``, then the binary).
- ``bash_kernel``: one long-lived bash per kernel, stdout and stderr kept apart.
- ``tslab``: starts tslab (JavaScript and TypeScript) through ``tslab_launcher.js``.
- ``ipc_bridge``: puts a TCP-only kernel (Deno's) behind the IPC sockets ERA's provisioners use.
"""
