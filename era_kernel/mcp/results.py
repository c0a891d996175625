"""Run results as MCP content a model can use: text first (exit code, stdout, stderr, the
value, the error), then images as image content, HTML as an embedded resource, JSON as
text; long output cut in the middle with a note; a timeout or an error said in words,
with what to do next.

Content items are plain dicts in MCP's wire shape, so the SDK server (which validates
them into its types) and the ``/mcp/v1`` JSON-RPC endpoint share them."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_TEXT = 20_000  # characters per stream a model gets; past it, head and tail with a note
MAX_IMAGES = 5
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # base64 length, about 3.7 MB of image
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

Content = dict[str, Any]


def text(value: str) -> Content:
    return {"type": "text", "text": value}


def cut(value: str, limit: int = MAX_TEXT, what: str = "output") -> str:
    """``value`` whole when short; else its start and end with a note of what was cut."""
    if len(value) <= limit:
        return value
    head, tail = value[: limit * 2 // 3], value[-(limit // 3):]
    dropped = len(value) - len(head) - len(tail)
    return (f"{head}\n\n[... {dropped:,} characters of {what} cut here; to see everything, write it to a file "
            f"in a session and read parts of it ...]\n\n{tail}")


def _joined(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def describe_run(result: dict[str, Any], timeout_hint: str = "") -> str:
    """The text part: ERA's layout (Exit Code / Stdout / Stderr / Duration) plus what a
    model needs to act: the error, the last expression's value, timeouts and cuts."""
    parts = [f"Exit Code: {result.get('exit_code')}"]
    if result.get("stdout"):
        parts.append("Stdout:\n" + cut(result["stdout"], what="stdout").rstrip("\n"))
    if result.get("stderr"):
        parts.append("Stderr:\n" + cut(result["stderr"], what="stderr").rstrip("\n"))
    for output in result.get("outputs") or []:
        if output.get("output_type") == "execute_result":
            value = (output.get("data") or {}).get("text/plain")
            if value is not None:
                parts.append("Result:\n" + cut(_joined(value), what="the result"))
    error = result.get("error")
    if error:
        trace = ANSI.sub("", "\n".join(error.get("traceback") or []))
        parts.append(f"Error: {error.get('ename')}: {error.get('evalue')}" + (f"\n{cut(trace, 8000, 'traceback')}"
                                                                              if trace else ""))
    if result.get("timed_out"):
        parts.append("The run hit its timeout and was interrupted; a session stays usable (its variables may be "
                     "lost if the interpreter had to restart). Pass a larger `timeout`" + timeout_hint + ".")
    if result.get("truncated"):
        parts.append("Note: the output went past the server's per-run limit and the rest was dropped; print less, "
                     "or write large output to a file and read parts of it.")
    if result.get("duration"):
        parts.append(f"Duration: {result['duration']}")
    if not result.get("stdout") and not result.get("stderr") and not error and result.get("exit_code") == 0 \
            and not any(o.get("output_type") == "execute_result" for o in result.get("outputs") or []):
        parts.append("(no output: print what you want to see)")
    return "\n\n".join(parts)


def rich_outputs(result: dict[str, Any], uri_base: str) -> list[Content]:
    """Images as image content, HTML as embedded resources, JSON and Markdown as text."""
    items: list[Content] = []
    images = 0
    for index, output in enumerate(result.get("outputs") or []):
        if output.get("output_type") not in ("display_data", "execute_result"):
            continue
        bundle = output.get("data") or {}
        image = next((mime for mime in IMAGE_TYPES if mime in bundle), None)
        if image is not None:
            data = _joined(bundle[image]).replace("\n", "")
            if images >= MAX_IMAGES:
                items.append(text(f"[image {index} not shown: at most {MAX_IMAGES} images per result]"))
            elif len(data) > MAX_IMAGE_BYTES:
                items.append(text(f"[image {index} not shown: {len(data):,} bytes of base64 is too large; save it "
                                  "to a smaller file instead]"))
            else:
                items.append({"type": "image", "data": data, "mimeType": image})
                images += 1
            continue
        if "text/html" in bundle:
            items.append({"type": "resource", "resource": {"uri": f"{uri_base}/outputs/{index}",
                                                           "mimeType": "text/html",
                                                           "text": cut(_joined(bundle["text/html"]), what="HTML")}})
        elif "application/json" in bundle:
            items.append(text("JSON output:\n" + cut(json.dumps(bundle["application/json"], indent=2), what="JSON")))
        elif "text/markdown" in bundle:
            items.append(text(cut(_joined(bundle["text/markdown"]), what="Markdown")))
        elif "image/svg+xml" in bundle:
            items.append({"type": "resource", "resource": {"uri": f"{uri_base}/outputs/{index}",
                                                           "mimeType": "image/svg+xml",
                                                           "text": cut(_joined(bundle["image/svg+xml"]), what="SVG")}})
        elif output.get("output_type") == "display_data" and "text/plain" in bundle:
            items.append(text("Display:\n" + cut(_joined(bundle["text/plain"]), what="display")))
    return items


def run_content(result: dict[str, Any], uri_base: str, timeout_hint: str = "") -> tuple[list[Content], bool]:
    """The content of a run result, and whether it is an error (a failed run is a tool
    result the model should read, flagged as an error)."""
    content = [text(describe_run(result, timeout_hint))] + rich_outputs(result, uri_base)
    return content, result.get("exit_code") not in (0, None)


def events_text(events: list[dict[str, Any]]) -> str:
    """A run's journal events as the output they carry, in order."""
    chunks = []
    for event in events:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            chunks.append(event.get("content", "") if kind == "stdout" else f"[stderr] {event.get('content', '')}")
        elif kind == "error":
            chunks.append(f"[error] {event.get('ename')}: {event.get('evalue')}\n")
        elif kind == "display":
            plain = (event.get("data") or {}).get("text/plain")
            chunks.append(f"[display] {_joined(plain) if plain is not None else 'rich output'}\n")
    return cut("".join(chunks), what="output")
