"""A live Jupyter kernel as the engine drives it: ``SessionKernel`` (start, execute,
interrupt, stop, over a jupyter_client manager and one of ERA's provisioners), the
loop-driven channel reader, the lean wire session, and the output model. Nothing here
knows of sessions, stores or HTTP. (The language kernels ERA ships are in ``kernels/``.)
"""

from .outputs import OutputCollector, format_duration
from .session_kernel import EventSink, ExecOutcome, InputHandler, KernelState, SessionKernel

__all__ = ["EventSink", "ExecOutcome", "InputHandler", "KernelState", "OutputCollector", "SessionKernel",
           "format_duration"]
