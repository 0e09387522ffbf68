"""The methods (CrIBo, BAM, VICRegL on ``SSLModule``) and their mechanics: the EMA teacher, multi-crop
encoding, local matching, CrIBo's object bank, BAM's ContrastiveCrop, hyper-parameter range checks."""
