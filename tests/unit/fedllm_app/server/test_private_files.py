"""The server's outputs (metrics, checkpoints, resume state) and the apps' files are private to their owner."""

import stat

from fedllm_app.config import load_config
from fedllm_app.server.outputs import RunWriter


def test_the_run_folder_is_readable_by_its_owner_only(tmp_path):
    writer = RunWriter(load_config({"overrides": f"output_dir={tmp_path} run_name=private"}))
    assert stat.S_IMODE(writer.dir.stat().st_mode) == 0o700
    writer.close()
