import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# The same session corpus as tests/training: a 1 MB corpus, its 1,000-token tokenizer and .bin/.idx.
_spec = importlib.util.spec_from_file_location("training_conftest", os.path.join(os.path.dirname(HERE), "training",
                                                                                  "conftest.py"))
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)
corpus = _training.corpus
