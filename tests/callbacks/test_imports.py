"""``callbacks`` is a thin front end: it loads the evaluation core of ``ssl_modules.evaluation`` and the feature
contract, but no method (ContrastiveCrop aside, which it re-exports), no protocol of ``evaluate``, no checkpoint
reading and no command line."""
import subprocess
import sys

FORBIDDEN_PREFIXES = ("ssl_modules.cli", "ssl_modules.checkpoints", "ssl_modules.optimization",
                      "ssl_modules.evaluation.api", "ssl_modules.evaluation.linear",
                      "ssl_modules.evaluation.voc_linear", "ssl_modules.evaluation.hummingbird")
ALLOWED_METHODS = {"ssl_modules.methods", "ssl_modules.methods.contrastive_crop",
                   "ssl_modules.methods.contrastive_crop.boxes", "ssl_modules.methods.contrastive_crop.callback"}


def test_callbacks_load_the_evaluation_core_and_no_method_or_protocol():
    code = "import sys, callbacks; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {"ssl_modules.evaluation.features", "ssl_modules.evaluation.knn", "ssl_modules.evaluation.retrieval"} <= set(
        loaded)
    assert [name for name in loaded if name.startswith(FORBIDDEN_PREFIXES)] == []
    methods = {name for name in loaded if name.startswith("ssl_modules.methods")}
    assert methods <= ALLOWED_METHODS, methods - ALLOWED_METHODS
