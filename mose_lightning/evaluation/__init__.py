"""Evaluation: benchmark metrics (DriveLM, CODA-LM via the LLM judge, judge-free local metrics), results tables,
plots and the HTML sample report."""
