"""``callbacks`` depends only on the feature contract: no method module, no datamodule internals."""
import subprocess
import sys

ALLOWED = {"ssl_modules", "ssl_modules.contracts", "ssl_modules.distributed", "ssl_modules.backbones",
           "ssl_modules.visualize", "ssl_modules.evaluation", "ssl_modules.evaluation.search",
           "ssl_modules.contrastive_crop",  # the pure attention/box functions of callbacks.ContrastiveCrop
           "ssl_modules.optional_parts",  # agreed failures and isolated randomness of optional parts (torch only)
           # pure torch math: ContrastiveCrop's attention runs in float32 through the functional core's helper
           "ssl_modules.functional", "ssl_modules.functional._checks", "ssl_modules.functional._precision",
           "ssl_modules.functional.bam", "ssl_modules.functional.cribo", "ssl_modules.functional.vicregl",
           "datamodules", "datamodules.views"}


def test_callbacks_import_only_the_feature_contract():
    code = "import sys, callbacks; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ours = {name for name in loaded if name.split(".")[0] in ("ssl_modules", "datamodules")}
    assert ours <= ALLOWED, ours - ALLOWED
