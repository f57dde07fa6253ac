"""`openrun up` of one fixture repository per language reaches green tests: the JSON result names
a running sandbox, the check (the plan's test suite) passed, the exit code is 0, and inside the
sandbox the dependencies are really installed. Test ids name the fixture
(`test_language_is_green[rust]`)."""

import os

import pytest

# kind -> (language in the plan, a script run in the workspace that shows the dependencies are
# there without the network: its output must contain the expected text).
LANGUAGES = {
    "rust": (
        "rust",
        # Offline: only what `up` fetched is there.
        "cargo test --locked --offline -q 2>&1 && echo DEPS-OK",
        "DEPS-OK",
    ),
    "python": (
        "python",
        "P=python3; [ -x .venv/bin/python ] && P=.venv/bin/python; "
        "$P -c 'import attr, packaging, pytest; print(\"attrs\", attr.__version__)'",
        "attrs 23.2.0",
    ),
    "python-pyproject": (
        "python",
        "P=python3; [ -x .venv/bin/python ] && P=.venv/bin/python; "
        "$P -c 'import attr, upfixture; print(\"own\", upfixture.answer(), attr.__version__)'",
        "own 42 23.2.0",
    ),
    "node": (
        "node",
        "node -e 'console.log(\"is-number\", require(\"is-number/package.json\").version)'",
        "is-number 7.0.0",
    ),
    "go": (
        "go",
        "GOFLAGS=-mod=vendor GOPROXY=off go test ./... 2>&1 && echo DEPS-OK",
        "DEPS-OK",
    ),
    "java": (
        "java",
        'ls "$HOME/.m2/repository/junit/junit/4.13.2/junit-4.13.2.jar" && mvn -B -o -q test 2>&1 && echo DEPS-OK',
        "DEPS-OK",
    ),
    "ruby": (
        "ruby",
        "bundle exec ruby -e 'require \"minitest\"; puts \"minitest \" + Minitest::VERSION'",
        "minitest 5.15.0",
    ),
    "cpp": (
        "c++",
        "dpkg -s libfmt-dev >/dev/null && ./build/greet_test",
        "ok",
    ),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", list(LANGUAGES))
def test_language_is_green(kind, opened, client, data_dir):
    language, script, expected = LANGUAGES[kind]
    run = opened(kind)
    assert run.code == 0, run.describe()
    out = run.out
    assert out.get("sandbox_id"), run.describe()
    assert language in out["plan"]["languages"], run.describe()
    check = out["check"]
    assert check is not None and check["passed"] is True and check["exit_code"] == 0, run.describe()
    assert check["command"], run.describe()
    assert out["cached"] is False, run.describe()
    assert out["attach"] == f"openrun shell {out['sandbox_id']}"
    assert out["workspace"].endswith("/" + kind), out["workspace"]
    for key in ("total_ms", "ready_ms"):
        assert isinstance(out["timings"][key], int), out["timings"]

    # The sandbox runs, labelled with the repository's name.
    sandbox = client.sandbox(out["sandbox_id"])
    assert sandbox["state"] == "running"
    up_labels = {k: v for k, v in sandbox["labels"].items() if k.startswith("openrun.up")}
    assert kind in up_labels.values(), sandbox["labels"]

    # The recipe (a devcontainer.json a user can commit) is where the result says.
    recipe = out["recipe"]
    assert recipe["key"] and recipe["path"], recipe
    if os.path.isabs(recipe["path"]):
        assert os.path.isfile(recipe["path"]), recipe

    # The dependencies are really there, inside the sandbox.
    code, text = client.exec(out["sandbox_id"], script, workdir=out["workspace"])
    assert code == 0 and expected in text, f"[{kind}] {script}\nexit {code}\n{text[-3000:]}"
