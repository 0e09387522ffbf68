"""Checkpoint files: one reader with the trust rule (``reading``) and the one writer and reader of backbone
exports (``export``: a ``.pt`` with its ``.json``, or a folder ``timm.create_model("local-dir:<folder>")`` loads).

File formats only: nothing here builds a method, so every part of the library reads and writes through it.
The official CrIBo / BAM / VICRegL layouts are ``ssl_modules.methods.official``; what ``evaluate`` accepts as a
model is ``ssl_modules.evaluation.sources``."""
