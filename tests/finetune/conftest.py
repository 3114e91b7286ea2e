import os
import sys

# finetune_worker.py and finetune_helpers.py are imported by name (also in spawned ranks).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
