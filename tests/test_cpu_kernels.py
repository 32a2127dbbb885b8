"""oneDNN CPU kernels: turned on before TensorFlow loads where TensorFlow would leave them off, a user's
own ``TF_ENABLE_ONEDNN_OPTS`` respected, and every run saying which kernels ran."""

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Records TF_ENABLE_ONEDNN_OPTS at the moment TensorFlow's package starts to import: the setting only
# counts if it is in place by then.
PROBE = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" and not seen:
            seen.append(os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
        return None
sys.meta_path.insert(0, Watch())
import unet_model_core as core
from unet_nuclei import devices
print(repr(seen[0]), core.ONEDNN_CHOICE, devices.onednn_enabled())
"""


def probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update({"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **env_changes})
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the choice is made on x86 only")
def test_onednn_is_on_before_tensorflow_loads():
    at_import, chooser, enabled = probe()
    assert at_import == "'1'" and chooser == "project" and enabled == "True"


@pytest.mark.slow
@pytest.mark.parametrize("value, expected", [("0", "False"), ("1", "True")])
def test_a_users_own_setting_wins(value, expected):
    at_import, chooser, enabled = probe(TF_ENABLE_ONEDNN_OPTS=value)
    assert at_import == repr(value) and chooser == "user" and enabled == expected


@pytest.mark.slow
def test_the_run_records_and_shows_the_kernels(quick_run):
    work, run, out = quick_run
    import unet_model_core as core
    from unet_nuclei import devices

    recorded = json.loads((run / "config.json").read_text())["cpu_kernels"]
    assert recorded["chosen_by"] == core.ONEDNN_CHOICE
    assert recorded["onednn"] == devices.onednn_enabled() is not None  # TensorFlow's own answer, recorded
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") in ("0", "1"):  # whoever chose, the setting took effect
        assert recorded["onednn"] == (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")
    assert "oneDNN" in out and "TF_ENABLE_ONEDNN_OPTS" in out
