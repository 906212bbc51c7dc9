"""The sparsity study (issue 5): data, training, sweeps, reports.

Submodules: :mod:`iternn.study.data` (datasets, offline by default).
"""
