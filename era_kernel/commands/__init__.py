"""Commands, background processes and terminals in a session's kernel's sandbox: the
supervisor that runs there (``supervisor.py``), the channel to it (``channel.py``), a
process's record and output ring (``process.py``) and the engine's service
(``service.py``, ``engine.commands``)."""
