"""The family report: typed records, their collection from manifests, plots, the end-of-build table, the dry run."""
