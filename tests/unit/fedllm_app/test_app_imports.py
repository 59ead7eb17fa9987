"""The app modules load without importing transformers/peft/trl.

Flower's simulation process imports the ClientApp while the ServerApp thread imports
peft; transformers' lazy module then failed with "cannot import name 'AutoModel'".
Heavy libraries are imported inside functions instead.
"""

import subprocess
import sys


def test_app_modules_do_not_import_the_hf_stack_at_load_time():
    code = (
        "import sys, fedllm_app.client_app, fedllm_app.server_app; "
        "print(sorted(m for m in ('transformers', 'peft', 'trl', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
