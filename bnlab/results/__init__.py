"""Floor 2, beside run: what finished runs say, read only from their record (bnlab.record, bnlab.schema): the
analysis, the console table and CSV, figures, report.md and the TensorBoard dashboard. Imports no torch."""
