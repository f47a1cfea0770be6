"""Chapter-only helpers: continuity (chapter 1), checks (Monte-Carlo estimators and bounds of chapters 2 and 5),
objectives (chapter 3's side-by-side losses), rotations (chapter 4's rotated flows)."""
