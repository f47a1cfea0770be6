"""Method families, each a loss on fmtoy.train.fit plus its model and sampler: shortcut and meanflow (chapter 6),
vrfm (chapter 7), guidance (chapter 8), reflow and consistency (chapter 10), discrete (chapter 11)."""
