"""`openrun up GIT_URL`: a fixture repository committed to a bare git repository served on
loopback over "smart" HTTP (`git http-backend` as CGI) and over "dumb" HTTP (`git
update-server-info` + Python's http.server, in a thread); the server clones it inside a sandbox
and reaches green tests. Test ids name the transport."""

import pytest


@pytest.fixture(scope="module", params=["smart", "dumb"])
def git_url(request, git_url_for):
    """The Ruby fixture's URL over smart or dumb HTTP."""
    return git_url_for(request.param)


@pytest.mark.timeout(900)
def test_git_url_is_cloned_and_green(client, git_url):
    run = client.up(git_url)
    assert run.code == 0, run.describe()
    out = run.out
    assert "ruby" in out["plan"]["languages"], run.describe()
    assert out["check"]["passed"] is True, run.describe()
    assert out["workspace"].endswith("/ruby-fixture"), out["workspace"]
    code, text = client.exec(out["sandbox_id"], "ls Gemfile Rakefile test/greeter_test.rb", workdir=out["workspace"])
    assert code == 0, text
    client.delete(out["sandbox_id"])


@pytest.mark.timeout(300)
def test_git_url_plan_only(client, git_url):
    """`--plan` on a URL asks the server, which clones, plans and makes no sandbox."""
    before = client.sandbox_ids()
    run = client.up(git_url, "--plan")
    assert run.code == 0, run.describe()
    assert "ruby" in run.out.get("languages", []), run.describe()
    assert client.sandbox_ids() == before
