"""fmtoy: a small PyTorch playground for flow matching on 2D mixtures, with exact ground truth."""
