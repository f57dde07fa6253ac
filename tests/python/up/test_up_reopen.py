"""Cached re-open: the second `openrun up` of an unchanged repository starts from the recipe's
snapshot (`cached: true`); a changed source file is synced in (and a deleted one is gone) without
leaving the cache; a changed requirements file sets up again. Speed is measured by bench/up, not
asserted here."""

import pytest

KIND = "python"


def read(client, run, path):
    code, text = client.exec(run.out["sandbox_id"], f"cat {path}", workdir=run.out["workspace"])
    return code, text


@pytest.mark.timeout(900)
def test_reopen(client, opened, repo):
    first = opened(KIND)
    assert first.code == 0, first.describe()
    root = repo(KIND)

    # Unchanged: cached, a new sandbox, the check still green.
    second = client.up(root)
    assert second.code == 0, second.describe()
    assert second.out["cached"] is True, second.describe()
    assert second.out["sandbox_id"] != first.out["sandbox_id"]
    assert second.out["check"]["passed"] is True, second.describe()
    assert second.out["recipe"]["key"] == first.out["recipe"]["key"]
    client.delete(second.out["sandbox_id"])

    # A source file changed, one deleted, one added: still cached, the workspace is the new tree.
    (root / "app.py").write_text('GREETING = "v2"\n')
    (root / "notes.txt").unlink()
    (root / "added.txt").write_text("new file\n")
    third = client.up(root)
    assert third.code == 0, third.describe()
    assert third.out["cached"] is True, third.describe()
    assert third.out["check"]["passed"] is True, third.describe()
    code, text = read(client, third, "app.py")
    assert code == 0 and 'GREETING = "v2"' in text, text
    code, text = read(client, third, "added.txt")
    assert code == 0 and "new file" in text, text
    code, text = client.exec(third.out["sandbox_id"], "test ! -e notes.txt && echo GONE", workdir=third.out["workspace"])
    assert code == 0 and "GONE" in text, text
    client.delete(third.out["sandbox_id"])

    # The requirements changed: set up again (not cached), and the new dependency is there.
    (root / "requirements.txt").write_text((root / "requirements.txt").read_text() + "six==1.16.0\n")
    fourth = client.up(root)
    assert fourth.code == 0, fourth.describe()
    assert fourth.out["cached"] is False, fourth.describe()
    assert fourth.out["recipe"]["key"] != first.out["recipe"]["key"]
    assert fourth.out["check"]["passed"] is True, fourth.describe()
    code, text = client.exec(
        fourth.out["sandbox_id"],
        "P=python3; [ -x .venv/bin/python ] && P=.venv/bin/python; $P -c 'import six; print(\"six\", six.__version__)'",
        workdir=fourth.out["workspace"],
    )
    assert code == 0 and "six 1.16.0" in text, text
    client.delete(fourth.out["sandbox_id"])


@pytest.mark.timeout(600)
def test_what_a_directory_sends(client, opened, repo):
    """The tree sent follows the CLI's rules (checked on a cached open, seconds): .gitignore'd
    files stay home, hidden files go, a symlink inside the tree goes as a link, one out of the
    tree is skipped with a warning and never followed."""
    assert opened(KIND).code == 0, opened(KIND).describe()
    root = repo(KIND)
    (root / ".gitignore").write_text("secret.txt\nbuild/\n")
    (root / "secret.txt").write_text("stays home\n")
    (root / "build").mkdir(exist_ok=True)
    (root / "build" / "big.bin").write_bytes(b"\0" * 1024)
    (root / ".hidden").write_text("hidden but sent\n")
    (root / "link-in").symlink_to("app.py")
    (root / "link-out").symlink_to("/etc/hostname")
    try:
        run = client.up(root)
        assert run.code == 0, run.describe()
        assert run.out["cached"] is True, run.describe()
        assert "link-out" in run.stderr, run.describe()  # the warning names the skipped link
        code, text = client.exec(
            run.out["sandbox_id"],
            "test ! -e secret.txt && test ! -e build && cat .hidden && readlink link-in "
            "&& test ! -e link-out && test ! -L link-out && echo RULES-OK",
            workdir=run.out["workspace"],
        )
        assert code == 0 and "hidden but sent" in text and "app.py" in text and "RULES-OK" in text, text
        client.delete(run.out["sandbox_id"])
    finally:
        for name in ("link-in", "link-out"):
            (root / name).unlink(missing_ok=True)
