"""fairseq's command lines for the tests, each in a process of its own that is
forked from a server which has already imported torch and fairseq (about 2.5 s
of every command's start on the development CPU, and the end-to-end tests
start a few hundred).

A command runs as its console script (or ``python -m MODULE``, ``python
SCRIPT.py``) does: a fresh
process with the test's arguments, environment, working folder and standard
input; its entry point (fairseq-train -> fairseq_cli.train:cli_main, or the
module or script as __main__) called with sys.argv and sys.path[0] set; the
exit code, an uncaught exception (through sys.excepthook, which the plugin
sets in a fairseq command) and the exit handlers as at the end of a Python
process. What differs: torch's and fairseq's import-time output went to the
server, not to the command. A test about that output (deprecation warnings,
import-time logging) starts its command with subprocess instead.

    run(["fairseq-train", DATA, "--arch", ...], env=..., cwd=..., input=...)
        -> subprocess.CompletedProcess with text stdout and stderr
"""
import atexit
import functools
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

COMMANDS = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("fairseq-")}


def serve() -> None:
    """The server: import torch and fairseq, then for each request line (JSON)
    fork a command and answer with its exit code."""
    requests, answers = sys.stdin, os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what importing prints stays out of the answers
    import fairseq  # noqa: F401
    import torch  # noqa: F401

    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            command(**request)
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


def command(argv, env, cwd, stdin, stdout, stderr) -> None:
    """In the forked child: become the command, run it, exit as Python would."""
    import atexit as child_atexit
    import logging
    import threading
    import warnings

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, mode in ((0, stdin, os.O_RDONLY), (1, stdout, written), (2, stderr, written)):
        target = os.open(path, mode)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    root = logging.getLogger()  # a fresh process has no logging set up: the command's basicConfig applies
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    warnings._filters_mutated()  # warnings the server showed show again
    try:
        raise SystemExit(entry_point(argv, cwd)())
    except SystemExit as stop:
        code = stop.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    child_atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 0)


def entry_point(argv, cwd):
    """sys.argv and sys.path as the command's own process has them; the function that runs it."""
    import runpy

    if argv[0] in COMMANDS:  # a console script: its folder first on the path
        scripts = Path(sys.executable).parent
        sys.argv, sys.path[0] = [str(scripts / argv[0]), *argv[1:]], str(scripts)
        module, _, function = COMMANDS[argv[0]].partition(":")
        return getattr(__import__(module, fromlist=[function]), function)
    if argv[1] == "-m":  # python -m MODULE: the working folder first
        sys.argv, sys.path[0] = [argv[2], *argv[3:]], cwd
        run = functools.partial(runpy.run_module, argv[2], run_name="__main__", alter_sys=True)
    else:  # python SCRIPT: the script's folder first
        script = Path(cwd, argv[1])
        sys.argv, sys.path[0] = argv[1:], str(script.resolve().parent)
        run = functools.partial(runpy.run_path, str(script), run_name="__main__")
    return lambda: run() and None  # the module's globals are no exit code


def forkable(cmd) -> bool:
    """A fairseq console script, `python -m MODULE` or `python SCRIPT.py` with this interpreter."""
    python = cmd[0] == sys.executable and len(cmd) > 1
    return cmd[0] in COMMANDS or (python and cmd[1] == "-m" and len(cmd) > 2) or (python and cmd[1].endswith(".py"))


class Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        atexit.register(self.proc.kill)

    def run(self, request: dict) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["returncode"]


_server = []


def run(cmd, *, env=None, cwd=None, input=None, stdin=None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, ...) for a command
    forkable() accepts, forked from the server; any other through subprocess.
    Standard input: `input`, else empty (stdin=subprocess.DEVNULL
    or None alike)."""
    assert stdin in (None, subprocess.DEVNULL), "forked.run takes standard input as `input`"
    cmd = [str(c) for c in cmd]
    if not forkable(cmd):
        return subprocess.run(cmd, env=env, cwd=cwd, input=input, stdin=stdin, capture_output=True, text=True)
    if not _server:
        _server.append(Server())
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        Path(files["stdin"]).write_text(input or "")
        code = _server[0].run({"argv": cmd, "env": dict(os.environ if env is None else env),
                               "cwd": str(cwd or os.getcwd()), **files})
        out, err = (Path(files[name]).read_text() for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(cmd, code, out, err)


if __name__ == "__main__":
    serve()
