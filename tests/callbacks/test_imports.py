"""``callbacks`` depends only on the feature contract: no method module, no datamodule internals."""
import subprocess
import sys

ALLOWED = {"ssl_modules", "ssl_modules.contracts", "ssl_modules.run.distributed", "ssl_modules.networks.backbones",
           "ssl_modules._drawing", "ssl_modules.evaluation", "ssl_modules.evaluation.search",
           # ContrastiveCrop lives with BAM's mechanics; callbacks re-exports it
           "ssl_modules.methods", "ssl_modules.methods.contrastive_crop", "ssl_modules.methods.contrastive_crop.boxes",
           "ssl_modules.methods.contrastive_crop.callback", "ssl_modules.networks", "ssl_modules.run",
           "ssl_modules.run._optional_parts",  # agreed failures and isolated randomness of optional parts (torch only)
           # pure torch math: ContrastiveCrop's attention runs in float32 through the functional core's helper
           "ssl_modules.functional", "ssl_modules.functional._checks", "ssl_modules.functional._precision",
           "ssl_modules.functional.bam", "ssl_modules.functional.cribo", "ssl_modules.functional.vicregl",
           "datamodules", "datamodules.views"}


def test_callbacks_import_only_the_feature_contract():
    code = "import sys, callbacks; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ours = {name for name in loaded if name.split(".")[0] in ("ssl_modules", "datamodules")}
    assert ours <= ALLOWED, ours - ALLOWED
