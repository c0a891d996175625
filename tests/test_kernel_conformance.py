"""Every kernelspec we ship against the Jupyter community's kernel conformance suite.

``jupyter_kernel_test.KernelTests`` starts a kernel by name the way any Jupyter app
does (``jupyter_client.start_new_kernel``, which finds the kernelspec on JUPYTER_PATH and
its provisioner through the entry point) and checks every reply and IOPub message against
the protocol's schemas. One subclass per kernelspec: 6 languages x 2 provisioners.

The samples claim what each kernel supports, no more and no less: a kernel that answers
completion, inspection, is_complete or history requests with something real has samples
for them; one that gives the protocol's empty default (Bash and Go: ipykernel's base
Kernel) has none, and its tests skip. Each kernel's own abilities:
- Python (ipykernel): everything, pager included.
- Node and TypeScript (tslab through era_kernel/kernels/tslab_launcher.js): results,
  display data (the tslab module), completion, inspection, is_complete (complete or
  incomplete: tslab never says "invalid"), history from the kernel's own cells.
- Deno (deno jupyter behind era_kernel/kernels/ipc_bridge.py): results, display data
  (Deno.jupyter), completion, is_complete; no inspection, no history.
- Bash and Go (era_kernel/kernels): output streams and errors; Go cells are whole
  programs, so there is no last value to show.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import jupyter_kernel_test as jkt
import pytest
from jupyter_client.manager import start_new_kernel

from era_kernel.kernelspecs import install
from era_kernel.languages import LANGUAGES, PROVISIONERS

from .conftest import require_docker

GO_MAIN = 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hello, world")\n}\n'

JS_COMMON: dict[str, Any] = {
    "code_hello_world": 'console.log("hello, world")',
    "code_stderr": 'console.error("oops")',
    "code_generate_error": 'throw new Error("boom")',
    "code_display_data": [{"code": 'require("tslab").display.html("<b>hi</b>")', "mime": "text/html"},
                          {"code": 'require("tslab").display.markdown("*hi*")', "mime": "text/markdown"}],
    "completion_samples": [{"text": "Math.ab", "matches": {"abs"}}],
    "code_inspect_sample": "Math.abs",
    "complete_code_samples": ["1", "const a = 1;", "function f() {\n  return 1;\n}"],
    "incomplete_code_samples": ["function f() {", "[1, 2,", "if (true) {"],
    "code_history_pattern": "6*",
    "supported_history_operations": ("tail", "range", "search"),
}

SAMPLES: dict[str, dict[str, Any]] = {
    "python": {
        "language_name": "python",
        "file_extension": ".py",
        "code_hello_world": "print('hello, world')",
        "code_stderr": "import sys; print('oops', file=sys.stderr)",
        "code_generate_error": "raise ValueError('boom')",
        "code_execute_result": [{"code": "6*7", "result": "42"}, {"code": "'a' + 'b'", "result": "'ab'"}],
        "code_display_data": [{"code": "from IPython.display import HTML, display; display(HTML('<b>hi</b>'))",
                               "mime": "text/html"}],
        "code_page_something": "print?",
        "code_clear_output": "from IPython.display import clear_output; clear_output()",
        "completion_samples": [{"text": "zi", "matches": {"zip"}}],
        "code_inspect_sample": "zip",
        "complete_code_samples": ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"],
        "incomplete_code_samples": ["print('''hello", "def f(x):\n  x*2"],
        "invalid_code_samples": ["import = 7q"],
        "code_history_pattern": "6*",
        "supported_history_operations": ("tail", "range", "search"),
    },
    "node": {
        "language_name": "javascript",
        "file_extension": ".js",
        "code_execute_result": [{"code": "6*7", "result": "42"}, {"code": '"a" + "b"', "result": "'ab'"}],
        **JS_COMMON,
    },
    "typescript": {
        "language_name": "typescript",
        "file_extension": ".ts",
        "code_execute_result": [{"code": "6*7", "result": "42"},
                                {"code": "const six: number = 6; six * 7", "result": "42"}],
        **JS_COMMON,
    },
    "deno": {
        "language_name": "typescript",
        "file_extension": ".ts",
        "code_hello_world": 'console.log("hello, world")',
        "code_stderr": 'console.error("oops")',
        "code_generate_error": 'throw new Error("boom")',
        "code_execute_result": [{"code": "6*7", "result": "42"}],
        "code_display_data": [{"code": 'await Deno.jupyter.display({"text/html": "<b>hi</b>"}, {raw: true})',
                               "mime": "text/html"}],
        "completion_samples": [{"text": "Math.ab", "matches": {"abs"}}],
        "complete_code_samples": ["1", "const a = 1;"],
        "incomplete_code_samples": ["function f() {"],
    },
    "bash": {
        "language_name": "bash",
        "file_extension": ".sh",
        "code_hello_world": "echo 'hello, world'",
        "code_stderr": "echo oops >&2",
        "code_generate_error": "false",
    },
    "go": {
        "language_name": "go",
        "file_extension": ".go",
        "code_hello_world": GO_MAIN,
        "code_stderr": 'package main\n\nimport "os"\n\nfunc main() {\n\tos.Stderr.WriteString("oops\\n")\n}\n',
        "code_generate_error": 'package main\n\nimport "os"\n\nfunc main() {\n\tos.Exit(3)\n}\n',
    },
}


class EraKernelTests(jkt.KernelTests):
    """The suite, against one of our kernelspecs installed into a private Jupyter data
    directory (as ``era kernelspecs install --prefix`` would) and found through
    JUPYTER_PATH, started in a directory of its own."""

    __test__ = False  # only the per-kernelspec subclasses below run
    language = ""
    provisioner = ""
    REPLY_TIMEOUT = 60.0  # seconds: the suite waits for a shell reply forever by default

    def get_non_kernel_info_reply(self, timeout: float | None = None):
        # A kernel that never answers (seen once: Deno's is_complete on a loaded machine)
        # must fail its test, not hang the whole run.
        return super().get_non_kernel_info_reply(timeout=timeout or self.REPLY_TIMEOUT)

    @classmethod
    def setUpClass(cls) -> None:
        if cls.provisioner == "docker":
            require_docker()
            from era_kernel.images.build import current_image

            if current_image(cls.language) is None:
                message = f"the era/{cls.language} image is not built (era images build --language {cls.language})"
                if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
                    pytest.fail(message)
                pytest.skip(message)
        cls.prefix = tempfile.mkdtemp(prefix="era-jkt-", dir="/tmp")
        install(prefix=cls.prefix, names=[cls.kernel_name])
        cls.cwd = os.path.join(cls.prefix, "work")
        os.makedirs(cls.cwd)
        # A Jupyter app running as root starts the sandboxed kernel as nobody: the
        # working directory must be usable by that uid.
        os.chmod(cls.prefix, 0o777)
        os.chmod(cls.cwd, 0o777)
        cls.saved_path = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.path.join(cls.prefix, "share", "jupyter")
        try:
            # a Go build or tslab's compiler warming up can take seconds on a busy machine
            cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, cwd=cls.cwd, startup_timeout=120)
        except BaseException:
            cls._restore()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._restore()

    @classmethod
    def _restore(cls) -> None:
        if cls.saved_path is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = cls.saved_path
        shutil.rmtree(cls.prefix, ignore_errors=True)


for _language in LANGUAGES:
    for _provisioner in PROVISIONERS:
        _name = LANGUAGES[_language].kernelspec_name(_provisioner)
        _class = f"Test_{_name.replace('-', '_')}"
        globals()[_class] = type(_class, (EraKernelTests,), {
            "__test__": True, "__module__": __name__, "kernel_name": _name, "language": _language,
            "provisioner": _provisioner, **SAMPLES[_language],
        })
