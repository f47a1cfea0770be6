"""Course tooling: assignments (student and instructor notebooks from the chapters) and grade (the autograder)."""
