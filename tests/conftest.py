"""The local AWS-API server fixtures (moto on 127.0.0.1) and the native kernel module for every
test; shared data fixtures are in the repository's conftest.py. Every session runs with its own $TMPDIR and fails if a run left
anything of its own (``fsd-*``) in it."""
import os
import shutil
import tempfile
import time

import pytest

pytest_plugins = ["aws_fixtures", "native_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """A fresh $TMPDIR for the session (worker processes inherit it); at the end it must hold no
    ``fsd-*`` store, socket directory or run record."""
    tmp_path_factory.getbasetemp()  # pytest's own directory stays where it was
    private = tempfile.mkdtemp(prefix="fsdtest-")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = private, private
    yield private
    leftovers = []
    for _ in range(20):  # a worker that is being killed may still be removing its own files
        leftovers = sorted(name for name in os.listdir(private) if name.startswith("fsd-"))
        if not leftovers:
            break
        time.sleep(0.1)
    found = {name: sorted(os.path.relpath(os.path.join(d, f), private)
                          for d, _, files in os.walk(os.path.join(private, name)) for f in files)[:5]
             for name in leftovers}
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    shutil.rmtree(private, ignore_errors=True)
    assert not leftovers, f"the test session left files of runs in $TMPDIR: {found}"
