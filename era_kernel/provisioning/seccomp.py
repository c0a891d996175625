"""A seccomp filter for sandboxed local kernels, handed to bubblewrap with ``--seccomp``.

Docker applies its default seccomp profile to containers; bubblewrap applies none. This
classic-BPF program denies (EPERM) the system calls a kernel never needs and a sandbox
escape often does: new namespaces (``unshare``, ``setns``, ``clone`` with namespace
flags; ``clone3`` answers ENOSYS so libc falls back to ``clone``), mounts, ``ptrace``
and cross-process memory access, keyrings, eBPF, perf, userfaultfd, kernel modules,
kexec, reboot, swap. Built by hand because the only other way is libseccomp's C
library, which the kernel's Python environment need not have.
"""

from __future__ import annotations

import os
import platform
import struct

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_AND_K = 0x54
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38

_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_X32_SYSCALL_BIT = 0x40000000

# name: (x86_64, aarch64)
_DENIED = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "mount_setattr": (442, 442), "unshare": (272, 97), "setns": (308, 268),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
    "syslog": (103, 116), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "fanotify_init": (300, 262), "lookup_dcookie": (212, 18),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(machine: str | None = None) -> bytes | None:
    """The BPF program for this machine's architecture, or None where we have no table."""
    arch = _ARCH.get(machine or platform.machine())
    if arch is None:
        return None
    index, audit_arch = arch
    deny = _insn(_RET_K, _RET_ERRNO | _EPERM)
    prog = [
        _insn(_LD_W_ABS, 4),                       # seccomp_data.arch
        _insn(_JEQ_K, audit_arch, 1, 0),
        deny,                                      # another ABI (i386 via int 0x80): refuse
        _insn(_LD_W_ABS, 0),                       # seccomp_data.nr
    ]
    if index == 0:
        prog += [_insn(_JGE_K, _X32_SYSCALL_BIT, 0, 1), deny]  # the x32 ABI
    for numbers in _DENIED.values():
        prog += [_insn(_JEQ_K, numbers[index], 0, 1), deny]
    prog += [
        _insn(_JEQ_K, _CLONE[index], 0, 5),
        _insn(_LD_W_ABS, 16),                      # low 32 bits of args[0]: the flags
        _insn(_AND_K, _CLONE_NAMESPACES),
        _insn(_JEQ_K, 0, 0, 1),
        _insn(_RET_K, _RET_ALLOW),
        deny,
        _insn(_LD_W_ABS, 0),
        _insn(_JEQ_K, _CLONE3[index], 0, 1),
        _insn(_RET_K, _RET_ERRNO | _ENOSYS),
        _insn(_RET_K, _RET_ALLOW),
    ]
    return b"".join(prog)


def filter_fd() -> int | None:
    """A readable fd holding the program (for ``bwrap --seccomp FD``); caller closes it."""
    program = build_filter()
    if program is None:
        return None
    fd = os.memfd_create("era-seccomp", 0)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
