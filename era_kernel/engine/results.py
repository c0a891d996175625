"""Turning a kernel's ``ExecOutcome`` into ERA's run result, and runs into a notebook."""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from ..kernel import ExecOutcome
from ..languages import Language
from ..kernel.outputs import format_duration

EXIT_TIMEOUT = 124


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_run_id() -> str:
    return f"run_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


def exit_code_and_error(outcome: ExecOutcome, language: Language, timeout: float) -> tuple[int, dict | None]:
    """ERA's exit code: 0 ok, 1 exception, n for sys.exit(n), 124 timeout."""
    error = outcome.collector.error
    if outcome.status == "timeout":
        detail = " (the interrupt did not take; the kernel was restarted)" if outcome.restarted else ""
        return EXIT_TIMEOUT, {"ename": "TimeoutError", "evalue": f"run exceeded its {timeout:g}s timeout{detail}",
                              "traceback": []}
    if outcome.status == "cut":
        return 1, {"ename": "MessageTooLarge", "evalue": outcome.cut or "the kernel's connection was cut",
                   "traceback": []}
    if outcome.status == "dead" and outcome.out_of_memory:
        return (outcome.dead_status or 137), {
            "ename": "MemoryError",
            "evalue": "the kernel ran out of memory (its memory limit) and was killed; the next run starts a fresh kernel",
            "traceback": []}
    if outcome.status == "dead":
        status = outcome.dead_status
        how = f"exit status {status}" if status is not None else "unknown exit status"
        return (status if status else 1), {
            "ename": "KernelDied",
            "evalue": f"the kernel died during the run ({how}); the next run starts a fresh kernel",
            "traceback": []}
    if outcome.status in ("error", "aborted") and error is not None:
        code = language.exit_code(error.get("ename", ""), error.get("evalue", ""))
        if code == 0:
            return 0, None
        return (1 if code is None else code), error
    if outcome.status != "ok":
        return 1, error
    return 0, None


def death_reason(outcome: ExecOutcome) -> str:
    """Why a run's kernel is gone (``KernelDied.reason``), in a few words."""
    if outcome.status == "cut":
        return "message too large"
    if outcome.status == "timeout":
        return "timeout: the interrupt did not take"
    if outcome.out_of_memory:
        return "out of memory"
    return f"exit status {outcome.dead_status}" if outcome.dead_status is not None else "died"


def death_details(outcome: ExecOutcome, timeout: float) -> dict[str, Any]:
    """``KernelDied.details`` for a run's kernel that is gone: how it ended, for the
    session log (``timeout_s`` only when the run's timeout, not a death, stopped it)."""
    details: dict[str, Any] = {"exit_status": outcome.dead_status, "out_of_memory": outcome.out_of_memory or None,
                               "cut": outcome.cut}
    if outcome.status == "timeout":
        details["timeout_s"] = timeout
    return details


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_text(error: dict[str, Any] | None) -> str:
    """What an interpreter run as a process prints on stderr when the code fails (ERA runs
    ``python3``/``node`` so, and its clients read the failure there): the traceback
    without colours, else ``ename: evalue``. Nothing for an exit (``sys.exit(n)``)."""
    if not error or error.get("ename") == "SystemExit":
        return ""
    trace = ANSI.sub("", "\n".join(error.get("traceback") or []))
    if not trace.strip():
        trace = f"{error.get('ename') or 'Error'}: {error.get('evalue') or ''}".rstrip(": ")
    return trace if trace.endswith("\n") else trace + "\n"


def run_result(outcome: ExecOutcome, *, language: Language, timeout: float, session_id: str | None,
               data: dict | None, run_id: str) -> dict[str, Any]:
    exit_code, error = exit_code_and_error(outcome, language, timeout)
    c = outcome.collector
    stderr = "".join(c.stderr)
    if outcome.status != "timeout" and c.error:  # the kernel's own error, not one the engine made up
        failure = error_text(error)
        stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + failure
    return {
        "exit_code": exit_code,
        "stdout": "".join(c.stdout),
        "stderr": stderr,
        "duration": format_duration(outcome.duration),
        "duration_ms": round(outcome.duration * 1000, 3),
        "session_id": session_id,
        "data": data,
        "outputs": c.nbformat_outputs(),
        "execution_count": c.execution_count,
        "error": error,
        "timed_out": outcome.status == "timeout",
        "truncated": c.truncated,
        "run_id": run_id,
    }


def done_event(result: dict[str, Any]) -> dict[str, Any]:
    """The last event of a run's stream."""
    return {"type": "done", **{k: result[k] for k in ("exit_code", "duration", "duration_ms", "timed_out",
                                                        "truncated")}}


def notebook_from_runs(runs: list[dict[str, Any]], language: str, session_id: str) -> dict[str, Any]:
    """The run history as an nbformat v4 notebook."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": f"era-{language}-local", "display_name": f"{language} (ERA)",
                                 "language": language}
    nb.metadata["language_info"] = {"name": language}
    nb.metadata["era"] = {"session_id": session_id}
    for run in runs:
        cell = nbformat.v4.new_code_cell(source=run.get("code") or "")
        cell.execution_count = run.get("execution_count")
        cell.outputs = [nbformat.from_dict(_clean_output(o)) for o in run.get("outputs", [])]
        cell.metadata["era"] = {"run_id": run.get("run_id"), "exit_code": run.get("exit_code"),
                                "started_at": run.get("started_at"), "duration_ms": run.get("duration_ms"),
                                "status": run.get("status", "completed"), "reason": run.get("reason")}
        nb.cells.append(cell)
    return nb


def _clean_output(output: dict[str, Any]) -> dict[str, Any]:
    if output.get("output_type") == "error":
        return {k: output[k] for k in ("output_type", "ename", "evalue", "traceback")}
    return output
