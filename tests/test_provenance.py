"""The provenance record (`bsim_fast.provenance`): what a run or report says about its code and machine."""

import subprocess

import torch

from bsim_fast import provenance


def test_environment_names_the_commit_the_versions_and_the_world(monkeypatch):
    env = provenance.environment(torch.device("cpu"), world_size=3)
    assert env["world_size"] == 3 and env["device"] and env["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=provenance.REPO)
    if head.returncode == 0:  # a clone: the commit is HEAD's, marked when tracked files differ from it
        assert env["commit"].split("+")[0] == head.stdout.strip()
        assert env["commit"].endswith("+changes") == env["dirty"]
    import torchvision

    assert env["torchvision"] == torchvision.__version__.split("+")[0]  # the wheel's local tag is not in its metadata


def test_a_tree_without_git_takes_the_commit_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a git checkout
    monkeypatch.setenv("BSIM_FAST_COMMIT", "abc1234")
    assert provenance.git_commit() == ("abc1234", None)


def test_package_version_takes_the_first_installed_name():
    import yaml

    assert provenance.package_version("no-such-distribution-xyz", "pyyaml") == yaml.__version__
    assert provenance.package_version("no-such-distribution-xyz") is None
