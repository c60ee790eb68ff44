"""Stage 4 (debugging): the failure-mode doctor and error analysis; see 4_debugging/CHECKLIST.md."""
