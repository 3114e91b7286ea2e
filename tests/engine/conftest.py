import os
import sys

# engine_worker.py is imported by name in the spawned ranks.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
