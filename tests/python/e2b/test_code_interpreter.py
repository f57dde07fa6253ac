"""The official e2b-code-interpreter SDK against a live `openrun serve`: run_code with contexts
whose variables persist, streamed stdout/stderr, results (text, rich formats, display), errors,
env vars, contexts (create, list, restart, remove), client timeouts that interrupt the kernel.

Run: scripts/python-tests e2b -- -k code_interpreter
"""

import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest
from e2b import InvalidArgumentException, NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox
from e2b_code_interpreter.models import Context


@pytest.fixture(scope="module")
def sandbox(server_url):
    """One sandbox of the SDK's default template (code-interpreter-v1) for the module."""
    sbx = Sandbox.create()
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture()
def context(sandbox):
    """A fresh context of its own, removed afterwards."""
    ctx = sandbox.create_code_context()
    try:
        yield ctx
    finally:
        try:
            sandbox.remove_code_context(ctx)
        except NotFoundException:
            pass


def test_code_interpreter_variables_persist_across_calls(sandbox):
    sandbox.run_code("counter = 41")
    execution = sandbox.run_code("counter += 1\ncounter")
    assert execution.error is None
    assert execution.text == "42"
    assert sandbox.run_code("counter * 2").text == "84"


def test_code_interpreter_text_of_the_last_expression(sandbox):
    assert sandbox.run_code("1 + 1").text == "2"
    # As E2B's server does, a string result loses its quotes.
    assert sandbox.run_code("'hel' + 'lo'").text == "hello"
    # No result when the last statement is not an expression, or ends with a semicolon.
    execution = sandbox.run_code("y = 3")
    assert execution.text is None and execution.results == []
    assert sandbox.run_code("y;").results == []
    main = [r for r in sandbox.run_code("[1, 2]").results if r.is_main_result]
    assert len(main) == 1 and main[0].text == "[1, 2]"


def test_code_interpreter_logs_and_streaming_callbacks(sandbox):
    seen = []

    def on_stdout(message):
        seen.append(("out", message.line, time.monotonic(), message.timestamp))

    def on_stderr(message):
        seen.append(("err", message.line, time.monotonic(), message.timestamp))

    code = (
        "import sys, time\n"
        "print('first', flush=True)\n"
        "print('oops', file=sys.stderr, flush=True)\n"
        "time.sleep(1.5)\n"
        "print('second')\n"
    )
    execution = sandbox.run_code(code, on_stdout=on_stdout, on_stderr=on_stderr)
    assert execution.error is None
    assert "".join(execution.logs.stdout) == "first\nsecond\n"
    assert execution.logs.stderr == ["oops\n"]
    outs = [s for s in seen if s[0] == "out"]
    assert [o[1] for o in outs] == ["first\n", "second\n"]
    assert [s[1] for s in seen if s[0] == "err"] == ["oops\n"]
    # Streamed as produced: the first line arrived well before the second was printed.
    assert outs[1][2] - outs[0][2] >= 1.0
    assert all(s[3] for s in seen), "every output line has a timestamp"


def test_code_interpreter_output_of_subprocesses_is_captured(sandbox):
    execution = sandbox.run_code(
        "import os, subprocess\n"
        "os.system('echo from-shell; echo to-stderr >&2')\n"
        "subprocess.run(['printf', 'from-child'])\n"
        "None\n"
    )
    assert execution.error is None
    stdout = "".join(execution.logs.stdout)
    assert "from-shell\n" in stdout and "from-child" in stdout
    assert "to-stderr\n" in "".join(execution.logs.stderr)


def test_code_interpreter_rich_results_and_display(sandbox):
    code = (
        "class Card:\n"
        "    def _repr_html_(self):\n"
        "        return '<b>card</b>'\n"
        "    def _repr_markdown_(self):\n"
        "        return '**card**'\n"
        "    def __repr__(self):\n"
        "        return 'Card()'\n"
        "class Shown:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'image/svg+xml': '<svg/>', 'application/x-custom': 'c'}\n"
        "display(Shown())\n"
        "Card()\n"
    )
    results = []
    execution = sandbox.run_code(code, on_result=results.append)
    assert execution.error is None
    assert len(execution.results) == 2 and len(results) == 2
    shown, card = execution.results
    assert not shown.is_main_result
    assert shown.svg == "<svg/>"
    assert shown.extra == {"application/x-custom": "c"}
    assert card.is_main_result
    assert card.html == "<b>card</b>"
    assert card.markdown == "**card**"
    assert card.text == "Card()"
    assert execution.text == "Card()"
    assert set(card.formats()) >= {"text", "html", "markdown"}


def test_code_interpreter_error_then_context_still_works(sandbox):
    errors = []
    sandbox.run_code("kept = 'still here'")
    execution = sandbox.run_code("print('before')\n1 / 0", on_error=errors.append)
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "ZeroDivisionError" in execution.error.traceback
    assert "1 / 0" in execution.error.traceback
    assert errors and errors[0].name == "ZeroDivisionError"
    assert execution.logs.stdout == ["before\n"]
    assert execution.results == []

    syntax = sandbox.run_code("def broken(:")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"

    after = sandbox.run_code("kept")
    assert after.error is None and after.text == "still here"


def test_code_interpreter_executions_are_in_the_timeline(sandbox, context, server_url, api_key):
    sandbox.run_code("timeline_marker = 'seen'", context=context, envs={"SECRET_NAME": "hidden"})
    events = httpx.get(
        f"{server_url}/v1/sandboxes/{sandbox.sandbox_id}/events",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    ).json()
    runs = [e for e in events if e["kind"] == "code.execute"]
    mine = [e for e in runs if e["payload"]["code"] == "timeline_marker = 'seen'"]
    assert len(mine) == 1
    payload = mine[0]["payload"]
    assert payload["context_id"] == context.id and payload["language"] == "python"
    # Names of env vars only, never their values.
    assert payload["env"] == ["SECRET_NAME"] and "hidden" not in str(payload)


def test_code_interpreter_execution_count_increases(sandbox, context):
    first = sandbox.run_code("1", context=context)
    second = sandbox.run_code("2", context=context)
    assert first.execution_count >= 1
    assert second.execution_count == first.execution_count + 1


def test_code_interpreter_separate_contexts_do_not_share_variables(sandbox, context):
    other = sandbox.create_code_context()
    try:
        sandbox.run_code("secret = 'mine'", context=context)
        leaked = sandbox.run_code("secret", context=other)
        assert leaked.error is not None and leaked.error.name == "NameError"
        assert sandbox.run_code("secret", context=context).text == "mine"
        # The default context does not see it either.
        default = sandbox.run_code("secret")
        assert default.error is not None and default.error.name == "NameError"
    finally:
        sandbox.remove_code_context(other)


def test_code_interpreter_context_lifecycle(sandbox):
    created = sandbox.create_code_context(cwd="/tmp", language="python")
    assert created.language == "python"
    assert created.cwd == "/tmp"
    assert len(created.id) == 32
    assert sandbox.run_code("import os; os.getcwd()", context=created).text == "/tmp"

    listed = {c.id: c for c in sandbox.list_code_contexts()}
    assert created.id in listed
    assert listed[created.id].cwd == "/tmp"
    assert listed[created.id].language == "python"

    sandbox.run_code("before_restart = 1", context=created)
    sandbox.restart_code_context(created)
    gone = sandbox.run_code("before_restart", context=created)
    assert gone.error is not None and gone.error.name == "NameError"
    # Same id, same working directory, usable.
    assert sandbox.run_code("import os; os.getcwd()", context=created).text == "/tmp"

    sandbox.remove_code_context(created.id)
    assert created.id not in {c.id for c in sandbox.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=created)
    with pytest.raises(NotFoundException):
        sandbox.remove_code_context(created)
    with pytest.raises(NotFoundException):
        sandbox.restart_code_context(created)


def test_code_interpreter_context_in_a_missing_directory_is_refused(sandbox):
    with pytest.raises(SandboxException) as caught:
        sandbox.create_code_context(cwd="/no/such/dir")
    assert not isinstance(caught.value, NotFoundException)
    assert "400" in str(caught.value) and "/no/such/dir" in str(caught.value)


def test_code_interpreter_unknown_context_is_not_found(sandbox):
    for context_id in ["0" * 32, "not-a-context", "../../etc"]:
        unknown = Context(context_id=context_id, language="python", cwd="/")
        with pytest.raises(NotFoundException) as caught:
            sandbox.run_code("1", context=unknown)
        assert "not found" in str(caught.value)


def test_code_interpreter_unsupported_language_is_refused(sandbox):
    with pytest.raises(SandboxException) as caught:
        sandbox.run_code("1", language="r")
    assert "400" in str(caught.value) and "python and bash" in str(caught.value)
    with pytest.raises(SandboxException):
        sandbox.create_code_context(language="java")
    with pytest.raises(InvalidArgumentException):
        sandbox.run_code("1", language="python", context=Context("x", "python", "/"))
    # Python by name is the default context.
    sandbox.run_code("by_name = 7", language="python")
    assert sandbox.run_code("by_name").text == "7"


def test_code_interpreter_bash_contexts_keep_their_shell(sandbox):
    first = sandbox.run_code("COUNT=3; cd /tmp; twice() { echo \"$1$1\"; }", language="bash")
    assert first.error is None
    execution = sandbox.run_code("twice ab; pwd; echo $COUNT; echo oops >&2", language="bash")
    assert execution.error is None
    assert "".join(execution.logs.stdout) == "abab\n/tmp\n3\n"
    assert execution.logs.stderr == ["oops\n"]
    failed = sandbox.run_code("ls /no/such/path", language="bash")
    assert failed.error is not None and failed.error.name == "ExitCode"
    assert failed.error.value == "2"
    assert "/no/such/path" in "".join(failed.logs.stderr)
    env = sandbox.run_code("echo $ONLY_NOW", language="bash", envs={"ONLY_NOW": "x y"})
    assert env.logs.stdout == ["x y\n"]
    assert sandbox.run_code("echo ${ONLY_NOW-unset}", language="bash").logs.stdout == ["unset\n"]

    ctx = sandbox.create_code_context(language="bash", cwd="/")
    try:
        assert ctx.language == "bash"
        assert {c.id: c.language for c in sandbox.list_code_contexts()}[ctx.id] == "bash"
        # Its own shell: the default bash context's variables are not there.
        assert sandbox.run_code("echo ${COUNT-none}; pwd", context=ctx).logs.stdout == ["none\n/\n"]
        sandbox.run_code("KEPT=yes", context=ctx)
        with pytest.raises(TimeoutException):
            sandbox.run_code("while true; do sleep 0.2; done", context=ctx, timeout=2)
        after = sandbox.run_code("echo $KEPT", context=ctx, timeout=30)
        assert after.error is None and after.logs.stdout == ["yes\n"]
        gone = sandbox.run_code("exit 4", context=ctx)
        assert gone.error is not None and gone.error.name == "ShellExited"
        assert sandbox.run_code("echo ${KEPT-fresh}", context=ctx).logs.stdout == ["fresh\n"]
    finally:
        sandbox.remove_code_context(ctx)


def test_code_interpreter_ipython_shell_escapes_and_magics(sandbox, context):
    execution = sandbox.run_code("n = 2\n!echo shell {n * 21}\n!exit 3\n_exit_code", context=context)
    assert execution.error is None
    assert execution.logs.stdout == ["shell 42\n"]
    assert execution.text == "3"
    assert sandbox.run_code("%cd /tmp", context=context).logs.stdout == ["/tmp\n"]
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == "/tmp"
    sandbox.run_code("%env MAGIC_VAR=on", context=context)
    assert sandbox.run_code("os.environ['MAGIC_VAR']", context=context).text == "on"
    shell = sandbox.run_code("%%bash\nX=cell; echo \"$X\"", context=context)
    assert shell.logs.stdout == ["cell\n"]
    unknown = sandbox.run_code("%timeit 1", context=context)
    assert unknown.error is not None and unknown.error.name == "UsageError"
    assert "%timeit" in unknown.error.value
    # Python that is wrong stays a SyntaxError about the code as written.
    broken = sandbox.run_code("x = (1,\n!echo no", context=context)
    assert broken.error is not None and broken.error.name == "SyntaxError"
    assert "never closed" in broken.error.value


def test_code_interpreter_env_vars_apply_to_one_run(sandbox):
    execution = sandbox.run_code(
        "import os, subprocess\n"
        "print(subprocess.run(['sh', '-c', 'echo $GREETING'], capture_output=True, text=True).stdout, end='')\n"
        "os.environ['GREETING']",
        envs={"GREETING": "hello"},
    )
    assert execution.error is None
    assert execution.text == "hello"
    assert execution.logs.stdout == ["hello\n"]
    after = sandbox.run_code("import os; repr(os.environ.get('GREETING'))")
    assert after.text == "None"


def test_code_interpreter_client_timeout_interrupts_the_kernel(sandbox, context):
    sandbox.run_code("survivor = 5", context=context)
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code("while True:\n    pass", context=context, timeout=2)
    assert time.monotonic() - started < 10
    # The loop was interrupted: the next execution runs at once, with the variables intact.
    started = time.monotonic()
    after = sandbox.run_code("survivor", context=context, timeout=30)
    assert after.error is None and after.text == "5"
    assert time.monotonic() - started < 15


def test_code_interpreter_dead_kernel_restarts(sandbox, context):
    sandbox.run_code("lost = 1", context=context)
    died = sandbox.run_code("import os; os._exit(3)", context=context)
    assert died.error is not None
    assert died.error.name == "KernelDied"
    assert "exit code 3" in died.error.value
    fresh = sandbox.run_code("lost", context=context)
    assert fresh.error is not None and fresh.error.name == "NameError"
    assert sandbox.run_code("2 + 2", context=context).text == "4"


def test_code_interpreter_executions_of_one_context_run_in_order(sandbox, context):
    out = {}
    started = threading.Event()

    def run(name, code, **kwargs):
        out[name] = sandbox.run_code(code, context=context, **kwargs)

    first = threading.Thread(
        target=run,
        args=("a", "import time\nprint('started', flush=True)\ntime.sleep(1)\norder = ['a']"),
        kwargs={"on_stdout": lambda _: started.set()},
    )
    first.start()
    # The first execution runs (its output arrived) before the second is sent.
    assert started.wait(30)
    second = threading.Thread(target=run, args=("b", "order.append('b'); order"))
    second.start()
    first.join(30)
    second.join(30)
    assert out["a"].error is None
    assert out["b"].error is None and out["b"].text == "['a', 'b']"


# The kernel's globals (its protocol fds, the running request's id) from the user's code: code
# in a context can reach everything of its kernel (same process).
_KERNEL_GLOBALS = "import sys, os\nkernel = sys._getframe().f_back.f_globals\n"


def test_code_interpreter_huge_output_and_results(sandbox, context):
    # Output is streamed in pieces, whatever its size.
    big = sandbox.run_code("print('y' * 20_000_000)", context=context, timeout=120)
    assert big.error is None
    assert len("".join(big.logs.stdout)) == 20_000_001
    # A result too large for one message: a clear error, the start of its text, and the
    # context goes on.
    huge = sandbox.run_code("'x' * 30_000_000", context=context, timeout=120)
    assert huge.error is not None and huge.error.name == "OutputTooLarge", huge.error
    assert "30000" in huge.error.value and "limit" in huge.error.value
    assert huge.text.startswith("xxxx") and "cut by openrun" in huge.text
    assert sandbox.run_code("2 + 2", context=context).text == "4"


def test_code_interpreter_output_without_newline_on_the_protocol_pipe(sandbox, context):
    """Code that writes 20 MiB without a newline to the kernel's protocol pipe: the server drops
    that line (it does not buffer it without limit) and tells the client; the rest of the
    execution arrives."""
    execution = sandbox.run_code(
        _KERNEL_GLOBALS
        + "os.write(kernel['_PROTO_OUT'], b'z' * (20 << 20) + b'\\n')\nprint('after')\n",
        context=context,
        timeout=120,
    )
    assert execution.error is None
    assert execution.logs.stdout == ["after\n"]
    stderr = "".join(execution.logs.stderr)
    assert "line of 20971520 bytes was dropped" in stderr, stderr
    assert sandbox.run_code("3 * 3", context=context).text == "9"


def test_code_interpreter_forged_end_of_execution_only_cuts_its_own_stream(sandbox, context):
    """Code in a context can forge its kernel's output (same process): a fake end of execution
    ends its own stream early. It cannot reach into the next execution's output."""
    forged = sandbox.run_code(
        _KERNEL_GLOBALS
        + "import json, time\n"
        "line = json.dumps({'id': kernel['_State'].current, 'type': 'end_of_execution'})\n"
        "os.write(kernel['_PROTO_OUT'], line.encode() + b'\\n')\n"
        "time.sleep(1)\n"
        "print('late')\n"
        "forger = 1\n",
        context=context,
    )
    assert forged.error is None and forged.logs.stdout == []
    after = sandbox.run_code("print('own'); forger + 1", context=context)
    assert after.error is None
    assert after.logs.stdout == ["own\n"] and after.text == "2"


def test_code_interpreter_kernel_dying_just_after_an_execution(sandbox, context):
    """A kernel that exits right after an execution: the next execution runs (in a fresh kernel
    when needed) or reports KernelDied; never a 4xx about a closed stdin."""
    for delay in [0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15]:
        sandbox.run_code(
            "import os, threading\nthreading.Timer(%r, os._exit, (0,)).start()" % delay,
            context=context,
        )
        after = sandbox.run_code("1 + 1", context=context, timeout=60)
        if after.error is not None:
            assert after.error.name == "KernelDied", after.error
        else:
            assert after.text == "2"
    final = sandbox.run_code("2 + 3", context=context)
    if final.error is not None:
        # The last timer may fire during this execution on a loaded machine: then this one
        # reports KernelDied and the next runs in a fresh kernel, which has no timer.
        assert final.error.name == "KernelDied", final.error
        final = sandbox.run_code("2 + 3", context=context)
    assert final.text == "5"


def test_code_interpreter_removal_and_restart_while_an_execution_waits(sandbox):
    for action in ["remove", "restart"]:
        ctx = sandbox.create_code_context()
        try:
            sandbox.run_code("before = 1", context=ctx)
            out = {}
            started = threading.Event()

            def first():
                out["first"] = sandbox.run_code(
                    "import time\nprint('started', flush=True)\ntime.sleep(5)",
                    context=ctx, on_stdout=lambda _: started.set(), timeout=60,
                )

            def second():
                try:
                    out["second"] = sandbox.run_code("'before' in globals()", context=ctx, timeout=60)
                except Exception as e:
                    out["second"] = e

            one = threading.Thread(target=first)
            one.start()
            assert started.wait(30)
            two = threading.Thread(target=second)
            two.start()
            time.sleep(0.5)  # the second request reaches the server and waits for the first
            if action == "remove":
                sandbox.remove_code_context(ctx)
            else:
                sandbox.restart_code_context(ctx)
            one.join(60)
            two.join(60)
            if action == "remove":
                assert out["first"].error.name == "ContextRemoved", out["first"].error
                assert isinstance(out["second"], NotFoundException), out["second"]
            else:
                assert out["first"].error.name == "ContextRestarted", out["first"].error
                # Ran in the fresh kernel, after the restart.
                assert out["second"].error is None and out["second"].text == "False"
        finally:
            try:
                sandbox.remove_code_context(ctx)
            except NotFoundException:
                pass


def test_code_interpreter_interrupting_a_slow_repr(sandbox, context):
    """The result's formatting is the user's code too: a client timeout interrupts it like the
    code itself (no kill after 10 s, the variables stay)."""
    sandbox.run_code(
        "kept = 'yes'\nclass Slow:\n    def __repr__(self):\n        while True:\n            pass\n",
        context=context,
    )
    with pytest.raises(TimeoutException):
        sandbox.run_code("Slow()", context=context, timeout=2)
    started = time.monotonic()
    after = sandbox.run_code("kept", context=context, timeout=30)
    assert after.error is None and after.text == "yes"
    assert time.monotonic() - started < 6


def test_code_interpreter_bash_shell_exit_with_a_background_job(sandbox):
    """bash exits while a job it started keeps its pipes open: the exit is seen at once."""
    ctx = sandbox.create_code_context(language="bash")
    try:
        started = time.monotonic()
        gone = sandbox.run_code("sleep 1000 & exit 1", context=ctx, timeout=30)
        assert gone.error is not None and gone.error.name == "ShellExited"
        assert time.monotonic() - started < 10
        assert sandbox.run_code("echo fine", context=ctx).logs.stdout == ["fine\n"]
        # The cells' temp directory removed under it: the next cells still run.
        sandbox.run_code("KEEP=1; rm -rf /tmp/openrun-bash-*", context=ctx)
        again = sandbox.run_code("echo $KEEP", context=ctx)
        assert again.error is None and again.logs.stdout == ["1\n"]
    finally:
        sandbox.remove_code_context(ctx)


def test_code_interpreter_code_too_large_is_a_413_naming_it(sandbox, context):
    with pytest.raises(SandboxException) as caught:
        sandbox.run_code("x = '" + "a" * (5 << 20) + "'", context=context)
    assert "413" in str(caught.value) and "code to run is too large" in str(caught.value)
    assert sandbox.run_code("5 + 5", context=context).text == "10"


async def test_code_interpreter_async_sandbox(server_url):
    sbx = await AsyncSandbox.create()
    try:
        lines = []
        await sbx.run_code("value = 20")
        execution = await sbx.run_code("print('async'); value + 1", on_stdout=lines.append)
        assert execution.text == "21"
        assert [m.line for m in lines] == ["async\n"]
        ctx = await sbx.create_code_context()
        assert ctx.id in {c.id for c in await sbx.list_code_contexts()}
        await sbx.remove_code_context(ctx)
    finally:
        await sbx.kill()


def test_code_interpreter_contexts_outlive_a_server_restart(private_servers):
    """Contexts live in the sandbox's process table, not in the server: a restarted server
    (sandboxes outlive it) finds them, their kernels and variables again."""
    server = private_servers.start()
    opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
    sbx = Sandbox.create(**opts)
    try:
        ctx = sbx.create_code_context(cwd="/tmp")
        sbx.run_code("kept = 'across restarts'", context=ctx)
        sbx.run_code("default_kept = 11")

        server = private_servers.restart(server)
        opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
        again = Sandbox.connect(sbx.sandbox_id, **opts)

        listed = {c.id: c for c in again.list_code_contexts()}
        assert ctx.id in listed and listed[ctx.id].cwd == "/tmp"
        assert again.run_code("kept", context=ctx).text == "across restarts"
        assert again.run_code("default_kept").text == "11"
        sbx = again
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def test_code_interpreter_on_a_killed_sandbox(server_url):
    sbx = Sandbox.create()
    sbx.run_code("1")
    sbx.kill()
    with pytest.raises(TimeoutException) as caught:
        sbx.run_code("1")
    assert "was not found" in str(caught.value)
    with pytest.raises(TimeoutException):
        sbx.create_code_context()
    with pytest.raises(TimeoutException):
        sbx.list_code_contexts()


def test_code_interpreter_needs_python_in_the_image(openrun_bin, private_servers):
    """A template whose image has no python3 (busybox only): the calls fail with a 400 that
    says so, not with a hang or a 500."""
    data = private_servers.data_dir()
    context = os.path.join(data, "build")
    root = os.path.join(context, "rootfs")
    os.makedirs(os.path.join(root, "usr", "bin"))
    os.makedirs(os.path.join(root, "etc"))
    os.makedirs(os.path.join(root, "tmp"))
    shutil.copy("/bin/busybox", os.path.join(root, "usr", "bin", "busybox"))
    for applet in ["sh", "echo", "cat", "ls"]:
        os.symlink("busybox", os.path.join(root, "usr", "bin", applet))
    os.symlink("usr/bin", os.path.join(root, "bin"))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        f.write('FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/bin:/bin\nCMD ["sh"]\n')
    subprocess.run(
        [openrun_bin, "--data-dir", data, "image", "build", "-t", "nopython", context],
        check=True, capture_output=True,
    )
    server = private_servers.start(data=data)
    sbx = Sandbox.create(
        template="nopython", api_key=server.key, api_url=server.url, sandbox_url=server.url
    )
    try:
        with pytest.raises(SandboxException) as caught:
            sbx.run_code("1 + 1")
        assert "400" in str(caught.value) and "python3" in str(caught.value)
        with pytest.raises(SandboxException) as caught:
            sbx.create_code_context()
        assert "python3" in str(caught.value)
        assert sbx.list_code_contexts() == []
    finally:
        try:
            sbx.kill()
        except Exception:
            pass
