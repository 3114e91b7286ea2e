"""Data pipeline: MMIDIDX token files, tokenizer loading, corpus readers, GPT samples and blends.

Only the light, numpy-only names are re-exported here; import the tokenizer and readers from their
modules so that `import megatron_bloom.data` never pulls in transformers or datasets.
"""
from megatron_bloom.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)

__all__ = [
    "IndexedDatasetError",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "best_dtype",
    "data_file_path",
    "index_file_path",
]
