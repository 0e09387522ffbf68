"""Checkpoints: one reader with the trust rule (``reading``), model sources for evaluation (``sources``), the
official CrIBo / BAM / VICRegL layouts in and out (``official``)."""
