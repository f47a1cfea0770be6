"""Method families, each a loss on fmtoy.train.fit plus its model and sampler: shortcut and meanflow (chapter 6),
vrfm (chapter 7), guidance (chapter 8), discrete (chapter 11)."""
