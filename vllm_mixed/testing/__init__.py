"""Fixtures that the tests and the benchmarks share, importable from the
package: published model configs (``published``), header-true sparse
checkpoints at a real model's shape (``full_shape``) and the independent
float reference on dequantized weights (``reference``, needs transformers)."""
