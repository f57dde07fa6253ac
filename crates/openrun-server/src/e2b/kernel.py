# The code-interpreter kernel of openrun's E2B surface: one long-running Python process per
# context inside the sandbox (see interpreter.rs). It keeps the context's variables and runs
# code the way a Jupyter kernel does.
#
# Protocol. The server starts `python3 -c <BOOTSTRAP>` with a stdin pipe; the bootstrap reads a
# decimal length line and then this source from stdin, and runs it. From then on:
#   stdin:  one JSON object per line: {"id": str, "code": str, "env_vars": {str: str} | null}
#   stdout: one JSON object per line, each with "id" (the request's, or null), in E2B's shape:
#           {"type": "ready", "pid", "cwd", "python"}                      once, at start
#           {"type": "number_of_executions", "execution_count"}
#           {"type": "stdout" | "stderr", "text", "timestamp"}
#           {"type": "result", "is_main_result", "text"?, "html"?, ...}
#           {"type": "error", "name", "value", "traceback"}
#           {"type": "end_of_execution"}                                     last of a request
# The protocol uses private copies of the original fds 0 and 1. Fds 1 and 2 become pipes that
# threads read, so the output of subprocesses and C code is captured and streamed as well;
# fd 0 becomes /dev/null. SIGINT interrupts the running code (KeyboardInterrupt) and is
# ignored between requests.

import ast
import asyncio
import base64
import builtins
import codecs
import datetime
import importlib.abc
import inspect
import io
import json
import linecache
import math
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
import traceback
import types

_PID = os.getpid()
_PROTO_IN = os.dup(0)
_PROTO_OUT = os.dup(1)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)

_write_lock = threading.Lock()


class _State:
    current = None  # id of the request that runs now
    user = False  # whether user code runs now (SIGINT interrupts it)
    emitting = False  # whether the main thread writes a protocol line now
    deferred = False  # a SIGINT came while it did
    count = 0
    loop = None


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# Longest protocol line the kernel writes (the server drops lines over 16 MiB): bigger output is
# split, a bigger result loses its biggest formats (with an OutputTooLarge error saying so).
_MAX_LINE = 8 << 20


def _plain(value, depth=0):
    """`value` with what JSON cannot carry made plain: NaN and infinities become null, odd
    keys and objects their str(), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if depth > 64:
        return "<nested too deeply>"
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    try:
        return str(value)
    except Exception as e:
        return "<unrepresentable %s: %s>" % (type(value).__name__, e)


def _encode(message):
    try:
        text = json.dumps(message, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        text = json.dumps(_plain(message), allow_nan=False)
    return (text + "\n").encode("utf-8", "backslashreplace")


def _size(value):
    try:
        return len(_encode(value)) - 1
    except Exception:
        return 0


def _shrink(message, size):
    """Messages that carry `message` (encoded: `size` bytes, over _MAX_LINE) within the limit."""
    kind = message.get("type")
    ident = message.get("id")
    limit = _MAX_LINE // 2

    def too_large(value):
        return {"type": "error", "name": "OutputTooLarge", "id": ident, "traceback": "",
                "value": value}

    if kind in ("stdout", "stderr") and isinstance(message.get("text"), str):
        text = message["text"]
        step = max(1, limit // 12)  # a character is at most 12 bytes of JSON (a surrogate pair)
        return [dict(message, text=text[i:i + step]) for i in range(0, len(text), step)]
    if kind == "result":
        kept = dict(message)
        dropped = []
        for key in sorted(message, key=lambda k: -_size(message[k])):
            if _size(kept) <= limit:
                break
            if key in ("type", "id", "is_main_result"):
                continue
            dropped.append("%s (%d bytes)" % (key, _size(message[key])))
            del kept[key]
        text = message.get("text")
        if "text" not in kept and isinstance(text, str):
            kept["text"] = text[:1000] + "... [cut by openrun: %d characters]" % len(text)
        return [kept, too_large(
            "the result was %d bytes as JSON, over the kernel's limit of %d bytes per message: "
            "dropped %s" % (size, _MAX_LINE, ", ".join(dropped) or "nothing"))]
    if kind == "error":
        cut = dict(message)
        for key in ("value", "traceback"):
            text = cut.get(key)
            if isinstance(text, str) and len(text) > limit // 24:
                cut[key] = text[:limit // 24] + "... [cut by openrun: %d characters]" % len(text)
        if _size(cut) <= limit:
            return [cut]
    return [too_large("a %s message of %d bytes was over the kernel's limit of %d bytes per "
                      "message and was dropped" % (kind, size, _MAX_LINE))]


def _emit(message, ident=None):
    message["id"] = ident if ident is not None else _State.current
    data = _encode(message)
    if len(data) > _MAX_LINE:
        data = b"".join(_encode(part) for part in _shrink(message, len(data)))
    main = threading.current_thread() is threading.main_thread()
    if main:
        # A SIGINT now would cut the line short: it waits until the line is out.
        _State.emitting = True
    try:
        with _write_lock:
            view = memoryview(data)
            while view:
                written = os.write(_PROTO_OUT, view)
                view = view[written:]
    finally:
        if main:
            _State.emitting = False
            if _State.deferred:
                _State.deferred = False
                if _State.user:
                    raise KeyboardInterrupt


class _Capture(threading.Thread):
    """Reads one of the replaced fds (1 or 2) and emits what arrives as stdout/stderr."""

    def __init__(self, fd, name):
        super().__init__(daemon=True)
        self.name_ = name
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.read_end = read_end
        self.fd = fd
        self.pipe = os.fstat(fd).st_ino
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.cond = threading.Condition()
        self.seen = set()
        self.pending = b""

    def sync(self, token):
        """Returns once everything written to the fd before this call has been emitted."""
        marker = _SYNC_PREFIX + token.encode() + b"\0"
        view = memoryview(marker)
        try:
            if os.fstat(self.fd).st_ino != self.pipe:
                return  # the user's code put something else on the fd
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            return  # the user's code closed or replaced the fd: nothing to wait for
        with self.cond:
            self.cond.wait_for(lambda: marker in self.seen, timeout=5)
            self.seen.discard(marker)

    def _text(self, data):
        if data:
            text = self.decoder.decode(data)
            if text:
                _emit({"type": self.name_, "text": text, "timestamp": _now()})

    def run(self):
        prefix = _SYNC_PREFIX
        while True:
            try:
                chunk = os.read(self.read_end, 65536)
            except InterruptedError:
                continue
            if not chunk:
                return
            # What keeps coming within a few milliseconds goes out as one message.
            while len(chunk) < 65536:
                try:
                    ready = select.select([self.read_end], [], [], 0.005)[0]
                    more = os.read(self.read_end, 65536 - len(chunk)) if ready else b""
                except InterruptedError:
                    continue
                if not more:
                    break
                chunk += more
            data = self.pending + chunk
            self.pending = b""
            while True:
                start = data.find(prefix)
                if start < 0:
                    break
                end = data.find(b"\0", start + len(prefix))
                if end < 0:
                    break
                self._text(data[:start])
                with self.cond:
                    self.seen.add(data[start:end + 1])
                    self.cond.notify_all()
                data = data[end + 1:]
            # Hold back a possible beginning of a marker split across reads (a few bytes: a
            # marker's token is short).
            at = data.rfind(b"\0")
            if at >= 0:
                tail = data[at:]
                if prefix.startswith(tail) or (tail.startswith(prefix)
                                               and len(tail) <= len(prefix) + 64):
                    self.pending = tail
                    data = data[:at]
            self._text(data)


# Sync markers carry a random part per kernel: output cannot contain one by accident.
_SYNC_PREFIX = b"\0openrun-sync-" + secrets.token_hex(8).encode() + b"-"
_stdout_capture = _Capture(1, "stdout")
_stderr_capture = _Capture(2, "stderr")
_stdout_capture.start()
_stderr_capture.start()
sys.stdout = io.TextIOWrapper(
    io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
    line_buffering=True, write_through=False,
)
sys.stderr = io.TextIOWrapper(
    io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
    line_buffering=True,
)
sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
sys.__stdin__ = sys.stdin


def _on_sigint(signum, frame):
    if _State.user:
        if _State.emitting:
            _State.deferred = True
        else:
            raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_sigint)

# ---------------------------------------------------------------------------------------------
# Rich results, as IPython's display formatter makes them.

_MIME_METHODS = [
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
]

_E2B_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


def _method(obj, name):
    if inspect.isclass(obj):
        return None
    try:
        method = getattr(obj, name, None)
    except Exception:
        return None
    return method if callable(method) else None


def _binary(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def _bundle(obj):
    """The MIME bundle of `obj` (text/plain always present)."""
    data = {}
    method = _method(obj, "_repr_mimebundle_")
    if method is not None:
        try:
            bundle = method(include=None, exclude=None)
        except TypeError:
            bundle = method()
        except Exception:
            bundle = None
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        if isinstance(bundle, dict):
            data.update(bundle)
    for mime, name in _MIME_METHODS:
        if mime in data:
            continue
        method = _method(obj, name)
        if method is None:
            continue
        try:
            value = method()
        except Exception:
            continue
        if isinstance(value, tuple):
            value = value[0]
        if value is not None:
            data[mime] = value
    if _is_figure(obj) and "image/png" not in data:
        png = _figure_png(obj)
        if png is not None:
            data["image/png"] = png
    if "text/plain" not in data:
        try:
            data["text/plain"] = repr(obj)
        except Exception as e:
            data["text/plain"] = "<unrepresentable %s: %s>" % (type(obj).__name__, e)
    return data


def _result(data, main):
    message = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in data.items():
        if mime in ("image/png", "image/jpeg", "application/pdf"):
            value = _binary(value)
        field = _E2B_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            message[field] = value
    text = message.get("text")
    # As E2B's server does: a string's repr loses its quotes.
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
        message["text"] = text[1:-1]
    if extra:
        message["extra"] = extra
    return message


def display(*objs, raw=False, **kwargs):
    """Shows each object as an extra result of the running code (like IPython's display)."""
    for obj in objs:
        data = obj if raw and isinstance(obj, dict) else _bundle(obj)
        _sync_streams()
        _emit(_result(data, False))


builtins.display = display

# ---------------------------------------------------------------------------------------------
# matplotlib: figures are shown inline as PNG results (Agg backend; show() and the end of each
# execution display the open figures and close them). IPython.display.display is ours.

os.environ.setdefault("MPLBACKEND", "Agg")


def _is_figure(obj):
    figure = sys.modules.get("matplotlib.figure")
    return figure is not None and isinstance(obj, figure.Figure)


def _figure_png(figure):
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", bbox_inches="tight")
    except Exception as e:
        print("cannot render the figure: %s" % e, file=sys.stderr)
        return None
    return buffer.getvalue()


def _close_figure(figure):
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)


def _show_figures(*args, **kwargs):
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        display(pyplot.figure(number))
    pyplot.close("all")


def _patch(module):
    if module.__name__ == "matplotlib.pyplot":
        module.show = _show_figures
    elif module.__name__ in ("IPython.display", "IPython.core.display_functions"):
        module.display = display


class _PostImport(importlib.abc.MetaPathFinder):
    names = ("matplotlib.pyplot", "IPython.display", "IPython.core.display_functions")

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is None:
                continue
            loader = spec.loader
            original = getattr(loader, "exec_module", None)
            if original is None:
                return spec

            class _Loader(importlib.abc.Loader):
                def create_module(self, spec):
                    return loader.create_module(spec)

                def exec_module(self, module):
                    original(module)
                    _patch(module)

            spec.loader = _Loader()
            return spec
        return None


sys.meta_path.insert(0, _PostImport())

# ---------------------------------------------------------------------------------------------
# Running code.

_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = builtins
_namespace = _main.__dict__
sys.modules["__main__"] = _main
_KERNEL_FILE = "<openrun-kernel>"


def _flush_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _sync_streams():
    _flush_streams()
    token = "%d-%d" % (os.getpid(), _State.count)
    _stdout_capture.sync(token)
    _stderr_capture.sync(token)


def _silenced(code):
    """Whether the code ends in a semicolon (IPython then shows no result)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except Exception:
        return False
    skip = (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER,
            tokenize.INDENT, tokenize.DEDENT)
    for token in reversed(tokens):
        if token.type in skip:
            continue
        return token.type == tokenize.OP and token.string == ";"
    return False


def _run(code_object):
    if code_object.co_flags & inspect.CO_COROUTINE:
        if _State.loop is None:
            _State.loop = asyncio.new_event_loop()
        return _State.loop.run_until_complete(eval(code_object, _namespace))
    return eval(code_object, _namespace)


def _error_message(etype, value, tb):
    # Drop the kernel's own frames: the traceback shows the user's code only.
    report = traceback.TracebackException(etype, value, tb)
    for part in [report, report.__cause__, report.__context__]:
        if part is not None:
            kept = [f for f in part.stack if f.filename != _KERNEL_FILE]
            part.stack = traceback.StackSummary.from_list(kept)
    if issubclass(etype, (SyntaxError, UsageError)):
        # Where the code is wrong, not where the kernel was (as IPython shows them).
        lines = list(report.format_exception_only())
    else:
        lines = list(report.format())
    return {
        "type": "error",
        "name": etype.__name__,
        "value": str(value),
        "traceback": "".join(lines),
    }


# IPython syntax that models write out of habit: shell escapes and a few magics, translated to
# calls of _magic when the code does not parse as Python as it stands.

_SHELL_LINE = re.compile(r"^(\s*)!(.*)$")
_MAGIC_LINE = re.compile(r"^(\s*)%([A-Za-z_]\w*)(.*)$")


class UsageError(Exception):
    """A magic that this kernel does not have (IPython's name for it)."""


def _translate_magics(code):
    lines = code.split("\n")
    first = lines[0].strip()
    if first in ("%%bash", "%%sh"):
        return "_magic(%r, %r)\n" % (first[2:], "\n".join(lines[1:]))
    if first.startswith("%%"):
        return "_magic(%r, '')\n" % ("%" + (first[2:].split() or [""])[0])
    out = []
    for line in lines:
        shell = _SHELL_LINE.match(line)
        magic = _MAGIC_LINE.match(line)
        if shell:
            out.append("%s_magic('!', %r)" % (shell.group(1), shell.group(2)))
        elif magic:
            out.append("%s_magic(%r, %r)" % (magic.group(1), magic.group(2), magic.group(3).strip()))
        else:
            out.append(line)
    return "\n".join(out)


def _expand(text):
    """IPython's `{expression}` expansion in shell lines (what does not evaluate stays)."""
    def value(match):
        try:
            return str(eval(match.group(1), _namespace))
        except Exception:
            return match.group(0)
    return re.sub(r"(?<!\$)\{([^{}]+)\}", value, text)


def _magic(name, argument):
    """Runs `!command`, `%pip`, `%cd`, `%env` and `%%bash` / `%%sh` cells as IPython does."""
    _flush_streams()
    if name == "!":
        status = subprocess.call(_expand(argument), shell=True)
        _namespace["_exit_code"] = status
        return None
    if name in ("bash", "sh"):
        subprocess.call([name, "-c", argument])
        return None
    if name == "pip":
        subprocess.call([sys.executable, "-m", "pip"] + shlex.split(_expand(argument)))
        print("Note: you may need to restart the kernel to use updated packages.")
        return None
    if name == "cd":
        os.chdir(os.path.expanduser(_expand(argument) or "~"))
        print(os.getcwd())
        return None
    if name == "env":
        if not argument:
            return dict(os.environ)
        key, sep, value = argument.replace("=", " ", 1).partition(" ")
        if not sep:
            return os.environ.get(key)
        os.environ[key] = _expand(value.strip())
        print("env: %s=%s" % (key, os.environ[key]))
        return None
    kind = "Cell" if name.startswith("%") else "Line"
    raise UsageError("%s magic function `%%%s` not found (openrun's kernel has !command, "
                     "%%pip, %%cd, %%env, %%%%bash and %%%%sh)." % (kind, name))


builtins._magic = _magic


def _execute(request):
    _State.count += 1
    _State.deferred = False
    count = _State.count
    _emit({"type": "number_of_executions", "execution_count": count})
    code = request.get("code") or ""
    env_vars = request.get("env_vars") or {}
    saved = {key: os.environ.get(key) for key in env_vars}
    filename = "Cell In[%d]" % count
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
    try:
        for key, value in env_vars.items():
            os.environ[str(key)] = str(value)
        try:
            tree = ast.parse(code, filename=filename, mode="exec")
        except SyntaxError:
            # Perhaps IPython syntax (`!pip install x`, `%cd dir`): parse it as its translation,
            # or else fail on the code as it was written.
            magic = _translate_magics(code)
            if magic == code:
                raise
            try:
                tree = ast.parse(magic, filename=filename, mode="exec")
            except SyntaxError:
                ast.parse(code, filename=filename, mode="exec")
                raise
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not _silenced(code):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        tail = compile(last, filename, "eval", flags=flags, dont_inherit=True) if last else None
        # Formatting the result runs the user's code too (__repr__, _repr_*_, savefig): SIGINT
        # interrupts it as well.
        _State.user = True
        try:
            _run(body)
            value = _run(tail) if tail is not None else None
            if os.getpid() != _PID:
                os._exit(0)  # a child of os.fork() in the code: only the kernel answers
            if value is not None:
                _namespace["_"] = value
                data = _bundle(value)
                if _is_figure(value):
                    # Shown once, as the result.
                    _close_figure(value)
                _show_figures()
                _sync_streams()
                _emit(_result(data, True))
            else:
                _show_figures()
        finally:
            _State.user = False
            if os.getpid() != _PID:
                os._exit(0)
    except BaseException:
        _State.user = False
        etype, value, tb = sys.exc_info()
        _State.user = True
        try:
            _show_figures()
        except BaseException:
            pass
        finally:
            _State.user = False
        _sync_streams()
        _emit(_error_message(etype, value, tb))
    finally:
        _State.user = False
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _sync_streams()


# ---------------------------------------------------------------------------------------------
# bash contexts: one persistent bash (same process group as the kernel) runs every execution
# with `source`, so variables, functions and the working directory persist. Its output goes to
# the captured fds 1 and 2; the exit status of each execution comes back on a private pipe.
# SIGINT: the kernel passes it to its process group; bash's trap returns from the `source`.

# The cell's first line: SIGINT returns from the cell's `source`. Outside a cell, a no-op
# handler (bash survives, the commands it runs get SIGINT's default action).
_BASH_CELL_TRAP = "trap 'return 130 2>/dev/null' INT\n"
_BASH_IDLE_TRAP = "trap : INT"


_BASH_DIR_PREFIX = "openrun-bash-%d-" % _PID
_BASH_DIR_NAME = re.compile(r"^openrun-bash-(\d+)-")


def _clean_stale_bash_dirs():
    """Removes the cell directories of bash kernels that are gone (killed kernels leave them)."""
    try:
        root = tempfile.gettempdir()
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = _BASH_DIR_NAME.match(name)
        if match is None or int(match.group(1)) == _PID:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its kernel still runs
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(root, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


class _Bash:
    def __init__(self):
        self.process = None
        _clean_stale_bash_dirs()
        self.directory = tempfile.mkdtemp(prefix=_BASH_DIR_PREFIX)
        self.start()

    def cell_directory(self):
        """The directory of the cell files, made again when something removed it."""
        if not os.path.isdir(self.directory):
            try:
                self.directory = tempfile.mkdtemp(prefix=_BASH_DIR_PREFIX)
            except OSError:
                tempfile.tempdir = None  # the one it chose went away: choose again
                self.directory = tempfile.mkdtemp(prefix=_BASH_DIR_PREFIX)
        return self.directory

    def start(self):
        status_r, status_w = os.pipe()
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, pass_fds=(status_w,),
        )
        os.close(status_w)
        self.status_fd = status_r
        self.pending = b""
        self.fd = status_w
        self.send(_BASH_IDLE_TRAP + "\n")

    def send(self, text):
        """Writes to bash's stdin (OSError: bash is gone)."""
        self.process.stdin.write(text.encode("utf-8", "surrogateescape"))
        self.process.stdin.flush()

    def read_status(self, count, timeout):
        """The exit status of execution `count`: an int, None after `timeout` seconds (None:
        no limit), "exited" when bash is gone. Status lines of other executions are skipped.
        Bash's exit is seen even while a child it left holds the status pipe open."""
        deadline = None if timeout is None else time.monotonic() + timeout
        gone = False
        while True:
            while b"\n" in self.pending:
                line, _, self.pending = self.pending.partition(b"\n")
                number, _, status = line.decode("ascii", "replace").partition(" ")
                if number == str(count):
                    try:
                        return int(status)
                    except ValueError:
                        return 1
            if gone:
                return "exited"
            if self.process.poll() is not None:
                # Gone: what it wrote before it went is still read (a last status line).
                gone = True
                while select.select([self.status_fd], [], [], 0)[0]:
                    chunk = os.read(self.status_fd, 4096)
                    if not chunk:
                        break
                    self.pending += chunk
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = 0.2 if left is None else min(left, 0.2)
            if not select.select([self.status_fd], [], [], wait)[0]:
                if left is not None and left <= 0.2:
                    return None
                continue
            chunk = os.read(self.status_fd, 4096)
            if not chunk:
                return "exited"
            self.pending += chunk

    def run(self, code, env_vars, count):
        """Runs `code`; answers its exit status, "exited" when bash itself exited."""
        if self.process.poll() is not None:
            status = self.process.returncode
            self.restart()
            _emit({"type": "stderr", "timestamp": _now(),
                   "text": "[openrun] bash had exited (status %s) since the last execution: this "
                           "execution runs in a fresh bash; its variables are lost\n" % status})
        directory = self.cell_directory()
        cell = os.path.join(directory, "cell-%d.sh" % count)
        wrapper = os.path.join(directory, "run-%d.sh" % count)
        with open(cell, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(_BASH_CELL_TRAP + code + "\n")
        script = []
        for index, (key, value) in enumerate(env_vars.items()):
            script.append("__openrun_set_%d=${%s+x}; __openrun_old_%d=${%s-}; export %s=%s"
                          % (index, key, index, key, key, shlex.quote(str(value))))
        script.append("source %s </dev/null; __openrun_rc=$?; %s"
                      % (shlex.quote(cell), _BASH_IDLE_TRAP))
        for index, key in enumerate(env_vars):
            script.append('if [ -n "$__openrun_set_%d" ]; then export %s="$__openrun_old_%d"; '
                          "else unset %s; fi; unset __openrun_set_%d __openrun_old_%d"
                          % (index, key, index, key, index, index))
        script.append("printf '%d %%s\\n' \"$__openrun_rc\" >&%d" % (count, self.fd))
        with open(wrapper, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("\n".join(script) + "\n")
        try:
            # The wrapper comes from a file: bash drops the rest of its input line on SIGINT.
            try:
                self.send("source %s\n" % shlex.quote(wrapper))
            except OSError:
                return "exited"
            try:
                return self.read_status(count, None)
            except KeyboardInterrupt:
                return self.interrupted(count)
        finally:
            for path in (cell, wrapper):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def interrupted(self, count):
        """SIGINT came: pass it to bash and what it runs, then wait for the cell to end."""
        _State.user = False  # the kernel ignores SIGINT from here on
        if self.process.poll() is not None:
            return "exited"
        os.killpg(os.getpgrp(), signal.SIGINT)
        status = self.read_status(count, 2.0)
        if status is None:
            # A SIGINT that came between the cell's end and the idle trap skipped the status.
            try:
                self.send("%s; printf '%d 130\\n' >&%d\n" % (_BASH_IDLE_TRAP, count, self.fd))
            except OSError:
                return "exited"
            status = self.read_status(count, 2.0)
        if status is None:
            self.restart()
            return "restarted"
        return status

    def restart(self):
        try:
            self.process.kill()
            self.process.wait()
        except Exception:
            pass
        try:
            self.process.stdin.close()
        except Exception:
            pass
        try:
            os.close(self.status_fd)
        except OSError:
            pass
        self.start()


def _execute_bash(request):
    _State.count += 1
    _State.deferred = False
    count = _State.count
    _emit({"type": "number_of_executions", "execution_count": count})
    env_vars = request.get("env_vars") or {}
    bad = [key for key in env_vars if not _IDENTIFIER.match(str(key))]
    if bad:
        _emit({"type": "error", "name": "ValueError", "traceback": "",
               "value": "not a shell variable name: %s" % ", ".join(map(repr, bad))})
        return
    _State.user = True
    try:
        status = _BASH.run(request.get("code") or "", env_vars, count)
    except KeyboardInterrupt:
        status = _BASH.interrupted(count)
    finally:
        _State.user = False
    _sync_streams()
    if status == "exited":
        code = _BASH.process.wait()
        _BASH.restart()
        _emit({"type": "error", "name": "ShellExited", "traceback": "",
               "value": "bash exited (status %s): its variables are lost; the next execution "
                        "runs in a fresh bash" % code})
    elif status == "restarted":
        _emit({"type": "error", "name": "KeyboardInterrupt", "traceback": "",
               "value": "bash did not stop on SIGINT and was restarted: its variables are lost"})
    elif status == 130:
        _emit({"type": "error", "name": "KeyboardInterrupt", "value": "", "traceback": ""})
    elif status != 0:
        _emit({"type": "error", "name": "ExitCode", "value": str(status), "traceback":
               "the last command exited with status %d\n" % status})


def _serve():
    requests = os.fdopen(_PROTO_IN, "rb", buffering=0)
    reader = io.BufferedReader(requests)
    _emit({"type": "ready", "pid": os.getpid(), "cwd": os.getcwd(), "python": sys.version}, "")
    while True:
        try:
            line = reader.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return
        try:
            request = json.loads(line)
            ident = str(request["id"])
        except Exception as e:
            _emit({"type": "error", "name": "ProtocolError", "value": str(e), "traceback": ""}, "")
            continue
        _State.current = ident
        try:
            (_execute_bash if _LANGUAGE == "bash" else _execute)(request)
        except KeyboardInterrupt:
            pass
        except Exception as e:
            # A failure of the kernel itself: the execution ends with it, the kernel goes on.
            _State.user = False
            try:
                _emit({"type": "error", "name": "KernelError", "traceback": traceback.format_exc(),
                       "value": "the kernel failed: %s: %s" % (type(e).__name__, e)})
            except Exception:
                pass
        finally:
            try:
                _emit({"type": "end_of_execution"}, ident)
            finally:
                _State.current = None


_LANGUAGE = os.environ.pop("OPENRUN_KERNEL_LANGUAGE", "python")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BASH = _Bash() if _LANGUAGE == "bash" else None
_serve()
