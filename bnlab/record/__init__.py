"""Floor 1, beside core: the record of a run, as files a reader can trust: the summary contract, result files
written whole, TensorBoard's hparams, provenance, the console. Imports only bnlab.schema."""
