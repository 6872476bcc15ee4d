"""Token data: the bundled corpus, prepared datasets (`python -m harness.data prepare`), and their loaders."""
